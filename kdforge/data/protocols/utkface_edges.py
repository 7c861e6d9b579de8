"""UTKFace edges -> face: paired images for image-to-image translation, the analogue of pix2pix's Edges -> Shoes.

Each sample is a UTKFace aligned-and-cropped face (the target) and the edge map of that face (the input),
computed once at prepare time with kornia on the grey image (`kornia.color.rgb_to_grayscale`):

    canny  kornia.filters.canny (5x5 Gaussian blur, sigma 1; thresholds on its unnormalised Sobel magnitude)
           with hysteresis: weak pixels (> low_threshold) are kept when 8-connected to a strong one
           (> high_threshold). kornia's own hysteresis loop gives the same map (tested) but took 6-18x longer on
           real faces (measured), so kornia's output without hysteresis is tracked here with scipy.ndimage.label
           (scipy comes with scikit-learn).
    sobel  kornia.filters.sobel (normalised magnitude) > sobel_threshold: thicker, double-sided strokes.

Defaults, measured on 400 random real faces (share of edge pixels per face, mean [5th-95th percentile]):
canny 0.2 / 0.4 gives 13.5 % [8.9, 17.8] at 64 px and 18.7 % [13.1, 24.1] at 32 px (a clean sketch of eyes,
mouth, nose and outline; 0.1 / 0.2 adds skin texture, 0.3 / 0.6 leaves some faces almost blank at 32 px);
sobel 0.1 gives 11.5 % [4.0, 20.3] at 64 px and 19.2 % [7.1, 32.2] at 32 px. Edges are 255 on 0. All 23,702 faces:
canny 13.3 % at 64 px, 18.6 % at 32 px, prepared in 49 s and 28 s on 2 busy cores.

Storage: the decoded cache holds one (H, W, 3) uint8 image per sample, so a pair is stored as ONE image of
twice the width, pix2pix's "AB" layout: columns [0, W) the edge map (grey replicated to 3 channels), columns
[W, 2W) the face. `PairedBatchLoader` serves it as `image` = edges (the generator's input) and `target` = the
face, cropped and flipped with one draw per sample for both. A plain BatchLoader over these images would serve
the AB image itself, and its flip would swap the halves: use PairedBatchLoader (or `split_pairs`).

split: the well-formed names of every race (Others too: no group is dropped for generation), natural-sorted,
    shuffled by `numpy.random.default_rng(seed)`; test = the first `test_size`, train = the rest, each kept in
    natural order. Edges depend on the face alone (computed in a fixed order before the split), never on the
    seed. Malformed names (5 in the original release) are skipped with a warning that lists them.
label: age bin (0-19, 20-39, 40+, the utkface protocol's bins); attributes `group` (race 0-4) and `gender`.

Options: size (64; 32 for CPU runs), edges ('canny'), low_threshold (0.2), high_threshold (0.4),
sobel_threshold (0.1), test_size (1000), seed (0), workers. The record (options, rule, counts, the file of
every sample in order) is `protocol.json` beside each split.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdforge.data.decoded import DecodedData
from kdforge.data.formats._archive import check_source, natural_key
from kdforge.data.formats._decode_into import allocate, decode_into
from kdforge.data.formats.utkface import UTKFACE_RACES, scan_utkface
from kdforge.data.loader import _AUGMENT, BatchLoader, _generator
from kdforge.data.protocols.record import ProtocolData
from kdforge.data.protocols.utkface import age_bin_names, age_class
from kdforge.data.transforms import crop_flip_numpy, normalize_numpy, resize
from kdforge.registry import DATASETS

VERSION = 1
EDGES = ("canny", "sobel")
AGE_BINS = (20, 40)
REFERENCE = ("UTKFace (Zhang, Song and Qi, CVPR 2017); edges -> image pairs as pix2pix's Edges -> Shoes (Isola et "
             "al., CVPR 2017), edges by kornia")
_CHUNK = 256  # faces per edge computation: fixed, so the work is the same whatever the split


def _check_edge_options(edges: str, low: float, high: float, sobel: float) -> None:
    if edges not in EDGES:
        raise ValueError(f"utkface_edges: edges must be one of {', '.join(EDGES)}, got {edges!r}")
    if not 0 < low <= high:
        raise ValueError(f"utkface_edges: need 0 < low_threshold <= high_threshold, got {low} and {high}")
    if not sobel > 0:
        raise ValueError(f"utkface_edges: sobel_threshold must be > 0, got {sobel}")


def _hysteresis(weak_strong: np.ndarray) -> np.ndarray:
    """Canny's edge tracking on (N, H, W) maps of 0 / 0.5 (weak) / 1 (strong): the 8-connected components of
    the non-zero pixels that hold a strong pixel, as a bool (N, H, W). Components never cross images."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-neighbours within one image, none across the batch axis
    components, n = ndimage.label(weak_strong > 0, structure=structure)
    keep = np.zeros(n + 1, dtype=bool)
    keep[components[weak_strong == 1]] = True
    keep[0] = False
    return keep[components]


def edge_maps(faces: np.ndarray, *, edges: str = "canny", low_threshold: float = 0.2, high_threshold: float = 0.4,
              sobel_threshold: float = 0.1) -> np.ndarray:
    """Edge maps of uint8 (N, H, W, 3) faces as uint8 (N, H, W): 255 on an edge, 0 elsewhere (see the module).

    Batched torch on the CPU; each face's map depends on that face alone.
    """
    import kornia

    _check_edge_options(edges, low_threshold, high_threshold, sobel_threshold)
    out = np.zeros(faces.shape[:3], dtype=np.uint8)
    with torch.no_grad():
        for start in range(0, len(faces), _CHUNK):
            x = torch.from_numpy(np.ascontiguousarray(faces[start:start + _CHUNK])).permute(0, 3, 1, 2)
            grey = kornia.color.rgb_to_grayscale(x.float() / 255.0)
            if edges == "canny":
                _, weak_strong = kornia.filters.canny(grey, low_threshold, high_threshold, hysteresis=False)
                on = _hysteresis(weak_strong[:, 0].numpy())
            else:
                on = (kornia.filters.sobel(grey)[:, 0] > sobel_threshold).numpy()
            out[start:start + len(on)] = on * np.uint8(255)
    return out


def split_pairs(images: np.ndarray | torch.Tensor) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """(inputs, targets) of side-by-side pairs (..., H, 2W, C): the left and the right half (views)."""
    w2 = images.shape[-2]
    if w2 % 2:
        raise ValueError(f"paired images are side by side (H, 2W, C); got an odd width {w2}")
    return images[..., :w2 // 2, :], images[..., w2 // 2:, :]


class PairedBatchLoader(BatchLoader):
    """A BatchLoader over side-by-side pairs (H, 2W, 3): `{"image", "target", "label", "index", **attrs}`.

    `image` is the left half (the input), `target` the right half, both float32 (B, 3, H, W); `image` is
    normalised with `mean`/`std` and `target` with `target_mean`/`target_std` (default: the same). Augmentation
    is paired: one random crop offset and one flip bit per sample, applied to input and target alike (the two
    are gathered as one 6-channel image), drawn from the same (seed, epoch, batch) stream as BatchLoader's, so
    a pair stays pixel-aligned. `resize` resizes both. Everything else (order, resume, ranks) is BatchLoader's.
    """

    def __init__(self, data: DecodedData, batch_size: int, *, target_mean: Sequence[float] | None = None,
                 target_std: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(data, batch_size, **kwargs)
        split_pairs(data.images[:0])  # checks the width
        self.target_mean = tuple(float(m) for m in (target_mean if target_mean is not None else self.mean))
        self.target_std = tuple(float(s) for s in (target_std if target_std is not None else self.std))
        if len(self.target_mean) != 3 or len(self.target_std) != 3:
            raise ValueError("target_mean and target_std need 3 values (RGB)")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of `image` and of `target` (half the stored width, or the resize)."""
        if self.augment.resize is not None:
            return super().image_shape
        h, w2 = self.data.image_size
        return (3, h, w2 // 2)

    def make_batch(self, idx: torch.Tensor, batch_idx: int, epoch: int | None = None) -> dict[str, torch.Tensor]:
        """Batch of pairs `idx` as batch `batch_idx` of `epoch` (its augmentation seed)."""
        e = self.epoch if epoch is None else epoch
        left, right = split_pairs(np.take(self.data.images, idx.numpy(), axis=0))
        pair = np.concatenate([left, right], axis=3)  # (B, H, W, 6): one gather moves both halves together
        aug = self.augment
        if aug.is_random:
            pair = crop_flip_numpy(pair, aug.crop_pad, aug.flip, _generator(self.seed, _AUGMENT, e, batch_idx))
        if aug.resize is not None:
            pair = resize(torch.from_numpy(pair), aug.resize, channels_last=True).numpy()
        out_nchw = not self.channels_last
        halves = []
        for x, mean, std in ((pair[..., :3], self.mean, self.std), (pair[..., 3:], self.target_mean, self.target_std)):
            t = torch.from_numpy(normalize_numpy(x, mean, std, channels_last=True, out_nchw=out_nchw))
            halves.append(t if out_nchw else t.permute(0, 3, 1, 2))  # NCHW shape, channels_last memory
        batch = {"image": halves[0], "target": halves[1], "label": self._labels[idx], "index": idx.clone()}
        for k, col in self._attrs.items():
            batch[k] = col[idx]
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch


def _faces_and_split(source: str | Path, size: int, test_size: int, seed: int, workers: int | None, what: str):
    """Every well-formed face decoded at `size`, natural-sorted, and the test mask of the seeded split (shared by
    utkface_edges and utkface_faces, so a classifier trained on utkface_faces' train split never saw a test face)."""
    path = check_source(source)
    if int(size) < 8:
        raise ValueError(f"{what}: size must be >= 8 (32 or 64 in the issue), got {size}")
    files, malformed = scan_utkface(path)
    if not files:
        raise ValueError(f"no UTKFace files (<age>_<gender>_<race>_<datetime>.jpg.chip.jpg) found in {path}")
    if malformed:
        warnings.warn(f"UTKFace source {path}: skipped {len(malformed)} malformed file name(s) (not "
                      f"<age>_<gender>_<race>_<datetime>.jpg.chip.jpg): {', '.join(sorted(malformed))}",
                      stacklevel=3)
    if not 1 <= int(test_size) < len(files):
        raise ValueError(f"{what}: test_size must be in [1, {len(files) - 1}] for {len(files)} faces, "
                         f"got {test_size}")
    files = sorted(files, key=lambda f: natural_key(f.name))
    faces = decode_into(path, {f.rel: ("all", i) for i, f in enumerate(files)}, {"all": len(files)},
                        size=int(size), workers=workers)["all"]
    in_test = np.zeros(len(files), dtype=bool)
    in_test[np.random.default_rng(int(seed)).permutation(len(files))[:int(test_size)]] = True
    return path, files, malformed, faces, in_test


@DATASETS.register("utkface_edges")
def utkface_edges(
    source: str | Path, *, size: int = 64, edges: str = "canny", low_threshold: float = 0.2,
    high_threshold: float = 0.4, sobel_threshold: float = 0.1, test_size: int = 1000, seed: int = 0,
    workers: int | None = None,
) -> dict[str, ProtocolData]:
    """UTKFace faces (dir, .tar, .tar.gz) paired with their kornia edge maps, side by side; see the module."""
    _check_edge_options(edges, low_threshold, high_threshold, sobel_threshold)
    path, files, malformed, faces, in_test = _faces_and_split(source, size, test_size, seed, workers, "utkface_edges")
    edge = edge_maps(faces, edges=edges, low_threshold=low_threshold, high_threshold=high_threshold,
                     sobel_threshold=sobel_threshold)

    classes = age_bin_names(AGE_BINS)
    options = {"size": int(size), "edges": edges, "low_threshold": float(low_threshold),
               "high_threshold": float(high_threshold), "sobel_threshold": float(sobel_threshold),
               "test_size": int(test_size), "seed": int(seed)}
    import kornia

    detector = (f"kornia.filters.canny(grey, {low_threshold}, {high_threshold}) with 8-connected hysteresis"
                if edges == "canny" else f"kornia.filters.sobel(grey) > {sobel_threshold}")
    detector += f" (kornia {kornia.__version__})"  # another version may draw other edges
    rule = (f"well-formed names of every race, natural-sorted, permuted by numpy.random.default_rng({int(seed)}); "
            f"test = the first {int(test_size)}, train = the rest, both in natural order; edges: {detector}")
    out: dict[str, ProtocolData] = {}
    for s, rows in (("train", np.flatnonzero(~in_test)), ("test", np.flatnonzero(in_test))):
        h = w = int(size)
        pairs = allocate(len(rows), h, 2 * w)
        left, right = split_pairs(pairs)
        left[...] = edge[rows][..., None]  # grey replicated to 3 channels
        right[...] = faces[rows]
        chosen = [files[i] for i in rows]
        label = np.asarray([age_class(f.age, AGE_BINS) for f in chosen], dtype=np.int64)
        race = np.asarray([f.race for f in chosen], dtype=np.int64)
        gender = np.asarray([f.gender for f in chosen], dtype=np.int64)
        density = float(edge[rows].mean() / 255.0) if len(rows) else 0.0
        out[s] = ProtocolData(
            pairs, label, classes, attrs={"group": race, "gender": gender}, source=str(path),
            protocol={"protocol": "utkface_edges", "version": VERSION, "reference": REFERENCE, "source": str(path),
                      "split": s, "options": options, "rule": rule,
                      "layout": f"side by side, {h} x {2 * w}: columns [0, {w}) the edge map (255 = edge, the "
                                f"input), [{w}, {2 * w}) the face (the target)",
                      "classes": classes, "groups": {str(i): g for i, g in enumerate(UTKFACE_RACES)},
                      "counts": {g: int((race == k).sum()) for k, g in enumerate(UTKFACE_RACES)},
                      "edge_density": round(density, 4), "skipped_malformed": sorted(malformed),
                      "files": "list 'files': the file of every sample"},
            lists={"files": [f.name for f in chosen]})
    return out


utkface_edges.loader_class = PairedBatchLoader  # build_loaders serves its pairs as `image` (edges) and `target`


FACE_LABELS = ("age", "gender")


@DATASETS.register("utkface_faces")
def utkface_faces(
    source: str | Path, *, size: int = 64, test_size: int = 1000, seed: int = 0, label: str = "age",
    workers: int | None = None,
) -> dict[str, ProtocolData]:
    """The faces of utkface_edges alone, with the same split (same size, test_size and seed: the same test faces),
    labelled by age bin or gender: the data of the face classifier that scores generated faces (FID features and
    the downstream accuracy) without having seen a test face."""
    if label not in FACE_LABELS:
        raise ValueError(f"utkface_faces: label must be one of {', '.join(FACE_LABELS)}, got {label!r}")
    path, files, malformed, faces, in_test = _faces_and_split(source, size, test_size, seed, workers, "utkface_faces")
    classes = age_bin_names(AGE_BINS) if label == "age" else ["male", "female"]
    options = {"size": int(size), "test_size": int(test_size), "seed": int(seed), "label": label}
    out: dict[str, ProtocolData] = {}
    for s, rows in (("train", np.flatnonzero(~in_test)), ("test", np.flatnonzero(in_test))):
        chosen = [files[i] for i in rows]
        age = np.asarray([age_class(f.age, AGE_BINS) for f in chosen], dtype=np.int64)
        gender = np.asarray([f.gender for f in chosen], dtype=np.int64)
        race = np.asarray([f.race for f in chosen], dtype=np.int64)
        out[s] = ProtocolData(
            np.ascontiguousarray(faces[rows]), age if label == "age" else gender, classes,
            attrs={"group": race, "gender": gender, "age_bin": age}, source=str(path),
            protocol={"protocol": "utkface_faces", "version": VERSION, "reference": REFERENCE, "source": str(path),
                      "split": s, "options": options, "rule": "the split of utkface_edges with the same options",
                      "classes": classes, "groups": {str(i): g for i, g in enumerate(UTKFACE_RACES)},
                      "skipped_malformed": sorted(malformed), "files": "list 'files': the file of every sample"},
            lists={"files": [f.name for f in chosen]})
    return out
