"""The "generation" evaluator: FID/KID through the whole evaluator path against a naive numpy/scipy reference,
a kdforge model as feature network, paired and teacher metrics, downstream accuracy, errors and the RNG."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from kdforge.config import ConfigError
from kdforge.metrics import build_evaluator
from kdforge.metrics.generation import GenerationEvaluator
from kdforge.models import build_model


def _batches(real: torch.Tensor, fake: torch.Tensor, size: int, **extra: torch.Tensor) -> list[dict]:
    """A loader: dict batches whose `index` lets `predict` look up the generated images."""
    return [{"image": real[i:i + size], "index": torch.arange(i, min(i + size, len(real))),
             **{k: v[i:i + size] for k, v in extra.items()}} for i in range(0, len(real), size)]


def _small_features() -> nn.Module:
    """12-d features (mean colour of each image quarter): FID's d x d eigenproblem stays cheap."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())


def _predict(fake: torch.Tensor):
    return lambda batch: fake[batch["index"]]


def _naive_fid(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _naive_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, on the whole sets (one subset of all samples)."""
    m, d = x.shape

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off_diag = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off_diag - 2 * kxy.sum() / m**2)


def _pixel_features(n: int, shift: float, seed: int) -> torch.Tensor:
    """n random 12-d features laid out as (n, 3, 2, 2) images, so flattening an image gives its feature."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 12, generator=g, dtype=torch.float64) * 1.5 + shift).float().view(n, 3, 2, 2)


def test_fid_and_kid_match_naive_reference_through_the_evaluator():
    real, fake = _pixel_features(80, 0.0, 1), _pixel_features(80, 0.3, 2)
    # image space = [0, 1] space, and the feature net flattens: the features are exactly the pixels
    ev = GenerationEvaluator(features=nn.Flatten(), image_mean=0.0, image_std=1.0, kid_subset_size=80,
                             kid_subsets=1)
    got = ev(_predict(fake), _batches(real, fake, 16), torch.device("cpu"))
    x, y = real.flatten(1).double().numpy(), fake.flatten(1).double().numpy()
    assert got["fid"] == pytest.approx(_naive_fid(x, y), rel=1e-3)
    assert got["kid"] == pytest.approx(_naive_kid(x, y), rel=1e-3, abs=1e-6)
    assert got["kid_std"] == 0.0  # one subset
    assert got["fid_samples"] == 80
    assert got["fid_features"] == "Flatten (user module)"
    assert "psnr" not in got and "teacher_psnr" not in got  # unpaired, no teacher


def test_kid_default_subset_size_shrinks_to_small_sets():
    real, fake = _pixel_features(30, 0.0, 3), _pixel_features(30, 0.0, 4)
    ev = GenerationEvaluator(features=nn.Flatten(), image_mean=0.0, image_std=1.0, kid_subsets=3)
    got = ev(_predict(fake), _batches(real, fake, 7), "cpu")  # min(1000, 30) = every sample, in any order
    x, y = real.flatten(1).double().numpy(), fake.flatten(1).double().numpy()
    assert got["kid"] == pytest.approx(_naive_kid(x, y), rel=1e-3, abs=1e-6)
    too_big = GenerationEvaluator(features=nn.Flatten(), kid_subset_size=31)
    with pytest.raises(ValueError, match="kid_subset_size=31 is more than the 30 samples"):
        too_big(_predict(fake), _batches(real, fake, 7), "cpu")


@pytest.fixture
def resnet_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet20.pt"
    torch.save(build_model("resnet20").state_dict(), path)
    return path


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # the generator's [-1, 1]


def test_kdforge_model_as_feature_network(resnet_weights):
    ev = build_evaluator("generation", features={"name": "resnet20", "weights": str(resnet_weights)})
    assert (ev.monitor, ev.mode) == ("fid", "min")
    real = _images(32, 0)
    same = ev(_predict(real), _batches(real, real, 16), "cpu")
    assert same["fid_features"] == f"resnet20@{resnet_weights}:auto:in"
    assert abs(same["fid"]) < 1e-3  # KID's unbiased estimate of a set against itself is not 0: not checked
    shifted = (real + 0.5).clamp(-1, 1)
    worse = ev(_predict(shifted), _batches(real, shifted, 16), "cpu")
    assert worse["fid"] > 1e-2 and worse["fid"] > 100 * abs(same["fid"])
    assert worse["kid"] > same["kid"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer evaluates: the feature net stays float32
        mixed = ev(_predict(shifted), _batches(real, shifted, 16), "cpu")
    assert mixed["fid"] == pytest.approx(worse["fid"], rel=1e-6)


def test_feature_tap_resize_and_normalisation_are_used(resnet_weights):
    spec = {"name": "resnet20", "weights": str(resnet_weights), "layer": "layer2", "size": 24,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    ev = GenerationEvaluator(features=spec)
    assert ev.fid_features == f"resnet20@{resnet_weights}:layer2@24x24"
    images = _images(4, 5)
    features = ev.feature_net(images)
    # by hand: [-1, 1] -> [0, 1] -> resize -> normalise -> layer2's (N, 32, 12, 12) map, averaged
    net = build_model("resnet20")
    net.load_state_dict(torch.load(resnet_weights))
    net.eval()
    x = torch.nn.functional.interpolate(images * 0.5 + 0.5, size=(24, 24), mode="bilinear", antialias=True)
    x = (x - 0.5) / 0.25
    taken = {}
    net.layer2.register_forward_hook(lambda m, i, o: taken.setdefault("out", o))
    with torch.no_grad():
        net(x)
    assert features.shape == (4, 32)
    torch.testing.assert_close(features, taken["out"].mean(dim=(2, 3)))


def test_paired_and_teacher_metrics():
    real, fake, teacher = _images(20, 1), _images(20, 2), _images(20, 3)
    ev = GenerationEvaluator(features=_small_features())
    loader = [{"image": _images(10, 9), "target": real[i:i + 10], "index": torch.arange(i, i + 10)}
              for i in (0, 10)]
    got = ev(_predict(fake), loader, "cpu", reference=lambda b: teacher[b["index"]])
    psnr = peak_signal_noise_ratio(fake, real, data_range=2.0, reduction="none", dim=(1, 2, 3)).mean()
    ssim = structural_similarity_index_measure(fake, real, data_range=2.0, reduction="none").mean()
    assert got["psnr"] == pytest.approx(float(psnr), rel=1e-5)
    assert got["ssim"] == pytest.approx(float(ssim), rel=1e-4, abs=1e-6)
    assert got["l1"] == pytest.approx(float((fake - real).abs().mean()), rel=1e-5)
    teacher_psnr = peak_signal_noise_ratio(fake, teacher, data_range=2.0, reduction="none", dim=(1, 2, 3)).mean()
    assert got["teacher_psnr"] == pytest.approx(float(teacher_psnr), rel=1e-5)
    assert got["teacher_l1"] == pytest.approx(float((fake - teacher).abs().mean()), rel=1e-5)
    # FID compares with the targets (the real images of a paired batch), not with the inputs
    target_only = ev(_predict(fake), [{"image": real, "index": torch.arange(20)}], "cpu")
    assert got["fid"] == pytest.approx(target_only["fid"], rel=1e-6)


class _MeanColourClassifier(nn.Module):
    """Class = the brightest channel: accuracy is easy to compute by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_downstream_accuracy_on_generated_and_real_images():
    real, fake = _images(30, 4), _images(30, 5)
    labels = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(6))
    ev = GenerationEvaluator(features=_small_features(), classifier=_MeanColourClassifier(), classifier_label="cls")
    loader = _batches(real, fake, 8, cls=labels)
    loader[-1].pop("cls")  # the last 6 samples carry no label: they do not count
    got = ev(_predict(fake), loader, "cpu")
    expect_fake = 100.0 * float((fake[:24].mean(dim=(2, 3)).argmax(1) == labels[:24]).double().mean())
    expect_real = 100.0 * float((real[:24].mean(dim=(2, 3)).argmax(1) == labels[:24]).double().mean())
    assert got["downstream_top1"] == pytest.approx(expect_fake)
    assert got["downstream_real_top1"] == pytest.approx(expect_real)
    assert got["downstream_gap"] == pytest.approx(expect_real - expect_fake)
    with pytest.raises(ValueError, match="no batch carries 'label'"):
        GenerationEvaluator(features=_small_features(), classifier=_MeanColourClassifier())(
            _predict(fake), _batches(real, fake, 8), "cpu")


def test_classifier_by_name_matches_a_direct_computation(resnet_weights):
    ev = GenerationEvaluator(features=_small_features(),
                             classifier={"name": "resnet20", "weights": str(resnet_weights)})
    real, fake = _images(12, 7), _images(12, 8)
    labels = torch.arange(12) % 10
    got = ev(_predict(fake), _batches(real, fake, 5, label=labels), "cpu")
    net = build_model("resnet20")
    net.load_state_dict(torch.load(resnet_weights))
    net.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's, the default
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = net(((fake * 0.5 + 0.5) - mean) / std).argmax(1)
    assert got["downstream_top1"] == pytest.approx(100.0 * float((pred == labels).double().mean()))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="FID needs a feature network.*eval.features.*inception_weights"):
        build_evaluator("generation")
    with pytest.raises(ConfigError, match="unknown option 'feature'.*did you mean 'features'"):
        build_evaluator("generation", feature={"name": "resnet20"})
    with pytest.raises(ConfigError, match="unknown key 'wieghts' in features.*did you mean 'weights'"):
        build_evaluator("generation", features={"name": "resnet20", "wieghts": "x.pt"})
    missing = tmp_path / "nowhere" / "resnet56.th"
    with pytest.raises(FileNotFoundError, match=f"features.weights file not found: '{missing}'"):
        build_evaluator("generation", features={"name": "resnet20", "weights": str(missing)})
    with pytest.raises(FileNotFoundError, match=f"inception_weights.weights file not found: '{missing}'"):
        build_evaluator("generation", inception_weights=str(missing))
    with pytest.raises(ValueError, match="not both"):
        build_evaluator("generation", features=nn.Flatten(), inception_weights=str(missing))


def test_inception_weights_need_torch_fidelity(tmp_path):
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed")
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not read")
    with pytest.raises(ImportError, match="torch-fidelity"):
        build_evaluator("generation", inception_weights=str(weights))


def test_evaluation_leaves_the_global_rng_alone(resnet_weights):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ev = build_evaluator("generation", features={"name": "resnet20", "weights": str(resnet_weights)},
                         classifier={"name": "resnet20"}, kid_subset_size=10, kid_subsets=4)
    real, fake = _images(24, 0), _images(24, 1)
    first = ev(_predict(fake), _batches(real, fake, 8, label=torch.arange(24) % 10), "cpu")
    assert torch.equal(torch.get_rng_state(), before)
    second = ev(_predict(fake), _batches(real, fake, 8, label=torch.arange(24) % 10), "cpu")
    assert first == second  # KID's subsets are the same every time
    assert first["kid_std"] > 0  # they are random subsets, though
