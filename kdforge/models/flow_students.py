"""CNN students of a Glow teacher for flow distillation ("Defender of privacy and fairness", appendix A.1.1 and
Fig. 4; ../shared/papers/README.md section (d)): an encoder image -> latents and a decoder latents -> image, each
trained on its own against the teacher (Algorithm 1), neither invertible.

The paper keeps the flow's skeleton (squeeze, ActNorm, K steps per level, L levels, the split of half the channels
at every level but the last) and swaps its two constrained layers for free ones: the invertible 1x1 convolution
becomes a standard 1x1 (and 3x3) convolution, the affine coupling a residual dense block (RDB, Zhang et al. 2018).
The encoder and the decoder mirror each other. Both speak the teacher's latent layout
(kdforge/models/flow_layout.py): the encoder returns, and the decoder takes, exactly the list
`latent_shapes(C, img_size, latent_levels)`, so a student drops in wherever the teacher's encode / decode is used.

Layout of one level (`_Level`, the same module in both directions; c = channels after the squeeze, w = `width`):
  inp        conv3x3 (c -> w): the level's entry; the 3x3 of "1x1 and 3x3 convolutions", the one place that mixes
             neighbouring 2 x 2 blocks of the squeezed input before the steps
  steps.k    `FlowStep` x K: ActNorm(w), conv1x1 (w -> w, no bias) where the flow has its invertible 1x1
             convolution, then `rdbs_per_step` RDBs where it has its coupling layer
  out        conv1x1 (w -> c, no bias) + ActNorm(c): back to the flow's channel count (the level transition of
             Baranchuk et al. 2021's SRFlow student)
The encoder runs levels 1 .. L, each after a squeeze, and splits as the flow does; the decoder runs them L .. 1, each
followed by an unsqueeze, concatenating z_l in front of what comes up from below (the inverse of the split). Hooks
name the level of the same resolution alike in both: `levels.0` is the finest (16 x 16 at 32 px).

Fewer student levels than teacher levels (the paper's (K, L) = (3, 2) decoder against an L = 3 teacher, or its
K = 6, L = 3 encoder against its L = 4 teacher): the layouts are folded onto each other without learning anything.
`merge_latent_levels` unsqueezes the teacher's deepest latent and concatenates the next one in front, repeatedly,
which turns `latent_shapes(C, s, L)` into exactly `latent_shapes(C, s, L_s)` (at 32 px: [(6, 16, 16), (12, 8, 8),
(48, 4, 4)] -> [(6, 16, 16), (24, 8, 8)]); the decoder does this before its first (deepest) level and so spends its
capacity on the finest resolutions. `split_latent_levels` is the exact inverse, applied by the encoder after its last
level. The student's levels are therefore always the teacher's *finest* L_s levels.

ActNorm here is a learnable per-channel scale and bias initialised to the identity, without Glow's data-dependent
initialisation: a student is fitted by regression to the teacher from the first step, never needs a log-determinant,
and so needs neither the first-batch statistics nor an "initialised" flag in its state dict.

Initialisation: the steps' 1x1 convolutions start orthogonal (as Glow's invertible ones start as rotations) and each
RDB's fusion starts at 0.1 x PyTorch's default, so with the 0.2 residual scale every block starts close to the
identity and a deep stack neither blows up nor dies. Building runs under `torch.random.fork_rng`: the weights come
from the global generator's current state but the state is put back, so building a student does not shift the
random stream (data order, augmentation) of the run around it; two students built from the same state are equal.

Sizes at 32 px, 3 channels, width 64, growth 32, 4 RDB layers, 1 RDB per step, teacher L = 3 (parameters; MACs per
image by `kdforge.models.cost.count_macs`):
  encoder (K, L) = (6, 3)   2.68 M   0.297 G
  decoder (2, 3)            0.93 M   0.101 G
  decoder (1, 3)            0.49 M   0.052 G
  decoder (3, 2)            0.90 M   0.143 G
(3, 2) and (2, 3) have the same six steps, so nearly the same parameters ((2, 3) has one more level's entry and
exit); (3, 2) runs them at the two finer resolutions and costs more MACs; (1, 3) is about half of either.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdforge.models.cost import count_macs  # noqa: F401  (the docstring's sizes are counted with it)
from kdforge.models.flow_layout import latent_shapes, squeeze2d, unsqueeze2d
from kdforge.registry import MODELS

DECODER_OUTPUTS = ("none", "tanh_half")
RESIDUAL_SCALE = 0.2  # ESRGAN's scale of an RDB's residual branch
FUSION_INIT_SCALE = 0.1  # ESRGAN's down-scaling of residual-branch weights at init


# ---------------------------------------------------------------- latent layouts with fewer levels


def merge_latent_levels(latents: Sequence[torch.Tensor], levels: int) -> list[torch.Tensor]:
    """Fold an L-level latent list into `levels` levels (L >= levels): the deepest latents are unsqueezed and
    concatenated behind the next finer one (z_l first, as the flow's split puts it first) until `levels` remain;
    shapes go from `latent_shapes(C, s, L)` to `latent_shapes(C, s, levels)`. Nothing is learned."""
    if not 1 <= levels <= len(latents):
        raise ValueError(f"cannot merge {len(latents)} latent levels into {levels}")
    deepest = latents[-1]
    for z in reversed(latents[levels - 1:-1]):
        deepest = torch.cat([z, unsqueeze2d(deepest)], dim=1)
    return [*latents[:levels - 1], deepest]


def split_latent_levels(latents: Sequence[torch.Tensor], levels: int) -> list[torch.Tensor]:
    """The inverse of `merge_latent_levels`: unfold the last latent until there are `levels` of them, each time
    keeping the first half of its channels and squeezing the second half into the next level."""
    if levels < len(latents):
        raise ValueError(f"cannot split {len(latents)} latent levels into {levels}")
    out, deepest = list(latents[:-1]), latents[-1]
    for _ in range(levels - len(latents)):
        half = deepest.shape[1] // 2
        out.append(deepest[:, :half])
        deepest = squeeze2d(deepest[:, half:])
    return [*out, deepest]


# ---------------------------------------------------------------- building blocks


class ActNorm(nn.Module):
    """Per-channel affine y = x * scale + bias, initialised to the identity (no data-dependent init; see the
    module docstring)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias


class ResidualDenseBlock(nn.Module):
    """A residual dense block (Zhang et al. 2018, "Residual Dense Network"; residual scaled as in ESRGAN).

      layers.i   conv3x3 (channels + i * growth -> growth), LeakyReLU 0.2: each layer sees the block input and
                 every earlier layer's output, concatenated (dense connectivity)
      fusion     conv1x1 (channels + n * growth -> channels): local feature fusion of all of them
      out        x + 0.2 * fusion(...)                          (local residual learning)
    """

    def __init__(self, channels: int, growth: int = 32, n_layers: int = 4) -> None:
        super().__init__()
        if n_layers < 1 or growth < 1:
            raise ValueError(f"ResidualDenseBlock: n_layers and growth must be >= 1, got {n_layers}, {growth}")
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels + i * growth, growth, 3, 1, 1), nn.LeakyReLU(0.2))
            for i in range(n_layers))
        self.fusion = nn.Conv2d(channels + n_layers * growth, channels, 1)
        with torch.no_grad():
            self.fusion.weight.mul_(FUSION_INIT_SCALE)
            self.fusion.bias.mul_(FUSION_INIT_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return x + RESIDUAL_SCALE * self.fusion(torch.cat(features, dim=1))


class FlowStep(nn.Module):
    """One student step in place of a Glow step: ActNorm, conv1x1 (no bias, orthogonal init) for the invertible
    1x1 convolution, `n_rdbs` residual dense blocks for the coupling layer."""

    def __init__(self, width: int, growth: int, rdb_layers: int, n_rdbs: int) -> None:
        super().__init__()
        self.actnorm = ActNorm(width)
        self.mix = nn.Conv2d(width, width, 1, bias=False)
        nn.init.orthogonal_(self.mix.weight)
        self.rdbs = nn.Sequential(*[ResidualDenseBlock(width, growth, rdb_layers) for _ in range(n_rdbs)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdbs(self.mix(self.actnorm(x)))


class _Level(nn.Module):
    """One level at `channels` (the flow's count after the squeeze): conv3x3 in to `width`, K steps, conv1x1 out
    (no bias) + ActNorm back to `channels`."""

    def __init__(self, channels: int, width: int, steps: int, growth: int, rdb_layers: int, rdbs_per_step: int
                 ) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, 1, 1)
        self.steps = nn.Sequential(*[FlowStep(width, growth, rdb_layers, rdbs_per_step) for _ in range(steps)])
        self.out = nn.Sequential(nn.Conv2d(width, channels, 1, bias=False), ActNorm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.steps(self.inp(x)))


def _level_channels(image_channels: int, levels: int) -> list[int]:
    """Channels of each level after its squeeze, with the flow's split: 4C, 8C, 16C, ... (4 x what went on)."""
    channels, c = [], image_channels
    for _ in range(levels):
        channels.append(4 * c)
        c *= 2  # the squeeze quadruples, the split keeps half
    return channels


def _check_sizes(what: str, channels: int, img_size: int, levels: int, latent_levels: int, steps: int,
                 width: int, growth: int, rdb_layers: int, rdbs_per_step: int) -> None:
    if channels < 1 or width < 1 or growth < 1 or rdb_layers < 1 or rdbs_per_step < 1 or steps < 1:
        raise ValueError(f"{what}: channels, width, growth, rdb_layers, rdbs_per_step and steps must be >= 1")
    if not 1 <= levels <= latent_levels:
        raise ValueError(f"{what}: levels must be in [1, latent_levels={latent_levels}] (the student's levels are "
                         f"the teacher's finest ones), got {levels}")
    latent_shapes(channels, img_size, latent_levels)  # raises when the image side does not divide


# ---------------------------------------------------------------- encoder and decoder


class RDBEncoder(nn.Module):
    """Student encoder x (B, C, H, W) -> [z_1, ..., z_L'], with L' = `latent_levels` (the teacher's L; default
    `levels`) and shapes exactly `latent_shapes(in_channels, img_size, latent_levels)`.

    Level l: squeeze, `_Level` (conv3x3 in, `steps` x `FlowStep`, conv1x1 + ActNorm out), then z_l = the first half
    of the channels and the second half goes on (the last student level keeps all). With `levels` < `latent_levels`
    the last output is split into the teacher's deeper levels by `split_latent_levels`. The paper's encoder is
    K = 6, L = 3 (`steps=6, levels=3`); against its L = 4 teacher that is `latent_levels=4`.
    """

    def __init__(self, in_channels: int = 3, img_size: int = 32, levels: int = 3, steps: int = 6, width: int = 64,
                 growth: int = 32, rdb_layers: int = 4, rdbs_per_step: int = 1, latent_levels: int | None = None
                 ) -> None:
        super().__init__()
        latent_levels = levels if latent_levels is None else int(latent_levels)
        _check_sizes("rdb_encoder", in_channels, img_size, levels, latent_levels, steps, width, growth, rdb_layers,
                     rdbs_per_step)
        self.in_channels, self.img_size = in_channels, img_size
        self.num_levels, self.latent_levels = levels, latent_levels
        self.latent_shapes = latent_shapes(in_channels, img_size, latent_levels)
        with torch.random.fork_rng(devices=[]):  # see the module docstring
            self.levels = nn.ModuleList(_Level(c, width, steps, growth, rdb_layers, rdbs_per_step)
                                        for c in _level_channels(in_channels, levels))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        latents = []
        for i, level in enumerate(self.levels):
            h = level(squeeze2d(x))
            if i == self.num_levels - 1:
                latents.append(h)
            else:
                half = h.shape[1] // 2
                latents.append(h[:, :half])
                x = h[:, half:]
        return split_latent_levels(latents, self.latent_levels)


class RDBDecoder(nn.Module):
    """Student decoder [z_1, ..., z_L'] -> x (B, C, H, W), the encoder mirrored; L' = `latent_levels` (the
    teacher's L; default `levels`), the latents shaped `latent_shapes(out_channels, img_size, latent_levels)`.

    The teacher's latents are first folded into `levels` levels (`merge_latent_levels`), then level l = L .. 1:
    input z_L, or z_l concatenated in front of what came up from level l + 1; `_Level`; unsqueeze. The result of
    level 1 is the image: unbounded with `output="none"` (the teacher's images are in [-0.5, 0.5] and a regression
    target needs no squashing), or 0.5 tanh(.) in (-0.5, 0.5) with `output="tanh_half"`. The paper's decoders are
    (K, L) = (2, 3), (1, 3) and (3, 2) (`steps`, `levels`), each with `latent_levels` the teacher's L.
    """

    def __init__(self, out_channels: int = 3, img_size: int = 32, levels: int = 3, steps: int = 2, width: int = 64,
                 growth: int = 32, rdb_layers: int = 4, rdbs_per_step: int = 1, latent_levels: int | None = None,
                 output: str = "none") -> None:
        super().__init__()
        latent_levels = levels if latent_levels is None else int(latent_levels)
        _check_sizes("rdb_decoder", out_channels, img_size, levels, latent_levels, steps, width, growth, rdb_layers,
                     rdbs_per_step)
        if output not in DECODER_OUTPUTS:
            raise ValueError(f"rdb_decoder: unknown output {output!r}; use one of "
                             f"{', '.join(map(repr, DECODER_OUTPUTS))}")
        self.out_channels, self.img_size, self.output = out_channels, img_size, output
        self.num_levels, self.latent_levels = levels, latent_levels
        self.latent_shapes = latent_shapes(out_channels, img_size, latent_levels)
        with torch.random.fork_rng(devices=[]):  # see the module docstring
            self.levels = nn.ModuleList(_Level(c, width, steps, growth, rdb_layers, rdbs_per_step)
                                        for c in _level_channels(out_channels, levels))

    @property
    def input_latent_shapes(self) -> list[tuple[int, int, int]]:
        """What `forward` takes, one tensor per level (kdforge.deploy builds export examples from it)."""
        return list(self.latent_shapes)

    def forward(self, *latents: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """decoder([z_1, ..., z_L]) or decoder(z_1, ..., z_L): the list form for code, the spread form for
        exporters, which pass one tensor per input."""
        if len(latents) == 1 and isinstance(latents[0], (list, tuple)):
            latents = tuple(latents[0])
        shapes = [tuple(z.shape[1:]) for z in latents]
        if shapes != self.latent_shapes:
            raise ValueError(f"rdb_decoder: expected {self.latent_levels} latents shaped {self.latent_shapes} "
                             f"(the teacher's layout), got {shapes}")
        latents = merge_latent_levels(latents, self.num_levels)
        h = latents[-1]
        for i in reversed(range(self.num_levels)):
            if i < self.num_levels - 1:
                h = torch.cat([latents[i], h], dim=1)
            h = unsqueeze2d(self.levels[i](h))
        return 0.5 * torch.tanh(h) if self.output == "tanh_half" else h


class FlowStudent(nn.Module):
    """An encoder and a decoder student trained together by flow distillation (kdforge/distillers/flow_kd.py), as
    one model a recipe names (`student: {name: flow_student, encoder: {...}, decoder: {...}}`): `forward(x)` is
    decoder(encoder(x)), and `encoder` / `decoder` are the two networks, exported and loaded by those names.
    Any module with `encoder` and `decoder` attributes speaking the teacher's latent layout works the same."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@MODELS.register("flow_student")
def flow_student(num_classes: int | None = None, *, in_channels: int = 3, img_size: int = 32,
                 latent_levels: int = 3, encoder: dict | None = None, decoder: dict | None = None) -> FlowStudent:
    """The paper's student pair for a `latent_levels`-level teacher: an `rdb_encoder` (default K = 6, L = 3) and an
    `rdb_decoder` (default (K, L) = (2, 3); the paper's smaller ones are (1, 3) and (3, 2)); `encoder` / `decoder`
    hold each one's options (steps, levels, width, growth, rdb_layers, rdbs_per_step, output)."""
    enc = {"steps": 6, "levels": min(3, latent_levels), **(encoder or {})}
    dec = {"steps": 2, "levels": min(3, latent_levels), **(decoder or {})}
    return FlowStudent(RDBEncoder(in_channels=in_channels, img_size=img_size, latent_levels=latent_levels, **enc),
                       RDBDecoder(out_channels=in_channels, img_size=img_size, latent_levels=latent_levels, **dec))


@MODELS.register("rdb_encoder")
def rdb_encoder(num_classes: int | None = None, **kw) -> RDBEncoder:
    """Flow-distillation student encoder image -> teacher-layout latents (in_channels, img_size, levels 3, steps 6,
    width 64, growth 32, rdb_layers 4, rdbs_per_step 1, latent_levels)."""
    return RDBEncoder(**kw)


@MODELS.register("rdb_decoder")
def rdb_decoder(num_classes: int | None = None, **kw) -> RDBDecoder:
    """Flow-distillation student decoder teacher-layout latents -> image (out_channels, img_size, levels 3, steps 2,
    width 64, growth 32, rdb_layers 4, rdbs_per_step 1, latent_levels, output "none" / "tanh_half")."""
    return RDBDecoder(**kw)
