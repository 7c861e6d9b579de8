"""How well anonymisation hides faces and de-anonymisation brings them back, and how evenly a face pipeline treats
groups of people (issue 18; the appendix of "Defender of privacy and fairness", A.2-A.3).

- `psnr`, `ssim`: per-image fidelity, torchmetrics's functional versions with one value per image (a batch mean
  would hide the per-image and per-group spread the fairness metrics need).
- `reidentification_rate`: the share of queries whose nearest gallery image, by cosine similarity in a feature
  space (raw pixels by default), is their own original. Fakes against originals: lower is more private (chance is
  k / gallery size); de-anonymised faces against originals: higher is a better recovery. The feature space is
  named in the result: a rate in pixel space says little about a face-recognition network's.
- `group_fairness`: the paper's Eq. 7-9 (from Karkkainen & Joo 2021, FairFace) and its "STD", over the per-group
  means of any positive per-image score (the paper: the IoU of face-detection boxes; PSNR works too).
- `face_box_iou`: that IoU, with OpenCV's Haar cascade as the detector by default (optional dependency, 4.x:
  OpenCV 5 dropped the cascades); it finds 97% of aligned UTKFace faces at 64 px and 95% at 32 px with its
  default padding and upscaling, 61% and 33% without (`haar_face_detector`).

Choices where the paper is not explicit (details in `group_fairness`): D_mean averages over unordered pairs of
groups; STD is the population standard deviation (ddof = 0, numpy's default) of the group means; epsilon needs
non-negative group means (a zero one makes it inf, a negative one NaN).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Box = tuple[float, float, float, float]  # (x, y, width, height), OpenCV's order
FaceDetector = Callable[[np.ndarray], Sequence[Sequence[float]]]

OPENCV_HINT = ("pip install opencv-python-headless (a 4.x release, e.g. 'opencv-python-headless<5': OpenCV 5 "
               "dropped CascadeClassifier and the bundled Haar cascades)")


# ---------------------------------------------------------------- per-image fidelity


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of two (B, C, H, W) batches, (B,); `data_range` is the width of the value range (1 for
    [0, 1] and for Glow's [-0.5, 0.5]). Identical images give inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio
    _check_pair(a, b)
    return peak_signal_noise_ratio(a, b, data_range=data_range, reduction="none", dim=(1, 2, 3))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of two (B, C, H, W) batches, (B,): torchmetrics's defaults (11 x 11 Gaussian window,
    sigma 1.5, k1 0.01, k2 0.03); `data_range` as in `psnr`."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    _check_pair(a, b)
    return structural_similarity_index_measure(a, b, data_range=data_range, reduction="none")


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"expected two (B, C, H, W) batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


# ---------------------------------------------------------------- re-identification


def _feature_space_name(features: Callable | None) -> str:
    if features is None:
        return "pixels"
    return str(getattr(features, "name", None) or getattr(features, "__name__", None) or type(features).__name__)


@torch.no_grad()
def _embed(images: torch.Tensor, features: Callable | None, batch_size: int) -> torch.Tensor:
    """Unit-length (N, F) rows: features (or the flattened pixels) in chunks, so a big gallery fits in memory."""
    if features is None:
        rows = images.flatten(1)
    else:
        rows = torch.cat([features(images[i:i + batch_size]).flatten(1) for i in range(0, len(images), batch_size)])
    return torch.nn.functional.normalize(rows.double(), dim=1)


@torch.no_grad()
def reidentification_rate(queries: torch.Tensor, gallery: torch.Tensor,
                          features: Callable[[torch.Tensor], torch.Tensor] | None = None, *, k: int = 1,
                          batch_size: int = 256) -> tuple[float, str]:
    """(rate, feature space): the share of queries whose true match, gallery[i] for queries[i], is among their k
    nearest gallery images by cosine similarity, in `features(images)` space (raw pixels when None).

    The gallery may hold more images than the queries (distractors after the first len(queries)). Ties are broken
    at random, in expectation: a true match with s images strictly closer and t others exactly as close counts
    clamp((k - s) / (t + 1), 0, 1). So a pipeline that maps every face to the same image (alpha = 0) scores chance,
    k / len(gallery), rather than 1 (ties always won) or 0 (always lost)."""
    if len(gallery) < len(queries) or not len(queries):
        raise ValueError(f"reidentification_rate: need 1 .. len(gallery) queries, got {len(queries)} queries and "
                         f"{len(gallery)} gallery images")
    if k < 1:
        raise ValueError(f"reidentification_rate: k must be >= 1, got {k}")
    query_rows = _embed(queries, features, batch_size)
    gallery_rows = _embed(gallery, features, batch_size)
    if query_rows.shape[1] != gallery_rows.shape[1]:
        raise ValueError(f"queries and gallery give {query_rows.shape[1]} and {gallery_rows.shape[1]} features")
    hits = 0.0
    for start in range(0, len(query_rows), batch_size):
        rows = query_rows[start:start + batch_size]
        similarity = rows @ gallery_rows.T  # (b, G)
        own = torch.arange(start, start + len(rows))
        true_match = similarity[torch.arange(len(rows)), own].unsqueeze(1)
        closer = (similarity > true_match).sum(1).double()
        tied = (similarity == true_match).sum(1).double() - 1  # minus the true match itself
        hits += float(((k - closer) / (tied + 1)).clamp(0, 1).sum())
    return hits / len(query_rows), _feature_space_name(features)


# ---------------------------------------------------------------- fairness over groups


def group_fairness(scores: torch.Tensor, groups: torch.Tensor, num_groups: int | None = None, *,
                   ddof: int = 0) -> dict[str, Any]:
    """The paper's fairness metrics (A.3.1, Eq. 7-9) over the per-group means s_g of a per-sample score.

    scores: (N,) per-sample values, e.g. per-image face-box IoU (the paper's mIoU per group) or PSNR; finite.
    groups: (N,) integer group ids in [0, num_groups) (num_groups defaults to max id + 1).

    Over the populated groups (groups without samples are dropped and listed in "empty_groups"):
      d_max   = max over pairs |s_i - s_j| = max s - min s (Eq. 7);
      d_mean  = mean over unordered pairs i < j of |s_i - s_j|: Eq. 8's (1/n) sum over a_i != a_j, reading n as
                the number of ordered pairs (each unordered pair is summed twice);
      epsilon = max over pairs |log(s_i / s_j)| = log(max s / min s) (Eq. 9), defined for positive means: a zero
                mean among positive ones gives inf (the ratio is unbounded), all zero gives 0 (no disparity), and a
                negative mean gives NaN (the log ratio of a score that changes sign means nothing);
      std     = the standard deviation of the group means, population (ddof = 0) by default: the paper only says
                "the standard deviation of results on different groups"; ddof = 0 is numpy's np.std, and with
                two groups it is half the gap. Pass ddof = 1 for the sample version.
    With a single populated group every gap is 0; with none every metric is NaN. Lower is fairer for all four.

    Returns those four floats and "group_means" / "group_counts" (lists over all num_groups, NaN / 0 where
    empty), "groups" (the populated ids) and "empty_groups"."""
    scores, groups = scores.detach().reshape(-1).double().cpu(), groups.detach().reshape(-1).long().cpu()
    if scores.numel() != groups.numel():
        raise ValueError(f"group_fairness: {scores.numel()} scores and {groups.numel()} group ids: they must match")
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(f"group_fairness: {bad} scores are NaN or infinite (PSNR of identical images is inf: "
                         "clamp it, e.g. to 100 dB, first)")
    if groups.numel() and int(groups.min()) < 0:
        raise ValueError(f"group_fairness: group ids must be >= 0, got {int(groups.min())}")
    if num_groups is None:
        num_groups = int(groups.max()) + 1 if groups.numel() else 0
    elif groups.numel() and int(groups.max()) >= num_groups:
        raise ValueError(f"group_fairness: group ids must lie in [0, {num_groups}), got {int(groups.max())}")
    counts = torch.bincount(groups, minlength=num_groups)
    sums = torch.bincount(groups, weights=scores, minlength=num_groups)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan)
    populated = (counts > 0).nonzero().flatten()
    values = means[populated]

    if len(values) == 0:
        d_max = d_mean = epsilon = std = math.nan
    elif len(values) == 1:
        d_max = d_mean = epsilon = std = 0.0
    else:
        gaps = (values[:, None] - values[None, :]).abs()
        upper = torch.triu(torch.ones_like(gaps, dtype=torch.bool), diagonal=1)
        d_max, d_mean = float(gaps.max()), float(gaps[upper].mean())
        std = float(values.std(correction=ddof))
        lowest, highest = float(values.min()), float(values.max())
        if lowest < 0:
            epsilon = math.nan
        elif lowest == highest:
            epsilon = 0.0
        elif lowest == 0:
            epsilon = math.inf
        else:
            epsilon = math.log(highest / lowest)
    return {
        "d_max": d_max,
        "d_mean": d_mean,
        "epsilon": epsilon,
        "std": std,
        "group_means": means.tolist(),
        "group_counts": counts.tolist(),
        "groups": populated.tolist(),
        "empty_groups": (counts == 0).nonzero().flatten().tolist(),
    }


# ---------------------------------------------------------------- face-detection boxes


def _cv2():
    """OpenCV, imported on first use: it is an optional dependency, needed only for the default face detector."""
    try:
        import cv2
    except ImportError as error:
        raise ImportError(f"the Haar face detector needs OpenCV: {OPENCV_HINT}") from error
    if not hasattr(cv2, "CascadeClassifier"):
        raise ImportError(f"OpenCV {cv2.__version__} has no CascadeClassifier: {OPENCV_HINT}")
    return cv2


@functools.lru_cache(maxsize=8)
def _cascade(path: str):
    cascade = _cv2().CascadeClassifier(path)
    if cascade.empty():
        raise FileNotFoundError(f"OpenCV could not load the Haar cascade {path}")
    return cascade


def haar_face_detector(*, scale_factor: float = 1.1, min_neighbors: int = 3, pad: float = 0.25, upscale: int = 2,
                       cascade: str = "haarcascade_frontalface_default.xml") -> FaceDetector:
    """OpenCV's frontal-face Haar cascade (shipped inside opencv-python 4.x) as a `FaceDetector`: an (H, W, 3) RGB
    or (H, W) uint8 image -> its face boxes (x, y, w, h) in that image's pixels (possibly reaching past it).

    Two preprocessing steps, both measured on 300 aligned UTKFace crops (issue 18), min_neighbors = 3:
    - `pad`: a border of pad * side pixels, replicating the edge, added before detection. Aligned crops are all
      face, and the cascade, trained on faces with some surroundings, misses many of them without it: detection
      rises from 61% to 96% at 64 px and from 33% to 83% at 32 px.
    - `upscale`: the padded image enlarged (bicubic) before detection, as the cascade scans windows of 24 x 24 px
      and up: a 32 px face is barely above that. With both (the defaults) 97% of faces are found at 64 px and 95%
      at 32 px (32 px: the 64 px crops resized with antialiasing). Boxes are mapped back to the input image."""
    if pad < 0 or upscale < 1:
        raise ValueError(f"haar_face_detector: pad must be >= 0 and upscale >= 1, got pad={pad}, upscale={upscale}")
    cv2 = _cv2()
    classifier = _cascade(cv2.data.haarcascades + cascade)

    def detect(image: np.ndarray) -> list[Box]:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        border = int(round(pad * max(gray.shape)))
        if border:
            gray = cv2.copyMakeBorder(gray, border, border, border, border, cv2.BORDER_REPLICATE)
        if upscale > 1:
            gray = cv2.resize(gray, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC)
        found = classifier.detectMultiScale(gray, scaleFactor=scale_factor, minNeighbors=min_neighbors)
        # not clipped to the image: on tight crops most boxes reach past it, and clipping would make them all the
        # full frame, leaving the IoU nothing to compare but "found or not"
        return [(x / upscale - border, y / upscale - border, w / upscale, h / upscale) for x, y, w, h in found]

    detect.name = f"haar:{cascade}"
    return detect


def _to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [0, 1] (or uint8) -> (B, H, W, C) uint8, what OpenCV-style detectors take; C = 1 drops to
    (B, H, W)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array)


def largest_face_boxes(images: torch.Tensor, detector: FaceDetector | None = None) -> torch.Tensor:
    """(B, 4) boxes (x, y, w, h) of the largest detected face per image, a row of NaN where none is found.
    images: (B, C, H, W) in [0, 1] (Glow's [-0.5, 0.5] images: add 0.5 first) or uint8; detector: any
    `FaceDetector`, default `haar_face_detector()`."""
    detector = detector or haar_face_detector()
    out = torch.full((images.shape[0], 4), torch.nan, dtype=torch.float64)
    for i, image in enumerate(_to_uint8_images(images)):
        boxes = [tuple(map(float, box)) for box in detector(image)]
        if boxes:
            out[i] = torch.tensor(max(boxes, key=lambda box: box[2] * box[3]), dtype=torch.float64)
    return out


def box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of two (B, 4) tensors of (x, y, w, h) boxes, (B,); 0 where either box is missing (NaN)."""
    left = torch.maximum(first[:, 0], second[:, 0])
    top = torch.maximum(first[:, 1], second[:, 1])
    right = torch.minimum(first[:, 0] + first[:, 2], second[:, 0] + second[:, 2])
    bottom = torch.minimum(first[:, 1] + first[:, 3], second[:, 1] + second[:, 3])
    overlap = (right - left).clamp_min(0) * (bottom - top).clamp_min(0)
    union = first[:, 2] * first[:, 3] + second[:, 2] * second[:, 3] - overlap
    iou = overlap / union.clamp_min(1e-12)
    return torch.nan_to_num(iou, nan=0.0)


def face_box_iou(original: torch.Tensor, processed: torch.Tensor,
                 detector: FaceDetector | None = None) -> torch.Tensor:
    """Per image, the IoU of the largest face box found on the original and on the processed (fake or recovered)
    image, (B,), 0 when either has no face: the paper's face-detection score, whose per-group mean is the mIoU the
    fairness metrics compare (`group_fairness`). Images as in `largest_face_boxes`; the default detector is
    OpenCV's Haar cascade (ImportError naming the pip package when OpenCV is missing)."""
    _check_pair(original, processed)
    detector = detector or haar_face_detector()
    return box_iou(largest_face_boxes(original, detector), largest_face_boxes(processed, detector))
