"""Reliability of the data layer: truncated archives, cache/source consistency, interrupted preparations,
prefetch threads at exit, impossible loader settings, group attributes and the group-balanced sampler.

Every archive is built here in tmp_path; nothing needs ../shared/data.
"""
from __future__ import annotations

import gc
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from kdforge.config import DataConfig
from kdforge.data import BatchLoader, DecodedData, load_split, prepare
from kdforge.data.build import build_loaders, load_splits
from kdforge.registry import DATASETS

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def png(seed: int, size: int = 8) -> bytes:
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
    return encode_png(img).numpy().tobytes()


def tree_files(n_per_class: int = 4, classes=("ant", "bee"), splits=("train", "test"), seed: int = 0) -> dict:
    """{relative path: PNG bytes} of a `<top>/<split>/<class>/<k>.png` tree; pixels depend on `seed`."""
    return {
        f"top/{split}/{c}/{k}.png": png(seed * 1000 + 100 * s + 10 * ci + k)
        for s, split in enumerate(splits) for ci, c in enumerate(classes) for k in range(n_per_class)
    }


def tar_bytes(files: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for rel, data in files.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_offsets(raw: bytes) -> list[int]:
    """Header offsets of every member of an uncompressed tar: the member boundaries."""
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        return [m.offset for m in tf.getmembers()]


def write_dir(files: dict, where: Path) -> Path:
    for rel, data in files.items():
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rel).write_bytes(data)
    return where


def assert_no_cache(root: Path, name: str) -> None:
    base = root / name
    assert not (base / "prepared.json").exists()
    leftovers = [p.name for p in base.iterdir() if p.name != ".prepare.lock"] if base.exists() else []
    assert leftovers == [], leftovers
    with pytest.raises(FileNotFoundError):
        load_split(name, "train", root)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- 1. truncated archives
@pytest.mark.parametrize("kind", ["tar", "tar.gz"])
def test_archive_cut_on_a_member_boundary_fails_and_writes_no_cache(tmp_path: Path, kind: str) -> None:
    """The whole tar stream is valid up to the cut (and the gzip around it is intact), so only the missing
    end-of-archive blocks tell that half of the images are gone."""
    raw = tar_bytes(tree_files(8))
    offsets = member_offsets(raw)
    cut = raw[: offsets[len(offsets) // 2]]
    src = tmp_path / f"half.{kind}"
    src.write_bytes(gzip.compress(cut) if kind == "tar.gz" else cut)
    with pytest.raises(ValueError, match=r"half\.tar(\.gz)?.* truncated"):
        prepare("image_folder", src, tmp_path / "cache")
    assert_no_cache(tmp_path / "cache", "image_folder")


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.77, 0.999])
def test_gzip_stream_cut_anywhere_fails_with_one_clear_error(tmp_path: Path, fraction: float) -> None:
    packed = gzip.compress(tar_bytes(tree_files(8)))
    src = tmp_path / "cut.tar.gz"
    src.write_bytes(packed[: int(len(packed) * fraction)])
    with pytest.raises(ValueError, match=r"cut\.tar\.gz.* (truncated|corrupt)") as err:
        prepare("image_folder", src, tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert_no_cache(tmp_path / "cache", "image_folder")


@pytest.mark.parametrize("where", ["mid_member", "between_end_blocks", "garbage_header"])
def test_plain_tar_damage_is_detected(tmp_path: Path, where: str) -> None:
    raw = tar_bytes(tree_files(8))
    offsets = member_offsets(raw)
    mid = offsets[len(offsets) // 2]
    if where == "mid_member":
        bad = raw[: mid + 512 + 40]  # the header and 40 bytes of a member's data
    elif where == "between_end_blocks":
        end = offsets[-1] + 512 + 512  # last header + its (< 512 byte) data block
        bad = raw[: end + 512]  # only one of the two zero blocks
    else:  # a damaged header mid-archive: tarfile alone stops there as if the archive ended
        bad = raw[:mid] + b"\x7f" * 512 + raw[mid + 512:]
    src = tmp_path / "bad.tar"
    src.write_bytes(bad)
    with pytest.raises(ValueError, match=r"bad\.tar.* (truncated|corrupt)"):
        prepare("image_folder", src, tmp_path / "cache")


def test_gzip_crc_mismatch_is_corrupt(tmp_path: Path) -> None:
    packed = bytearray(gzip.compress(tar_bytes(tree_files(4))))
    packed[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    src = tmp_path / "crc.tar.gz"
    src.write_bytes(bytes(packed))
    with pytest.raises(ValueError, match=r"crc\.tar\.gz.* (truncated|corrupt)"):
        prepare("image_folder", src, tmp_path / "cache")


def test_intact_archives_still_read(tmp_path: Path) -> None:
    raw = tar_bytes(tree_files(4))
    (tmp_path / "ok.tar").write_bytes(raw)
    (tmp_path / "ok.tar.gz").write_bytes(gzip.compress(raw))
    for src in ("ok.tar", "ok.tar.gz"):
        root = tmp_path / src.replace(".", "_")
        prepare("image_folder", tmp_path / src, root)
        assert len(load_split("image_folder", "train", root)) == 8


def test_truncated_cifar_pickle_archive_is_named(tmp_path: Path) -> None:
    import pickle

    files = {"cifar-10-batches-py/batches.meta": pickle.dumps({b"label_names": [b"a"] * 10})}
    for i in range(1, 6):
        files[f"cifar-10-batches-py/data_batch_{i}"] = pickle.dumps(
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    files["cifar-10-batches-py/test_batch"] = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    raw = tar_bytes(files)
    src = tmp_path / "c10.tar.gz"
    src.write_bytes(gzip.compress(raw[: member_offsets(raw)[4]]))
    with pytest.raises(ValueError, match=r"c10\.tar\.gz.* truncated"):
        prepare("cifar10", src, tmp_path / "cache")


# ----------------------------------------------------------------------------- 2. cache vs source
def cfg_for(source: Path | None, root: Path, **kw) -> DataConfig:
    return DataConfig(name="image_folder", source=None if source is None else str(source), root=str(root), **kw)


def test_load_splits_reprepares_when_a_directory_source_changes(tmp_path: Path) -> None:
    src = write_dir(tree_files(3), tmp_path / "src")
    cfg = cfg_for(src, tmp_path / "cache")
    train, _ = load_splits(cfg)
    assert len(train) == 6
    (src / "top/train/ant/99.png").write_bytes(png(99))  # a file added
    train, _ = load_splits(cfg)
    assert len(train) == 7
    (src / "top/train/bee/0.png").unlink()  # and one deleted
    (src / "top/train/bee/1.png").unlink()
    train, _ = load_splits(cfg)
    assert len(train) == 5
    assert prepare("image_folder", src, tmp_path / "cache") == tmp_path / "cache" / "image_folder"  # reused


def test_load_splits_never_uses_a_cache_of_another_source(tmp_path: Path) -> None:
    a = write_dir(tree_files(3, seed=1), tmp_path / "a")
    b = write_dir(tree_files(3, seed=2), tmp_path / "b")
    root = tmp_path / "cache"
    prepare("image_folder", a, root)
    from_a = np.array(load_split("image_folder", "train", root).images)
    train, test = load_splits(cfg_for(b, root))
    want = DATASETS.get("image_folder")(b)
    np.testing.assert_array_equal(train.images, want["train"].images)
    np.testing.assert_array_equal(test.images, want["test"].images)
    assert not np.array_equal(train.images, from_a)
    stamp = json.loads((root / "image_folder" / "prepared.json").read_text())
    assert stamp["fingerprint"]["kind"] == "directory"


def test_file_source_fingerprint_sees_a_changed_file(tmp_path: Path) -> None:
    src = tmp_path / "d.tar"
    src.write_bytes(tar_bytes(tree_files(3, seed=1)))
    root = tmp_path / "cache"
    train, _ = load_splits(cfg_for(src, root))
    assert len(train) == 6
    src.write_bytes(tar_bytes(tree_files(4, seed=1)))
    train, _ = load_splits(cfg_for(src, root))
    assert len(train) == 8
    stamp = json.loads((root / "image_folder" / "prepared.json").read_text())
    assert {"size", "mtime_ns"} <= set(stamp["fingerprint"])


def test_load_splits_uses_the_cache_when_the_source_is_gone(tmp_path: Path) -> None:
    src = write_dir(tree_files(3), tmp_path / "src")
    root = tmp_path / "cache"
    prepare("image_folder", src, root)
    for p in sorted(src.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    src.rmdir()
    train, test = load_splits(cfg_for(src, root))
    assert (len(train), len(test)) == (6, 6)
    train, _ = load_splits(cfg_for(None, root))
    assert len(train) == 6


def test_load_split_refuses_a_split_of_no_committed_preparation(tmp_path: Path) -> None:
    """A split folder that no committed preparation names (an older layout, or a preparation that died
    before it committed) is never loaded."""
    from kdforge.data.synthetic import make_synthetic

    base = tmp_path / "synthetic"
    make_synthetic(8, 4, size=8)["train"].save(base / "train")
    with pytest.raises(FileNotFoundError, match=r"synthetic.*--force") as err:
        load_split("synthetic", "train", tmp_path)
    assert str(base) in str(err.value)


def test_commit_is_all_splits_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_dir(tree_files(3, seed=1), tmp_path / "a")
    b = write_dir(tree_files(3, seed=2), tmp_path / "b")
    root = tmp_path / "cache"
    prepare("image_folder", a, root)
    old = {s: np.array(load_split("image_folder", s, root).images) for s in ("train", "test")}
    real_save, calls = DecodedData.save, []

    def fail_second(self, directory, **kw):
        calls.append(directory)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a Ctrl-C in the middle of writing the second split
        return real_save(self, directory, **kw)

    monkeypatch.setattr(DecodedData, "save", fail_second)
    with pytest.raises(KeyboardInterrupt):
        prepare("image_folder", b, root)
    for s in ("train", "test"):
        np.testing.assert_array_equal(load_split("image_folder", s, root).images, old[s])


KILL_SCRIPT = """
import os, sys
from kdforge.data import DecodedData, prepare
real, calls = DecodedData.save, []
def save(self, directory, **kw):
    calls.append(directory)
    if len(calls) == 2:
        os._exit(9)  # killed: no except, no finally, no cleanup runs
    return real(self, directory, **kw)
DecodedData.save = save
prepare("image_folder", sys.argv[1], sys.argv[2])
"""


def test_kill_mid_prepare_leaves_the_old_complete_cache_and_its_temp_is_cleaned(tmp_path: Path) -> None:
    a = write_dir(tree_files(3, seed=1), tmp_path / "a")
    b = write_dir(tree_files(5, seed=2), tmp_path / "b")
    root = tmp_path / "cache"
    prepare("image_folder", a, root)
    old = {s: np.array(load_split("image_folder", s, root).images) for s in ("train", "test")}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(b), str(root)], cwd=REPO, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    for s in ("train", "test"):  # never a mix: both splits are still the old preparation
        np.testing.assert_array_equal(load_split("image_folder", s, root).images, old[s])
    base = root / "image_folder"
    assert [p for p in base.iterdir() if ".tmp-" in p.name]  # what the killed run left behind
    train, _ = load_splits(cfg_for(b, root))  # the source differs from the cache: prepared again
    assert len(train) == 10
    assert not [p for p in base.iterdir() if ".tmp-" in p.name]
    gens = [p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(gens) == 1  # older generations are removed once the new one is committed


# ----------------------------------------------------------------------------- 3. stale temp folders
def test_prepare_removes_stale_temp_folders_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    base = root / "synthetic"
    dead = dead_pid()
    (base / "test").mkdir(parents=True)  # what the `.test.old-` copy below was replaced by
    stale = [f".train.tmp-{dead}-0a1b2c3d", f".gen-x.tmp-{dead}-deadbeef", f".test.old-{dead}-12345678"]
    live = f".train.tmp-{os.getppid()}-0a1b2c3d"  # a preparation still running elsewhere
    others = [".mine", "notes.tmp", f"train.tmp-{dead}-0a1b2c3d", f".x.tmp-{dead}-nothex!!",
              f".lost.old-{dead}-12345678"]  # an .old- copy whose replacement never arrived: the only copy
    for name in stale + [live] + others:
        (base / name).mkdir(parents=True)
        (base / name / "images.u8").write_bytes(b"\0" * 100)
    prepare("synthetic", None, root, n_train=8, n_test=4, size=8)
    names = {p.name for p in base.iterdir()}
    assert not names & set(stale)
    assert {live, *others} <= names
    assert len(load_split("synthetic", "train", root)) == 8


# ----------------------------------------------------------------------------- 4. prefetch thread
ABORT_SCRIPT = """
import numpy as np
import torch
from kdforge.data import BatchLoader, DecodedData

torch.set_num_threads(1)  # five of these run at once on a small machine
ONE = torch.ones(4)


class BusyLoader(BatchLoader):
    def make_batch(self, idx, batch_idx, epoch=None):
        for _ in range(300):  # many small torch calls, each releasing and retaking the GIL
            ONE.add(1)
        return super().make_batch(idx, batch_idx, epoch)


data = DecodedData(np.zeros((20000, 8, 8, 3), np.uint8), np.arange(20000) % 2, ["a", "b"])
loader = BusyLoader(data, 2, prefetch=100_000)


def fit():
    batches = iter(loader)  # held by the traceback's frame, as a trainer's local would be
    for i, _batch in enumerate(batches):
        if i == 1:
            raise RuntimeError("boom mid-epoch")


fit()
"""


@pytest.mark.slow  # five interpreters importing torch: about 10 s on 2 cores
def test_error_mid_epoch_exits_with_python_error_not_abort() -> None:
    """Before the fix this died with SIGABRT ("terminate called without an active exception", rc 134):
    the prefetch thread was inside a torch op when the interpreter finalised."""
    procs = [subprocess.Popen([sys.executable, "-c", ABORT_SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(5)]
    results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    for rc, err in results:
        assert rc == 1 and "boom mid-epoch" in err and "terminate called" not in err, (rc, err[-1500:])


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kdforge-prefetch" and t.is_alive()]


def test_prefetch_thread_stops_on_close_gc_and_consumer_error() -> None:
    data = DecodedData(np.zeros((400, 8, 8, 3), np.uint8), np.arange(400) % 2, ["a", "b"])
    loader = BatchLoader(data, 2, prefetch=4)
    assert not prefetch_threads()
    it = iter(loader)
    next(it)
    assert prefetch_threads()
    it.close()  # closing the iterator joins the thread: no sleep needed
    assert not prefetch_threads()

    it = loader.iter_from(3)
    next(it)
    del it
    gc.collect()
    assert not prefetch_threads()

    def consume():
        batches = iter(loader)
        for i, _ in enumerate(batches):
            if i == 2:
                raise RuntimeError("consumer broke")

    with pytest.raises(RuntimeError, match="consumer broke"):
        consume()
    gc.collect()
    assert not prefetch_threads()


def test_atexit_hook_stops_live_prefetchers() -> None:
    from kdforge.data import loader as loader_mod

    data = DecodedData(np.zeros((400, 8, 8, 3), np.uint8), np.arange(400) % 2, ["a", "b"])
    it = iter(BatchLoader(data, 2, prefetch=4))
    next(it)
    assert prefetch_threads()
    loader_mod._stop_all_prefetchers()  # what the interpreter runs at exit
    assert not prefetch_threads()
    it.close()


# ----------------------------------------------------------------------------- 5. impossible settings
def small(n: int, classes=("a", "b", "c"), groups=None) -> DecodedData:
    attrs = {} if groups is None else {"group": np.asarray(groups)}
    return DecodedData(np.zeros((n, 4, 4, 3), np.uint8), np.arange(n) % len(classes), list(classes), attrs=attrs,
                       name="tiny")


def test_batch_larger_than_the_dataset_with_drop_last_fails_early() -> None:
    with pytest.raises(ValueError, match=r"'tiny'.*10 samples.*batch_size=16.*drop_last"):
        BatchLoader(small(10), 16, drop_last=True)
    with pytest.raises(ValueError, match=r"10 samples, fewer than a global batch of 3 ranks x batch_size=5"):
        BatchLoader(small(10), 5, drop_last=True, rank=1, world_size=3)
    assert len(BatchLoader(small(10), 16, drop_last=False)) == 1
    assert len(BatchLoader(small(10), 10, drop_last=True)) == 1


def test_build_loaders_names_the_batch_size_fix(tmp_path: Path) -> None:
    src = write_dir(tree_files(3), tmp_path / "src")
    with pytest.raises(ValueError, match=r"6 samples.*batch_size=64.*data\.batch_size"):
        build_loaders(cfg_for(src, tmp_path / "cache", batch_size=64))


def test_one_class_dataset_warns(tmp_path: Path) -> None:
    src = write_dir(tree_files(3, classes=("only",)), tmp_path / "src")
    with pytest.warns(UserWarning, match=r"image_folder.*one class.*100"):
        build_loaders(cfg_for(src, tmp_path / "cache", batch_size=2, crop_pad=0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*one class")
        build_loaders(cfg_for(write_dir(tree_files(3), tmp_path / "two"), tmp_path / "c2", batch_size=2))


# ----------------------------------------------------------------------------- 6. one place for path defaults
def test_cache_and_shared_data_defaults_live_in_kdforge_paths(tmp_path: Path, monkeypatch) -> None:
    import importlib

    from kdforge import config, paths

    prepare_mod = importlib.import_module("kdforge.data.prepare")  # kdforge.data.prepare is also a function

    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("KDFORGE_SHARED_DATA", str(tmp_path / "s"))
    assert paths.default_cache_root() == tmp_path / "c" / "data" == prepare_mod.default_cache_root()
    assert config.expand_path("${KDFORGE_CACHE}/data") == str(paths.default_cache_root())
    assert config.default_shared_data() == paths.default_shared_data() == tmp_path / "s"
    monkeypatch.delenv("KDFORGE_CACHE")
    monkeypatch.delenv("KDFORGE_SHARED_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.default_cache_root() == tmp_path / "home" / ".cache" / "kdforge" / "data"
    assert config.expand_path("${KDFORGE_CACHE}/data") == str(paths.default_cache_root())
    assert config.expand_path(DataConfig().root) == str(prepare_mod.default_cache_root())
    assert paths.default_shared_data() == REPO.parent / "shared" / "data" == config.default_shared_data()
    assert config.expand_path("$KDFORGE_SHARED_DATA/x.tar") == str(REPO.parent / "shared" / "data" / "x.tar")
    monkeypatch.setenv("KDFORGE_CACHE", "")  # set but empty: the default, not "/data"
    assert paths.default_cache_root() == tmp_path / "home" / ".cache" / "kdforge" / "data"
    assert config.expand_path("${KDFORGE_CACHE}/data") == str(paths.default_cache_root())


# ----------------------------------------------------------------------------- 7. groups
def test_num_groups_on_loaders_and_bundle() -> None:
    assert BatchLoader(small(10, groups=[0, 2, 1, 0, 0, 0, 0, 0, 0, 0]), 2).num_groups == 3
    assert BatchLoader(small(10), 2).num_groups is None
    bundle = build_loaders(DataConfig(name="synthetic", synthetic_train=64, synthetic_test=32, synthetic_size=8,
                                      batch_size=16))
    assert bundle.num_groups == 2 and bundle.train.num_groups == 2 and bundle.val.num_groups == 2


# ----------------------------------------------------------------------------- 8. sampler hook
def imbalanced() -> DecodedData:
    """Cells (group, class): (0, 0) x 12, (0, 1) x 3, (1, 0) x 1, (1, 1) x 6; (1, 2) absent, (0, 2) x 2."""
    cells = [(0, 0)] * 12 + [(0, 1)] * 3 + [(1, 0)] * 1 + [(1, 1)] * 6 + [(0, 2)] * 2
    g, y = np.array(cells).T
    return DecodedData(np.arange(len(g) * 48, dtype=np.int64).astype(np.uint8).reshape(len(g), 4, 4, 3), y,
                       ["a", "b", "c"], attrs={"group": g}, name="imb")


def cell_counts(data: DecodedData, idx: torch.Tensor) -> dict:
    out: dict = {}
    for i in idx.tolist():
        key = (int(data.attrs["group"][i]), int(data.labels[i]))
        out[key] = out.get(key, 0) + 1
    return out


def test_group_class_balanced_sampler_balances_cells_per_epoch() -> None:
    from kdforge.data.samplers import GroupClassBalancedSampler

    data = imbalanced()
    loader = BatchLoader(data, 8, sampler=GroupClassBalancedSampler(), seed=3)
    assert len(loader) == -(-5 * 12 // 8)  # 5 cells present, each drawn as often as the largest (12)
    e0 = loader.epoch_indices(0)
    assert cell_counts(data, e0) == {c: 12 for c in [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]}
    big = [i for i in e0.tolist() if data.attrs["group"][i] == 0 and data.labels[i] == 0]
    assert sorted(big) == list(range(12))  # the largest cell: each sample exactly once
    assert not torch.equal(e0, loader.epoch_indices(1))  # another epoch, another draw
    assert torch.equal(e0, BatchLoader(data, 8, sampler=GroupClassBalancedSampler(), seed=3).epoch_indices(0))
    assert not torch.equal(e0, BatchLoader(data, 8, sampler=GroupClassBalancedSampler(), seed=4).epoch_indices(0))
    four = BatchLoader(data, 5, sampler=GroupClassBalancedSampler(per_cell=4), seed=0)
    e = four.epoch_indices(0)
    assert len(e) == 20 and set(cell_counts(data, e).values()) == {4}
    big = [i for i in e.tolist() if data.attrs["group"][i] == 0 and data.labels[i] == 0]
    assert len(set(big)) == 4  # a cell larger than per_cell is subsampled without repeats
    with pytest.raises(ValueError, match="group"):
        BatchLoader(small(10), 2, sampler=GroupClassBalancedSampler()).epoch_indices(0)


def test_balanced_sampler_resumes_mid_epoch_exactly_and_shards() -> None:
    from kdforge.data.samplers import GroupClassBalancedSampler
    from kdforge.data.transforms import BatchAugment

    data = imbalanced()

    def make(**kw):
        return BatchLoader(data, 8, sampler=GroupClassBalancedSampler(), seed=5, augment=BatchAugment(1, True), **kw)

    a, b = make(), make()
    a.set_epoch(1)
    b.set_epoch(1)
    full = list(a)
    assert len(full) == len(a) == 8
    resumed = list(b.iter_from(2))
    assert len(resumed) == len(full) - 2
    for x, y in zip(full[2:], resumed):
        torch.testing.assert_close(x["index"], y["index"])
        torch.testing.assert_close(x["image"], y["image"])
    torch.testing.assert_close(b.get_batch(5)["image"], full[5]["image"])
    torch.testing.assert_close(torch.cat([x["index"] for x in full]), a.epoch_indices())
    shards = [make(rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    order = a.epoch_indices()
    assert len(shards[0]) == len(shards[1]) == 4
    padded = torch.cat([order, order])[:64]  # 60 samples, wrapped to 4 whole global batches of 16
    for i, (b0, b1) in enumerate(zip(shards[0], shards[1])):  # rank r: block r of every global batch
        torch.testing.assert_close(torch.cat([b0["index"], b1["index"]]), padded[16 * i:16 * (i + 1)])


def test_sampler_hook_takes_any_object_with_indices() -> None:
    class FirstTwice:
        def indices(self, data, epoch, generator):
            return torch.tensor([0, 0, 1, 1][: 2 + epoch])

    loader = BatchLoader(small(10), 2, sampler=FirstTwice(), prefetch=0)
    assert len(loader) == 1 and loader.epoch_indices().tolist() == [0, 0]
    loader.set_epoch(2)
    assert len(loader) == 2 and [b["index"].tolist() for b in loader] == [[0, 0], [1, 1]]

    class OutOfRange:
        def indices(self, data, epoch, generator):
            return torch.tensor([0, 10])

    with pytest.raises(ValueError, match=r"sampler.*out of range"):
        BatchLoader(small(10), 2, sampler=OutOfRange()).epoch_indices(0)
