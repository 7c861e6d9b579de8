"""`kdforge demo gan` end to end (quick size), and its generated paired data, synthetic_edges: each pair's input is the
edge map of its target, the data is deterministic in its seed, and a recipe with no source prepares and serves it."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kdforge.config import DataConfig, load_config
from kdforge.data.build import build_loaders
from kdforge.data.protocols.synthetic_edges import synthetic_edges
from kdforge.data.protocols.utkface_edges import PairedBatchLoader, edge_maps, split_pairs
from kdforge.data.synthetic import make_synthetic

pytest.importorskip("kornia")

SMALL = {"n_train": 48, "n_test": 24, "size": 32}
HALF = (0.5, 0.5, 0.5)  # the demo's normalisation: images in [-1, 1]


def _data_config(root, **over) -> DataConfig:
    kw = dict(name="synthetic_edges", root=str(root), options=dict(SMALL), batch_size=16, eval_batch_size=24,
              crop_pad=0, flip=False, mean=HALF, std=HALF)
    return DataConfig(**{**kw, **over})


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """A normalised (B, 3, H, W) batch back to the uint8 (B, H, W, 3) images it was made from."""
    unit = x * torch.tensor(HALF).view(1, 3, 1, 1) + torch.tensor(HALF).view(1, 3, 1, 1)
    return (unit * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- synthetic_edges
@pytest.fixture(scope="module")
def built() -> dict:
    return synthetic_edges(**SMALL)


def test_pairs_are_the_shapes_and_their_edges(built):
    shapes = make_synthetic(SMALL["n_train"], SMALL["n_test"], size=32, seed=0, group_bias=0.5)
    for split in ("train", "test"):
        left, right = split_pairs(np.asarray(built[split].images))
        assert built[split].images.shape == (len(shapes[split]), 32, 64, 3)
        np.testing.assert_array_equal(right, shapes[split].images)  # the target is the generated image
        np.testing.assert_array_equal(built[split].labels, shapes[split].labels)  # labelled by its class
        np.testing.assert_array_equal(built[split].attrs["group"], shapes[split].attrs["group"])
        edges = edge_maps(np.ascontiguousarray(right), low_threshold=0.15, high_threshold=0.3)
        for c in range(3):  # grey replicated to 3 channels
            np.testing.assert_array_equal(left[..., c], edges)
        assert set(np.unique(left)) <= {0, 255}
        density = left[..., 0].mean() / 255
        assert 0.02 < density < 0.2, density  # outlines, neither blank nor clutter (7.9 % measured on 2,000)
        assert built[split].protocol["edge_density"] == pytest.approx(density, abs=1e-4)


def test_deterministic_in_seed(built):
    again = synthetic_edges(**SMALL)
    other = synthetic_edges(**SMALL, seed=1)
    for split in ("train", "test"):
        np.testing.assert_array_equal(again[split].images, built[split].images)
        np.testing.assert_array_equal(again[split].labels, built[split].labels)
        assert not np.array_equal(other[split].images, built[split].images)


def test_options_are_checked():
    with pytest.raises(ValueError, match="edges must be one of"):
        synthetic_edges(**SMALL, edges="laplace")
    with pytest.raises(ValueError, match="size must be"):
        synthetic_edges(n_train=4, n_test=4, size=4)


def test_recipe_without_source_prepares_and_serves_pairs(tmp_path):
    """data.source null: the first build prepares the cache from the options, the next reuses it, and the loaders
    are PairedBatchLoaders whose `image` is the edge map of their `target` (recomputed after undoing the
    normalisation)."""
    cfg = _data_config(tmp_path)
    bundle = build_loaders(cfg)
    assert isinstance(bundle.train, PairedBatchLoader) and isinstance(bundle.val, PairedBatchLoader)
    assert bundle.image_shape == (3, 32, 32) and bundle.num_classes == 10
    stamp = json.loads((tmp_path / "synthetic_edges" / "prepared.json").read_text())
    assert stamp["fingerprint"] == {"kind": "none"} and stamp["source"] is None
    assert stamp["options"] == SMALL and stamp["sizes"] == {"train": 48, "test": 24}

    for loader in (bundle.train, bundle.val):
        batch = loader.get_batch(0)
        assert {"image", "target", "label", "index", "group"} <= set(batch)
        assert batch["image"].shape == batch["target"].shape == (len(batch["label"]), 3, 32, 32)
        assert batch["image"].min() >= -1 and batch["target"].max() <= 1
        target, image = _to_uint8(batch["target"]), _to_uint8(batch["image"])
        np.testing.assert_array_equal(image[..., 0], edge_maps(target, low_threshold=0.15, high_threshold=0.3))

    build_loaders(cfg)  # the same options: the committed cache is reused, not prepared again
    assert json.loads((tmp_path / "synthetic_edges" / "prepared.json").read_text())["generation"] == stamp["generation"]
    bigger = build_loaders(_data_config(tmp_path, options={**SMALL, "n_test": 32}))  # other options: prepared again
    assert len(bigger.val.data) == 32


# ---------------------------------------------------------------- the demo
def test_demo_gan_quick(tmp_path, single_thread):
    from kdforge.demo_gan import STUDENTS, run_gan_demo

    out = tmp_path / "gan"
    table = run_gan_demo(out, quick=True, progress=False)
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == ["teacher (pix2pix)", *STUDENTS]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        fid, psnr = float(cells[3]), float(cells[4])
        assert math.isfinite(fid) and fid >= 0 and math.isfinite(psnr)
    student_macs = {r.split(" | ")[2] for r in rows[1:]}
    assert len(student_macs) == 1  # every student is the same network, VEM's too

    report = (out / "report.md").read_text()
    assert table in report and "VEM's training step" in report and "Reading (this run)" in report
    for name in ("features", "teacher", *(run for run, _ in STUDENTS.values())):
        assert (out / name / "report.md").is_file() and (out / name / "checkpoints" / "last.pt").is_file()
    # the distilled runs loaded the demo teacher's checkpoint, and scored with the demo's own FID network
    cfg = load_config(out / "student_vem" / "config.yaml")
    assert cfg.teacher.weights == str(out / "teacher" / "checkpoints" / "last.pt")
    assert cfg.eval.kwargs["features"]["weights"] == str(out / "features" / "checkpoints" / "last.pt")
    assert cfg.data.source is None and cfg.data.root == str(out / "data")
