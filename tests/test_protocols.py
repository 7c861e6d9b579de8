"""Dataset protocols (CIFAR-10S, UTKFace, CelebA): exact counts on generated layouts, seeded and saved splits,
and the real shared files where present (skipped with a reason otherwise)."""
from __future__ import annotations

import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from kdforge.data import load_split, prepare, shared_data_dir
from kdforge.data.build import load_splits
from kdforge.data.formats.celeba import parse_celeba_attrs
from kdforge.data.formats.utkface import parse_utkface_name, scan_utkface
from kdforge.data.prepare import cifar10
from kdforge.data.protocols import load_protocol
from kdforge.data.protocols.celeba import celeba
from kdforge.data.protocols.cifar10s import cifar10s, grey_mask, to_grey
from kdforge.data.protocols.utkface import age_bin_names, age_class, utkface, utkface_split

Image = pytest.importorskip("PIL.Image")  # torchvision's dependency; writes the generated layouts

CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def _shared(name: str) -> Path:
    root = shared_data_dir()
    if root is None or not (root / name).exists():
        pytest.skip(f"shared data {name} not found (set KDFORGE_SHARED_DATA or provide ../shared/data)")
    return root / name


def _is_grey(images: np.ndarray) -> np.ndarray:
    """Per image: R == G == B everywhere."""
    x = np.asarray(images)
    return ((x[..., 0] == x[..., 1]) & (x[..., 1] == x[..., 2])).all(axis=(1, 2))


# ----------------------------------------------------------------------------- CIFAR-10S
@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-like PNG class-folder tree: 10 classes x 50 train + 10 test colourful 8x8 images."""
    root = tmp_path_factory.mktemp("cifar") / "cifar10-png"
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("test", 10)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("skew, grey_first", [(0.8, 40), (0.9, 45)])
def test_cifar10s_counts_grey_and_test(cifar_tree: Path, skew: float, grey_first: int) -> None:
    source = cifar10(cifar_tree)
    out = cifar10s(cifar_tree, skew=skew, seed=0)
    train, test = out["train"], out["test"]
    g = train.attrs["group"]
    grey = [int(((train.labels == c) & (g == 0)).sum()) for c in range(10)]
    colour = [int(((train.labels == c) & (g == 1)).sum()) for c in range(10)]
    assert grey == [grey_first] * 5 + [50 - grey_first] * 5
    assert colour == [50 - grey_first] * 5 + [grey_first] * 5
    assert train.protocol["counts"] == {"grey": grey, "colour": colour}
    # group 0 images are grey, group 1 images are the untouched source images, in source order
    assert _is_grey(train.images[g == 0]).all() and not _is_grey(train.images[g == 1]).any()
    assert (train.attrs["source_index"] == np.arange(500)).all()
    assert np.array_equal(train.images[g == 1], source["train"].images[g == 1])
    assert np.array_equal(train.images[g == 0], to_grey(source["train"].images[g == 0]))
    # test: every test image in grey, then in colour
    assert len(test) == 200 and (test.attrs["group"] == np.repeat([0, 1], 100)).all()
    assert _is_grey(test.images[:100]).all() and np.array_equal(test.images[100:], source["test"].images)
    assert (test.labels == np.tile(source["test"].labels, 2)).all()
    assert test.class_counts().tolist() == [20] * 10


def test_cifar10s_is_seeded_and_records_the_greyed_images(cifar_tree: Path) -> None:
    a, b = cifar10s(cifar_tree, seed=3)["train"], cifar10s(cifar_tree, seed=3)["train"]
    c = cifar10s(cifar_tree, seed=4)["train"]
    assert np.array_equal(a.images, b.images) and np.array_equal(a.attrs["group"], b.attrs["group"])
    assert not np.array_equal(a.attrs["group"], c.attrs["group"])
    assert a.lists["greyed_source_indices"] == np.flatnonzero(a.attrs["group"] == 0).tolist()
    assert a.protocol["options"] == {"skew": 0.8, "seed": 3, "unskewed": False}


def test_grey_mask_is_the_official_draw() -> None:
    """The official code shuffles with np.random.seed(seed) and greys the first images of a class it meets."""
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 30))
    np.random.seed(7)
    order = np.arange(len(labels))
    np.random.shuffle(order)
    seen, expected = np.zeros(10, int), np.zeros(len(labels), bool)
    for i in order:
        limit = 24 if labels[i] < 5 else 30 - 24  # int(skew * 30) grey in classes 0-4, the rest in 5-9
        if seen[labels[i]] < limit:
            expected[i], seen[labels[i]] = True, seen[labels[i]] + 1
    assert np.array_equal(grey_mask(labels, 10, 0.8, 7), expected)


def test_to_grey_is_pillow_luma() -> None:
    x = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    want = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in x])
    assert np.array_equal(to_grey(x), np.repeat(want[..., None], 3, axis=-1))


def test_cifar10s_unskewed_is_every_image_in_both(cifar_tree: Path) -> None:
    train = cifar10s(cifar_tree, unskewed=True)["train"]
    assert len(train) == 1000 and np.bincount(train.attrs["source_index"]).tolist() == [2] * 500
    assert (train.attrs["group"] == np.repeat([0, 1], 500)).all() and _is_grey(train.images[:500]).all()
    assert train.protocol["counts"] == {"grey": [50] * 10, "colour": [50] * 10}
    with pytest.raises(ValueError, match="takes no skew"):
        cifar10s(cifar_tree, unskewed=True, skew=0.5)
    with pytest.raises(ValueError, match=r"skew must lie in \[0, 1\]"):
        cifar10s(cifar_tree, skew=1.5)


def test_cifar10s_prepare_saves_the_protocol_and_options_join_the_fingerprint(cifar_tree: Path, tmp_path: Path) -> None:
    prepare("cifar10s", cifar_tree, tmp_path, skew=0.9, seed=1)
    train = load_split("cifar10s", "train", tmp_path)
    record = load_protocol("cifar10s", "train", tmp_path)
    assert record["options"] == {"skew": 0.9, "seed": 1, "unskewed": False}
    assert record["greyed_source_indices"] == train.attrs["source_index"][train.attrs["group"] == 0].tolist()
    assert load_protocol("cifar10s", "test", tmp_path)["counts"]["grey"] == [10] * 10
    prepare("cifar10s", cifar_tree, tmp_path, skew=0.8, seed=1)  # other options: decoded again
    assert load_protocol("cifar10s", "train", tmp_path)["counts"]["grey"][0] == 40


def test_cifar10s_from_a_recipe_data_section(cifar_tree: Path, tmp_path: Path) -> None:
    from kdforge.config import DataConfig

    train, val = load_splits(DataConfig(name="cifar10s", source=str(cifar_tree), root=str(tmp_path)))
    assert (len(train), len(val)) == (500, 200) and set(train.attrs) == {"group", "source_index"}


def test_cifar10s_from_the_official_pickles(tmp_path: Path) -> None:
    """The pickle batches (tiny here: 20 images a batch) give the same protocol; order = data_batch_1..5."""
    import pickle

    rng = np.random.default_rng(0)
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2}
        (src / name).write_bytes(pickle.dumps(batch))
    (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}))
    out = cifar10s(src, skew=0.8, seed=0)
    train = out["train"]
    assert train.protocol["source_format"] == "official CIFAR-10 python pickles" and len(out["test"]) == 40
    grey = np.bincount(train.labels[train.attrs["group"] == 0], minlength=10).tolist()
    assert grey == [8] * 5 + [2] * 5 and np.array_equal(train.attrs["group"] == 0, grey_mask(train.labels, 10, 0.8, 0))


@pytest.mark.slow
def test_real_cifar10s_skew_08() -> None:
    src = _shared("cifar10-jpeg.tar.gz")
    out = cifar10s(src, skew=0.8, seed=0)
    train, test = out["train"], out["test"]
    g = train.attrs["group"]
    assert [int(((train.labels == c) & (g == 0)).sum()) for c in range(10)] == [4000] * 5 + [1000] * 5
    assert [int(((train.labels == c) & (g == 1)).sum()) for c in range(10)] == [1000] * 5 + [4000] * 5
    assert len(test) == 20000 and int((test.attrs["group"] == 0).sum()) == 10000


# ----------------------------------------------------------------------------- UTKFace
MALFORMED = ["24_0_1_20170116220224657 .jpg.chip.jpg", "39_1_20170116174525125.jpg.chip.jpg",
             "55_0_0_20170116232725357jpg.chip.jpg", "61_1_20170109142408075.jpg.chip.jpg",
             "61_1_20170109150557335.jpg.chip.jpg"]


def test_utkface_name_parsing_and_age_bins() -> None:
    assert parse_utkface_name("100_0_0_20170112213500903.jpg.chip.jpg") == (100, 0, 0)
    assert all(parse_utkface_name(n) is None for n in MALFORMED)
    assert age_bin_names((20, 40)) == ["0-19", "20-39", "40+"]
    assert [age_class(a, (20, 40)) for a in (0, 19, 20, 39, 40, 116)] == [0, 0, 1, 1, 2, 2]  # the official bins
    assert [age_class(a, (20, 41)) for a in (19, 20, 40, 41)] == [0, 1, 1, 2]  # the paper text's reading


def _utk_layout(root: Path, per_cell: int = 6) -> dict[str, tuple[int, int, int]]:
    """UTKFace/ with `per_cell` files per (race 0-4, age bin), plus two malformed names; solid colours."""
    (root / "UTKFace").mkdir(parents=True)
    colours, k = {}, 0
    for race in range(5):
        for age in (5, 30, 70):
            for i in range(per_cell):
                k += 1
                name = f"{age + i}_{k % 2}_{race}_2017010112000{k:04d}.jpg.chip.jpg"
                colours[name] = (k * 3 % 256, 255 - k % 256, (race * 50 + i) % 256)
    for name in ("33_1_20170101120000999.jpg.chip.jpg", "44_0_2_20170101120000998jpg.chip.jpg"):
        colours[name] = (0, 0, 0)
    for name, c in colours.items():
        Image.new("RGB", (24, 24), c).save(root / "UTKFace" / name, format="PNG")  # lossless: colours compare
    return colours


def test_utkface_generated_layout_split(tmp_path: Path) -> None:
    colours = _utk_layout(tmp_path / "src")
    with pytest.warns(UserWarning, match=r"skipped 2 malformed file name\(s\).*33_1_2017"):
        out = utkface(tmp_path / "src", test_per_cell=2, size=16, seed=5)
    train, test = out["train"], out["test"]
    assert len(test) == 4 * 3 * 2 and len(train) == 4 * 3 * 6 - len(test)
    cells = np.bincount(test.attrs["group"] * 3 + test.labels, minlength=12)
    assert cells.tolist() == [2] * 12 and set(train.attrs["group"].tolist()) == {0, 1, 2, 3}
    assert not set(train.lists["files"]) & set(test.lists["files"])
    assert train.images.shape[1:] == (16, 16, 3) and train.classes == ["0-19", "20-39", "40+"]
    for data in (train, test):  # each row is its file: image colour, age bin and race from the name
        for i, name in enumerate(data.lists["files"]):
            age, _, race = parse_utkface_name(name)
            assert (data.labels[i], data.attrs["group"][i]) == (0 if age < 20 else 1 if age < 40 else 2, race)
            assert (data.images[i] == np.asarray(colours[name], np.uint8)).all()
    # seeded: the same seed gives the same split, another seed another one; a .tar.gz gives the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        again = utkface(tmp_path / "src", test_per_cell=2, size=16, seed=5)
        other = utkface(tmp_path / "src", test_per_cell=2, size=16, seed=6)
        with tarfile.open(tmp_path / "utk.tar.gz", "w:gz") as tf:
            tf.add(tmp_path / "src" / "UTKFace", arcname="UTKFace")
        packed = utkface(tmp_path / "utk.tar.gz", test_per_cell=2, size=16, seed=5)
    assert again["test"].lists == test.lists and np.array_equal(again["train"].images, train.images)
    assert other["test"].lists != test.lists
    assert packed["train"].lists == train.lists and np.array_equal(packed["test"].images, test.images)
    with pytest.raises(ValueError, match="cannot take test_per_cell=7"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        utkface(tmp_path / "src", test_per_cell=7)


@pytest.mark.slow
def test_real_utkface_names_and_split() -> None:
    src = _shared("utkface-aligned-cropped-64px.tar.gz")
    files, malformed = scan_utkface(src)
    assert len(files) + len(malformed) == 23707 and len(files) == 23702
    assert sorted(m.split("/")[-1] for m in malformed) == sorted(MALFORMED)
    split = utkface_split([f.name for f in files] + [m.split("/")[-1] for m in malformed])
    assert len(split["test"]) == 1200 and not set(split["test"]) & set(split["train"])
    others = sum(f.race == 4 for f in files)
    assert len(split["train"]) + 1200 == 23702 - others
    cells = np.zeros((4, 3), int)
    for n in split["test"]:
        age, _, race = parse_utkface_name(n)
        cells[race, 0 if age < 20 else 1 if age < 40 else 2] += 1
    assert (cells == 100).all()


# ----------------------------------------------------------------------------- CelebA
CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()


def _celeba_layout(root: Path) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """celeba/ in the official layout: 36 aligned 178x218 JPEGs (solid colours), the attribute and partition
    files as published (a count line, a header, `-1`/` 1` columns). Partition: 20 train, 6 valid, 10 test."""
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 36
    values = rng.choice([-1, 1], size=(n, 40))
    # test rows 26-35: cells (Male, Attractive) = (0,0) x4, (0,1) x3, (1,0) x1... made explicit below
    test_cells = [(0, 0)] * 4 + [(0, 1)] * 3 + [(1, 0)] * 2 + [(1, 1)] * 1
    a, m = CELEBA_ATTRS.index("Attractive"), CELEBA_ATTRS.index("Male")
    for r, (male, attractive) in zip(range(26, 36), test_cells):
        values[r, m], values[r, a] = 2 * male - 1, 2 * attractive - 1
    part = np.array([0] * 20 + [1] * 6 + [2] * 10)
    colours = [(int(v) * 7 % 256, int(v) * 13 % 256, 255 - int(v) * 5 % 256) for v in range(n)]
    lines = [str(n), " ".join(CELEBA_ATTRS) + " "]
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        Image.new("RGB", (178, 218), colours[i]).save(base / "img_align_celeba" / name, quality=95)
        lines.append(name + " " + " ".join(f"{v:>2}" for v in values[i]))
    (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (base / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(part)))
    return (values + 1) // 2, part, colours


def test_celeba_generated_layout_round_trip(tmp_path: Path) -> None:
    table, part, colours = _celeba_layout(tmp_path)
    names, files, parsed = parse_celeba_attrs((tmp_path / "celeba" / "list_attr_celeba.txt").read_text())
    assert names == CELEBA_ATTRS and files[0] == "000001.jpg" and np.array_equal(parsed, table)
    prepare("celeba", tmp_path / "celeba", tmp_path / "cache", size=32)
    a, m = CELEBA_ATTRS.index("Attractive"), CELEBA_ATTRS.index("Male")
    for split, rows in (("train", np.arange(20)), ("valid", np.arange(20, 26))):
        data = load_split("celeba", split, tmp_path / "cache")
        assert data.classes == ["not_Attractive", "Attractive"] and data.images.shape == (len(rows), 32, 32, 3)
        assert (data.labels == table[rows, a]).all() and (data.attrs["group"] == table[rows, m]).all()
        for i, r in enumerate(rows):  # JPEG of a solid colour: within a few levels
            assert np.abs(data.images[i].astype(int) - colours[r]).max() <= 4
    test = load_split("celeba", "test", tmp_path / "cache")
    record = load_protocol("celeba", "test", tmp_path / "cache")
    # balanced: every (Male, Attractive) cell cut to the smallest (1), keeping its first file
    assert record["files"] == ["000027.jpg", "000031.jpg", "000034.jpg", "000036.jpg"]
    assert sorted(zip(test.attrs["group"].tolist(), test.labels.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert record["counts"] == {"Male=0": [1, 1], "Male=1": [1, 1]} and record["options"]["target"] == "Attractive"


def test_celeba_large_splits_are_decoded_into_a_temporary_file(tmp_path: Path, monkeypatch) -> None:
    from kdforge.data.formats import _decode_into

    _celeba_layout(tmp_path)
    monkeypatch.setattr(_decode_into, "MEMMAP_BYTES", 0)  # every split counts as large
    out = celeba(tmp_path / "celeba", size=16)
    assert isinstance(out["train"].images, np.memmap)
    prepare("celeba", tmp_path / "celeba", tmp_path / "cache", size=16)  # saved from the memmap
    assert np.array_equal(load_split("celeba", "train", tmp_path / "cache").images, out["train"].images)


def test_celeba_options_and_errors(tmp_path: Path) -> None:
    _celeba_layout(tmp_path)
    out = celeba(tmp_path / "celeba", target="Smiling", size=None, crop="center", seed=0)
    assert out["train"].images.shape[1:] == (178, 178, 3) and out["train"].classes == ["not_Smiling", "Smiling"]
    cells = out["test"].attrs["group"] * 2 + out["test"].labels
    assert len(set(np.bincount(cells, minlength=4).tolist())) == 1  # balanced whatever the cells
    assert celeba(tmp_path / "celeba", size=None)["valid"].images.shape[1:] == (218, 178, 3)
    with pytest.raises(ValueError, match="unknown target attribute 'Atractive'; did you mean 'Attractive'"):
        celeba(tmp_path / "celeba", target="Atractive")
    with pytest.raises(ValueError, match="did you mean 'Male'"):
        celeba(tmp_path / "celeba", group="male")
    (tmp_path / "celeba" / "img_align_celeba" / "000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 image.*000003.jpg"):
        celeba(tmp_path / "celeba")
