"""kdforge.data: public formats -> decoded cache -> per-sample-augmented batch loader.

Every format is tested on tiny files written here (tmp_path), in the layout of the official release; the
real shared data is used by two tests that skip when it is absent.
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png, read_image

import kdforge.data.formats.image_folder as image_folder_mod
from kdforge.data import (
    BatchAugment,
    BatchLoader,
    DecodedData,
    load_split,
    make_grid_image,
    make_synthetic,
    normalize,
    prepare,
    random_crop_flip,
    resize,
)
from kdforge.data.formats import read_cifar_pickle, read_image_folder, read_tiny_imagenet
from kdforge.data.prepare import shared_data_dir
from kdforge.registry import DATASETS, RegistryError

# torchvision 0.29 deprecates its codecs in favour of TorchCodec; they are still what the formats use.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


# ----------------------------------------------------------------------------- helpers
def smooth_images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    """Random but smooth uint8 (n, h, w, 3) images: JPEG keeps them close, PNG exact."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 3, 3, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=True)
    return (x * 200 + 28).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def encode(img_hwc: np.ndarray, ext: str) -> bytes:
    chw = torch.from_numpy(np.ascontiguousarray(img_hwc.transpose(2, 0, 1)))
    data = encode_png(chw) if ext == "png" else encode_jpeg(chw, quality=95)
    return data.numpy().tobytes()


def write_tree(files: dict[str, bytes], where: Path, kind: str) -> Path:
    """Write {relative path: bytes} as a directory, a .tar or a .tar.gz at `where` (+ suffix)."""
    if kind == "dir":
        for rel, data in files.items():
            (where / rel).parent.mkdir(parents=True, exist_ok=True)
            (where / rel).write_bytes(data)
        return where
    path = where.with_name(where.name + (".tar" if kind == "tar" else ".tar.gz"))
    with tarfile.open(path, "w" if kind == "tar" else "w:gz") as tf:
        for rel, data in reversed(list(files.items())):  # archive order must not matter
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def folder_files(ext: str = "png", top: str = "mydata", splits=("train", "test"), size: int = 8) -> tuple:
    """An image tree with 3 classes; returns files and the expected {split: (images, labels)}."""
    classes = ["cat", "ant", "bee"]  # sorted: ant, bee, cat
    files, expect = {}, {}
    for s, split in enumerate(splits):
        imgs, labels = [], []
        for c in sorted(classes):
            block = smooth_images(3, size, size, seed=10 * s + classes.index(c))
            for k in (2, 10, 1):  # natural order within a class: 1, 2, 10
                prefix = f"{top}/{split}" if split else top
                files[f"{prefix}/{c}/{k}.{ext}"] = encode(block[[2, 10, 1].index(k)], ext)
            imgs.extend(block[[2, 0, 1]])  # order of k = 1, 2, 10
            labels.extend([sorted(classes).index(c)] * 3)
        expect[split or "all"] = (np.stack(imgs), np.array(labels))
    return files, expect


def cifar10_files(n_per_batch: int = 6, top: str = "cifar-10-batches-py") -> tuple:
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    imgs = smooth_images(6 * n_per_batch, 32, 32, seed=3)
    labels = np.arange(len(imgs)) % 10
    files = {f"{top}/batches.meta": pickle.dumps({b"label_names": [n.encode() for n in names]})}
    for b, fname in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        sl = slice(b * n_per_batch, (b + 1) * n_per_batch)
        rows = imgs[sl].transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)  # 1024 R, 1024 G, 1024 B
        files[f"{top}/{fname}"] = pickle.dumps({b"data": rows, b"labels": labels[sl].tolist()})
    return files, imgs, labels


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("kind", ["dir", "tar.gz"])
def test_cifar10_pickles_decode_exactly(tmp_path: Path, kind: str) -> None:
    files, imgs, labels = cifar10_files()
    out = read_cifar_pickle(write_tree(files, tmp_path / "c10", kind))
    assert sorted(out) == ["test", "train"]
    np.testing.assert_array_equal(out["train"].images, imgs[:30])
    np.testing.assert_array_equal(out["test"].images, imgs[30:])
    np.testing.assert_array_equal(out["train"].labels, labels[:30])
    assert out["train"].classes[:3] == ["airplane", "automobile", "bird"]


def test_cifar10_missing_batches_are_named(tmp_path: Path) -> None:
    files, _, _ = cifar10_files()
    del files["cifar-10-batches-py/data_batch_3"], files["cifar-10-batches-py/data_batch_5"]
    with pytest.raises(FileNotFoundError, match="data_batch_3, data_batch_5"):
        read_cifar_pickle(write_tree(files, tmp_path / "c10", "dir"))


@pytest.mark.parametrize("kind", ["dir", "tar.gz"])
def test_cifar100_pickles_fine_labels_and_coarse_attr(tmp_path: Path, kind: str) -> None:
    imgs = smooth_images(8, 32, 32, seed=5)
    fine, coarse = np.arange(8) * 7 % 100, np.arange(8) % 20
    rows = imgs.transpose(0, 3, 1, 2).reshape(8, 3072)
    names = [f"class{i:02d}".encode() for i in range(100)]
    files = {
        "cifar-100-python/meta": pickle.dumps({b"fine_label_names": names, b"coarse_label_names": names[:9]}),
        "cifar-100-python/train": pickle.dumps(
            {b"data": rows[:5], b"fine_labels": fine[:5].tolist(), b"coarse_labels": coarse[:5].tolist()}
        ),
        "cifar-100-python/test": pickle.dumps(
            {b"data": rows[5:], b"fine_labels": fine[5:].tolist(), b"coarse_labels": coarse[5:].tolist()}
        ),
    }
    out = DATASETS.get("cifar100")(write_tree(files, tmp_path / "c100", kind))
    np.testing.assert_array_equal(out["train"].images, imgs[:5])
    np.testing.assert_array_equal(out["test"].labels, fine[5:])
    np.testing.assert_array_equal(out["test"].attrs["coarse_label"], coarse[5:])
    assert out["train"].classes[7] == "class07" and len(out["train"].classes) == 100


def test_cifar_pickle_refuses_code(tmp_path: Path) -> None:
    """A pickle that would build an arbitrary object (here an OrderedDict) is rejected, not executed."""
    from collections import OrderedDict

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": OrderedDict(), b"labels": []}))
    with pytest.raises(ValueError, match="collections.OrderedDict"):
        read_cifar_pickle(tmp_path)


@pytest.mark.parametrize("kind", ["dir", "tar", "tar.gz"])
def test_image_folder_png_exact_with_splits(tmp_path: Path, kind: str) -> None:
    files, expect = folder_files("png")
    out = read_image_folder(write_tree(files, tmp_path / "tree", kind))
    assert sorted(out) == ["test", "train"]
    for split, (imgs, labels) in expect.items():
        assert out[split].classes == ["ant", "bee", "cat"]
        np.testing.assert_array_equal(out[split].labels, labels)
        np.testing.assert_array_equal(out[split].images, imgs)


def test_image_folder_jpeg_close_and_no_split_level(tmp_path: Path) -> None:
    files, expect = folder_files("jpg", top="flowers", splits=(None,), size=16)
    out = DATASETS.get("image_folder")(write_tree(files, tmp_path / "tree", "tar.gz"))
    assert list(out) == ["all"]
    imgs, labels = expect["all"]
    np.testing.assert_array_equal(out["all"].labels, labels)
    err = np.abs(out["all"].images.astype(int) - imgs.astype(int))
    assert err.mean() < 3 and err.max() < 40  # lossy, but the same picture


def test_image_folder_resizes_odd_sized_images(tmp_path: Path) -> None:
    big = smooth_images(1, 16, 16, seed=9)[0]
    files = {"t/train/a/0.png": encode(smooth_images(1)[0], "png"), "t/train/a/1.png": encode(big, "png")}
    out = read_image_folder(write_tree(files, tmp_path / "tree", "dir"))["train"]
    assert out.images.shape == (2, 8, 8, 3)
    want = resize(torch.from_numpy(big).permute(2, 0, 1)[None], 8)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(out.images[1], want)


@pytest.mark.parametrize("kind", ["dir", "tar.gz"])
def test_corrupt_jpeg_error_names_the_file(tmp_path: Path, kind: str) -> None:
    files, _ = folder_files("jpg")
    files["mydata/train/bee/10.jpg"] = files["mydata/train/bee/10.jpg"][:40]  # truncated
    with pytest.raises(ValueError, match="mydata/train/bee/10.jpg"):
        read_image_folder(write_tree(files, tmp_path / "tree", kind))


def test_missing_source_error_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.tar.gz"
    with pytest.raises(FileNotFoundError, match="nowhere.tar.gz"):
        prepare("cifar10", missing, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_image_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no dataset source given"):
        prepare("tiny_imagenet", None, tmp_path / "cache")


def test_tiny_imagenet_val_labels_follow_wnids_order(tmp_path: Path) -> None:
    wnids = ["n09", "n01", "n05"]  # not sorted: wnids.txt order is the class order
    imgs = smooth_images(5, 64, 64, seed=4)
    ann = ["n05", "n09", "n01", "n05", "n09"]
    files = {
        "tiny-imagenet-200/wnids.txt": ("\n".join(wnids) + "\n").encode(),
        "tiny-imagenet-200/words.txt": b"n09\tnine\nn01\tone\nn05\tfive\n",
        "tiny-imagenet-200/val/val_annotations.txt": "".join(
            f"val_{i}.JPEG\t{w}\t0\t0\t10\t10\n" for i, w in enumerate(ann)
        ).encode(),
    }
    for i in (10, 2, 0, 1, 3, 4):  # val_10 is an extra image of class n01
        files[f"tiny-imagenet-200/val/images/val_{i}.JPEG"] = encode(imgs[i % 5], "jpg")
    files["tiny-imagenet-200/val/val_annotations.txt"] += b"val_10.JPEG\tn01\t0\t0\t1\t1\n"
    out = read_tiny_imagenet(write_tree(files, tmp_path / "tiny", "tar.gz"))
    assert list(out) == ["val"] and out["val"].classes == wnids
    np.testing.assert_array_equal(out["val"].labels, [2, 0, 1, 2, 0, 1])  # val_0..val_4, val_10
    assert np.abs(out["val"].images[:5].astype(int) - imgs.astype(int)).mean() < 3


# ----------------------------------------------------------------------------- cache + prepare
def small_data(n: int = 20, seed: int = 0) -> DecodedData:
    rng = np.random.default_rng(seed)
    return DecodedData(
        images=rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8),
        labels=np.arange(n) % 4,
        classes=["a", "b", "c", "d"],
        attrs={"group": rng.integers(0, 2, n)},
        name="small",
    )


def test_cache_round_trip_is_exact_and_memmapped(tmp_path: Path) -> None:
    data = small_data()
    data.save(tmp_path / "split")
    t0 = time.perf_counter()
    back = DecodedData.load(tmp_path / "split")
    assert time.perf_counter() - t0 < 1.0
    assert isinstance(back.images, np.memmap)
    np.testing.assert_array_equal(back.images, data.images)
    np.testing.assert_array_equal(back.labels, data.labels)
    np.testing.assert_array_equal(back.attrs["group"], data.attrs["group"])
    assert back.classes == data.classes and back.name == "small"
    files = sorted(os.listdir(tmp_path / "split"))
    assert files == ["attrs_group.npy", "images.u8", "labels.npy", "meta.json"]


def test_cache_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        small_data().save(tmp_path / "split")
    assert os.listdir(tmp_path) == []  # neither the target nor a temp dir is left
    monkeypatch.undo()
    small_data(seed=1).save(tmp_path / "split")
    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(OSError):
        small_data(seed=2).save(tmp_path / "split")  # a failed overwrite keeps the old cache
    assert os.listdir(tmp_path) == ["split"]
    np.testing.assert_array_equal(DecodedData.load(tmp_path / "split").images, small_data(seed=1).images)


def test_prepare_reuses_cache_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, expect = folder_files("png")
    src = write_tree(files, tmp_path / "tree", "tar")
    root = tmp_path / "cache"
    assert prepare("pets", src, root, format="image_folder") == root / "pets"
    train = load_split("pets", "train", root)
    np.testing.assert_array_equal(train.images, expect["train"][0])

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_folder_mod, "decode_stream", no_decoding)
    prepare("pets", src, root, format="image_folder")  # reused: no decoding
    with pytest.raises(AssertionError, match="decoded again"):
        prepare("pets", src, root, format="image_folder", force=True)
    with pytest.raises(AssertionError, match="decoded again"):  # other options: another cache
        prepare("pets", src, root, format="image_folder", size=4)


def test_load_split_errors_tell_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar10.*train.*kdforge prepare cifar10 --source"):
        load_split("cifar10", "train", tmp_path)
    prepare("synthetic", None, tmp_path, n_train=20, n_test=10)
    with pytest.raises(FileNotFoundError, match="did you mean 'test'"):
        load_split("synthetic", "tset", tmp_path)
    with pytest.raises(RegistryError, match="did you mean 'cifar10'"):
        prepare("cifar11", tmp_path, tmp_path)


# ----------------------------------------------------------------------------- transforms
def test_random_crop_flip_differs_within_one_batch() -> None:
    img = torch.from_numpy(smooth_images(1, 32, 32)[0])
    batch = img.expand(64, 32, 32, 3).contiguous()
    out = random_crop_flip(batch, 4, True, torch.Generator().manual_seed(0))
    distinct = {out[i].numpy().tobytes() for i in range(64)}
    assert len(distinct) > 20  # one shared draw would give 1


def test_random_crop_matches_naive_slice_and_flip() -> None:
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 7, 9, 3), dtype=np.uint8))
    pad = 3
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = random_crop_flip(x, pad, True, g1)
    oy = torch.randint(0, 2 * pad + 1, (16,), generator=g2)  # the same draws, in the documented order
    ox = torch.randint(0, 2 * pad + 1, (16,), generator=g2)
    flipped = torch.rand(16, generator=g2) < 0.5
    padded = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
    for i in range(16):
        want = padded[i, oy[i]:oy[i] + 7, ox[i]:ox[i] + 9]
        torch.testing.assert_close(out[i], want.flip(1) if flipped[i] else want)
    assert 0 < int(flipped.sum()) < 16
    g3 = torch.Generator().manual_seed(5)
    nchw = random_crop_flip(x.permute(0, 3, 1, 2), pad, True, g3, channels_last=False)
    torch.testing.assert_close(nchw, out.permute(0, 3, 1, 2))


def test_flip_only_gives_original_or_mirror() -> None:
    x = torch.from_numpy(smooth_images(32, 8, 8, seed=1))
    out = random_crop_flip(x, 0, True, torch.Generator().manual_seed(1))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(2)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()


def test_normalize_resize_and_augment_flags() -> None:
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    want = (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(normalize(x, mean, std), want)
    nhwc = normalize(x.permute(0, 2, 3, 1), mean, std, channels_last=True)
    torch.testing.assert_close(nhwc, want.permute(0, 2, 3, 1))
    assert resize(x, 8).shape == (2, 3, 8, 8) and resize(x, 8).dtype == torch.uint8
    assert not BatchAugment().is_random and not BatchAugment(resize=64).is_random
    assert BatchAugment(crop_pad=4).is_random and BatchAugment(flip=True).is_random


# ----------------------------------------------------------------------------- loader
def test_loader_batches_without_augmentation_are_exact() -> None:
    data = small_data(23)
    loader = BatchLoader(data, 5, shuffle=True, mean=(0.5,) * 3, std=(0.25,) * 3, seed=1)
    assert loader.deterministic and len(loader) == 5 and loader.num_classes == 4 and loader.dataset_size == 23
    seen = []
    for batch in loader:
        idx = batch["index"].numpy()
        want = normalize(torch.from_numpy(data.images[idx]).permute(0, 3, 1, 2), (0.5,) * 3, (0.25,) * 3)
        torch.testing.assert_close(batch["image"], want)
        np.testing.assert_array_equal(batch["label"].numpy(), data.labels[idx])
        np.testing.assert_array_equal(batch["group"].numpy(), data.attrs["group"][idx])  # attrs carried
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(23)) and seen != list(range(23))
    assert len(BatchLoader(data, 5, drop_last=True)) == 4


def test_loader_is_reproducible_per_batch_and_resumes_exactly() -> None:
    same = np.repeat(smooth_images(1, 16, 16), 40, 0)
    data = DecodedData(same, np.zeros(40), ["x"], attrs={"group": np.arange(40)})
    aug = BatchAugment(crop_pad=4, flip=True)
    a, b = BatchLoader(data, 8, augment=aug, seed=3), BatchLoader(data, 8, augment=aug, seed=3)
    assert not a.deterministic
    a.set_epoch(2)
    b.set_epoch(2)
    full = list(a)
    again = list(b)
    for x, y in zip(full, again):
        torch.testing.assert_close(x["image"], y["image"])
        torch.testing.assert_close(x["index"], y["index"])
    resumed = list(b.iter_from(3))
    assert len(resumed) == 2
    for x, y in zip(full[3:], resumed):
        torch.testing.assert_close(x["image"], y["image"])
        torch.testing.assert_close(x["group"], y["group"])
    torch.testing.assert_close(b.get_batch(4)["image"], full[4]["image"])
    # per-sample augmentation: identical source images come out differently within a batch
    assert len({full[0]["image"][i].numpy().tobytes() for i in range(8)}) > 1
    b.set_epoch(3)
    assert not torch.equal(next(iter(b))["index"], full[0]["index"])  # another epoch, another order


def test_loader_shards_by_rank_and_surfaces_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    data = small_data(10)
    shards = [torch.cat([bt["index"] for bt in BatchLoader(data, 2, rank=r, world_size=3)]) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # 10 padded to 12 by wrapping
    assert set(torch.cat(shards).tolist()) == set(range(10))
    loader = BatchLoader(data, 2)
    real = loader.make_batch

    def fail_on_third(idx, batch_idx, epoch=None):
        if batch_idx == 2:
            raise RuntimeError("batch 2 broke")
        return real(idx, batch_idx, epoch)

    for i, _ in enumerate(loader):  # leaving early stops the prefetch thread
        if i == 1:
            break
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "kdforge-prefetch"]
    monkeypatch.setattr(loader, "make_batch", fail_on_third)
    it = iter(loader)
    next(it), next(it)
    with pytest.raises(RuntimeError, match="batch 2 broke"):
        next(it)


# ----------------------------------------------------------------------------- synthetic + grid
def test_synthetic_is_deterministic_balanced_and_grouped() -> None:
    a = make_synthetic(200, 50, num_classes=10, size=16, seed=7)
    b = make_synthetic(200, 50, num_classes=10, size=16, seed=7)
    c = make_synthetic(200, 50, num_classes=10, size=16, seed=8)
    np.testing.assert_array_equal(a["train"].images, b["train"].images)
    np.testing.assert_array_equal(a["test"].attrs["group"], b["test"].attrs["group"])
    assert not np.array_equal(a["train"].images, c["train"].images)
    assert a["train"].class_counts().tolist() == [20] * 10 and a["test"].class_counts().tolist() == [5] * 10
    g, y = a["train"].attrs["group"], a["train"].labels
    assert set(np.unique(g)) == {0, 1} and g[y >= 5].mean() > g[y < 5].mean() + 0.3  # CIFAR-10S-style bias
    grey = a["train"].images[g == 1].astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (a["train"].images[g == 0].std(-1) > 0).any()
    assert a["train"].images.shape == (200, 16, 16, 3) and a["train"].images.std() > 20


def test_make_grid_image_unnormalises(tmp_path: Path) -> None:
    imgs = torch.from_numpy(smooth_images(4, 8, 8)).permute(0, 3, 1, 2)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    path = make_grid_image(normalize(imgs, mean, std), tmp_path / "grid.png", mean, std, nrow=2)
    grid = read_image(str(path))
    assert grid.shape == (3, 2 + 2 * 10, 2 + 2 * 10)  # 2x2 tiles of 8 px with 2 px padding
    assert (grid[:, 2:10, 12:20].int() - imgs[1].int()).abs().max() <= 1


# ----------------------------------------------------------------------------- real shared data
def _shared(name: str) -> Path:
    root = shared_data_dir()
    if root is None or not (root / name).exists():
        pytest.skip(f"shared data {name} not found (set KDFORGE_SHARED_DATA or provide ../shared/data)")
    return root / name


def test_real_cifar10_jpeg_prepare(tmp_path: Path) -> None:
    src = _shared("cifar10-jpeg.tar.gz")
    t0 = time.perf_counter()
    prepare("cifar10", src, tmp_path)
    seconds = time.perf_counter() - t0
    train, test = load_split("cifar10", "train", tmp_path), load_split("cifar10", "test", tmp_path)
    assert (len(train), len(test)) == (50000, 10000) and train.images.shape[1:] == (32, 32, 3)
    assert train.classes == "airplane automobile bird cat deer dog frog horse ship truck".split()
    assert train.class_counts().tolist() == [5000] * 10 and test.class_counts().tolist() == [1000] * 10
    assert seconds < 60, f"first CIFAR-10 prepare took {seconds:.1f}s"


def test_real_tiny_imagenet_val(tmp_path: Path) -> None:
    src = _shared("tiny-imagenet-200-val.tar.gz")
    val = load_split("tiny_imagenet", "val", prepare("tiny_imagenet", src, tmp_path).parent)
    with tarfile.open(src) as tf:
        wnids = tf.extractfile("tiny-imagenet-200/wnids.txt").read().decode().split()
    assert val.classes == wnids and val.images.shape[1:] == (64, 64, 3)
    assert len(val) == 50 * len(wnids) and val.labels[0] == wnids.index("n03444034")  # val_0.JPEG


def test_loader_image_shape_matches_its_batches():
    from kdforge.data import BatchAugment, BatchLoader, make_synthetic

    data = make_synthetic(8, 0, size=16)["train"]
    for augment in (BatchAugment(2, True), BatchAugment(resize=24)):
        loader = BatchLoader(data, 4, augment=augment, prefetch=0)
        assert tuple(loader.get_batch(0)["image"].shape[1:]) == loader.image_shape


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_loader_on_a_device_builds_the_same_batches(synth, channels_last):
    """`device=`: the split lives decoded there and batches are built there (the GPU path; "cpu" here runs the
    same code) with the same draws: the same images, labels, indices and attributes as the numpy path."""
    common = dict(shuffle=True, augment=BatchAugment(4, True, resize=24), seed=3, channels_last=channels_last,
                  rank=1, world_size=2)
    host, dev = BatchLoader(synth["train"], 8, **common), BatchLoader(synth["train"], 8, device="cpu", **common)
    for epoch in (0, 1):
        host.set_epoch(epoch)
        dev.set_epoch(epoch)
        pairs = list(zip(host, dev))
        assert len(pairs) == len(host) > 1
        for a, b in pairs:
            assert a.keys() == b.keys() and b["image"].device.type == "cpu"
            assert b["image"].is_contiguous(memory_format=torch.channels_last) == channels_last
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_data_device_puts_a_recipes_loaders_on_it_and_is_refused_for_paired_loaders(tmp_path):
    from kdforge.config import ConfigError, load_config
    from kdforge.data.build import build_loaders

    data = {"name": "synthetic", "synthetic_train": 32, "synthetic_test": 16, "synthetic_size": 16,
            "root": str(tmp_path / "cache"), "batch_size": 8, "device": "cpu"}
    bundle = build_loaders(load_config(None, base={"data": data}).data)
    assert bundle.train.device == bundle.val.device == torch.device("cpu")
    assert next(iter(bundle.train))["image"].shape == (8, 3, 16, 16)
    with pytest.raises(ConfigError, match="data.device"):
        load_config(None, base={"data": {**data, "device": "gpu0"}})
    with pytest.raises(ValueError, match="own loader"):
        build_loaders(load_config(None, base={"data": {**data, "name": "synthetic_edges"}}).data)
