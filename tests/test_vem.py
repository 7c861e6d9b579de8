"""VEM's building blocks: the GAN-compression models (kdforge/models/image_gan.py) and the pure losses of
kdforge/losses/vem.py (Langevin sampling, the energy and student objectives, generator-KD terms, VID and patch
InfoNCE), each checked against its formula written out naively here."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

import kdforge.models  # noqa: F401  (registers every model)
from kdforge.losses import vem
from kdforge.losses.vem import (
    energy_model_loss,
    feature_mimic_loss,
    gram_matrix,
    image_patches,
    langevin_sample,
    output_mimic_loss,
    patch_nce,
    ssim,
    style_loss,
    total_variation,
    vem_student_loss,
    vid_pixel_nll,
)
from kdforge.models import build_model
from kdforge.models.image_gan import EnergyNet, _SpectralBound, count_macs
from kdforge.models.state import no_weight_grads
from kdforge.registry import LOSSES

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny nets: a second thread only adds contention


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- models

SMALL = {  # narrow versions, so building and running them takes milliseconds
    "unet_generator": {"ngf": 8},
    "patchgan_discriminator": {"ndf": 8},
    "dcgan_generator": {"ngf": 8},
    "sn_discriminator": {"ndf": 8},
    "energy_net": {"nef": 8},
}


def _forward(name: str, model: nn.Module, size: int) -> torch.Tensor:
    x = torch.randn(2, 3, size, size)
    if name == "dcgan_generator":
        return model(torch.randn(2, 100))
    if name == "patchgan_discriminator":
        return model(x, torch.randn(2, 3, size, size))
    if name == "energy_net":
        return model(x, torch.randn(2, 3, size, size))
    return model(x)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", list(SMALL))
def test_model_shapes_and_gradients(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, img_size=size, **SMALL[name]).train()
    out = _forward(name, model, size)
    expected = {"unet_generator": (2, 3, size, size), "dcgan_generator": (2, 3, size, size),
                "patchgan_discriminator": (2, 1, 14, 14), "sn_discriminator": (2, 1), "energy_net": (2,)}[name]
    assert out.shape == expected
    if name.endswith("generator"):
        assert out.abs().max() <= 1.0  # tanh images in [-1, 1]
    out.float().pow(2).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no finite gradient for {pname}"


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", list(SMALL))
def test_width_multiplier_shrinks_parameters_about_quadratically(name: str, size: int) -> None:
    # the default (teacher) widths; on the meta device (nothing allocated) except the spectral-norm nets, whose
    # power iterations at construction run slower there than on the CPU
    with torch.device("cpu" if name in ("sn_discriminator", "energy_net") else "meta"):
        full = _n_params(build_model(name, img_size=size, width=1.0))
        quarter = _n_params(build_model(name, img_size=size, width=0.25))
    # 1/16 for hidden-to-hidden layers; the input and output layers (DCGAN's z projection) shrink linearly
    assert 1 / 16 <= quarter / full < 2.5 / 16, f"{name}: {quarter} / {full}"


@pytest.mark.parametrize("name", ["sn_discriminator", "energy_net", "unet_generator"])
def test_state_dict_round_trip_and_deepcopy(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, img_size=32, **SMALL[name])
    _forward(name, model.train(), 32)  # one power iteration / BN update, so the buffers are not the initial ones
    torch.manual_seed(1)
    fresh = build_model(name, img_size=32, **SMALL[name])
    fresh.load_state_dict(model.state_dict())
    torch.manual_seed(2)
    a = _forward(name, model.eval(), 32)
    torch.manual_seed(2)
    b = _forward(name, fresh.eval(), 32)
    torch.manual_seed(2)
    c = _forward(name, copy.deepcopy(model), 32)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_published_sizes() -> None:
    with torch.device("meta"):  # shapes only: nothing allocated, nothing computed
        teacher = build_model("unet_generator", img_size=256)
        student = build_model("unet_generator", img_size=256, width=0.25)
        x = torch.empty(1, 3, 256, 256)
    # VEM Table 1: Pix2Pix U-Net 54.40 M parameters; OMGD's ngf-16 student 3.40 M
    assert abs(_n_params(teacher) - 54.40e6) / 54.40e6 < 0.001
    assert abs(_n_params(student) - 3.40e6) / 3.40e6 < 0.002
    # FlopCounterMode counts a stride-2 transposed conv at its true cost (input pixels x C_in x C_out x k^2); the
    # paper's 1.22 G (torchprofile) counts it per output pixel, 4x more: encoder + 4 x decoder = 1.2187 G
    enc = sum(count_macs(m, torch.empty(1, m[0].in_channels, 256 // 2 ** i, 256 // 2 ** i, device="meta"))
              for i, m in enumerate(student.down))
    assert count_macs(student, x) == 406_323_200
    assert abs(enc + 4 * (406_323_200 - enc) - 1.22e9) / 1.22e9 < 0.002
    # the pix2pix 70x70 PatchGAN at 256 px, conditional (6 channels), by hand: convs + BN + biases
    d = build_model("patchgan_discriminator", img_size=256)
    assert d.n_layers == 3
    assert _n_params(d) == (6 * 64 * 16 + 64) + (64 * 128 * 16 + 256) + (128 * 256 * 16 + 512) \
        + (256 * 512 * 16 + 1024) + (512 * 16 + 1) == 2_768_705
    assert d(torch.zeros(1, 3, 256, 256), torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    # the DCGAN example's generator (64 px, ngf 64, z 100): 3,576,704 parameters
    assert _n_params(build_model("dcgan_generator", img_size=64)) == 3_576_704


def test_energy_net_at_256_px_is_the_reimplementations_layout() -> None:
    e = EnergyNet(img_size=256)
    widths = [(b.residual[0].in_channels, b.residual[2].out_channels) for b in e.blocks]
    assert widths == [(32, 64), (64, 128)] + [(128, 128)] * 5
    assert isinstance(e.blocks[2].shortcut, nn.Identity) and not isinstance(e.blocks[0].shortcut, nn.Identity)
    assert len(EnergyNet(img_size=32).blocks) == 4  # 32 -> pooled 16 -> 1 px


def test_spectral_bound_caps_large_weights_and_keeps_small_ones() -> None:
    torch.manual_seed(0)
    big = torch.randn(16, 8, 3, 3) * 5
    bound = _SpectralBound(big).train()
    for _ in range(30):
        w = bound(big)
    assert abs(torch.linalg.matrix_norm(w.flatten(1), ord=2).item() - 1.0) < 1e-3
    small = torch.randn(16, 8, 3, 3) * 1e-3
    assert torch.equal(_SpectralBound(small)(small), small)


def test_patchgan_condition_is_checked() -> None:
    d = build_model("patchgan_discriminator", img_size=32, ndf=8)
    with pytest.raises(ValueError, match="cond_channels=3"):
        d(torch.zeros(1, 3, 32, 32))
    u = build_model("patchgan_discriminator", img_size=32, ndf=8, cond_channels=0)
    assert u(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 14, 14)
    with pytest.raises(ValueError, match="img_size"):
        build_model("unet_generator", img_size=48)


def test_mac_count_of_a_small_conv_net_equals_a_hand_count() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # 16x16 out
        nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(),  # 8x8 out
        nn.ConvTranspose2d(16, 4, 4, stride=2, padding=1),  # 8x8 in -> 16x16 out
        nn.Flatten(), nn.Linear(4 * 16 * 16, 10),
    )
    hand = (16 * 16 * 8 * 3 * 3 * 3  # output pixels x C_out x (C_in x k x k)
            + 8 * 8 * 16 * 8 * 4 * 4
            + 8 * 8 * 16 * 4 * 4 * 4  # transposed: input pixels x C_in x C_out x k x k
            + 1024 * 10)
    assert count_macs(net, torch.zeros(1, 3, 16, 16)) == hand == 262_144
    assert count_macs(net, torch.zeros(3, 3, 16, 16)) == 3 * hand


# ---------------------------------------------------------------- Langevin sampling


def test_langevin_reaches_the_known_gaussian() -> None:
    """E(x) = ||x - mu||^2 / (2 sigma^2): exp(-E) is N(mu, sigma^2 I). With Eq. 7's coupled noise
    (noise_std = sqrt(2 step)), a = step / sigma^2, the discretised chain's stationary law is N(mu, sigma^2 / (1 - a/2))
    and it forgets its start as (1 - a)^K."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.linspace(-2.0, 3.0, 8)
    sigma = 0.7
    step = 0.02 * sigma ** 2  # a = 0.02: 2% variance inflation; (0.98)^400 = 3e-4 of the start left
    init = torch.empty(4000, 8).uniform_(-10, 10, generator=gen)
    x = langevin_sample(lambda v: ((v - mu) ** 2).sum(1) / (2 * sigma ** 2), init, steps=400, step_size=step,
                        noise_std=None, generator=gen)
    assert (x.mean(0) - mu).abs().max() < 4 * sigma / math.sqrt(4000)
    var = x.var(0).mean()
    assert abs(var / (sigma ** 2 / (1 - 0.01)) - 1) < 0.03
    assert abs(var / sigma ** 2 - 1) < 0.05


def test_langevin_without_noise_descends_and_clamps() -> None:
    x = langevin_sample(lambda v: (v ** 2).sum(1) / 2, torch.full((2, 3), 4.0), steps=3, step_size=0.5,
                        noise_std=0.0)
    assert torch.allclose(x, torch.full((2, 3), 0.5))  # 4 -> 2 -> 1 -> 0.5
    y = langevin_sample(lambda v: -(v ** 2).sum(1), torch.full((2, 3), 0.9), steps=5, step_size=1.0, noise_std=0.0,
                        clamp=(-1.0, 1.0))
    assert torch.equal(y, torch.ones(2, 3))
    assert torch.equal(langevin_sample(lambda v: v.sum(1), torch.ones(2, 3), 0, 1.0, 0.1), torch.ones(2, 3))


def _energy_and_images(seed: int = 0) -> tuple[EnergyNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return EnergyNet(img_size=16, nef=4), torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1


@pytest.mark.parametrize("train_mode", [False, True])
def test_langevin_is_bit_exact_for_a_seed_and_touches_no_parameter(train_mode: bool) -> None:
    e, t, s = _energy_and_images()
    e.train(train_mode)
    s = s.requires_grad_(True)
    runs = []
    for seed in (5, 5, 6):
        net = copy.deepcopy(e)  # in training mode the spectral-norm buffers move with every call
        chain = langevin_sample(lambda x, net=net: net(x, s), s, steps=10, step_size=100.0, noise_std=0.005,
                                generator=torch.Generator().manual_seed(seed))
        runs.append(chain)
        assert not chain.requires_grad and chain.dtype == torch.float32
        assert all(p.grad is None for p in net.parameters())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert s.grad is None
    assert not torch.equal(runs[0], s)


def test_langevin_runs_in_fp32_under_no_grad_and_autocast() -> None:
    e, _, s = _energy_and_images()
    e.eval()
    seen = []

    def energy(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        out = e(x, s)
        seen.append(out.dtype)
        return out

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = langevin_sample(energy, s.to(torch.bfloat16), steps=2, step_size=1.0, noise_std=0.01,
                            generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and set(seen) == {torch.float32}


# ---------------------------------------------------------------- the energy and student objectives


def _vem_step_parts(seed: int = 0):
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.Tanh())
    teacher = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh()).requires_grad_(False)
    energy = EnergyNet(img_size=16, nef=4)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    t_tilde = langevin_sample(lambda v: energy(v, s.detach()), s, steps=3, step_size=10.0, noise_std=0.005,
                              generator=torch.Generator().manual_seed(1))
    return student, energy, t, s, t_tilde


def test_energy_model_loss_updates_only_the_energy_model() -> None:
    student, energy, t, s, t_tilde = _vem_step_parts()
    before_student = copy.deepcopy(student.state_dict())
    before_energy = {k: v.clone() for k, v in energy.named_parameters()}
    opt = torch.optim.Adam(energy.parameters(), lr=1e-2)
    loss = energy_model_loss(energy, t, s, t_tilde)
    assert not loss.requires_grad or loss.grad_fn is not None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in energy.parameters())
    opt.step()
    assert all(torch.equal(v, before_student[k]) for k, v in student.state_dict().items())
    assert any(not torch.equal(p, before_energy[k]) for k, p in energy.named_parameters())
    # the value is the formula (eval: the spectral-norm buffers stay put between the calls)
    energy.eval()
    with torch.no_grad():
        pos, neg = energy(t, s), energy(t_tilde, s)
        value = energy_model_loss(energy, t, s, t_tilde, reg_weight=0.05)
    assert torch.allclose(value, pos.mean() - neg.mean() + 0.05 * (pos ** 2 + neg ** 2).mean())


def test_student_loss_reaches_only_the_student() -> None:
    student, energy, t, s, t_tilde = _vem_step_parts()
    energy.eval()
    loss = vem_student_loss(energy, t, s, t_tilde)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in energy.parameters())
    assert all(p.requires_grad for p in energy.parameters())  # restored after the loss
    # Eq. 9: the gradient with respect to s is that of mean E(t, s) - mean E(t~, s) at fixed t, t~
    s_leaf = s.detach().requires_grad_(True)
    vem_student_loss(energy, t, s_leaf, t_tilde).backward()
    s_ref = s.detach().requires_grad_(True)
    (energy(t, s_ref).mean() - energy(t_tilde, s_ref).mean()).backward()
    assert torch.allclose(s_leaf.grad, s_ref.grad)


def test_frozen_restores_requires_grad_even_on_error() -> None:
    net = nn.Linear(2, 2)
    net.bias.requires_grad_(False)
    with pytest.raises(RuntimeError), no_weight_grads(net):
        assert not any(p.requires_grad for p in net.parameters())
        raise RuntimeError
    assert net.weight.requires_grad and not net.bias.requires_grad


def test_energy_must_be_per_sample() -> None:
    with pytest.raises(ValueError, match="one value per sample"):
        langevin_sample(lambda v: v.sum(), torch.zeros(2, 3), 1, 1.0, 0.0)


# ---------------------------------------------------------------- generator-KD terms against naive loops


def _naive_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
    """Mean SSIM over every 11 x 11 window inside the images, Gaussian weights sigma 1.5 (Wang et al. 2004)."""
    g = [math.exp(-((i - 5) ** 2) / (2 * 1.5 ** 2)) for i in range(11)]
    g = [v / sum(g) for v in g]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    b, c, h, w = x.shape
    for n in range(b):
        for ch in range(c):
            for i in range(h - 10):
                for j in range(w - 10):
                    mx = my = sxx = syy = sxy = 0.0
                    for u in range(11):
                        for v in range(11):
                            wt = g[u] * g[v]
                            a, bb = float(x[n, ch, i + u, j + v]), float(y[n, ch, i + u, j + v])
                            mx += wt * a
                            my += wt * bb
                            sxx += wt * a * a
                            syy += wt * bb * bb
                            sxy += wt * a * bb
                    vx, vy, cxy = sxx - mx * mx, syy - my * my, sxy - mx * my
                    vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return sum(vals) / len(vals)


def test_output_mimic_loss_equals_naive_l1_and_ssim() -> None:
    torch.manual_seed(0)
    t = torch.rand(2, 2, 13, 13, dtype=torch.float64) * 2 - 1
    s = (t + 0.3 * torch.randn_like(t)).clamp(-1, 1)
    l1 = sum(abs(float(a) - float(b)) for a, b in zip(s.flatten(), t.flatten())) / s.numel()
    naive = _naive_ssim(s, t, 2.0)
    assert float(ssim(s, t, data_range=2.0)) == pytest.approx(naive, abs=1e-10)
    got = output_mimic_loss(s, t, l1_weight=0.5, ssim_weight=3.0, data_range=2.0)
    assert float(got) == pytest.approx(0.5 * l1 + 3.0 * (1 - naive), abs=1e-10)
    # torchmetrics' per-pixel SSIM map, cut to the whole windows, is the same number
    _, full = structural_similarity_index_measure(s, t, data_range=2.0, return_full_image=True)
    assert float(full[..., 5:-5, 5:-5].mean()) == pytest.approx(naive, abs=1e-10)
    assert float(output_mimic_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    s32 = s.float().requires_grad_(True)
    output_mimic_loss(s32, t.float()).backward()
    assert s32.grad is not None and s32.grad.abs().sum() > 0


def test_total_variation_equals_naive_sum() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4)
    naive = 0.0
    for n in range(2):
        for c in range(3):
            for i in range(5):
                for j in range(4):
                    if i + 1 < 5:
                        naive += abs(float(x[n, c, i + 1, j] - x[n, c, i, j]))
                    if j + 1 < 4:
                        naive += abs(float(x[n, c, i, j + 1] - x[n, c, i, j]))
    assert float(total_variation(x)) == pytest.approx(naive, rel=1e-5)
    assert float(total_variation(x, "mean")) == pytest.approx(naive / 2, rel=1e-5)


def test_feature_and_style_losses_equal_naive_formulas() -> None:
    torch.manual_seed(0)
    s = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    t = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    mse = sum(((a - b) ** 2).mean() for a, b in zip(s, t))
    assert torch.allclose(feature_mimic_loss(s, t), mse)
    gap = sum(((a.mean((2, 3)) - b.mean((2, 3))) ** 2).mean() for a, b in zip(s, t))
    assert torch.allclose(feature_mimic_loss(s, t, pool=True), gap)

    def naive_gram(f: torch.Tensor) -> torch.Tensor:
        b, c, h, w = f.shape
        g = torch.zeros(b, c, c)
        for n in range(b):
            for i in range(c):
                for j in range(c):
                    g[n, i, j] = sum(f[n, i, y, x] * f[n, j, y, x] for y in range(h) for x in range(w)) / (c * h * w)
        return g

    assert torch.allclose(gram_matrix(s[0]), naive_gram(s[0]), atol=1e-6)
    naive = sum((naive_gram(a) - naive_gram(b)).abs().mean() for a, b in zip(s, t))
    assert torch.allclose(style_loss(s, t), naive, atol=1e-6)


# ---------------------------------------------------------------- VID and patch InfoNCE against naive loops


def test_vid_pixel_nll_equals_naive_loop() -> None:
    torch.manual_seed(0)
    mu, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    alpha = torch.randn(3, 4, 4)
    total, count = 0.0, 0
    for n in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(4):
                    var = math.log1p(math.exp(float(alpha[c, i, j]))) + 1e-5
                    total += 0.5 * ((float(t[n, c, i, j]) - float(mu[n, c, i, j])) ** 2 / var + math.log(var))
                    count += 1
    assert float(vid_pixel_nll(mu, t, alpha)) == pytest.approx(total / count, rel=1e-5)
    per_channel = torch.randn(3, 1, 1)
    expected = vid_pixel_nll(mu, t, per_channel.expand(3, 4, 4))
    assert torch.allclose(vid_pixel_nll(mu, t, per_channel), expected)
    with pytest.raises(ValueError, match="broadcast"):
        vid_pixel_nll(mu, t, torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize("negatives", ["all", "image", "position"])
def test_patch_nce_equals_naive_loop(negatives: str) -> None:
    torch.manual_seed(0)
    b, p, d, tau = 3, 4, 5, 0.2
    zs, zt = torch.randn(b, p, d), torch.randn(b, p, d)

    def unit(v: torch.Tensor) -> list[float]:
        n = math.sqrt(sum(float(a) ** 2 for a in v))
        return [float(a) / n for a in v]

    total = 0.0
    for i in range(b):
        for j in range(p):
            z = unit(zs[i, j])
            denom, pos = 0.0, 0.0
            for k in range(b):
                for m in range(p):
                    keep = {"all": True, "image": k == i, "position": m == j}[negatives]
                    if not keep:
                        continue
                    sim = math.exp(sum(a * c for a, c in zip(z, unit(zt[k, m]))) / tau)
                    denom += sim
                    if (k, m) == (i, j):
                        pos = sim
            total += -math.log(pos / denom)
    assert float(patch_nce(zs, zt, temperature=tau, negatives=negatives)) == pytest.approx(total / (b * p), rel=1e-5)


def test_patch_nce_gradient_reaches_student_only_and_patches_line_up() -> None:
    torch.manual_seed(0)
    zs, zt = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    patch_nce(zs, zt).backward()
    assert zs.grad is not None and zt.grad is None
    x = torch.randn(2, 3, 8, 6)
    patches = image_patches(x, 2)
    assert patches.shape == (2, 12, 12)
    # patch 4 is row 1, column 1 of the 4 x 3 grid: pixels [2:4, 2:4], flattened channel-major
    assert torch.equal(patches[1, 4], x[1, :, 2:4, 2:4].reshape(-1))


def test_losses_are_registered_by_name() -> None:
    for name in ("energy_model_loss", "vem_student_loss", "output_mimic_loss", "total_variation",
                 "feature_mimic_loss", "style_loss", "vid_pixel_nll", "patch_nce"):
        assert LOSSES.get(name) is getattr(vem, name)
