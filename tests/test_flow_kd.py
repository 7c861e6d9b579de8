"""Flow distillation (kdforge/distillers/flow_kd.py, Algorithm 1) and the flow's own training (flow_mle): each
stage's loss against its formula written out here, each stage trains only its own student, the "flow" evaluator,
and a run that resumes bit-exact."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_states_equal, state_copy

import kdforge
from kdforge.api import build_distiller
from kdforge.config import TrainConfig
from kdforge.engine.trainer import Trainer
from kdforge.losses.vem import ssim
from kdforge.models import build_model
from kdforge.models.feature_net import FrozenFeatures

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = 16


def _glow():
    flow = build_model("glow", img_size=SIZE, levels=2, steps=2, hidden=16)
    flow.initialize_actnorm(torch.rand(8, 3, SIZE, SIZE) - 0.5)
    return flow


def _students():
    torch.manual_seed(0)
    return build_model("flow_student", img_size=SIZE, latent_levels=2,
                       encoder={"levels": 2, "steps": 1, "width": 8, "growth": 4, "rdb_layers": 2},
                       decoder={"levels": 2, "steps": 1, "width": 8, "growth": 4, "rdb_layers": 2})


def _batches(n=3, b=4):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(b, 3, SIZE, SIZE, generator=g), "label": torch.zeros(b, dtype=torch.long),
             "index": torch.arange(b) + b * i} for i in range(n)]


def _kd(**options):
    return build_distiller("flow_kd", _students(), _glow(), _batches(), **options)


def _ready(d, stage):
    d.set_stage(next(s for s in d.stages(2) if s.name == stage))
    d.optimizers = {"main": torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=1e-3)}
    return d.train()


def test_decoder_stage_is_l1_plus_ssim_of_the_teachers_latents_decoded():
    d = _ready(_kd(l1_weight=2.0, ssim_weight=3.0), "decoder")
    batch = _batches()[0]
    out = d.training_step(batch)
    x = d.teacher.preprocess(batch["image"])
    recon = d.student.decoder(d.teacher.encode(x, standardized=True))
    torch.testing.assert_close(out["l1"], 2.0 * (recon - x).abs().mean())
    torch.testing.assert_close(out["ssim"], 3.0 * (1 - ssim(recon, x, data_range=1.0)))
    assert set(out) == {"l1", "ssim"}


def test_baseline_terms_follow_their_formulas():
    # MSE, wavelet (WKD), total variation (OMGD) against naive versions written here
    d = _ready(_kd(l1_weight=0.0, ssim_weight=0.0, mse_weight=2.0, wavelet_weight=3.0, wavelet_levels=2,
                   tv_weight=0.5), "decoder")
    batch = _batches()[0]
    out = d.training_step(batch)
    x = d.teacher.preprocess(batch["image"])
    recon = d.student.decoder(d.teacher.encode(x, standardized=True))
    torch.testing.assert_close(out["mse"], 2.0 * ((recon - x) ** 2).mean())
    tv = sum(((r[:, 1:] - r[:, :-1]).abs().sum() + (r[:, :, 1:] - r[:, :, :-1]).abs().sum()) for r in recon)
    torch.testing.assert_close(out["tv"], 0.5 * tv / len(recon))

    def highs(img, levels):  # naive Haar: every 2 x 2 block's three orthonormal details, then recurse on the mean
        bands = []
        for _ in range(levels):
            n, c, h, w = img.shape
            low, det = torch.zeros(n, c, h // 2, w // 2), torch.zeros(n, 3, c, h // 2, w // 2)
            for i in range(h // 2):
                for j in range(w // 2):
                    a, b_, c_, d_ = (img[:, :, 2 * i, 2 * j], img[:, :, 2 * i, 2 * j + 1],
                                     img[:, :, 2 * i + 1, 2 * j], img[:, :, 2 * i + 1, 2 * j + 1])
                    low[:, :, i, j] = (a + b_ + c_ + d_) / 2
                    det[:, 0, :, i, j], det[:, 1, :, i, j] = (a + b_ - c_ - d_) / 2, (a - b_ + c_ - d_) / 2
                    det[:, 2, :, i, j] = (a - b_ - c_ + d_) / 2
            bands.append(det)
            img = low
        return bands

    naive = sum((hs - ht).abs().mean() for hs, ht in zip(highs(recon.detach(), 2), highs(x, 2))) / 2
    torch.testing.assert_close(out["wavelet"].detach(), 3.0 * naive)


def test_samples_mode_distils_the_decoder_on_prior_samples_without_data():
    # Baranchuk et al. 2021: z ~ N(0, T^2 I), the student decoder regresses the teacher's D_t(z)
    d = _ready(_kd(decoder_data="samples", sample_temperature=0.8, ssim_weight=0.0), "decoder")
    torch.manual_seed(5)
    out = d.training_step(_batches()[0])
    torch.manual_seed(5)
    eps = [torch.randn(4, *shape) * 0.8 for shape in d.teacher.latent_shapes]
    expect = (d.student.decoder(eps) - d.teacher.decode(eps, standardized=True)).abs().mean()
    torch.testing.assert_close(out["l1"], expect)


def test_feature_and_style_terms_use_the_named_feature_network():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3))
    d = _ready(_kd(l1_weight=0.0, ssim_weight=0.0, feature_weight=2.0, style_weight=3.0,
                   feature_net=FrozenFeatures(net, ["1", "2"])), "decoder")
    batch = _batches()[0]
    out = d.training_step(batch)
    x = d.teacher.preprocess(batch["image"])
    recon = d.student.decoder(d.teacher.encode(x, standardized=True))
    fs, ft = d.feature_net(recon), d.feature_net(x)
    assert len(fs) == 2
    torch.testing.assert_close(out["feature"], 2.0 * sum((a - b).abs().mean() for a, b in zip(fs, ft)))

    def gram(f):
        flat = f.flatten(2)
        return flat @ flat.transpose(1, 2) / flat[0].numel()
    torch.testing.assert_close(out["style"], 3.0 * sum((gram(a) - gram(b)).abs().mean() for a, b in zip(fs, ft)))


@pytest.mark.parametrize("encoder_loss", ["weighted", "as_printed"])
def test_encoder_stage_regresses_the_prior_samples_through_the_teacher_decoder(encoder_loss):
    d = _ready(_kd(latent_weight=4.0, encoder_loss=encoder_loss, sample_temperature=0.7), "encoder")
    torch.manual_seed(3)
    out = d.training_step(_batches()[0])
    torch.manual_seed(3)
    eps = [torch.randn(4, *shape) * 0.7 for shape in d.teacher.latent_shapes]
    z_s = torch.cat([z.flatten(1) for z in d.student.encoder(d.teacher.decode(eps, standardized=True))], 1)
    z = torch.cat([e.flatten(1) for e in eps], 1)
    expect = 4.0 * F.mse_loss(z_s, z) if encoder_loss == "weighted" else F.mse_loss(z_s, 4.0 * z)
    torch.testing.assert_close(out["latent"], expect)


def test_each_stage_trains_only_its_own_student():
    for stage, moving, still in (("decoder", "decoder", "encoder"), ("encoder", "encoder", "decoder")):
        d = _ready(_kd(), stage)
        before = {k: state_copy(getattr(d.student, k)) for k in ("encoder", "decoder")}
        teacher = state_copy(d.teacher)
        loss = sum(d.training_step(_batches()[0]).values())
        d.optimizers["main"].zero_grad()
        loss.backward()
        d.optimizers["main"].step()
        assert_states_equal(before[still], state_copy(getattr(d.student, still)))
        assert_states_equal(teacher, state_copy(d.teacher))
        assert any(not torch.equal(v, getattr(d.student, moving).state_dict()[k]) for k, v in before[moving].items())
        assert not getattr(d.student, still).training  # frozen: eval mode too


def test_two_stages_need_two_epochs_and_bad_options_are_named():
    with pytest.raises(ValueError, match="epochs must be >= 2"):
        _kd().stages(1)
    assert [(s.name, s.epochs) for s in _kd(decoder_share=0.25).stages(8)] == [("decoder", 2), ("encoder", 6)]
    with pytest.raises(ValueError, match="decoder_data"):
        _kd(decoder_data="noise")
    with pytest.raises(ValueError, match="weight 0"):
        _kd(l1_weight=0.0, ssim_weight=0.0)
    with pytest.raises(ValueError, match="feature_net"):
        _kd(style_weight=1.0)
    with pytest.raises(ValueError, match="backbone_weights"):
        _kd(lpips_weight=1.0)
    with pytest.raises(TypeError, match="encoder"):
        build_distiller("flow_kd", build_model("resnet20"), _glow(), _batches())


def test_the_flow_evaluator_scores_every_pairing():
    d = _kd().eval()
    metrics = kdforge.evaluate(d, _batches(), evaluator="flow", device="cpu")
    for pairing in ("teacher", "student", "t_enc_s_dec", "s_enc_t_dec"):
        assert {f"psnr_{pairing}", f"ssim_{pairing}", f"max_err_{pairing}"} <= set(metrics)
    assert metrics["max_err_teacher"] < 1e-4  # the flow is exactly invertible; the untrained students are not
    assert metrics["psnr_teacher"] > 60 > metrics["psnr_student"]


def test_flow_mle_trains_bits_per_dim_and_resumes_bit_exact(tmp_path):
    def make():
        torch.manual_seed(0)
        return build_distiller("flow_mle", build_model("glow", img_size=SIZE, levels=2, steps=2, hidden=16),
                               None, _batches())

    cfg = dict(epochs=2, optimizer="adam", lr=1e-3, device="cpu", progress=False, log_every=1)
    whole = make()
    Trainer(TrainConfig(**cfg), tmp_path / "whole").fit(whole, _batches())
    Trainer(TrainConfig(**cfg, max_steps=4), tmp_path / "split").fit(make(), _batches())
    resumed = make()
    Trainer(TrainConfig(**cfg), tmp_path / "split").fit(resumed, _batches(), resume=True)
    assert_states_equal(state_copy(whole), state_copy(resumed))
    batch = _batches()[0]
    torch.manual_seed(7)
    expect = whole.student.bits_per_dim(whole.student.train().preprocess(batch["image"])).mean()
    torch.manual_seed(7)
    torch.testing.assert_close(whole.training_step(batch)["bpd"], expect)
    snap = whole.eval().epoch_snapshot()["samples"]
    assert snap.shape == (32, 3, SIZE, SIZE) and 0 <= float(snap.min()) and float(snap.max()) <= 1


def test_flow_kd_runs_both_stages_and_resumes_bit_exact(tmp_path):
    def make():
        torch.manual_seed(0)
        return copy.deepcopy(_kd())

    cfg = dict(epochs=2, optimizer="adam", lr=1e-3, device="cpu", progress=False, log_every=1)
    whole = make()
    fit = Trainer(TrainConfig(**cfg), tmp_path / "whole").fit(whole, _batches())
    assert [h["stage"] for h in fit.history] == ["decoder", "encoder"]
    Trainer(TrainConfig(**cfg, max_steps=4), tmp_path / "split").fit(make(), _batches())  # stops in the encoder stage
    resumed = make()
    Trainer(TrainConfig(**cfg), tmp_path / "split").fit(resumed, _batches(), resume=True)
    assert_states_equal(state_copy(whole.student), state_copy(resumed.student))


def test_prior_samples_the_teacher_cannot_decode_are_dropped():
    d = _ready(_kd(), "encoder")
    decode = d.teacher.decode

    def overflowing(latents, standardized=True):  # every other sample NaN, as a Glow's inverse does on rare draws
        x = decode(latents, standardized=standardized).clone()
        x[::2] = float("nan")
        return x

    d.teacher.decode = overflowing
    torch.manual_seed(1)
    eps, x_t = d.prior_images(6, torch.device("cpu"))
    assert len(x_t) == 3 and all(len(e) == 3 for e in eps) and torch.isfinite(x_t).all()
    assert torch.isfinite(d.training_step(_batches()[0])["latent"])
    d.teacher.decode = lambda latents, standardized=True: decode(latents, standardized=standardized) * float("inf")
    with pytest.raises(FloatingPointError, match="sample_temperature"):
        d.training_step(_batches()[0])


def test_one_stage_alone_trains_only_that_student():
    assert [(s.name, s.epochs, s.frozen) for s in _kd(distil="decoder").stages(3)] == [
        ("decoder", 3, ("student.encoder",))]
    assert [(s.name, s.epochs) for s in _kd(distil="encoder").stages(1)] == [("encoder", 1)]
    with pytest.raises(ValueError, match="distil"):
        _kd(distil="all")
