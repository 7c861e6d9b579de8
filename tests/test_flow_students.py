"""Tests for the flow-distillation CNN students (kdforge/models/flow_students.py): the teacher's latent layout in and
out for every (K, L) of the paper, gradients, the residual dense block, the sizes' order, state dicts and the RNG.

Tiny students (16 px, width 16, growth 8, 2 RDB layers) against an L = 3 teacher layout keep this file fast; the
paper-sized ones are only counted, on the meta device.
"""
from __future__ import annotations

import pytest
import torch

import kdforge.models  # noqa: F401  (registers the students)
from kdforge.models import build_model
from kdforge.models.cost import count_macs
from kdforge.models.flow_layout import latent_shapes
from kdforge.models.flow_students import (
    RDBDecoder,
    RDBEncoder,
    ResidualDenseBlock,
    merge_latent_levels,
    split_latent_levels,
)

SIZE, TEACHER_LEVELS = 16, 3
TINY = dict(img_size=SIZE, width=16, growth=8, rdb_layers=2, latent_levels=TEACHER_LEVELS)
ENCODER_KL = (6, 3)
DECODER_KLS = [(2, 3), (1, 3), (3, 2)]  # the paper's three decoder sizes (A.1.2)


def _latents(batch: int = 2, size: int = SIZE, levels: int = TEACHER_LEVELS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, *shape, generator=gen) for shape in latent_shapes(3, size, levels)]


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_gradients(model: torch.nn.Module, out: torch.Tensor) -> None:
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


# ---------------------------------------------------------------- layout and gradients


def test_encoder_returns_the_teacher_layout_and_trains() -> None:
    k, levels = ENCODER_KL
    encoder = build_model("rdb_encoder", steps=k, levels=levels, **TINY)
    latents = encoder(torch.randn(2, 3, SIZE, SIZE))
    assert [tuple(z.shape[1:]) for z in latents] == latent_shapes(3, SIZE, TEACHER_LEVELS)
    assert latents[0].shape[0] == 2
    _check_gradients(encoder, torch.cat([z.flatten(1) for z in latents], 1))


@pytest.mark.parametrize("k, levels", DECODER_KLS)
def test_decoder_takes_the_teacher_layout_and_trains(k: int, levels: int) -> None:
    decoder = build_model("rdb_decoder", steps=k, levels=levels, **TINY)
    image = decoder(_latents())
    assert image.shape == (2, 3, SIZE, SIZE)
    _check_gradients(decoder, image)


def test_fewer_level_encoder_splits_into_the_teacher_layout() -> None:
    # the paper's L = 3 encoder against its L = 4 teacher, scaled down: 2 student levels, 3 teacher levels
    encoder = RDBEncoder(steps=1, levels=2, **TINY)
    latents = encoder(torch.randn(2, 3, SIZE, SIZE))
    assert [tuple(z.shape[1:]) for z in latents] == latent_shapes(3, SIZE, TEACHER_LEVELS)


def test_merge_and_split_fold_one_layout_onto_the_other() -> None:
    latents = _latents(size=32, levels=4)
    for levels in (1, 2, 3, 4):
        merged = merge_latent_levels(latents, levels)
        assert [tuple(z.shape[1:]) for z in merged] == latent_shapes(3, 32, levels)
        back = split_latent_levels(merged, 4)
        assert all(torch.equal(a, b) for a, b in zip(back, latents))
    # at 32 px, L = 3 -> 2: the deepest (48, 4, 4) unsqueezes to (12, 8, 8) behind z_2
    merged = merge_latent_levels(_latents(size=32), 2)
    assert torch.equal(merged[1][:, :12], _latents(size=32)[1])


def test_decoder_rejects_latents_of_another_layout() -> None:
    decoder = RDBDecoder(steps=1, levels=2, **TINY)
    with pytest.raises(ValueError, match="teacher's layout"):
        decoder(_latents(levels=2))
    with pytest.raises(ValueError, match="levels must be in"):
        RDBDecoder(steps=1, levels=4, **TINY)
    with pytest.raises(ValueError, match="divisible"):
        RDBEncoder(img_size=12, levels=3)


def test_tanh_half_output_is_bounded() -> None:
    decoder = RDBDecoder(steps=1, levels=3, output="tanh_half", **TINY)
    with torch.no_grad():
        image = decoder([100 * z for z in _latents()])
    assert image.abs().max() <= 0.5  # saturates at 0.5 in float32
    with pytest.raises(ValueError, match="unknown output"):
        RDBDecoder(output="tanh")


# ---------------------------------------------------------------- the residual dense block


def test_rdb_is_densely_connected() -> None:
    block = ResidualDenseBlock(channels=64, growth=32, n_layers=4)
    assert [layer[0].in_channels for layer in block.layers] == [64, 96, 128, 160]
    assert all(layer[0].out_channels == 32 and layer[0].kernel_size == (3, 3) for layer in block.layers)
    assert (block.fusion.in_channels, block.fusion.out_channels, block.fusion.kernel_size) == (192, 64, (1, 1))


def test_rdb_residual_is_scaled_by_a_fifth() -> None:
    block = ResidualDenseBlock(channels=8, growth=4, n_layers=3)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        branch = block(x) - x
        block.fusion.weight.mul_(5.0)  # fusion x 5 -> residual branch x 5: the output is x + 0.2 * fusion(...)
        block.fusion.bias.mul_(5.0)
        torch.testing.assert_close(block(x) - x, 5 * branch)
        block.fusion.weight.zero_()
        block.fusion.bias.zero_()
        assert torch.equal(block(x), x)


# ---------------------------------------------------------------- sizes, state, RNG


def test_paper_sizes_are_ordered() -> None:
    # the defaults (width 64, growth 32, 4 RDB layers) at 32 px against an L = 3 teacher, built on the meta device
    # (shapes only, nothing computed); measured:
    #   encoder (6, 3) 2,677,224 params 296.6 M MACs
    #   decoder (2, 3)   928,488 params 101.2 M MACs
    #   decoder (1, 3)   491,304 params  52.3 M MACs
    #   decoder (3, 2)   897,608 params 142.5 M MACs
    # (3, 2) and (2, 3) share six steps and (2, 3) adds one level's entry and exit, so it has a few more parameters;
    # (3, 2) runs all six steps at the two finer resolutions, so it costs the most MACs; (1, 3) is half of either.
    with torch.device("meta"):
        latents = [torch.zeros(1, *shape) for shape in latent_shapes(3, 32, 3)]
        encoder = RDBEncoder(steps=6, levels=3)
        sizes = {(k, levels): RDBDecoder(steps=k, levels=levels, latent_levels=3) for k, levels in DECODER_KLS}
        assert (_n_params(encoder), count_macs(encoder, torch.zeros(1, 3, 32, 32))) == (2_677_224, 296_583_168)
        sizes = {kl: (_n_params(d), count_macs(d, latents)) for kl, d in sizes.items()}
    assert sizes == {(2, 3): (928_488, 101_154_816), (1, 3): (491_304, 52_297_728), (3, 2): (897_608, 142_540_800)}
    params = {kl: p for kl, (p, _) in sizes.items()}
    macs = {kl: m for kl, (_, m) in sizes.items()}
    assert params[2, 3] > params[3, 2] > params[1, 3]
    assert macs[3, 2] > macs[2, 3] > macs[1, 3]


def test_state_dict_round_trips() -> None:
    torch.manual_seed(0)
    decoder = RDBDecoder(steps=1, levels=2, **TINY).eval()
    torch.manual_seed(1)
    fresh = RDBDecoder(steps=1, levels=2, **TINY).eval()
    latents = _latents()
    with torch.no_grad():
        assert not torch.equal(fresh(latents), decoder(latents)), "different seeds should give different students"
        fresh.load_state_dict(decoder.state_dict())
        assert torch.equal(fresh(latents), decoder(latents))


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    RDBEncoder(steps=1, **TINY)
    RDBDecoder(steps=1, **TINY)
    assert torch.equal(torch.get_rng_state(), state)
