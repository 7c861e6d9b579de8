"""Out-of-domain transfer sets (kdforge.data.ood): the selection rules against naive loops, the per-teacher
cache, `data.train_select` in recipes, `kdforge prepare ood-subset`, and Tiny-ImageNet as a 32 px pool."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_net
from test_data import encode, smooth_images, write_tree

from kdforge.cli import main
from kdforge.config import ConfigError, load_config
from kdforge.data import BatchLoader, load_split, prepare, shared_data_dir
from kdforge.data.build import build_loaders, select_train
from kdforge.data.ood import (
    balanced_subset,
    entropy_subset,
    pool_fingerprint,
    select_ood_subset,
    teacher_fingerprint,
    teacher_probabilities,
)


def random_probs(n: int, c: int, seed: int, shift: dict[int, float] | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 2
    for cls, by in (shift or {}).items():
        logits[:, cls] += by
    return torch.softmax(logits, dim=1)


def with_ties(probs: torch.Tensor) -> torch.Tensor:
    """Copies of some rows elsewhere (equal entropies and equal p(c|x)), and two exactly uniform rows."""
    probs = probs.clone()
    probs[[7, 30, 31]] = probs[3].clone()
    probs[[12, 50]] = probs[40].clone()
    probs[[5, 60]] = 1.0 / probs.shape[1]
    return probs


# ------------------------------------------------------------------------------------------ rules vs naive loops
def naive_entropy_subset(p: list[list[float]], k: int) -> list[int]:
    h = [-sum(x * math.log(x) for x in row if x > 0) for row in p]
    order = sorted(range(len(p)), key=lambda i: (-h[i], i))
    return sorted(order[:k])


def naive_balanced_subset(p: list[list[float]], per_class: int) -> list[int]:
    n, c = len(p), len(p[0])
    pred = []
    for row in p:
        best = 0
        for j in range(1, c):
            if row[j] > row[best]:  # the first maximum wins ties
                best = j
        pred.append(best)
    chosen: set[int] = set()
    short = []
    for cls in range(c):
        members = sorted((i for i in range(n) if pred[i] == cls), key=lambda i: (-p[i][cls], i))[:per_class]
        chosen.update(members)
        if len(members) < per_class:
            short.append((cls, per_class - len(members)))
    for cls, count in short:
        free = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-p[i][cls], i))
        chosen.update(free[:count])
    return sorted(chosen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_subset_matches_a_naive_loop_with_ties(seed):
    probs = with_ties(random_probs(80, 6, seed))
    rows = probs.double().tolist()
    for k in (1, 5, 17, 40, 80):
        got = entropy_subset(probs, k)
        assert got.dtype == torch.long and got.tolist() == naive_entropy_subset(rows, k)
    # the two uniform rows have the largest entropy possible: both first, then the rest
    assert entropy_subset(probs, 2).tolist() == [5, 60]
    assert entropy_subset(probs, 80).tolist() == list(range(80))


def test_entropy_subset_ties_go_to_the_lower_index():
    probs = torch.full((6, 4), 0.25)
    assert entropy_subset(probs, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_subset_matches_a_naive_loop_with_a_short_class(seed):
    probs = with_ties(random_probs(90, 5, seed, shift={2: -3.0}))  # class 2: few argmax samples
    per_class = 12
    assert int((probs.argmax(1) == 2).sum()) < per_class  # the fallback is exercised
    got = balanced_subset(probs, per_class)
    assert got.tolist() == naive_balanced_subset(probs.double().tolist(), per_class)
    assert len(got) == 5 * per_class and len(set(got.tolist())) == len(got)
    for pc in (1, 3, 18):
        assert balanced_subset(probs, pc).tolist() == naive_balanced_subset(probs.double().tolist(), pc)


def test_balanced_subset_takes_the_most_confident_of_each_class():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8]])
    assert balanced_subset(probs, 2).tolist() == [0, 2, 3, 5]
    # class 1 has 3 argmax samples, class 0 three: with per_class 3 all are kept
    assert balanced_subset(probs, 3).tolist() == list(range(6))


def test_bad_sizes_name_the_numbers():
    probs = random_probs(10, 3, 0)
    with pytest.raises(ValueError, match=r"k=11 is more than the pool's 10 samples"):
        entropy_subset(probs, 11)
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 0"):
        entropy_subset(probs, 0)
    with pytest.raises(ValueError, match=r"per_class=4 x 3 classes = 12 samples is more than the pool's 10"):
        balanced_subset(probs, 4)
    with pytest.raises(ValueError, match="NaN"):
        entropy_subset(torch.full((3, 2), float("nan")), 1)


# ------------------------------------------------------------------------------------------ teacher pass + cache
class Counted(torch.nn.Module):
    """A teacher that counts the images it sees."""

    def __init__(self, seed: int, num_classes: int = 10):
        super().__init__()
        self.net = tiny_net(seed, width=4, num_classes=num_classes)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.net(x)


@pytest.fixture
def pool(tmp_path):
    root = tmp_path / "cache"
    prepare("ood_pool", None, root, format="synthetic", n_train=64, n_test=8, num_classes=3, size=16, seed=7)
    return root


def test_teacher_probabilities_are_in_index_order_and_leave_the_teacher_as_it_was(pool, single_thread):
    data = load_split("ood_pool", "train", pool)
    teacher = Counted(2).train()
    loader = BatchLoader(data, 24, shuffle=False, drop_last=False, prefetch=0)
    probs = teacher_probabilities(teacher, loader)
    assert probs.shape == (64, 10) and torch.allclose(probs.sum(1), torch.ones(64), atol=1e-5)
    assert teacher.training  # its mode is restored
    teacher.eval()
    with torch.no_grad():
        expect = torch.softmax(teacher(loader.get_batch(1)["image"]), 1)
    torch.testing.assert_close(probs[24:48], expect)
    with pytest.raises(ValueError, match="each index"):  # a shuffled, dropping loader misses samples
        teacher_probabilities(teacher, BatchLoader(data, 24, shuffle=True, drop_last=True, prefetch=0))


def test_the_cache_is_reused_for_the_same_teacher_only(pool, single_thread):
    teacher = Counted(2)
    idx = select_ood_subset("ood_pool", teacher, rule="entropy", k=10, root=pool)
    assert teacher.seen == 64 and len(idx) == 10
    data = load_split("ood_pool", "train", pool)
    probs = teacher_probabilities(teacher, BatchLoader(data, 64, shuffle=False, prefetch=0))
    assert idx.tolist() == entropy_subset(probs, 10).tolist()

    teacher.seen = 0
    again = select_ood_subset("ood_pool", teacher, rule="entropy", k=10, root=pool)
    balanced = select_ood_subset("ood_pool", teacher, rule="balanced", per_class=2, root=pool)
    assert teacher.seen == 0  # another rule, another size: the cached probabilities
    assert again.tolist() == idx.tolist() and balanced.tolist() == balanced_subset(probs, 2).tolist()

    other = Counted(3)  # another teacher: its own pass
    select_ood_subset("ood_pool", other, rule="entropy", k=10, root=pool)
    assert other.seen == 64 and teacher_fingerprint(other) != teacher_fingerprint(teacher)
    with torch.no_grad():  # the same teacher object with changed weights is another teacher too
        teacher.net.linear.bias += 1
    select_ood_subset("ood_pool", teacher, rule="entropy", k=10, root=pool)
    assert teacher.seen == 64

    teacher.seen = 0  # another normalisation is another view of the data
    select_ood_subset("ood_pool", teacher, rule="entropy", k=10, root=pool, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert teacher.seen == 64

    record = json.loads((next((pool / "ood_pool" / "ood").glob("*/entropy-k10.json"))).read_text())
    assert {"rule", "k", "teacher_id", "pool_fingerprint", "indices"} <= set(record)
    assert record["pool_fingerprint"] == pool_fingerprint("ood_pool", "train", pool)


def test_a_new_preparation_of_the_pool_is_a_new_cache(pool, single_thread):
    teacher = Counted(2)
    select_ood_subset("ood_pool", teacher, rule="entropy", k=5, root=pool)
    before = pool_fingerprint("ood_pool", "train", pool)
    prepare("ood_pool", None, pool, format="synthetic", n_train=64, n_test=8, num_classes=3, size=16, seed=8)
    assert pool_fingerprint("ood_pool", "train", pool) != before
    teacher.seen = 0
    select_ood_subset("ood_pool", teacher, rule="entropy", k=5, root=pool)
    assert teacher.seen == 64
    assert len(list((pool / "ood_pool" / "ood").iterdir())) == 1  # the stale entry is gone


def test_selection_errors_are_clear(pool):
    teacher = Counted(2)
    with pytest.raises(ConfigError, match=r"unknown rule 'entropi'; did you mean 'entropy'.*one of: entropy"):
        select_ood_subset("ood_pool", teacher, rule="entropi", k=5, root=pool)
    with pytest.raises(ValueError, match=r"k=65 is more than the pool's 64 samples"):
        select_ood_subset("ood_pool", teacher, rule="entropy", k=65, root=pool)
    with pytest.raises(ConfigError, match=r"unknown key 'k' for rule 'balanced'; k goes with rule entropy"):
        select_ood_subset("ood_pool", teacher, rule="balanced", k=5, root=pool)
    with pytest.raises(ConfigError, match="rule 'balanced' needs per_class"):
        select_ood_subset("ood_pool", teacher, rule="balanced", root=pool)
    with pytest.raises(FileNotFoundError, match="kdforge prepare nowhere"):
        select_ood_subset("nowhere", teacher, rule="entropy", k=5, root=pool)
    with pytest.raises(FileNotFoundError, match="did you mean 'train'"):
        select_ood_subset("ood_pool", teacher, rule="entropy", k=5, root=pool, split="trian")


# ------------------------------------------------------------------------------------------ recipes
def _ood_recipe(root: Path, tmp_path: Path, **data) -> dict:
    return {"name": "ood_select", "out_dir": str(tmp_path / "runs"),
            "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "synthetic_size": 16,
                     "train_name": "ood_pool", "root": str(root), "batch_size": 8, "eval_batch_size": 32, **data},
            "student": {"name": "resnet20"}, "teacher": {"name": "resnet20"},
            "method": {"name": "kd", "ce_weight": 0.0, "kd_weight": 1.0},
            "train": {"epochs": 1, "max_steps": 2, "device": "cpu", "progress": False}}


def test_train_select_in_a_recipe(pool, tmp_path, single_thread):
    from kdforge.recipe import run_recipe

    cfg = load_config(None, base=_ood_recipe(pool, tmp_path, train_select={"rule": "entropy", "k": 40}))
    teacher = tiny_net(2, width=4)
    bundle = build_loaders(cfg.data)
    assert len(bundle.train) == 64 // 8  # build_loaders alone: the whole pool
    selected = select_train(bundle, cfg.data, teacher)
    assert selected.train.dataset_size == 40 and len(selected.train) == 40 // 8
    assert selected.val is bundle.val and selected.num_classes == 10
    pool_data = load_split("ood_pool", "train", pool)
    probs = teacher_probabilities(teacher, BatchLoader(pool_data, 64, shuffle=False, prefetch=0))
    keep = entropy_subset(probs, 40).numpy()
    np.testing.assert_array_equal(selected.train.data.images, pool_data.images[keep])

    cfg.data.train_subset = 16  # select first, then a subset of the selection
    sub = select_train(build_loaders(cfg.data), cfg.data, teacher)
    assert sub.train.dataset_size == 16 and len(sub.train) == 2
    chosen = {pool_data.images[i].tobytes() for i in keep}
    assert all(img.tobytes() in chosen for img in sub.train.data.images)

    result = run_recipe(load_config(None, base=_ood_recipe(pool, tmp_path, train_select={"rule": "balanced",
                                                                                        "per_class": 2})),
                        eval_teacher=False)
    assert "top1" in result.metrics
    assert list((pool / "ood_pool" / "ood").glob("*/balanced-per_class2.json"))  # the run's selection, saved
    saved = load_config(tmp_path / "runs" / "ood_select" / "config.yaml")
    assert saved.data.train_select == {"rule": "balanced", "per_class": 2}


def test_train_select_on_generated_data_without_a_cache(tmp_path, single_thread):
    cfg = load_config(None, base={"data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 16,
                                           "synthetic_size": 16, "batch_size": 4,
                                           "train_select": {"rule": "balanced", "per_class": 3}}})
    bundle = select_train(build_loaders(cfg.data), cfg.data, tiny_net(2, width=4))
    assert bundle.train.dataset_size == 30 and len(bundle.train) == 30 // 4


def test_train_select_config_errors(tmp_path):
    base = _ood_recipe(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=r"data.train_select.rule: unknown rule 'entropi'.*entropy \(with k\), "
                                          r"balanced \(with per_class\)"):
        load_config(None, base={**base, "data": {**base["data"], "train_select": {"rule": "entropi", "k": 5}}})
    with pytest.raises(ConfigError, match=r"rule 'entropy' needs k"):
        load_config(None, base=base, overrides=["data.train_select={rule: entropy}"])
    with pytest.raises(ConfigError, match=r"unknown key 'per_clas' for rule 'balanced'; did you mean 'per_class'"):
        load_config(None, base=base, overrides=["data.train_select={rule: balanced, per_clas: 3}"])
    with pytest.raises(ConfigError, match=r"data.train_select.k must be an integer >= 1, got 0"):
        load_config(None, base=base, overrides=["data.train_select={rule: entropy, k: 0}"])
    from kdforge.recipe import run_recipe

    cfg = load_config(None, base=base, overrides=["data.train_select={rule: entropy, k: 5}", "method.name=scratch"])
    with pytest.raises(ConfigError, match="the teacher chooses the training samples"):
        run_recipe(cfg)
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made


def test_k_larger_than_the_pool_in_a_recipe(pool, tmp_path, single_thread):
    cfg = load_config(None, base=_ood_recipe(pool, tmp_path, train_select={"rule": "entropy", "k": 100}))
    with pytest.raises(ValueError, match=r"k=100 is more than the pool's 64 samples"):
        select_train(build_loaders(cfg.data), cfg.data, tiny_net(2, width=4))


# ------------------------------------------------------------------------------------------ the CLI verb
def test_cli_prepare_ood_subset(pool, tmp_path, capsys, single_thread):
    from kdforge.models import build_model

    weights = tmp_path / "teacher.pt"
    teacher = build_model("resnet20")
    torch.save(teacher.state_dict(), weights)
    args = ["prepare", "ood-subset", "--pool", "ood_pool", "--teacher", "resnet20", "--teacher-weights",
            str(weights), "--root", str(pool), "--device", "cpu"]
    assert main([*args, "--rule", "entropy", "--k", "12"]) == 0
    out = capsys.readouterr().out
    assert "selected 12 samples of ood_pool (train)" in out
    path = next((pool / "ood_pool" / "ood").glob("*/entropy-k12.json"))
    record = json.loads(path.read_text())
    assert record["teacher_id"] == teacher_fingerprint(teacher) and len(record["indices"]) == 12
    assert main([*args, "--rule", "balanced", "--per-class", "3"]) == 0
    assert "reusing teacher probabilities" in capsys.readouterr().out

    assert main([*args, "--rule", "entropi", "--k", "12"]) == 2
    assert "unknown rule 'entropi'; did you mean 'entropy'" in capsys.readouterr().err
    assert main([*args, "--rule", "entropy", "--k", "1000"]) == 2
    assert "k=1000 is more than the pool's 64 samples" in capsys.readouterr().err
    assert main(["prepare", "ood-subset", "--pool", "ood_pool", "--rule", "entropy", "--k", "3"]) == 2
    assert "needs --teacher, --teacher-weights" in capsys.readouterr().err
    assert main(["prepare", "cifar10", "--root", str(pool)]) == 2  # a dataset still needs its source
    assert "needs --source" in capsys.readouterr().err
    assert main(["prepare", "cifar10", "--source", str(tmp_path), "--k", "3"]) == 2
    assert "--k belong to `kdforge prepare ood-subset`" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ Tiny-ImageNet as a pool
def test_tiny_imagenet_val_resized_serves_as_a_train_pool(tmp_path, single_thread):
    """The shared copy has only the val split: prepared at 32 px (option size) it is the train data of a
    train_name recipe with train_split: val (here 64 px JPEGs resized to 16 px, CIFAR-like test images)."""
    wnids = ["n01", "n02", "n03"]
    imgs = smooth_images(12, 64, 64, seed=3)
    files = {"tiny-imagenet-200/wnids.txt": ("\n".join(wnids) + "\n").encode(),
             "tiny-imagenet-200/val/val_annotations.txt": "".join(
                 f"val_{i}.JPEG\t{wnids[i % 3]}\t0\t0\t1\t1\n" for i in range(12)).encode()}
    for i in range(12):
        files[f"tiny-imagenet-200/val/images/val_{i}.JPEG"] = encode(imgs[i], "jpg")
    src = write_tree(files, tmp_path / "tiny", "tar.gz")
    root = tmp_path / "cache"
    base = {"data": {"name": "synthetic", "synthetic_train": 16, "synthetic_test": 16, "synthetic_size": 16,
                     "train_name": "tiny_imagenet", "train_source": str(src), "train_options": {"size": 16},
                     "train_split": "val", "root": str(root), "batch_size": 4,
                     "train_select": {"rule": "entropy", "k": 8}}}
    cfg = load_config(None, base=base)
    bundle = build_loaders(cfg.data)  # prepares the pool at 16 px on first use
    assert bundle.train.data.image_size == (16, 16) and bundle.train.dataset_size == 12
    selected = select_train(bundle, cfg.data, tiny_net(2, width=4))
    assert selected.train.dataset_size == 8 and len(selected.train) == 2


@pytest.mark.slow
def test_real_tiny_imagenet_at_32px(tmp_path):
    root = shared_data_dir()
    src = None if root is None else root / "tiny-imagenet-200-val.tar.gz"
    if src is None or not src.exists():
        pytest.skip("shared tiny-imagenet-200-val.tar.gz not found (set KDFORGE_SHARED_DATA or provide ../shared/data)")
    prepare("tiny_imagenet", src, tmp_path, size=32)
    val = load_split("tiny_imagenet", "val", tmp_path)
    assert val.images.shape[1:] == (32, 32, 3) and len(val) >= 10000
