"""Generators and discriminators for GAN compression (VEM, Kang et al. NeurIPS 2022) and VEM's energy network.

Images are in [-1, 1] by default (`output="tanh"`), as in Pix2Pix, DCGAN and OMGD, whose code VEM builds on:
a recipe gets real images in the same range with `data.mean: [0.5, 0.5, 0.5]` and `data.std: [0.5, 0.5, 0.5]`
(the loader computes (x / 255 - mean) / std), so generated and real images, the L1/SSIM targets and the
Langevin chains all live in one space, and VEM's step size and noise (tuned on [-1, 1] images) keep their
meaning. `output="sigmoid"` gives [0, 1] images (MosaicKD's generators, kdforge/models/gan.py, then normalise
them for a classifier teacher; here the teacher is itself a generator, so nothing is normalised).

Every network takes a base width (`ngf`, `ndf`, `nef`) and a `width` multiplier: a student is the same
architecture with every hidden width times `width` (rounded, at least 1), so its parameters and MACs shrink
roughly as width^2 (OMGD's Pix2Pix student is ngf 16 against the teacher's 64: `width=0.25`).
Parts are named so forward hooks can take features: `down.<i>` / `up.<i>`, `blocks.<i>`, `head`.

`count_macs` counts multiply-accumulates with torch.utils.flop_counter.FlopCounterMode (convolutions,
transposed convolutions and matrix products; FLOPs / 2). It counts a transposed convolution at its true cost
(input pixels x C_in x C_out x k^2); the paper's MAC column (GAN-Compression's torchprofile) counts it per
output pixel, 4x more for the U-Net's stride-2 4x4 ones: OMGD's student is 0.41 G here, 1.22 G in Table 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.nn.utils.parametrize import register_parametrization

from kdforge.models.cost import count_macs  # noqa: F401  (re-exported: the docstrings count with it)
from kdforge.registry import MODELS

OUTPUTS = ("tanh", "sigmoid", "none")
NORMS = ("batch", "instance", "none")


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _log2(img_size: int, lowest: int, what: str) -> int:
    n = math.log2(img_size) if img_size > 0 else -1.0
    if n != int(n) or img_size < lowest:
        raise ValueError(f"{what}: img_size must be a power of two >= {lowest} (32, 64, ...), got {img_size}")
    return int(n)


def _check(value: str, allowed: tuple[str, ...], key: str, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what}: unknown {key} {value!r}; use one of {', '.join(map(repr, allowed))}")


def _width(width: float, what: str) -> None:
    if not width > 0:
        raise ValueError(f"{what}: width must be > 0, got {width}")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":  # Pix2Pix's instance norm: no affine, no running statistics
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    return nn.Identity()


def _activation(kind: str) -> nn.Module:
    return {"tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "none": nn.Identity()}[kind]


# ---------------------------------------------------------------- Pix2Pix U-Net and PatchGAN


class UNetGenerator(nn.Module):
    """Pix2Pix's U-Net generator (Isola et al. 2017; the official `UnetGenerator`, VEM Table 1's backbone).

    log2(img_size) stride-2 4x4 convolutions take the image down to 1 x 1 and as many 4x4 transposed ones bring
    it back, with the encoder's output at each level concatenated onto the decoder's input (skip connections).
    Level i has width ngf * min(2^i, 8) (64, 128, 256, 512, 512, ... at ngf 64); with c_i that width:
      down.0   conv(in -> c_0), LeakyReLU 0.2                        (no norm on the outermost level)
      down.i   conv(c_{i-1} -> c_i), norm, LeakyReLU 0.2             (0 < i < n-1)
      down.n-1 conv(c_{n-2} -> c_{n-1})                              (innermost, 1 x 1)
      up.n-1   ReLU, convT(c_{n-1} -> c_{n-2}), norm
      up.i     ReLU, convT(2 c_i -> c_{i-1}), norm, Dropout(0.5) for levels 4 .. n-2 (0 < i < n-1)
      up.0     ReLU, convT(2 c_0 -> out, bias), tanh
    Convolutions have a bias only when the norm is not BatchNorm (as the official code). The official code's
    in-place LeakyReLU activates the skip tensors too; putting the activation at the end of `down.i` gives the same
    function and hookable, activated encoder features. Sizes: at 256 px, ngf 64 this is the paper's teacher
    (54.4 M parameters; 18.6 G MACs in Table 1's count, 6.05 G by `count_macs`); ngf 16 (`width=0.25`) is OMGD's
    student (3.40 M; 1.22 G in Table 1, 0.41 G by `count_macs`). img_size 32 has 5 levels (no dropout), 64 has 6
    (dropout on level 4).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, img_size: int = 32, ngf: int = 64,
                 width: float = 1.0, norm: str = "batch", dropout: float = 0.5, output: str = "tanh") -> None:
        super().__init__()
        what = "unet_generator"
        n = _log2(img_size, 32, what)
        _width(width, what)
        _check(norm, NORMS, "norm", what)
        _check(output, OUTPUTS, "output", what)
        self.in_channels, self.out_channels, self.img_size = in_channels, out_channels, img_size
        bias = norm != "batch"
        c = [_scaled(ngf * min(2 ** i, 8), width) for i in range(n)]
        down: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, c[0], 4, 2, 1, bias=bias), nn.LeakyReLU(0.2))]
        for i in range(1, n - 1):
            down.append(nn.Sequential(nn.Conv2d(c[i - 1], c[i], 4, 2, 1, bias=bias), _norm(norm, c[i]),
                                      nn.LeakyReLU(0.2)))
        down.append(nn.Sequential(nn.Conv2d(c[n - 2], c[n - 1], 4, 2, 1, bias=bias)))
        up: list[nn.Module] = [nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * c[0], out_channels, 4, 2, 1),
                                             _activation(output))]
        for i in range(1, n):
            c_in = c[i] if i == n - 1 else 2 * c[i]
            drop = [nn.Dropout(dropout)] if 4 <= i < n - 1 and dropout > 0 else []
            up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(c_in, c[i - 1], 4, 2, 1, bias=bias),
                                    _norm(norm, c[i - 1]), *drop))
        self.down, self.up = nn.ModuleList(down), nn.ModuleList(up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        h = self.up[-1](skips[-1])
        for i in range(len(self.up) - 2, -1, -1):
            h = self.up[i](torch.cat([skips[i], h], 1))
        return h


class PatchGANDiscriminator(nn.Module):
    """Pix2Pix's PatchGAN (`NLayerDiscriminator`): a map of logits, one per overlapping image patch.

      blocks.0   conv4x4 s2 (in -> ndf, bias), LeakyReLU 0.2
      blocks.k   conv4x4 s2 (ndf min(2^(k-1), 8) -> ndf min(2^k, 8)), norm, LeakyReLU 0.2   (0 < k < n_layers)
      blocks.n   conv4x4 s1 (-> ndf min(2^n_layers, 8)), norm, LeakyReLU 0.2
      head       conv4x4 s1 (-> 1, bias): logits (B, 1, h, w), no sigmoid
    The official 70 x 70 PatchGAN is n_layers 3 at 256 px (30 x 30 logits, 2.77 M parameters at ndf 64 with a
    6-channel conditional input). Scaled to small images, the default n_layers = clamp(log2(img_size) - 4, 1, 3):
    1 at 32 px (16 px patches, 14 x 14 logits), 2 at 64 px (34 px patches, 14 x 14 logits), 3 from 128 px.
    Conditional (`cond_channels` > 0, Pix2Pix): `forward(image, condition)` judges the concatenation
    (condition, image), as the official code concatenates (real_A, fake_B); with `cond_channels=0` it is
    unconditional and `forward(image)`.
    """

    def __init__(self, in_channels: int = 3, cond_channels: int = 3, img_size: int = 32, ndf: int = 64,
                 width: float = 1.0, n_layers: int | None = None, norm: str = "batch") -> None:
        super().__init__()
        what = "patchgan_discriminator"
        n = _log2(img_size, 16, what)
        _width(width, what)
        _check(norm, NORMS, "norm", what)
        n_layers = min(max(n - 4, 1), 3) if n_layers is None else int(n_layers)
        if n_layers < 1 or img_size // 2 ** n_layers < 4:  # the two stride-1 4x4 convs need >= 4 px left
            raise ValueError(f"{what}: n_layers must be >= 1 and leave >= 4 px of a {img_size} px image, got "
                             f"{n_layers}")
        self.cond_channels, self.n_layers = cond_channels, n_layers
        bias = norm != "batch"
        c = [_scaled(ndf * min(2 ** k, 8), width) for k in range(n_layers + 1)]
        blocks: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels + cond_channels, c[0], 4, 2, 1),
                                                 nn.LeakyReLU(0.2))]
        for k in range(1, n_layers + 1):
            stride = 2 if k < n_layers else 1
            blocks.append(nn.Sequential(nn.Conv2d(c[k - 1], c[k], 4, stride, 1, bias=bias), _norm(norm, c[k]),
                                        nn.LeakyReLU(0.2)))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c[-1], 1, 4, 1, 1)

    def forward(self, image: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if (condition is None) != (self.cond_channels == 0):
            need = f"a condition with {self.cond_channels} channels" if self.cond_channels else "no condition"
            raise ValueError(f"patchgan_discriminator: built with cond_channels={self.cond_channels}, so it takes "
                             f"{need}")
        x = image if condition is None else torch.cat([condition, image], 1)
        return self.head(self.blocks(x))


# ---------------------------------------------------------------- unconditional: DCGAN + SN-GAN


class DCGANGenerator(nn.Module):
    """DCGAN's generator (Radford et al. 2016; the PyTorch example's layout), z (B, z_dim) -> image.

      project    convT4x4 (z_dim -> w_0, 1 x 1 -> 4 x 4, no bias), BN, ReLU
      blocks.i   convT4x4 s2 (w_i -> w_{i+1}, no bias), BN, ReLU               (doubling the size)
      to_image   convT4x4 s2 (ngf -> out, no bias), tanh
    with widths w = ngf * (2^(m-1), ..., 2, 1), m = log2(img_size) - 2 doublings from 4 x 4: 8ngf..ngf at 64 px
    (3.58 M parameters at ngf 64, z_dim 100, the DCGAN example's count), 4ngf..ngf at 32 px. The paper's
    unconditional analogue is SAGAN on CelebA 64 x 64 (Table 3); this is the same family without attention.
    """

    def __init__(self, z_dim: int = 100, img_size: int = 32, ngf: int = 64, width: float = 1.0,
                 out_channels: int = 3, output: str = "tanh") -> None:
        super().__init__()
        what = "dcgan_generator"
        m = _log2(img_size, 16, what) - 2
        _width(width, what)
        _check(output, OUTPUTS, "output", what)
        self.z_dim, self.img_size = z_dim, img_size
        w = [_scaled(ngf * 2 ** (m - 1 - i), width) for i in range(m)]
        self.project = nn.Sequential(nn.ConvTranspose2d(z_dim, w[0], 4, 1, 0, bias=False), nn.BatchNorm2d(w[0]),
                                     nn.ReLU())
        self.blocks = nn.Sequential(*[nn.Sequential(nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b),
                                                    nn.ReLU()) for a, b in zip(w[:-1], w[1:])])
        self.to_image = nn.Sequential(nn.ConvTranspose2d(w[-1], out_channels, 4, 2, 1, bias=False),
                                      _activation(output))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.blocks(self.project(z.reshape(z.shape[0], -1, 1, 1))))

    def sample(self, n: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` latent codes z ~ N(0, I) on `device` (the generator's own by default)."""
        device = device or self.project[0].weight.device
        return torch.randn(n, self.z_dim, device=device, generator=generator)


class SNDiscriminator(nn.Module):
    """SN-GAN's "standard CNN" discriminator (Miyato et al. 2018, Table 3b), every layer spectrally normalised
    (torch.nn.utils.parametrizations.spectral_norm, one power iteration per training forward).

      blocks.i   SN conv3x3 s1 (-> w_i), LeakyReLU 0.1, SN conv4x4 s2 (w_i -> w_i), LeakyReLU 0.1   (per halving)
      blocks.n   SN conv3x3 s1 (-> min(2 w_{n-1}, 8 ndf)), LeakyReLU 0.1                          (at 4 x 4)
      head       SN linear (4 * 4 * width -> 1): one logit per image (B, 1), no sigmoid
    with w_i = ndf * min(2^i, 8) and log2(img_size / 4) halvings: at 32 px and ndf 64 exactly the paper's
    64-64-128-128-256-256-512 network; 64 px adds a 512-wide stage.
    """

    def __init__(self, in_channels: int = 3, img_size: int = 32, ndf: int = 64, width: float = 1.0) -> None:
        super().__init__()
        what = "sn_discriminator"
        n = _log2(img_size, 8, what) - 2
        _width(width, what)
        w = [_scaled(ndf * min(2 ** i, 8), width) for i in range(n + 1)]
        blocks: list[nn.Module] = []
        c_in = in_channels
        for i in range(n):
            blocks.append(nn.Sequential(spectral_norm(nn.Conv2d(c_in, w[i], 3, 1, 1)), nn.LeakyReLU(0.1),
                                        spectral_norm(nn.Conv2d(w[i], w[i], 4, 2, 1)), nn.LeakyReLU(0.1)))
            c_in = w[i]
        blocks.append(nn.Sequential(spectral_norm(nn.Conv2d(c_in, w[n], 3, 1, 1)), nn.LeakyReLU(0.1)))
        self.blocks = nn.Sequential(*blocks)
        self.head = spectral_norm(nn.Linear(4 * 4 * w[n], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).flatten(1))


# ---------------------------------------------------------------- VEM's energy network E(t, s)


class _SpectralBound(nn.Module):
    """Parametrization W -> W * min(1, 1 / sigma(W)), sigma by power iteration (one step per training forward):
    the spectral norm is capped at 1 but a small weight stays small, unlike W / sigma(W), so a residual branch
    initialised near zero starts as (almost) nothing. The "lower_bound" spectral norm of the third-party VEM
    re-implementation (NICKEL_AND_DIME), written anew here."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        mat = weight.detach().flatten(1)
        self.n_power_iterations, self.eps = n_power_iterations, eps
        self.register_buffer("_u", F.normalize(mat.new_empty(mat.shape[0]).normal_(), dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(mat.new_empty(mat.shape[1]).normal_(), dim=0, eps=eps))
        self._power_method(mat, 15)

    @torch.no_grad()
    def _power_method(self, mat: torch.Tensor, steps: int) -> None:
        for _ in range(steps):
            self._u.copy_(F.normalize(mat @ self._v, dim=0, eps=self.eps))
            self._v.copy_(F.normalize(mat.t() @ self._u, dim=0, eps=self.eps))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mat = weight.flatten(1)
        if self.training:
            self._power_method(mat.detach(), self.n_power_iterations)
        sigma = torch.dot(self._u.clone(), mat @ self._v.clone())
        return weight / sigma.clamp_min(1.0)


def _bounded_sn(module: nn.Module) -> nn.Module:
    register_parametrization(module, "weight", _SpectralBound(module.weight))
    return module


class _EnergyBlock(nn.Module):
    """Residual down block: SN conv3x3 (in -> in), LeakyReLU, bounded-SN conv3x3 (in -> out, tiny init); shortcut
    SN conv3x3 when in != out else identity; sum, AvgPool 2, LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, slope: float, residual_init_std: float) -> None:
        super().__init__()
        second = nn.Conv2d(c_in, c_out, 3, 1, 1)
        if residual_init_std > 0:
            nn.init.normal_(second.weight, 0.0, residual_init_std)
        self.residual = nn.Sequential(spectral_norm(nn.Conv2d(c_in, c_in, 3, 1, 1)), nn.LeakyReLU(slope),
                                      _bounded_sn(second))
        self.shortcut = spectral_norm(nn.Conv2d(c_in, c_out, 3, 1, 1)) if c_in != c_out else nn.Identity()
        self.out = nn.Sequential(nn.AvgPool2d(2), nn.LeakyReLU(slope))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.residual(x) + self.shortcut(x))


class EnergyNet(nn.Module):
    """VEM's energy network E_theta(t, s) (Eq. 4: q(t | s) proportional to exp(-E(t, s))): one scalar per pair.

    The paper does not give its layout; this follows the third-party re-implementation (NICKEL_AND_DIME's
    `ResnetEBM`, read in ../shared/papers/README.md section (c)), written anew:
      pool       AvgPool(3, stride 2, pad 1) of t and of s (`input_pool`), concatenated: 2 * in channels
      stem       SN conv3x3 (2 in -> nef), LeakyReLU (slope 0.01, PyTorch's default, as there)
      blocks.i   residual down blocks (`_EnergyBlock`), widths nef -> 2 nef -> 4 nef -> 4 nef ... (capped at
                 4 nef), one per halving until 1 x 1 (`n_blocks`, default log2 of the pooled size)
      head       ReLU, spatial mean, SN linear (-> 1): E (B,)
    At 256 px with nef 32 this is the re-implementation's network exactly (7 blocks, 32 -> 64 -> 128 -> 128 x 5);
    at 32 px it has 4 blocks (16 -> 1 px). The second conv of each residual branch uses a capped spectral norm
    (`_SpectralBound`) initialised N(0, `residual_init_std`^2) (1e-10 there), so every block starts as its shortcut.
    No BatchNorm: each sample's energy depends on that sample alone, so a batch's summed energy has per-sample
    input gradients (what Langevin sampling needs). Spectral-norm power iterations run in training mode only.
    """

    def __init__(self, in_channels: int = 3, img_size: int = 32, nef: int = 32, width: float = 1.0,
                 n_blocks: int | None = None, input_pool: bool = True, slope: float = 0.01,
                 residual_init_std: float = 1e-10) -> None:
        super().__init__()
        what = "energy_net"
        n = _log2(img_size, 4, what) - int(input_pool)
        _width(width, what)
        n_blocks = n if n_blocks is None else int(n_blocks)
        if not 0 <= n_blocks <= n:
            raise ValueError(f"{what}: n_blocks must be in [0, {n}] for {img_size} px, got {n_blocks}")
        self.img_size = img_size
        self.pool = nn.AvgPool2d(3, 2, 1) if input_pool else nn.Identity()
        c = [_scaled(nef * min(2 ** i, 4), width) for i in range(n_blocks + 1)]
        self.stem = nn.Sequential(spectral_norm(nn.Conv2d(2 * in_channels, c[0], 3, 1, 1)), nn.LeakyReLU(slope))
        self.blocks = nn.Sequential(*[_EnergyBlock(c[i], c[i + 1], slope, residual_init_std)
                                      for i in range(n_blocks)])
        self.head = spectral_norm(nn.Linear(c[-1], 1))

    def forward(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if t.shape != s.shape:
            raise ValueError(f"energy_net: t {tuple(t.shape)} and s {tuple(s.shape)} must have the same shape")
        h = self.blocks(self.stem(torch.cat([self.pool(t), self.pool(s)], 1)))
        return self.head(F.relu(h).mean(dim=(2, 3))).squeeze(1)


# ---------------------------------------------------------------- registration


@MODELS.register("unet_generator")
def unet_generator(num_classes: int | None = None, **kw) -> UNetGenerator:
    """Pix2Pix U-Net generator (in/out_channels, img_size 32/64/..., ngf 64, width, norm, dropout); [-1, 1] out."""
    return UNetGenerator(**kw)


@MODELS.register("patchgan_discriminator")
def patchgan_discriminator(num_classes: int | None = None, **kw) -> PatchGANDiscriminator:
    """Pix2Pix PatchGAN (in/cond_channels, img_size, ndf 64, width, n_layers, norm); patch logits."""
    return PatchGANDiscriminator(**kw)


@MODELS.register("dcgan_generator")
def dcgan_generator(num_classes: int | None = None, **kw) -> DCGANGenerator:
    """DCGAN generator z -> image (z_dim 100, img_size 32/64, ngf 64, width); [-1, 1] out."""
    return DCGANGenerator(**kw)


@MODELS.register("sn_discriminator")
def sn_discriminator(num_classes: int | None = None, **kw) -> SNDiscriminator:
    """SN-GAN standard CNN discriminator (img_size 32/64, ndf 64, width); one logit per image."""
    return SNDiscriminator(**kw)


@MODELS.register("energy_net")
def energy_net(num_classes: int | None = None, **kw) -> EnergyNet:
    """VEM's energy network E(t, s) -> (B,) (img_size, nef 32, width, n_blocks, input_pool)."""
    return EnergyNet(**kw)
