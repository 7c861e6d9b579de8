"""Glow (kdforge/models/glow.py): exact invertibility, every log-determinant against a brute-force Jacobian, ActNorm's
data-dependent initialisation, the log-likelihood against an independent implementation (normflows), and the
bookkeeping a teacher needs (bits/dim, temperature, RNG isolation, checkpoints, hooks, export).

The flows are tiny (4 to 16 px, K = 2, L = 2, hidden 8 or 16); their zero-initialised parameters get seeded random
values (`_perturb`) so that couplings, priors and ActNorms are not the trivial maps they start as."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from kdforge.models import build_model
from kdforge.models.flow_layout import flatten_latents, squeeze2d
from kdforge.models.glow import ActNorm, AffineCoupling, FlowStep, Glow, InvConv1x1

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny flows: a second thread only adds contention


def _tiny(img_size: int = 16, **kw) -> Glow:
    kw = {"in_channels": 3, "levels": 2, "steps": 2, "hidden": 16, **kw}
    return Glow(img_size=img_size, **kw)


def _perturb(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Draw seeded N(0, std^2) values for every parameter that is still all zeros: the zero convs (coupling
    outputs, split priors), the top prior and uninitialised ActNorms, which would otherwise be trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def _images(n: int, size: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=dtype) - 0.5


def _ready(model: Glow, seed: int = 0, dtype=torch.float32) -> Glow:
    """ActNorm fitted to a batch, then the zero-initialised parameters perturbed."""
    model = model.to(dtype)
    model.initialize_actnorm(_images(8, model.img_size, seed=100 + seed, dtype=dtype))
    return _perturb(model, seed)


def _brute_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at x (batch of one), from the full Jacobian."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(x.shape)).flatten(), x.flatten())
    return torch.linalg.slogdet(jac)[1]


# ---------------------------------------------------------------- 1. exact inverse


@pytest.mark.parametrize("kw", [{}, {"lu": False}, {"learn_prior": False, "net_actnorm": False},
                                {"affine_clamp": "exp"}, {"affine_clamp": 2.0}])
def test_decode_inverts_encode(kw):
    model = _tiny(**kw)
    x = _images(4, 16, seed=1)
    latents = model.encode(x)  # fires the ActNorm initialisation
    assert model.actnorm_initialized
    _perturb(model)
    latents = model.encode(x)
    assert [tuple(z.shape[1:]) for z in latents] == model.latent_shapes == [(6, 8, 8), (24, 4, 4)]
    assert (model.decode(latents) - x).abs().max() < 1e-4
    assert (model.decode(flatten_latents(latents)) - x).abs().max() < 1e-4  # the flat (B, D) vector too
    eps = model.encode(x, standardized=True)
    assert (model.decode(eps, standardized=True) - x).abs().max() < 1e-4


# ---------------------------------------------------------------- 2. log-determinants against brute force


def _layers() -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(3)
    layers = {"actnorm": ActNorm(4), "invconv_lu": InvConv1x1(4, lu=True, generator=g),
              "invconv_plain": InvConv1x1(4, lu=False, generator=g)}
    for clamp in ("sigmoid", "exp", 1.5):
        layers[f"coupling_{clamp}"] = AffineCoupling(4, hidden=8, affine_clamp=clamp, generator=g)
    layers["coupling_plain_net"] = AffineCoupling(4, hidden=8, net_actnorm=False, generator=g)
    layers["step"] = FlowStep(4, 8, lu=True, net_actnorm=True, affine_clamp="sigmoid", generator=g)
    return layers


@pytest.mark.parametrize("name", list(_layers()))
def test_layer_logdet_matches_jacobian(name):
    layer = _perturb(_layers()[name].double(), seed=4, std=0.3)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y, logdet = layer(x)
    assert logdet.shape == (1,)
    assert torch.allclose(logdet, _brute_logdet(lambda v: layer(v)[0], x).reshape(1), atol=1e-10)
    assert torch.allclose(layer.inverse(y), x, atol=1e-10)
    x_back, inverse_logdet = layer(y, reverse=True)
    assert torch.allclose(inverse_logdet, -logdet, atol=1e-12)
    assert torch.allclose(_brute_logdet(layer.inverse, y).reshape(1), -logdet, atol=1e-10)


@pytest.mark.parametrize("lu", [True, False])
def test_flow_logdet_matches_jacobian(lu):
    model = _ready(_tiny(img_size=4, hidden=8, lu=lu), dtype=torch.float64)  # latents (6, 2, 2), (24, 1, 1)
    x = _images(1, 4, seed=6, dtype=torch.float64)
    _, logdet = model(x)
    brute = _brute_logdet(lambda v: flatten_latents(model(v)[0]), x)
    assert torch.allclose(logdet, brute.reshape(1), atol=1e-9)


# ---------------------------------------------------------------- 3. ActNorm's data-dependent initialisation


def test_actnorm_init_standardises_first_batch():
    model = _tiny().eval()
    actnorms = {name: m for name, m in model.named_modules() if isinstance(m, ActNorm)}
    assert len(actnorms) == 2 * 2 * 3  # per step: its own and two in the coupling NN
    params_before = {name: (m.bias, m.log_scale) for name, m in actnorms.items()}
    outputs = {}
    for name, m in actnorms.items():
        m.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(name, out[0]))
    x = _images(16, 16, seed=7)
    with torch.no_grad():  # eval mode and no_grad: initialisation still fires, on the first encoding call
        model(x)
    for name, y in outputs.items():
        assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(y.shape[1]), atol=1e-5), name
        assert torch.allclose(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(y.shape[1]), atol=1e-3), name
    for name, m in actnorms.items():  # fitted in place: same Parameter objects, still trainable, flag set
        assert m.bias is params_before[name][0] and m.log_scale.requires_grad
        assert m.is_initialized and bool(m.initialized)
    fitted = {k: v.clone() for k, v in model.state_dict().items()}
    model(_images(16, 16, seed=8))  # a second batch does not re-fit
    assert all(torch.equal(fitted[k], v) for k, v in model.state_dict().items())
    model.initialize_actnorm(_images(16, 16, seed=8))  # forced re-fit on a chosen batch
    assert not torch.equal(fitted["levels.0.steps.0.actnorm.bias"], model.levels[0].steps[0].actnorm.bias)


def test_actnorm_init_only_when_encoding_and_can_be_skipped():
    model = _tiny()
    model.decode([torch.randn(2, *shape) for shape in model.latent_shapes])  # decoding never initialises
    assert not model.actnorm_initialized
    model.skip_actnorm_init()
    model(_images(4, 16))
    assert model.actnorm_initialized
    assert all(not m.log_scale.any() for m in model.modules() if isinstance(m, ActNorm))
    # a first call with grad: init runs under no_grad inside, the real pass keeps its graph
    fresh = _tiny()
    fresh.log_prob(_images(4, 16)).mean().backward()
    missing = [n for n, p in fresh.named_parameters() if p.grad is None]
    assert not missing


# ---------------------------------------------------------------- 4. independent oracle: normflows


class _NegatedShift(nn.Module):
    """Our coupling NN as a normflows param map: normflows encodes y_b = (x_b - shift) * sigmoid(s + 2) with
    (shift, s) the even and odd channels, ours y_b = (x_b + shift) * sigmoid(s + 2), so its shift is minus ours."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        sign = torch.ones(h.shape[1], dtype=h.dtype)
        sign[0::2] = -1
        return h * sign.view(1, -1, 1, 1)


class _LastDimPrior(nn.Module):
    """Our split prior as a normflows context encoder, which must return [mean, log sigma] along the last dim."""

    def __init__(self, prior: nn.Module) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, kept: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.prior(kept), dim=-1)


def _nf_step(nf, step: FlowStep) -> nn.Module:
    """normflows' GlowBlock (coupling, 1x1 conv, ActNorm in its generative order) carrying our step's weights."""
    channels = step.actnorm.bias.shape[1]
    block = nf.flows.GlowBlock(channels, 4, scale_map="sigmoid", use_lu=step.invconv.lu).double()
    coupling, invconv, actnorm = block.flows
    coupling.flows[1].param_map = _NegatedShift(step.coupling.net)
    with torch.no_grad():
        if step.invconv.lu:
            for theirs, ours in (("P", "perm"), ("L", "lower"), ("U", "upper"), ("sign_S", "sign_s"),
                                 ("log_S", "log_s")):
                getattr(invconv, theirs).copy_(getattr(step.invconv, ours))
        else:
            invconv.W.copy_(step.invconv.weight)
        # normflows' ActNorm encodes (x - t) * exp(-s); ours (x + b) * exp(log_s)
        actnorm.s.copy_(-step.actnorm.log_scale)
        actnorm.t.copy_(-step.actnorm.bias)
        actnorm.data_dep_init_done.fill_(1.0)
    return block


def _nf_levels(nf, model: Glow) -> list[list[nn.Module]]:
    """Per level (finest first), normflows flows in their generative order: the steps last to first, then the
    Squeeze, whose inverse (run first when encoding) is the squeeze."""
    return [[_nf_step(nf, s) for s in reversed(level.steps)] + [nf.flows.Squeeze()] for level in model.levels]


@pytest.mark.filterwarnings("ignore:torch.lu is deprecated")  # normflows' own 1x1 conv constructor
@pytest.mark.parametrize("lu", [True, False])
def test_log_prob_matches_normflows(lu):
    """Whole-model comparison, float64. Conventions mapped: normflows' `forward` is the generative direction, so
    its `inverse` (and `MultiscaleFlow.inverse_and_log_det`/`log_prob`) is our encoding direction and its log-dets
    there are ours; its ActNorm and coupling shift have the opposite sign (mapped above); its LU 1x1 conv uses
    W = P L U with the same parametrisation; its Squeeze.inverse is our squeeze2d and its Merge('channel').inverse
    splits kept half first, latent second, as ours. With standard normal priors normflows' own MultiscaleFlow (its
    levels listed deepest first) is the oracle; with Glow's learned priors, which MultiscaleFlow cannot express
    (its split priors do not see the kept half), the levels are composed here from normflows' layers and its
    ConditionalDiagGaussian / DiagGaussian densities wrapping our prior networks."""
    nf = pytest.importorskip("normflows")
    x = _images(3, 8, seed=9, dtype=torch.float64)
    assert torch.equal(nf.flows.Squeeze().inverse(x)[0], squeeze2d(x))

    plain = _ready(_tiny(img_size=8, hidden=8, lu=lu, learn_prior=False), dtype=torch.float64)
    levels = _nf_levels(nf, plain)
    q0 = [nf.distributions.DiagGaussian(shape, trainable=False).double() for shape in reversed(plain.latent_shapes)]
    oracle = nf.MultiscaleFlow(q0, levels[::-1], [nf.flows.Merge()], class_cond=False)
    latents, logdet = plain(x)
    nf_latents, nf_logdet = oracle.inverse_and_log_det(x)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(latents, reversed(nf_latents)))
    assert torch.allclose(logdet, nf_logdet, atol=1e-9)
    assert torch.allclose(plain.log_prob(x), oracle.log_prob(x, None), atol=1e-9)

    learned = _ready(_tiny(img_size=8, hidden=8, lu=lu, learn_prior=True), seed=1, dtype=torch.float64)
    log_q, h = torch.zeros(len(x), dtype=torch.float64), x
    for level, flows in zip(learned.levels, _nf_levels(nf, learned)):
        for flow in reversed(flows):
            h, step_logdet = flow.inverse(h)
            log_q = log_q + step_logdet
        if level.split:
            [h, z], _ = nf.flows.Merge().inverse(h)
            log_q = log_q + nf.distributions.base.ConditionalDiagGaussian(z.shape[1:], _LastDimPrior(level.prior)) \
                .log_prob(z, h)
        else:
            top = nf.distributions.DiagGaussian(h.shape[1:]).double()
            with torch.no_grad():
                top.loc.copy_(level.prior.mean.expand(1, *h.shape[1:]))
                top.log_scale.copy_(level.prior.log_scale.expand(1, *h.shape[1:]))
            log_q = log_q + top.log_prob(h)
    assert torch.allclose(learned.log_prob(x), log_q, atol=1e-9)


# ---------------------------------------------------------------- 5. bookkeeping


@pytest.mark.parametrize("n_bits", [8, 5])
def test_bits_per_dim_on_uniform_noise(n_bits):
    model = _ready(_tiny(n_bits=n_bits))
    x = _images(4, 16, seed=10)
    bpd = model.bits_per_dim(x)
    d = 3 * 16 * 16
    assert bpd.shape == (4,) and torch.isfinite(bpd).all()
    by_hand = -(model.log_prob(x) - d * math.log(2 ** n_bits)) / (d * math.log(2))
    assert torch.allclose(bpd, by_hand, atol=1e-5)


def test_preprocess_dequantises_within_the_bin():
    model = _tiny(n_bits=5)
    x01 = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(11)) / 255
    k = torch.floor(torch.round(x01 * 255) / 8)  # the 5-bit level
    x = model.preprocess(x01, generator=torch.Generator().manual_seed(12))
    assert torch.equal(torch.floor((x + 0.5) * 32), k) and x.min() >= -0.5 and x.max() < 0.5
    state = torch.get_rng_state()
    centred = model.eval().preprocess(x01)  # eval without a generator: bin centres, global RNG untouched
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.allclose(centred, (k + 0.5) / 32 - 0.5)
    eight = _tiny()
    assert torch.equal(eight.postprocess(eight.preprocess(x01, torch.Generator().manual_seed(0))),
                       torch.round(x01 * 255) / 255)


def test_temperature_zero_decodes_prior_means():
    model = _ready(_tiny())  # perturbed: the priors' means and scales are not 0 and 1
    x0 = model.sample(3, temperature=0.0)
    latents, _, means, _ = model.encode_with_prior(x0)
    for z, mean in zip(latents, means):
        assert (z - mean).abs().max() < 1e-4
    assert (latents[-1] - model.levels[-1].prior.mean).abs().max() < 1e-4
    assert torch.allclose(model.decode(3, temperature=0.0), x0)
    g1, g2 = torch.Generator().manual_seed(13), torch.Generator().manual_seed(13)
    sampled = model.sample(2, 0.7, generator=g1)
    eps = [0.7 * torch.randn(2, *s, generator=g2) for s in model.latent_shapes]
    assert torch.allclose(sampled, model.decode(eps, standardized=True))
    with pytest.raises(ValueError, match="temperature"):
        model.decode(eps, temperature=0.5)


def test_building_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = Glow(img_size=8, levels=2, steps=2, hidden=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = Glow(img_size=8, levels=2, steps=2, hidden=8, seed=3)
    c = Glow(img_size=8, levels=2, steps=2, hidden=8, seed=4)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.levels[0].steps[0].invconv.lower, c.levels[0].steps[0].invconv.lower)
    w = a.levels[1].steps[1].invconv.weight_matrix()  # starts as a rotation
    assert torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-5)


def test_state_dict_round_trip_keeps_actnorm_flag():
    source = _ready(_tiny())
    state = source.state_dict()
    flags = [k for k in state if k.endswith("initialized")]
    assert len(flags) == 12 and all(bool(state[k]) for k in flags)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = _tiny(seed=7)
    restored.load_state_dict(torch.load(buffer))
    assert restored.actnorm_initialized
    x = _images(4, 16, seed=14)  # a batch the ActNorms never saw: must not re-fit
    latents, logdet = restored(x)
    ref_latents, ref_logdet = source(x)
    assert all(torch.equal(a, b) for a, b in zip(latents, ref_latents)) and torch.equal(logdet, ref_logdet)
    # loading an uninitialised model's state clears the flags; a checkpoint without them counts as trained
    restored.load_state_dict(_tiny().state_dict())
    assert not restored.actnorm_initialized
    foreign = {k: v for k, v in state.items() if not k.endswith("initialized")}
    restored.load_state_dict(foreign)
    assert restored.actnorm_initialized


def test_registry_hooks_and_export():
    model = build_model("glow", num_classes=10, img_size=8, levels=2, steps=2, hidden=8)
    assert isinstance(model, Glow)
    names = dict(model.named_modules())
    for name in ("levels.0.steps.1.coupling", "levels.0.steps.1.coupling.net.conv_in", "levels.1.steps.0.actnorm",
                 "levels.0.prior", "levels.1.prior"):
        assert name in names, name
    x = _images(2, 8, seed=15)
    model.initialize_actnorm(x)
    seen = []
    names["levels.0.steps.1.coupling"].register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs.get("reverse", False)), with_kwargs=True)
    latents = model.encode(x)
    model.decode(latents)
    assert seen == [False, True]  # hooks fire both ways, the direction in the kwargs
    exported = torch.export.export(model, (x,)).module()
    out_latents, out_logdet = exported(x)
    ref_latents, ref_logdet = model(x)
    assert all(torch.allclose(a, b) for a, b in zip(out_latents, ref_latents))
    assert torch.allclose(out_logdet, ref_logdet)
