"""Glow (Kingma & Dhariwal 2018): a multi-scale normalizing flow, the teacher of flow distillation (issue 18), whose
encoder x -> [z_1 .. z_L] and decoder [z_1 .. z_L] -> x are exact inverses of each other.

Layout (kdforge/models/flow_layout.py, shared with the CNN students of kdforge/models/flow_students.py): L levels,
each a squeeze (`squeeze2d`), K flow steps and, except at the last level, a split that keeps the first half of the
channels and hands the second half out as that level's latent z_l. Latents travel as a list, first (finest) level
first, with exactly the shapes `latent_shapes(in_channels, img_size, levels)` (also the attribute `latent_shapes`).
One flow step (`FlowStep`) is, in the encoding direction (the paper's Table 1):
  actnorm    `ActNorm`: y = (x + b) * exp(log_s) per channel; log|det| = H W sum(log_s)
  invconv    `InvConv1x1`: y = W x at every pixel; log|det| = H W log|det W|
  coupling   `AffineCoupling`: x = [x_a, x_b] (channel halves); (shift, s) = NN(x_a);
             y_b = (x_b + shift) * scale(s), y_a = x_a; log|det| = sum(log scale(s))
Every layer has `forward(x, reverse=False) -> (y, logdet)` and `inverse(y) -> x`; the log-determinants are (B,)
tensors of the map actually run (the inverse map's are the negatives). Module names are stable, so forward hooks
take intermediate tensors: `levels.<l>.steps.<k>` and its `.actnorm`, `.invconv`, `.coupling` (`.coupling.net.conv_in`,
...), `levels.<l>.prior`. Steps and their parts are called as modules in both directions (decoding passes
`reverse=True` as a keyword: register a hook `with_kwargs=True` to tell the directions apart); a level's own hook
fires when encoding only.

Choices, each as Glow's released code (openai/glow, model.py) unless said otherwise:
- Input: images in [-0.5, 0.5] with uniform dequantisation noise, as Glow (`preprocess` maps [0, 1] images there,
  keeping `n_bits` bits per channel: 5 for the paper's CelebA-HQ, 8 here by default).
- Coupling scale (`affine_clamp="sigmoid"`): scale = sigmoid(s + 2), Glow's code (the paper's Table 1 writes
  y_b = exp(s) x_b + t); it starts near 0.88 and keeps the encoder contracting. `"exp"` is the paper's/RealNVP's
  exp(s), a number c > 0 the soft clamp exp(c tanh(s / c)). shift and s are the even and odd channels of the NN's
  output, as Glow.
- Coupling NN: conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> zero-initialised conv3x3 (`ZeroConv2d`:
  output times exp(3 log_s), a learned per-channel scale, as Glow's `conv2d_zeros`); `net_actnorm=False` gives
  plain biased convolutions instead. Hidden convolutions start N(0, 0.05^2) as Glow's. Glow pads with an extra
  "is border" input channel; here padding is plain zeros.
- Priors (`learn_prior=True`): a split latent is z_l ~ N(mu, sigma^2), (mu, log sigma) = ZeroConv2d(kept half)
  (even and odd output channels), Glow's `split2d_prior`; the top latent has a learned per-channel mean and log sigma
  starting at 0 (Glow's `--learntop` applies a zero conv to zeros: per-channel constants, plus edge terms from its
  border-channel padding, left out here). With
  `learn_prior=False` every latent is standard normal (RealNVP's choice). All priors start as N(0, 1).
- Invertible 1x1 convolution (`lu=True`, the paper's LU form): W = P L (U + diag(sign_s exp(log_s))) with P a fixed
  permutation, L unit lower triangular, U strictly upper triangular; `lu=False` learns W itself (log|det| by slogdet).
  W starts as a random rotation drawn from a `torch.Generator` seeded with `seed`, as are the NN's weights: building
  a Glow never touches torch's global RNG, so it does not shift a training run's data order or augmentation.

ActNorm's data-dependent initialisation (the paper's section 3.1): each ActNorm (the steps' and those inside the
coupling NNs) sets its bias and log scale so that its output on the first batch has per-channel mean 0 and variance
1. It fires on the first encoding-direction call of the Glow (`forward`, `encode`, `log_prob`, `bits_per_dim`) made
while some ActNorm is uninitialised, in train or eval mode and with or without grad: that call first runs one extra
pass over its batch under `torch.no_grad()` that fits every ActNorm in turn (parameters written in place, so an
optimiser built before keeps them), then its real pass. Decoding and sampling never initialise (an uninitialised
ActNorm is the identity). Whether each ActNorm is initialised is a buffer (`initialized`), so a checkpoint or a
resumed run keeps it; loading ActNorm weights from a checkpoint without the flag also counts as initialised (its
weights are trained, never re-fitted). `initialize_actnorm(x)` forces a re-fit on a chosen batch,
`skip_actnorm_init()` keeps the current values (e.g. to export an untrained model). Under DistributedDataParallel
call `initialize_actnorm` on one batch before wrapping (DDP broadcasts parameters only when it wraps; ranks that
each fitted their own first batch would drift apart). After initialisation `forward`
has no data-dependent Python control flow (the check reads Python flags mirrored from the buffers) and no in-place
operations.

Likelihood: log p(x) = sum_l log N(z_l; mu_l, sigma_l) + log|det dz/dx| in nats (`log_prob`), and `bits_per_dim`
turns it into the paper's discrete bits per dimension (derivation in its docstring).

Sizes (parameters): 32 px, K = 8, L = 3, hidden 128 (the CPU default): 1.62 M; the paper's faces model at 64 px,
K = 16, L = 4, hidden 512: 37.2 M (`n_bits` 5).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.models.flow_layout import latent_shapes as layout_shapes
from kdforge.models.flow_layout import squeeze2d, unflatten_latents, unsqueeze2d
from kdforge.registry import MODELS

LOG_2PI = math.log(2 * math.pi)
HIDDEN_INIT_STD = 0.05  # Glow's default initialiser for its (ActNorm-ed) hidden convolutions


def _per_sample(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A log-determinant that is the same for every image, as a (B,) tensor."""
    return value.expand(x.shape[0])


def _conv(c_in: int, c_out: int, kernel: int, bias: bool, generator: torch.Generator) -> nn.Conv2d:
    """A conv whose weight is drawn from `generator` (N(0, 0.05^2), bias 0): skip_init keeps nn.Conv2d from
    drawing its default initialisation from the global RNG."""
    conv = nn.utils.skip_init(nn.Conv2d, c_in, c_out, kernel, padding=kernel // 2, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * HIDDEN_INIT_STD)
        if bias:
            conv.bias.zero_()
    return conv


class ActNorm(nn.Module):
    """Per-channel affine layer y = (x + bias) * exp(log_scale) with Glow's data-dependent initialisation.

    `initialize(x)` fits it to a batch (output mean 0, variance 1 per channel, over batch and pixels); the Glow
    calls it through `_init_next` (see the module docstring for when). On its own, an ActNorm never initialises
    implicitly: `forward` only applies the current parameters."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # mirrors `initialized` so forward never reads a tensor to decide
        self._init_next = False  # set by Glow.initialize_actnorm: fit to the next encoding-direction input

    @property
    def is_initialized(self) -> bool:
        return self._ready

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set bias = -mean and log_scale = -log(std + eps) per channel of `x` (std over batch and pixels,
        population), so this batch comes out with mean 0 and variance 1 per channel."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True).sqrt()
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.mark_initialized(True)

    def mark_initialized(self, value: bool = True) -> None:
        self.initialized.fill_(value)
        self._ready = value
        self._init_next = False

    def forward(self, x: torch.Tensor, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self._init_next and not reverse:
            self.initialize(x)
        logdet = _per_sample(self.log_scale.sum() * (x.shape[2] * x.shape[3]), x)
        if reverse:
            return x * torch.exp(-self.log_scale) - self.bias, -logdet
        return (x + self.bias) * torch.exp(self.log_scale), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self(y, reverse=True)[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        flag = prefix + "initialized"
        if flag not in state_dict and prefix + "bias" in state_dict:
            # trained weights from a checkpoint without the flag: never re-fit them to a batch
            self.initialized.fill_(True)
            if flag in missing_keys:
                missing_keys.remove(flag)
        self._ready = bool(self.initialized)
        self._init_next = False


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution y = W x (paper section 3.2), W a C x C matrix started as a random rotation.

    `lu=True`: W = P L (U + diag(sign_s * exp(log_s))), P and sign_s fixed buffers, L unit lower triangular and U
    strictly upper triangular (only their strict triangles are used), so log|det W| = sum(log_s) costs O(C).
    `lu=False`: W is the parameter `weight`; log|det W| by slogdet, O(C^3)."""

    def __init__(self, channels: int, lu: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.lu = lu
        # a Haar-random rotation: QR of a Gaussian matrix, signs fixed by R's diagonal
        q, r = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        if lu:
            perm, lower, upper = torch.linalg.lu(q)
            s = torch.diagonal(upper)
            self.register_buffer("perm", perm.float())
            self.register_buffer("sign_s", torch.sign(s).float())
            self.lower = nn.Parameter(torch.tril(lower, -1).float())
            self.upper = nn.Parameter(torch.triu(upper, 1).float())
            self.log_s = nn.Parameter(torch.log(s.abs()).float())
        else:
            self.weight = nn.Parameter(q.float())

    def weight_matrix(self) -> torch.Tensor:
        """W as a (C, C) matrix."""
        if not self.lu:
            return self.weight
        eye = torch.eye(self.log_s.shape[0], dtype=self.log_s.dtype, device=self.log_s.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def log_abs_det(self) -> torch.Tensor:
        """log|det W| (one pixel's)."""
        return self.log_s.sum() if self.lu else torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: torch.Tensor, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.weight_matrix()
        logdet = _per_sample(self.log_abs_det() * (x.shape[2] * x.shape[3]), x)
        if reverse:
            return F.conv2d(x, torch.linalg.inv(weight)[:, :, None, None]), -logdet
        return F.conv2d(x, weight[:, :, None, None]), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self(y, reverse=True)[0]


class ZeroConv2d(nn.Module):
    """Glow's `conv2d_zeros`: a 3x3 conv started at zero whose output is scaled by exp(3 * log_scale) per channel
    (log_scale also starts at 0; the factor 3 makes the scale learn faster), so the layer starts as the zero map."""

    def __init__(self, c_in: int, c_out: int, logscale_factor: float = 3.0) -> None:
        super().__init__()
        self.logscale_factor = logscale_factor
        self.conv = nn.utils.skip_init(nn.Conv2d, c_in, c_out, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
        self.log_scale = nn.Parameter(torch.zeros(1, c_out, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.log_scale * self.logscale_factor)


class CouplingNet(nn.Module):
    """The coupling layer's NN: conv3x3 -> [ActNorm] -> ReLU -> conv1x1 -> [ActNorm] -> ReLU -> ZeroConv2d (3x3).
    With `actnorm` (Glow's) the two hidden convs have no bias and are followed by an ActNorm (`norm_in`,
    `norm_mid`); without it they have a bias and no norm."""

    def __init__(self, c_in: int, hidden: int, c_out: int, actnorm: bool, generator: torch.Generator) -> None:
        super().__init__()
        self.actnorm = actnorm
        self.conv_in = _conv(c_in, hidden, 3, not actnorm, generator)
        self.conv_mid = _conv(hidden, hidden, 1, not actnorm, generator)
        if actnorm:
            self.norm_in = ActNorm(hidden)
            self.norm_mid = ActNorm(hidden)
        self.conv_out = ZeroConv2d(hidden, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        if self.actnorm:
            h = self.norm_in(h)[0]
        h = self.conv_mid(F.relu(h))
        if self.actnorm:
            h = self.norm_mid(h)[0]
        return self.conv_out(F.relu(h))


def _check_clamp(affine_clamp: str | float) -> None:
    if isinstance(affine_clamp, str):
        if affine_clamp not in ("sigmoid", "exp"):
            raise ValueError(f"Glow: unknown affine_clamp {affine_clamp!r}; use 'sigmoid', 'exp' or a number > 0")
    elif not affine_clamp > 0:
        raise ValueError(f"Glow: a numeric affine_clamp must be > 0, got {affine_clamp}")


class AffineCoupling(nn.Module):
    """Affine coupling (paper section 3.3): the first half x_a of the channels passes unchanged and conditions the
    second, y_b = (x_b + shift) * scale, with shift = NN(x_a)[even channels] and scale from NN(x_a)[odd channels]
    through `affine_clamp` (see the module docstring). The NN's last layer starts at zero, so the layer starts as
    y_b = sigmoid(2) x_b (or the identity with "exp" or a numeric clamp)."""

    def __init__(self, channels: int, hidden: int, net_actnorm: bool = True, affine_clamp: str | float = "sigmoid",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_clamp(affine_clamp)
        self.affine_clamp = affine_clamp
        self.kept = channels // 2
        self.net = CouplingNet(self.kept, hidden, 2 * (channels - self.kept), net_actnorm, generator)

    def log_scale(self, raw: torch.Tensor) -> torch.Tensor:
        """log scale(s) for the NN's raw output s."""
        if self.affine_clamp == "sigmoid":
            return F.logsigmoid(raw + 2.0)
        if self.affine_clamp == "exp":
            return raw
        return self.affine_clamp * torch.tanh(raw / self.affine_clamp)

    def forward(self, x: torch.Tensor, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, :self.kept], x[:, self.kept:]
        h = self.net(x_a)
        shift, log_scale = h[:, 0::2], self.log_scale(h[:, 1::2])
        logdet = log_scale.flatten(1).sum(1)
        if reverse:
            return torch.cat([x_a, x_b * torch.exp(-log_scale) - shift], dim=1), -logdet
        return torch.cat([x_a, (x_b + shift) * torch.exp(log_scale)], dim=1), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self(y, reverse=True)[0]


class FlowStep(nn.Module):
    """One step of flow: actnorm -> invconv -> coupling when encoding, the reverse order when decoding."""

    def __init__(self, channels: int, hidden: int, lu: bool, net_actnorm: bool, affine_clamp: str | float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels, lu, generator)
        self.coupling = AffineCoupling(channels, hidden, net_actnorm, affine_clamp, generator)

    def forward(self, x: torch.Tensor, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        layers = (self.coupling, self.invconv, self.actnorm) if reverse else (self.actnorm, self.invconv,
                                                                              self.coupling)
        logdet = x.new_zeros(x.shape[0])
        for layer in layers:
            x, step_logdet = layer(x, reverse=reverse)
            logdet = logdet + step_logdet
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self(y, reverse=True)[0]


class SplitPrior(nn.Module):
    """Glow's split prior: z_l ~ N(mu, sigma^2) with (mu, log sigma) = ZeroConv2d(kept half), the even and odd
    output channels. `forward(kept) -> (mu, log_sigma)`, each shaped like z_l (= like the kept half)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = ZeroConv2d(channels, 2 * channels)

    def forward(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(kept)
        return h[:, 0::2], h[:, 1::2]


class ChannelPrior(nn.Module):
    """A prior that does not depend on the image: learned per-channel mean and log sigma starting at 0 (`learn`,
    Glow's learned top prior) or the standard normal. `forward(like) -> (mu, log_sigma)` shaped like `like`."""

    def __init__(self, channels: int, learn: bool) -> None:
        super().__init__()
        self.learn = learn
        if learn:
            self.mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.learn:
            return self.mean.expand_as(like), self.log_scale.expand_as(like)
        return torch.zeros_like(like), torch.zeros_like(like)


class FlowLevel(nn.Module):
    """squeeze -> K steps -> split (all but the last level). `forward(x) -> (kept, z, logdet)` (kept is None at the
    last level, whose whole output is its latent); `prior(kept)` (or `prior(z)` at the last level) gives z's
    (mean, log sigma); `inverse(kept, z) -> x`."""

    def __init__(self, in_channels: int, steps: int, hidden: int, split: bool, learn_prior: bool, lu: bool,
                 net_actnorm: bool, affine_clamp: str | float, generator: torch.Generator) -> None:
        super().__init__()
        channels = 4 * in_channels
        self.split = split
        self.steps = nn.ModuleList(FlowStep(channels, hidden, lu, net_actnorm, affine_clamp, generator)
                                   for _ in range(steps))
        if split and learn_prior:
            self.prior = SplitPrior(channels // 2)
        else:
            self.prior = ChannelPrior(channels // 2 if split else channels, learn_prior and not split)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        h = squeeze2d(x)
        logdet = h.new_zeros(h.shape[0])
        for step in self.steps:
            h, step_logdet = step(h)
            logdet = logdet + step_logdet
        if not self.split:
            return None, h, logdet
        half = h.shape[1] // 2
        return h[:, :half], h[:, half:], logdet

    def inverse(self, kept: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        h = z if kept is None else torch.cat([kept, z], dim=1)
        for step in reversed(self.steps):
            h = step(h, reverse=True)[0]
        return unsqueeze2d(h)


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """sum over all but the batch dimension of log N(z; mean, exp(log_scale)^2), in nats: (B,)."""
    density = -0.5 * (LOG_2PI + 2 * log_scale + (z - mean).pow(2) * torch.exp(-2 * log_scale))
    return density.flatten(1).sum(1)


class Glow(nn.Module):
    """Glow, x in [-0.5, 0.5]^(C x S x S) <-> latents [z_1 .. z_L] (see the module docstring).

    Args:
        in_channels, img_size: the images (C, S, S); S divisible by 2^levels.
        levels: L; steps: K flow steps per level; hidden: the coupling NN's width (the paper's 512).
        lu: LU-parametrised 1x1 convolutions (the paper's) or a plain weight.
        learn_prior: learned split and top priors (Glow) or standard normal ones.
        affine_clamp: "sigmoid" (Glow's code, scale = sigmoid(s + 2)), "exp", or a soft clamp c > 0.
        net_actnorm: ActNorm in the coupling NN (Glow's) or plain biased convolutions.
        n_bits: bits per channel the images are quantised to (`preprocess`, `bits_per_dim`).
        seed: seeds the torch.Generator every random initial weight is drawn from.
    """

    def __init__(self, in_channels: int = 3, img_size: int = 32, levels: int = 3, steps: int = 8,
                 hidden: int = 128, lu: bool = True, learn_prior: bool = True, affine_clamp: str | float = "sigmoid",
                 net_actnorm: bool = True, n_bits: int = 8, seed: int = 0) -> None:
        super().__init__()
        if not 1 <= n_bits <= 8:
            raise ValueError(f"Glow: n_bits must be in 1 .. 8, got {n_bits}")
        if steps < 1 or hidden < 1:
            raise ValueError(f"Glow: steps and hidden must be >= 1, got steps={steps}, hidden={hidden}")
        _check_clamp(affine_clamp)
        self.in_channels, self.img_size, self.n_bits = in_channels, img_size, n_bits
        self.latent_shapes = layout_shapes(in_channels, img_size, levels)  # raises for an unfit size
        generator = torch.Generator().manual_seed(seed)
        channels, level_list = in_channels, []
        for level in range(levels):
            split = level < levels - 1
            level_list.append(FlowLevel(channels, steps, hidden, split, learn_prior, lu, net_actnorm, affine_clamp,
                                        generator))
            channels = 2 * channels if split else channels
        self.levels = nn.ModuleList(level_list)
        self._actnorms = tuple(m for m in self.modules() if isinstance(m, ActNorm))

    @property
    def dim(self) -> int:
        """D, the numbers per image (= per latent vector)."""
        return self.in_channels * self.img_size ** 2

    # ------------------------------------------------------------ ActNorm initialisation

    @property
    def actnorm_initialized(self) -> bool:
        return all(m.is_initialized for m in self._actnorms)

    def initialize_actnorm(self, x: torch.Tensor) -> None:
        """Fit every ActNorm to the batch x (in [-0.5, 0.5]), in flow order, each to its own input; under no_grad.
        Under data parallel, to the global batch (every rank's x, gathered), so all ranks fit the same values."""
        from kdforge.engine import distributed  # (lazy: the engine imports the models)

        x = distributed.gather_batch(x.detach())[0]
        for m in self._actnorms:
            m._init_next = True
        try:
            with torch.no_grad():
                self._transform(x)
        finally:
            for m in self._actnorms:
                m._init_next = False

    def skip_actnorm_init(self) -> None:
        """Mark every ActNorm initialised with its current values: no data-dependent initialisation will fire."""
        for m in self._actnorms:
            m.mark_initialized(True)

    # ------------------------------------------------------------ encoding

    def _transform(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """x -> latents, logdet and what each level's prior takes (the kept half, or the top latent itself)."""
        if tuple(x.shape[1:]) != (self.in_channels, self.img_size, self.img_size):
            raise ValueError(f"Glow expects (B, {self.in_channels}, {self.img_size}, {self.img_size}) images, "
                             f"got {tuple(x.shape)}")
        latents, conditions = [], []
        logdet = x.new_zeros(x.shape[0])
        h = x
        for level in self.levels:
            kept, z, level_logdet = level(h)
            logdet = logdet + level_logdet
            latents.append(z)
            conditions.append(z if kept is None else kept)
            h = kept
        return latents, logdet, conditions

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        if not self.actnorm_initialized:  # Python flags: no tensor is read to decide
            self.initialize_actnorm(x)
        return self._transform(x)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, C, S, S) in [-0.5, 0.5] -> (latents [z_1 .. z_L], log|det dz/dx| (B,))."""
        latents, logdet, _ = self._encode(x)
        return latents, logdet

    def encode_with_prior(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor],
                                                           list[torch.Tensor]]:
        """x -> (latents, logdet, prior means, prior log sigmas), the last two lists shaped like the latents."""
        latents, logdet, conditions = self._encode(x)
        means, log_scales = [], []
        for level, condition in zip(self.levels, conditions):
            mean, log_scale = level.prior(condition)
            means.append(mean)
            log_scales.append(log_scale)
        return latents, logdet, means, log_scales

    def encode(self, x: torch.Tensor, standardized: bool = False) -> list[torch.Tensor]:
        """x -> [z_1 .. z_L]; `standardized` gives eps_l = (z_l - mu_l) / sigma_l instead, each N(0, I) under the
        model (what Glow's code hands out for manipulation)."""
        if not standardized:
            return self(x)[0]
        latents, _, means, log_scales = self.encode_with_prior(x)
        return [(z - m) * torch.exp(-s) for z, m, s in zip(latents, means, log_scales)]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats, (B,): the priors' log densities of the latents plus log|det dz/dx|, for the continuous
        (dequantised) x in [-0.5, 0.5]."""
        latents, logdet, means, log_scales = self.encode_with_prior(x)
        log_prior = sum(gaussian_log_density(z, m, s) for z, m, s in zip(latents, means, log_scales))
        return log_prior + logdet

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's bits per dimension, (B,): -(log p(x) - D log n_bins) / (D log 2) = n_bits - log p(x) / (D ln 2),
        n_bins = 2^n_bits, D = C S S, x a dequantised image (`preprocess`).

        Why: an image of integers k in {0 .. n_bins - 1}^D is x = k / n_bins - 1/2 + u, u ~ U[0, 1/n_bins)^D, so
        each value of k owns a cube of side 1 / n_bins and the discrete model gives it
        P(k) = integral over the cube of p = n_bins^-D E_u[p(x)] >= n_bins^-D exp(E_u[log p(x)]) (Jensen).
        Hence -log2 P(k) / D <= E_u[-(log p(x) - D ln n_bins)] / (D ln 2): the formula is an upper bound on the
        discrete code length, estimated without bias by one noise draw per image (Glow's code:
        objective = log p(x) - D log n_bins, bits = -objective / (D log 2))."""
        d = self.dim
        return -(self.log_prob(x) - d * self.n_bits * math.log(2)) / (d * math.log(2))

    # ------------------------------------------------------------ decoding and sampling

    def decode(self, latents: Sequence[torch.Tensor] | torch.Tensor | int | None, temperature: float | None = None,
               *, standardized: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """[z_1 .. z_L] (or the (B, D) flattened vector) -> x, the exact inverse of `encode`.

        `standardized`: the latents are eps_l (see `encode`), turned into z_l = mu_l + sigma_l eps_l level by level.
        `latents` None (one image) or a count n: sample from the prior at `temperature` (default 1), as `sample`;
        `temperature` is only for that."""
        if latents is None or isinstance(latents, int):
            return self.sample(1 if latents is None else latents, 1.0 if temperature is None else temperature,
                               generator=generator)
        if temperature is not None:
            raise ValueError("Glow.decode: temperature applies only when sampling (latents None or a count); scale "
                             "standardized latents instead")
        if isinstance(latents, torch.Tensor):
            latents = unflatten_latents(latents, self.latent_shapes)
        if len(latents) != len(self.levels) or any(tuple(z.shape[1:]) != tuple(shape)
                                                   for z, shape in zip(latents, self.latent_shapes)):
            raise ValueError(f"Glow.decode expects latents shaped {self.latent_shapes}, got "
                             f"{[tuple(z.shape[1:]) for z in latents]}")
        kept = None
        for level, z in zip(reversed(self.levels), reversed(list(latents))):
            if standardized:
                mean, log_scale = level.prior(z if kept is None else kept)
                z = mean + torch.exp(log_scale) * z
            kept = level.inverse(kept, z)
        return kept

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images from the model at `temperature` T: eps ~ N(0, T^2 I) at every level, z_l = mu_l + sigma_l eps_l
        (Glow's reduced-temperature sampling; T = 0 decodes the prior means). Noise comes from `generator` (on its
        device) or the global RNG."""
        param = next(self.parameters())
        device = generator.device if generator is not None else param.device
        eps = [torch.randn((n, *shape), generator=generator, device=device, dtype=param.dtype).to(param.device)
               * temperature for shape in self.latent_shapes]
        return self.decode(eps, standardized=True)

    # ------------------------------------------------------------ images in and out

    def preprocess(self, x01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[0, 1] images (8-bit values / 255) -> dequantised [-0.5, 0.5] inputs, as Glow: keep the top n_bits bits,
        k = floor(round(255 x) / 2^(8 - n_bits)), then x = k / n_bins - 0.5 + u, u ~ U[0, 1/n_bins). The noise comes
        from `generator` (on its device) or, in training mode only, the global RNG; in eval mode without a generator
        u is the bin centre 1 / (2 n_bins), deterministic (pass a generator for Glow's noisy test bits/dim)."""
        n_bins = 2 ** self.n_bits
        levels = torch.floor(torch.round(x01 * 255) / 2 ** (8 - self.n_bits))
        x = levels / n_bins - 0.5
        if generator is not None:
            noise = torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        elif self.training:
            from kdforge.engine import distributed  # (lazy: the engine imports the models)

            noise = distributed.rand(*x.shape, device=x.device, dtype=x.dtype)  # this rank's block, under DDP
        else:
            noise = torch.full_like(x, 0.5)
        return x + noise / n_bins

    def postprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-0.5, 0.5] model images -> [0, 1], quantised to n_bits as Glow's (floor((x + 0.5) n_bins) 256 / n_bins,
        clipped to 0 .. 255, / 255)."""
        n_bins = 2 ** self.n_bits
        return (torch.floor((x + 0.5) * n_bins) * (256 / n_bins)).clamp(0, 255) / 255


# ---------------------------------------------------------------- registration


@MODELS.register("glow")
def glow(num_classes: int | None = None, **kw) -> Glow:
    """Glow normalizing flow (in_channels 3, img_size 32, levels 3, steps 8, hidden 128, lu, learn_prior,
    affine_clamp 'sigmoid', net_actnorm, n_bits 8, seed 0); forward x -> (latents, logdet)."""
    return Glow(**kw)
