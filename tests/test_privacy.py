"""kdforge/privacy (issue 18): the secret key, anonymisation and its exact inverse, wrong keys at a chosen Frobenius
distance, re-identification, the fairness metrics of the paper's Eq. 7-9 against a naive pairwise computation, and
the per-image PSNR / SSIM against torchmetrics called directly.

The stand-in flow is an exact invertible linear map in float64 (a well-conditioned matrix, its latents split into
two "levels" like a multi-scale flow's), so every round-trip error is the key's alone; a tiny real Glow checks the
same with the teacher. Face detection runs on a fake detector (no OpenCV needed) and on OpenCV when installed."""
from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch

from kdforge.models.glow import Glow
from kdforge.privacy import (
    anonymize,
    box_iou,
    deanonymize,
    face_box_iou,
    group_fairness,
    largest_face_boxes,
    max_key_distance,
    perturbed_key,
    psnr,
    reidentification_rate,
    secret_key,
    ssim,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: a second thread only adds contention

SHAPE = (3, 4, 4)  # D = 48
DIM = 48
LEVEL_SHAPES = [(2, 4, 4), (16, 1, 1)]  # 32 + 16 = 48 numbers, a two-level latent list


class LinearFlow:
    """x -> [z_1, z_2] = split(W x) and back, W = Q diag(s) with singular values in [0.5, 2]: exactly invertible,
    not orthogonal (so the key's rotation and the flow do not commute), float64."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
        self.weight = q * torch.linspace(0.5, 2.0, DIM, dtype=torch.float64)
        self.inverse = torch.linalg.inv(self.weight)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        flat = x.flatten(1) @ self.weight.T
        return [flat[:, :32].reshape(-1, *LEVEL_SHAPES[0]), flat[:, 32:].reshape(-1, *LEVEL_SHAPES[1])]

    def decode(self, latents: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        flat = latents if isinstance(latents, torch.Tensor) else torch.cat([z.flatten(1) for z in latents], 1)
        return (flat @ self.inverse.T).reshape(-1, *SHAPE)


def _images(n: int = 6, seed: int = 1, shape=SHAPE, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) - 0.5


def _identity_error(matrix: torch.Tensor) -> float:
    eye = torch.eye(matrix.shape[0], dtype=torch.float64)
    return float((matrix.double() @ matrix.double().T - eye).abs().max())


# ---------------------------------------------------------------- the key


def test_secret_key_is_orthogonal_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    key = secret_key(DIM, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert key.shape == (DIM, DIM) and key.dtype == torch.float32
    assert _identity_error(key) < 1e-5
    assert torch.equal(key, secret_key(DIM, seed=3))
    assert not torch.allclose(key, secret_key(DIM, seed=4))
    assert _identity_error(secret_key(DIM, seed=3, dtype=torch.float64)) < 1e-12


def test_secret_key_is_haar_not_biased_by_qr_signs():
    # Haar-random orthogonal matrices have E[K] = 0; without the sign correction LAPACK's Householder QR gives
    # Q[0, 0] <= 0 always for 2 x 2 (mean -0.62 over these seeds); the standard error here is about 0.035
    corner_mean = torch.stack([secret_key(2, seed)[0, 0] for seed in range(400)]).mean()
    assert abs(float(corner_mean)) < 0.15


# ---------------------------------------------------------------- anonymise / de-anonymise


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_round_trip_with_an_exact_flow(alpha):
    flow, x = LinearFlow(), _images()
    key = secret_key(DIM, seed=0, dtype=torch.float64)
    fake = anonymize(x, flow.encode, flow.decode, key, alpha=alpha)
    assert fake.shape == x.shape
    assert (fake - x).abs().max() > 0.1  # the fake differs from the face
    recovered = deanonymize(fake, flow.encode, flow.decode, key, alpha=alpha)
    assert torch.allclose(recovered, x, atol=1e-4)


def test_float32_key_and_flat_latents():
    flow, x = LinearFlow(), _images()
    key = secret_key(DIM, seed=0)  # float32 on float64 latents: computed in float64, error is the key's rounding
    encode_flat = lambda images: torch.cat([z.flatten(1) for z in flow.encode(images)], 1)  # noqa: E731
    fake = anonymize(x, encode_flat, flow.decode, key)
    assert torch.allclose(fake, anonymize(x, flow.encode, flow.decode, key), atol=1e-10)  # both forms, same fake
    assert torch.allclose(deanonymize(fake, encode_flat, flow.decode, key), x, atol=1e-4)


def test_alpha_scales_the_rotated_latent():
    flow, x = LinearFlow(), _images()
    key = secret_key(DIM, seed=0, dtype=torch.float64)
    z = torch.cat([level.flatten(1) for level in flow.encode(x)], 1)
    fake = anonymize(x, flow.encode, flow.decode, key, alpha=0.3)
    assert torch.allclose(fake, flow.decode(0.3 * z @ key.T), atol=1e-10)
    assert torch.allclose(anonymize(x, flow.encode, flow.decode, key, alpha=0.0), flow.decode(torch.zeros_like(z)))
    with pytest.raises(ValueError, match="alpha = 0"):
        deanonymize(fake, flow.encode, flow.decode, key, alpha=0.0)


def test_wrong_key_shape_is_refused():
    flow = LinearFlow()
    with pytest.raises(ValueError, match=r"\(48, 48\)"):
        anonymize(_images(), flow.encode, flow.decode, secret_key(10, seed=0))


def test_round_trip_with_a_tiny_glow():
    glow = Glow(in_channels=3, img_size=8, levels=2, steps=2, hidden=8, seed=0).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in glow.parameters():  # the zero-initialised convs and priors get values, so no layer is trivial
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        x = _images(4, shape=(3, 8, 8))
        key = secret_key(glow.dim, seed=1, dtype=torch.float64)
        fake = anonymize(x, glow.encode, glow.decode, key)
        recovered = deanonymize(fake, glow.encode, glow.decode, key)
    assert (fake - x).abs().max() > 0.1
    assert torch.allclose(recovered, x, atol=1e-4)


# ---------------------------------------------------------------- wrong keys


@pytest.mark.parametrize("dim", [48, 7])
def test_perturbed_key_is_orthogonal_at_the_asked_distance(dim):
    key = secret_key(dim, seed=0, dtype=torch.float64)
    for distance in (0.0, 0.01, 1.0, 3.0, max_key_distance(dim)):
        wrong = perturbed_key(key, distance, seed=5)
        assert _identity_error(wrong) < 1e-10
        assert abs(float(torch.linalg.matrix_norm(wrong - key)) - distance) < 1e-4
    wrong32 = perturbed_key(key.float(), 2.0, seed=5)
    assert wrong32.dtype == torch.float32 and _identity_error(wrong32) < 1e-5
    assert abs(float(torch.linalg.matrix_norm(wrong32.double() - key)) - 2.0) < 1e-4
    assert torch.equal(perturbed_key(key, 1.0, seed=5), perturbed_key(key, 1.0, seed=5))
    with pytest.raises(ValueError, match="within Frobenius distance"):
        perturbed_key(key, max_key_distance(dim) + 0.1, seed=5)


def test_recovery_error_grows_with_the_key_distance():
    flow, x = LinearFlow(), _images()
    key = secret_key(DIM, seed=0, dtype=torch.float64)
    fake = anonymize(x, flow.encode, flow.decode, key)
    errors = []
    for distance in (0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0):
        recovered = deanonymize(fake, flow.encode, flow.decode, perturbed_key(key, distance, seed=1))
        errors.append(float((recovered - x).pow(2).mean().sqrt()))
    assert errors[0] < 1e-10
    assert all(a < b for a, b in zip(errors, errors[1:])), errors


# ---------------------------------------------------------------- re-identification


def test_reidentification_identical_and_permuted_sets():
    images = torch.rand(50, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert reidentification_rate(images, images) == (1.0, "pixels")
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    rate, _ = reidentification_rate(images, images[perm])
    fixed_points = float((perm == torch.arange(50)).double().mean())  # only those stay matched
    assert rate == pytest.approx(fixed_points) and rate <= 3 / 50
    rate5, _ = reidentification_rate(images, images[perm], k=5)
    assert rate5 >= rate


def test_reidentification_uses_the_feature_space():
    g = torch.Generator().manual_seed(0)
    gallery = torch.rand(40, 3, 8, 8, generator=g) - 0.5
    queries = gallery + 5 * torch.rand(40, 1, 1, 1, generator=g) + 1  # each face shifted by its own brightness
    calls = []

    def centred(images: torch.Tensor) -> torch.Tensor:  # brightness-invariant features
        calls.append(len(images))
        flat = images.flatten(1)
        return flat - flat.mean(1, keepdim=True)

    pixel_rate, _ = reidentification_rate(queries, gallery)
    feature_rate, space = reidentification_rate(queries, gallery, centred, batch_size=16)
    assert space == "centred" and sum(calls) == 80 and max(calls) == 16
    assert feature_rate == pytest.approx(1.0) and pixel_rate < 0.5


def test_reidentification_ties_score_chance():
    same = torch.ones(10, 3, 4, 4)  # alpha = 0: every fake is the same image
    assert reidentification_rate(same, same)[0] == pytest.approx(0.1)
    assert reidentification_rate(same, same, k=3)[0] == pytest.approx(0.3)
    with pytest.raises(ValueError):
        reidentification_rate(same, same[:5])


# ---------------------------------------------------------------- fairness (Eq. 7-9)


def _naive_fairness(scores: list[float], groups: list[int], num_groups: int) -> dict:
    means = {}
    for g in range(num_groups):
        members = [s for s, gi in zip(scores, groups) if gi == g]
        if members:
            means[g] = sum(members) / len(members)
    values = list(means.values())
    pairs = list(itertools.combinations(values, 2))
    centre = sum(values) / len(values)
    return {
        "d_max": max(abs(a - b) for a, b in pairs),
        "d_mean": sum(abs(a - b) for a, b in pairs) / len(pairs),
        "epsilon": max(abs(math.log(a / b)) for a, b in pairs),
        "std": math.sqrt(sum((v - centre) ** 2 for v in values) / len(values)),
        "means": means,
    }


def test_group_fairness_against_a_naive_computation():
    scores = [0.9, 0.7, 0.8, 0.4, 0.5, 0.65, 0.3, 0.95, 0.2, 0.6]
    groups = [0, 0, 1, 1, 1, 3, 3, 4, 4, 4]  # group 2 has nobody
    out = group_fairness(torch.tensor(scores, dtype=torch.float64), torch.tensor(groups), num_groups=5)
    naive = _naive_fairness(scores, groups, 5)
    for name in ("d_max", "d_mean", "epsilon", "std"):
        assert out[name] == pytest.approx(naive[name], abs=1e-12), name
    assert out["empty_groups"] == [2] and out["groups"] == [0, 1, 3, 4]
    assert out["group_counts"] == [2, 3, 0, 2, 3]
    assert math.isnan(out["group_means"][2])
    assert [out["group_means"][g] for g in naive["means"]] == pytest.approx(list(naive["means"].values()))
    sample_std = group_fairness(torch.tensor(scores, dtype=torch.float64), torch.tensor(groups), ddof=1)["std"]
    assert sample_std == pytest.approx(naive["std"] * math.sqrt(4 / 3))


def test_group_fairness_edge_cases():
    one_group = group_fairness(torch.tensor([0.5, 0.7]), torch.tensor([1, 1]))
    assert one_group["empty_groups"] == [0] and one_group["d_max"] == one_group["epsilon"] == 0.0
    assert group_fairness(torch.tensor([0.0, 0.5]), torch.tensor([0, 1]))["epsilon"] == math.inf
    assert group_fairness(torch.tensor([0.0, 0.0]), torch.tensor([0, 1]))["epsilon"] == 0.0
    negative = group_fairness(torch.tensor([-1.0, 2.0]), torch.tensor([0, 1]))
    assert math.isnan(negative["epsilon"]) and negative["d_max"] == 3.0
    with pytest.raises(ValueError, match="infinite"):
        group_fairness(torch.tensor([math.inf, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        group_fairness(torch.tensor([1.0, 1.0]), torch.tensor([0, 2]), num_groups=2)


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_and_ssim_match_torchmetrics_per_image():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 16, 16, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    per_image_psnr, per_image_ssim = psnr(a, b), ssim(a, b)
    assert per_image_psnr.shape == per_image_ssim.shape == (4,)
    for i in range(4):
        assert per_image_psnr[i] == pytest.approx(float(peak_signal_noise_ratio(a[i:i + 1], b[i:i + 1], 1.0)), rel=1e-5)
        expected_ssim = structural_similarity_index_measure(a[i:i + 1], b[i:i + 1], data_range=1.0)
        assert per_image_ssim[i] == pytest.approx(float(expected_ssim), rel=1e-5)


# ---------------------------------------------------------------- face boxes


def test_face_box_iou_with_a_given_detector():
    def boxes_by_brightness(image):  # a stand-in detector: a box whose width is the mean brightness, none if dark
        level = float(image.mean())
        return [] if level < 50 else [(0.0, 0.0, level / 10, 10.0), (0.0, 0.0, 1.0, 1.0)]

    original = torch.full((3, 3, 8, 8), 0.8)  # box (0, 0, 20.4, 10); the 1 x 1 one is not the largest
    processed = torch.stack([torch.full((3, 8, 8), v) for v in (0.8, 0.4, 0.1)])  # same, half width, none
    iou = face_box_iou(original, processed, boxes_by_brightness)
    assert iou.tolist() == pytest.approx([1.0, 0.5, 0.0], abs=1e-3)
    assert largest_face_boxes(processed[2:], boxes_by_brightness).isnan().all()
    assert box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 2, 2]])).item() == pytest.approx(1 / 7)


def test_face_box_iou_names_the_package_without_opencv(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(ImportError, match="pip install opencv-python-headless"):
        face_box_iou(images, images)


def test_haar_detector_runs_when_opencv_is_installed():
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "CascadeClassifier"):
        pytest.skip("OpenCV 5 has no Haar cascades")
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    iou = face_box_iou(noise, noise)
    assert iou.shape == (2,) and ((iou == 0) | (iou == 1)).all()  # the same image: the same boxes, or none
