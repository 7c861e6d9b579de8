"""utkface_edges: UTKFace faces paired with kornia edge maps (edges -> face), on a generated copy of the UTKFace
layout, and on a few hundred real faces of ../shared/data where present (skipped with a reason otherwise)."""
from __future__ import annotations

import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge.data import BatchAugment, BatchLoader, DecodedData, load_split, prepare, shared_data_dir
from kdforge.data.formats.utkface import parse_utkface_name
from kdforge.data.protocols import load_protocol
from kdforge.data.protocols.utkface_edges import PairedBatchLoader, edge_maps, split_pairs, utkface_edges

Image = pytest.importorskip("PIL.Image")  # torchvision's dependency; writes the generated layout
ImageDraw = pytest.importorskip("PIL.ImageDraw")
kornia = pytest.importorskip("kornia")

SIZE, N_FACES, TEST = 32, 30, 6
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # batches are x / 255: exact uint8 back with * 255


def _fake_utkface(root: Path, n: int = N_FACES) -> dict[str, np.ndarray]:
    """UTKFace/ with `n` lossless 'faces' (an oval, eyes, a mouth at seeded places, on a textured ground) named
    as the release names them, plus one malformed name; returns {name: pixels}."""
    rng = np.random.default_rng(0)
    (root / "UTKFace").mkdir(parents=True)
    faces = {}
    for k in range(n + 1):
        age, gender, race = int(rng.integers(1, 90)), k % 2, k % 5
        name = (f"{age}_{gender}_{race}_20170101120000{k:03d}.jpg.chip.jpg" if k < n
                else f"{age}_{gender}_2017010112000{k:04d}.jpg.chip.jpg")  # the race field missing
        ground = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8) + np.uint8(rng.integers(0, 120))
        img = Image.fromarray(ground)
        draw = ImageDraw.Draw(img)
        x0, y0 = (int(v) for v in rng.integers(2, 8, 2))
        draw.ellipse((x0, y0, x0 + 20, y0 + 24), fill=tuple(int(v) for v in rng.integers(150, 256, 3)))
        for ex in (x0 + 5, x0 + 12 + int(rng.integers(0, 3))):  # eyes, not quite symmetric
            draw.rectangle((ex, y0 + 8, ex + 2, y0 + 10), fill=(20, 20, 20))
        draw.line((x0 + 6, y0 + 18, x0 + 14, y0 + 17 + int(rng.integers(0, 3))), fill=(120, 0, 0), width=2)
        img.save(root / "UTKFace" / name, format="PNG")
        faces[name] = np.asarray(img)
    return faces


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("utk")
    return root, _fake_utkface(root)


@pytest.fixture(scope="module")
def built(source: tuple[Path, dict]) -> dict:
    with pytest.warns(UserWarning, match=r"skipped 1 malformed"):
        return utkface_edges(source[0], size=SIZE, test_size=TEST, seed=3)


def test_builds_pairs_with_labels_and_record(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, faces = source
    with pytest.warns(UserWarning, match=r"skipped 1 malformed file name\(s\).*UTKFace/\d+_[01]_2017"):
        prepare("utkface_edges", src, tmp_path, size=SIZE, test_size=TEST, seed=3)
    train, test = load_split("utkface_edges", "train", tmp_path), load_split("utkface_edges", "test", tmp_path)
    assert (len(train), len(test)) == (N_FACES - TEST, TEST)
    assert train.images.shape[1:] == (SIZE, 2 * SIZE, 3) and train.classes == ["0-19", "20-39", "40+"]
    record = load_protocol("utkface_edges", "train", tmp_path)
    assert record["options"] == {"size": SIZE, "edges": "canny", "low_threshold": 0.2, "high_threshold": 0.4,
                                 "sobel_threshold": 0.1, "test_size": TEST, "seed": 3}
    assert "columns [0, 32) the edge map" in record["layout"] and len(record["skipped_malformed"]) == 1
    for data, split in ((train, "train"), (test, "test")):
        files = load_protocol("utkface_edges", split, tmp_path)["files"]
        edges, face = split_pairs(np.asarray(data.images))
        assert set(np.unique(edges).tolist()) == {0, 255} and (edges == edges[..., :1]).all()  # grey, 0 / 255
        for i, name in enumerate(files):  # each row is its file: the face as drawn, labels from the name
            age, gender, race = parse_utkface_name(name)
            assert np.array_equal(face[i], faces[name])
            assert (data.labels[i], data.attrs["group"][i], data.attrs["gender"][i]) == (
                0 if age < 20 else 1 if age < 40 else 2, race, gender)
        assert np.array_equal(edges[..., 0], edge_maps(face))  # the edges are those of the stored face


def test_edges_are_deterministic_and_kornias(built: dict, source: tuple[Path, dict]) -> None:
    train = built["train"]
    edges, face = split_pairs(train.images)
    assert np.array_equal(edge_maps(face), edges[..., 0])  # again: the same bytes
    one_by_one = np.concatenate([edge_maps(face[i:i + 1]) for i in range(4)])
    assert np.array_equal(one_by_one, edges[:4, ..., 0])  # a face's map does not depend on its batch
    # the tracked hysteresis is kornia's own (its slow loop)
    grey = kornia.color.rgb_to_grayscale(torch.from_numpy(np.ascontiguousarray(face)).permute(0, 3, 1, 2) / 255.0)
    _, ref = kornia.filters.canny(grey, 0.2, 0.4, hysteresis=True)
    assert np.array_equal(ref[:, 0].numpy() * 255, edges[..., 0])
    density = (edges[..., 0] > 0).mean(axis=(1, 2))
    assert 0.03 < density.mean() < 0.4 and (density > 0).all()
    sobel = edge_maps(face, edges="sobel")
    assert np.array_equal(sobel > 0, (kornia.filters.sobel(grey)[:, 0] > 0.1).numpy())
    assert 0.03 < (sobel > 0).mean() < 0.4 and not np.array_equal(sobel, edges[..., 0])
    with pytest.raises(ValueError, match="edges must be one of canny, sobel"):
        edge_maps(face, edges="laplace")
    with pytest.raises(ValueError, match="low_threshold <= high_threshold"):
        edge_maps(face, low_threshold=0.5, high_threshold=0.4)


def test_split_is_seeded(built: dict, source: tuple[Path, dict]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        again = utkface_edges(source[0], size=SIZE, test_size=TEST, seed=3)
        other = utkface_edges(source[0], size=SIZE, test_size=TEST, seed=4)
    files = {s: built[s].lists["files"] for s in ("train", "test")}
    assert again["test"].lists == built["test"].lists and np.array_equal(again["train"].images, built["train"].images)
    assert not set(files["train"]) & set(files["test"]) and len(set(files["train"]) | set(files["test"])) == N_FACES
    assert other["test"].lists["files"] != files["test"] and len(other["test"]) == TEST
    # a face keeps its edges whatever split it falls in
    rows = {n: img for s in ("train", "test") for n, img in zip(built[s].lists["files"], built[s].images)}
    for s in ("train", "test"):
        for name, img in zip(other[s].lists["files"], other[s].images):
            assert np.array_equal(img, rows[name])
    with pytest.raises(ValueError, match=r"test_size must be in \[1, 29\]"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        utkface_edges(source[0], size=SIZE, test_size=N_FACES)


def test_paired_loader_batches(built: dict) -> None:
    train = built["train"]
    loader = PairedBatchLoader(train, 8, shuffle=False, **UNIT, target_mean=(0.5,) * 3, target_std=(0.5,) * 3)
    batch = next(iter(loader))
    assert set(batch) == {"image", "target", "label", "index", "group", "gender"}
    assert batch["image"].shape == batch["target"].shape == (8, 3, SIZE, SIZE) and loader.image_shape == (3, 32, 32)
    assert batch["image"].dtype == batch["target"].dtype == torch.float32 and batch["label"].dtype == torch.int64
    edges, face = (torch.from_numpy(np.ascontiguousarray(h[:8])).permute(0, 3, 1, 2) for h in split_pairs(train.images))
    assert torch.equal(batch["image"] * 255, edges.float())  # image: the edge map, as stored
    assert torch.allclose(batch["target"], face.float() / 255 * 2 - 1, atol=1e-6)  # target: the face, in [-1, 1]
    last = PairedBatchLoader(train, 8, shuffle=False, channels_last=True, augment=BatchAugment(resize=16), prefetch=0)
    b = last.get_batch(0)
    assert b["image"].shape == b["target"].shape == (8, 3, 16, 16) and last.image_shape == (3, 16, 16)
    assert b["target"].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="odd width"):
        PairedBatchLoader(DecodedData(np.zeros((4, 8, 9, 3), np.uint8), np.zeros(4), ["a"]), 2)


def test_paired_augmentation_keeps_image_and_target_aligned(built: dict) -> None:
    """One crop offset and one flip per sample for both halves: the input is exactly the edge map cropped and
    flipped as the face was (each as a plain BatchLoader on that half alone, same seed, augments it)."""
    train = built["train"]
    edges, face = split_pairs(np.asarray(train.images))
    aug = BatchAugment(crop_pad=4, flip=True)
    paired = PairedBatchLoader(train, 8, augment=aug, seed=7, **UNIT)
    alone = {k: BatchLoader(DecodedData(np.ascontiguousarray(half), train.labels, train.classes), 8, augment=aug,
                            seed=7, **UNIT) for k, half in (("image", edges), ("target", face))}
    flips = []
    for epoch in (0, 1):
        for loader in (paired, *alone.values()):
            loader.set_epoch(epoch)
        for b, (batch, *singles) in enumerate(zip(paired, *alone.values())):
            for key, single in zip(alone, singles):
                assert torch.equal(batch[key], single["image"]) and torch.equal(batch["index"], single["index"])
            # and the edges of the augmented face agree with the augmented edge map: flip-only, so no padding
            # border makes new edges (Canny keeps the left pixel of a tie, so a flip moves a few by one)
            plain = PairedBatchLoader(train, 8, augment=BatchAugment(flip=True), seed=7, **UNIT)
            plain.set_epoch(epoch)
            flipped = plain.get_batch(b)
            target_u8 = (flipped["target"] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            seen = edge_maps(target_u8) > 0
            image = flipped["image"][:, 0].numpy() > 0.5
            stored = edges[flipped["index"].numpy(), ..., 0] > 0
            flips += [not np.array_equal(image[i], stored[i]) for i in range(len(image))]
            for i in range(len(image)):
                agree = (seen[i] & image[i]).sum() / max(1, (seen[i] | image[i]).sum())
                wrong = (seen[i] & image[i][:, ::-1]).sum() / max(1, (seen[i] | image[i][:, ::-1]).sum())
                assert agree > 0.8 and agree > wrong + 0.2, (agree, wrong)
    assert any(flips) and not all(flips)  # both flipped and unflipped samples were checked


def _real_subset(tmp_path: Path, every: int = 64) -> Path:
    """A few hundred real UTKFace files (those whose name's crc32 is a multiple of `every`), copied out of the
    shared archive into tmp_path/UTKFace (the shared folder is read-only and stays untouched)."""
    root = shared_data_dir()
    name = "utkface-aligned-cropped-64px.tar.gz"
    if root is None or not (root / name).exists():
        pytest.skip(f"shared data {name} not found (set KDFORGE_SHARED_DATA or provide ../shared/data)")
    out = tmp_path / "UTKFace"
    out.mkdir()
    with tarfile.open(root / name, "r:gz") as tf:
        for member in tf:
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base.endswith(".chip.jpg") and zlib.crc32(base.encode()) % every == 0:
                (out / base).write_bytes(tf.extractfile(member).read())
    return tmp_path


@pytest.mark.slow
def test_real_faces_edge_density(tmp_path: Path) -> None:
    src = _real_subset(tmp_path)
    n = len(list((src / "UTKFace").iterdir()))
    assert 250 < n < 500
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a malformed name may be among them
        for kind in ("canny", "sobel"):
            out = utkface_edges(src, size=32, edges=kind, test_size=50)
            density = np.concatenate([(split_pairs(d.images)[0][..., 0] > 0).mean(axis=(1, 2)) for d in out.values()])
            assert 0.03 < density.mean() < 0.40, (kind, density.mean())
            assert ((density > 0.01) & (density < 0.5)).mean() > 0.9, kind  # few faces blank or all edges


def test_build_loaders_serves_pairs_from_a_recipe(source: tuple[Path, dict], tmp_path: Path, monkeypatch) -> None:
    from kdforge.config import load_config
    from kdforge.data.build import build_loaders

    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, base={"data": {"name": "utkface_edges", "source": str(source[0]), "batch_size": 4,
                                           "options": {"size": SIZE, "test_size": TEST}}})
    with pytest.warns(UserWarning, match=r"skipped 1 malformed"):
        bundle = build_loaders(cfg.data)
    assert isinstance(bundle.train, PairedBatchLoader) and isinstance(bundle.val, PairedBatchLoader)
    assert bundle.image_shape == (3, SIZE, SIZE)
    batch = next(iter(bundle.train))
    assert batch["image"].shape == batch["target"].shape == (4, 3, SIZE, SIZE)
