"""The "generation" evaluator: how good a (distilled) image generator's images are, the way GAN papers score them.

- FID and KID (torchmetrics) between generated images, `predict(batch)`, and the batch's real images
  (`batch["target"]` when paired, else `batch["image"]`), in one pass over the loader. Both need a feature
  network, which is never downloaded: a kdforge/torchvision/timm model given with its weights (`features:`),
  whose penultimate feature (or any tapped layer) is used, or torchmetrics's Inception-v3 with user-supplied
  weights (`inception_weights:`, needs torch-fidelity). Every result names the network in `fid_features`, so a
  FID measured with a CIFAR ResNet is never mistaken for the Inception FID of the literature.
- Paired data (batches with `target`, e.g. pix2pix): L1, PSNR and SSIM against the target. With a teacher:
  `teacher_l1` / `teacher_psnr`, the student's fidelity to the teacher's images for the same batch.
- Downstream (the analogue of mIoU on Cityscapes): with a `classifier:`, its top-1 on generated images and on
  the real ones against `batch[classifier_label]`, and the gap between the two.

Images arrive in the generator's space ([-1, 1] for tanh generators, and recipes normalise real images the same
way); `image_mean`/`image_std` map them back to [0, 1] (x * std + mean) before each network's own
normalisation. Networks run frozen, in eval mode, in float32 even under the Trainer's autocast. Evaluation
draws nothing from the global RNG: KID's random subsets come from a fixed seed and the RNG state is restored,
so a training run's randomness (and its exact resume) does not depend on when it was evaluated.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.metrics.evaluators import Evaluator, _check_not_empty
from kdforge.registry import EVALUATORS, did_you_mean

#: the normalisation of ImageNet-trained nets, also used by the pretrained CIFAR-10 ResNets
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: what a `features:` / `classifier:` section may hold
FEATURE_KEYS = ("name", "weights", "layer", "kwargs", "mean", "std", "size")
CLASSIFIER_KEYS = ("name", "weights", "kwargs", "mean", "std", "size")
DEFAULT_KID_SUBSET_SIZE = 1000  # torchmetrics's and the KID paper's


def _channel_stats(value: float | Sequence[float], what: str) -> torch.Tensor:
    """A scalar or per-channel list as a (1, C, 1, 1) tensor that broadcasts over images."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 0:
        raise ValueError(f"generation evaluator: {what} is empty")
    return t.view(1, -1, 1, 1)


def _size_pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _l1(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per image."""
    return (out - target).abs().flatten(1).mean(1)


def _pool(features: torch.Tensor) -> torch.Tensor:
    """(N, d) features: global average of a (N, C, H, W) map, flattened otherwise."""
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    return features.flatten(1)


class FrozenImageNet(nn.Module):
    """A frozen network behind the evaluator's preprocessing: generator space -> [0, 1] -> the network's
    normalisation (or uint8 for torchmetrics's Inception) and input size -> its output or a tapped layer,
    pooled to (N, d), in float32 whatever autocast is active."""

    def __init__(self, net: nn.Module, *, image_mean: Any, image_std: Any, mean: Any = None, std: Any = None,
                 size: int | Sequence[int] | None = None, layer: str | None = None, pool: bool = True,
                 as_uint8: bool = False) -> None:
        super().__init__()
        self.net = net.float().eval().requires_grad_(False)
        self.register_buffer("image_mean", _channel_stats(image_mean, "image_mean"), persistent=False)
        self.register_buffer("image_std", _channel_stats(image_std, "image_std"), persistent=False)
        self.normalise = mean is not None
        if self.normalise:
            self.register_buffer("mean", _channel_stats(mean, "mean"), persistent=False)
            self.register_buffer("std", _channel_stats(std, "std"), persistent=False)
        self.size, self.layer, self.pool, self.as_uint8 = _size_pair(size), layer, pool, as_uint8
        self.taps = None
        if layer is not None:
            from kdforge.distillers.base import FeatureTaps  # here: kdforge.distillers imports the metrics

            self.taps = FeatureTaps(net, [layer], role="the generation evaluator's network")

    def train(self, mode: bool = True) -> FrozenImageNet:
        return super().train(False)  # frozen: BatchNorm statistics and dropout never change

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            x = images.float() * self.image_std + self.image_mean  # to [0, 1]
            if self.as_uint8:  # torchmetrics's Inception takes [0, 255] bytes and resizes to 299 itself
                x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
            else:
                if self.size is not None and tuple(x.shape[-2:]) != self.size:
                    x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
                if self.normalise:
                    x = (x - self.mean) / self.std
            out = self.net(x)
            if self.taps is not None:
                out = self.taps[self.layer]
            out = out.float()
            return _pool(out) if self.pool else out


class _PassThrough(nn.Module):
    """The `feature` module torchmetrics's FID/KID get: the features are computed once, by the evaluator, and
    shared by both metrics. `num_features` spares FID its probe with a random 299x299 image (a global RNG draw
    and a forward pass); float64 output makes FID return float64 instead of rounding to the features' dtype."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def _check_keys(spec: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    from kdforge.config import ConfigError

    for key in spec:
        if key not in allowed:
            raise ConfigError(f"generation evaluator: unknown key {key!r} in {what}{did_you_mean(key, allowed)}"
                              f" (accepted: {', '.join(allowed)})")
    if "name" not in spec:
        raise ConfigError(f"generation evaluator: {what} needs a model 'name' (a kdforge model, torchvision:..., "
                          f"timm:... or pkg.mod:factory) and its 'weights'")


def _weights_path(spec: Mapping[str, Any], what: str) -> str | None:
    """The spec's weights path, expanded; it must exist (checked here, before any training starts)."""
    from kdforge.config import expand_path

    path = expand_path(spec.get("weights"))
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"generation evaluator: {what}.weights file not found: '{path}'")
    return path


def _build_net(spec: Mapping[str, Any], weights: str | None, what: str) -> nn.Module:
    """The model a spec names, with its weights; built without drawing from the global RNG."""
    from kdforge.config import ModelConfig
    from kdforge.recipe import build_model_from_config

    # a model's random init would otherwise shift the training run's random stream
    with torch.random.fork_rng(devices=[]):
        mc = ModelConfig(name=spec["name"], weights=weights, kwargs=dict(spec.get("kwargs") or {}))
        return build_model_from_config(mc, role=f"generation evaluator {what}")


def _inception(weights: str, image_mean: Any, image_std: Any) -> FrozenImageNet:
    """torchmetrics's FID Inception-v3 (2048-d pool features) loaded from the user's weights file."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ImportError("generation evaluator: inception_weights needs the package torch-fidelity, which is not "
                          "installed: pip install torch-fidelity (or pip install 'torchmetrics[image]')")
    from torchmetrics.image.fid import NoTrainInceptionV3

    with torch.random.fork_rng(devices=[]):
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=weights)
    return FrozenImageNet(net, image_mean=image_mean, image_std=image_std, as_uint8=True)


@EVALUATORS.register("generation")
class GenerationEvaluator(Evaluator):
    """FID/KID with a user-given feature network, paired L1/PSNR/SSIM, fidelity to the teacher and a downstream
    classifier's accuracy on generated images (see the module docstring).

    Options (a recipe's `eval:` section):
        features: {name, weights, layer="auto:in", kwargs={}, mean=ImageNet's, std=ImageNet's, size=None}, or
            an nn.Module (Python API) that takes [0, 1] images and returns features (pooled if 4-D).
        inception_weights: path of torchmetrics's Inception-v3 weights, instead of `features` (needs
            torch-fidelity).
        image_mean, image_std: generator space -> [0, 1] is x * image_std + image_mean (0.5, 0.5: [-1, 1]).
        kid_subset_size: samples per KID subset (default min(1000, samples)); kid_subsets: 100; kid_seed: 0.
        data_range: of the images for PSNR/SSIM (2.0 for [-1, 1]).
        classifier: {name, weights, kwargs, mean, std, size} or an nn.Module, scored on `classifier_label`.
    """

    monitor, mode = "fid", "min"

    def __init__(self, features: Mapping[str, Any] | nn.Module | None = None, inception_weights: str | None = None,
                 image_mean: float | Sequence[float] = 0.5, image_std: float | Sequence[float] = 0.5,
                 kid_subset_size: int | None = None, kid_subsets: int = 100, kid_seed: int = 0,
                 data_range: float = 2.0, classifier: Mapping[str, Any] | nn.Module | None = None,
                 classifier_label: str = "label") -> None:
        if features is None and inception_weights is None:
            raise ValueError(
                "generation evaluator: FID needs a feature network and none is downloaded; give eval.features: "
                "{name: <model, e.g. resnet56>, weights: <path>, layer: auto:in} (any kdforge, torchvision: or "
                "timm: model with its weights), or eval.inception_weights: <path to torchmetrics's Inception-v3 "
                "weights> (needs torch-fidelity)")
        if features is not None and inception_weights is not None:
            raise ValueError("generation evaluator: give features or inception_weights, not both")
        if kid_subset_size is not None and kid_subset_size < 2:
            raise ValueError(f"generation evaluator: kid_subset_size must be at least 2, got {kid_subset_size}")
        if kid_subsets < 1:
            raise ValueError(f"generation evaluator: kid_subsets must be at least 1, got {kid_subsets}")
        self.kid_subset_size, self.kid_subsets, self.kid_seed = kid_subset_size, kid_subsets, kid_seed
        self.data_range, self.classifier_label = float(data_range), classifier_label
        self.feature_net, self.fid_features = self._feature_net(features, inception_weights, image_mean, image_std)
        self.classifier = None
        if classifier is not None:
            self.classifier = self._classifier(classifier, image_mean, image_std)

    @staticmethod
    def _feature_net(features, inception_weights, image_mean, image_std) -> tuple[FrozenImageNet, str]:
        """The feature network and the name results carry in `fid_features`."""
        if inception_weights is not None:
            path = _weights_path({"weights": inception_weights}, "inception_weights")
            return _inception(path, image_mean, image_std), f"inception-v3 (user weights: {path})"
        if isinstance(features, nn.Module):
            net = FrozenImageNet(features, image_mean=image_mean, image_std=image_std)
            return net, f"{type(features).__name__} (user module)"
        if not isinstance(features, Mapping):
            raise TypeError(f"generation evaluator: features must be a mapping or an nn.Module, "
                            f"got {type(features).__name__}")
        _check_keys(features, FEATURE_KEYS, "features")
        weights = _weights_path(features, "features")
        layer = features.get("layer", "auto:in")
        net = FrozenImageNet(_build_net(features, weights, "features"), image_mean=image_mean, image_std=image_std,
                             mean=features.get("mean", IMAGENET_MEAN), std=features.get("std", IMAGENET_STD),
                             size=features.get("size"), layer=layer)
        size = _size_pair(features.get("size"))
        name = f"{features['name']}@{weights or 'random-init'}:{layer}"
        return net, name + (f"@{size[0]}x{size[1]}" if size else "")

    @staticmethod
    def _classifier(classifier, image_mean, image_std) -> FrozenImageNet:
        if isinstance(classifier, nn.Module):
            return FrozenImageNet(classifier, image_mean=image_mean, image_std=image_std, pool=False)
        if not isinstance(classifier, Mapping):
            raise TypeError(f"generation evaluator: classifier must be a mapping or an nn.Module, "
                            f"got {type(classifier).__name__}")
        _check_keys(classifier, CLASSIFIER_KEYS, "classifier")
        weights = _weights_path(classifier, "classifier")
        return FrozenImageNet(_build_net(classifier, weights, "classifier"), image_mean=image_mean,
                              image_std=image_std, mean=classifier.get("mean", IMAGENET_MEAN),
                              std=classifier.get("std", IMAGENET_STD), size=classifier.get("size"), pool=False)

    @torch.no_grad()
    def __call__(self, predict, loader, device, *, reference=None, to_batch=None):
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        from kdforge.distillers.gan_base import real_images

        device = torch.device(device)
        nets = [n for n in (self.feature_net, self.classifier) if n is not None]
        for net in nets:
            net.to(device)
        fid = kid = None
        sums: dict[str, float] = {}  # per-image metrics: their sums and how many images each covers
        counts: dict[str, int] = {}

        def add(name: str, per_image: torch.Tensor) -> None:
            sums[name] = sums.get(name, 0.0) + float(per_image.double().sum())
            counts[name] = counts.get(name, 0) + per_image.numel()

        for raw in loader:
            batch = to_batch(raw, device) if to_batch else raw
            real = real_images(batch).to(device).float()
            fake = predict(batch).to(device).float()
            if fake.shape != real.shape:
                raise ValueError(f"generation evaluator: generated images {tuple(fake.shape)} and real images "
                                 f"{tuple(real.shape)} differ in shape")
            real_features, fake_features = self.feature_net(real), self.feature_net(fake)
            if fid is None:  # the feature size is known from the first batch
                fid, kid = self._metrics(real_features.shape[1], device)
            with torch.autocast(device.type, enabled=False):  # float64 sums, whatever the Trainer's precision
                for metric in (fid, kid):
                    metric.update(real_features, real=True)
                    metric.update(fake_features, real=False)

            if "target" in batch:  # paired data: the generated image should be the target
                add("l1", _l1(fake, real))
                add("psnr", peak_signal_noise_ratio(fake, real, data_range=self.data_range, reduction="none",
                                                    dim=(1, 2, 3)))
                if min(fake.shape[-2:]) >= 11:  # SSIM's Gaussian window is 11 px
                    add("ssim", structural_similarity_index_measure(fake, real, data_range=self.data_range,
                                                                    reduction="none"))
                else:
                    add("ssim", torch.full((fake.shape[0],), float("nan")))
            if reference is not None:  # fidelity of the student to its teacher
                teacher = reference(batch).to(device).float()
                add("teacher_l1", _l1(fake, teacher))
                add("teacher_psnr", peak_signal_noise_ratio(fake, teacher, data_range=self.data_range,
                                                            reduction="none", dim=(1, 2, 3)))
            if self.classifier is not None and self.classifier_label in batch:
                label = batch[self.classifier_label].to(device)
                add("downstream_top1", 100.0 * (self.classifier(fake).argmax(1) == label))
                add("downstream_real_top1", 100.0 * (self.classifier(real).argmax(1) == label))

        n = 0 if fid is None else int(fid.real_features_num_samples)
        _check_not_empty(n, "generation")
        with torch.autocast(device.type, enabled=False):
            out: dict[str, Any] = {**self._fid_kid(fid, kid, n), "fid_samples": n,
                                   "fid_features": self.fid_features}
        out.update({name: total / counts[name] for name, total in sums.items()})
        if self.classifier is not None:
            if "downstream_top1" not in out:
                raise ValueError(f"generation evaluator: a classifier is set but no batch carries "
                                 f"{self.classifier_label!r} (set eval.classifier_label)")
            out["downstream_gap"] = out["downstream_real_top1"] - out["downstream_top1"]
        return out

    def _metrics(self, num_features: int, device: torch.device):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        fid = FrechetInceptionDistance(feature=_PassThrough(num_features))
        with warnings.catch_warnings():  # "KID will save all extracted features": that is the point here
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            kid = KernelInceptionDistance(feature=_PassThrough(num_features), subsets=self.kid_subsets,
                                          subset_size=self.kid_subset_size or DEFAULT_KID_SUBSET_SIZE)
        return fid.to(device), kid.to(device)

    def _fid_kid(self, fid, kid, n: int) -> dict[str, float]:
        if n < 2:
            raise ValueError(f"generation evaluator: FID and KID need at least 2 samples, the loader gave {n}")
        # torchmetrics needs subset_size <= samples: the default shrinks to a small test set, a set size fails
        size = self.kid_subset_size or min(DEFAULT_KID_SUBSET_SIZE, n)
        if size > n:
            raise ValueError(f"generation evaluator: kid_subset_size={size} is more than the {n} samples evaluated")
        kid.subset_size = size
        # KID draws its subsets with torch.randperm from the global CPU RNG: seed it, then put it back as it was
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(self.kid_seed)
            kid_mean, kid_std = kid.compute()
        finally:
            torch.set_rng_state(state)
        return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
