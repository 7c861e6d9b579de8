"""Generator distillation (kdforge/distillers/gan_kd.py, gan_mi.py, vem.py): each step's losses against the formulas
written out here, which optimiser touches which network, the paired-data reference, unconditional generators'
fixed evaluation codes, an online teacher, and runs that resume bit-exact (Langevin noise included)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_states_equal, state_copy
from torch import nn

import kdforge
from kdforge.api import build_distiller
from kdforge.config import TrainConfig
from kdforge.distillers.gan_base import eval_codes
from kdforge.engine.trainer import Trainer
from kdforge.losses.vem import image_patches, langevin_sample, patch_nce, ssim
from kdforge.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 32


def _unets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = build_model("unet_generator", img_size=SIZE, ngf=8)
    student = build_model("unet_generator", img_size=SIZE, ngf=8, width=0.5)
    return student, teacher


def _paired_batches(n: int = 3, b: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(b, 3, SIZE, SIZE, generator=g) * 2 - 1,
             "target": torch.rand(b, 3, SIZE, SIZE, generator=g) * 2 - 1,
             "label": torch.zeros(b, dtype=torch.long), "gender": torch.ones(b, dtype=torch.long),
             "index": torch.arange(b) + b * i} for i in range(n)]


def _method(name: str, loader=None, *, seed: int = 0, **options):
    student, teacher = _unets(seed)
    torch.manual_seed(seed)
    return build_distiller(name, student, teacher, loader or _paired_batches(), input_shape=(3, SIZE, SIZE),
                           **options)


def _ready(d, lr: float = 1e-3):
    d.optimizers = {k: (v[0] if isinstance(v, tuple) else v)
                    for k, v in d.configure_optimizers("main", TrainConfig(optimizer="adam", lr=lr), 10).items()}
    return d.train()


def _outputs_before_step(d, batch):
    """Teacher and student images as the step computes them (student in train mode, BN statistics per batch)."""
    student = copy.deepcopy(d.student).train()
    with torch.no_grad():
        return d.teacher(batch["image"]), student(batch["image"])


def test_baseline_terms_equal_the_formulas():
    d = _ready(_method("gan_kd", l1_weight=2.0, ssim_weight=10.0, tv_weight=1e-3, target_weight=0.5))
    batch = _paired_batches()[0]
    t, s = _outputs_before_step(d, batch)
    out = d.training_step(batch)
    naive_tv = sum((s[..., 1:, :] - s[..., :-1, :]).abs().sum() + (s[..., :, 1:] - s[..., :, :-1]).abs().sum()
                   for _ in [0])
    expect = {"l1": 2.0 * (s - t).abs().mean(), "ssim": 10.0 * (1 - ssim(s, t, data_range=2.0)),
              "tv": 1e-3 * naive_tv, "target": 0.5 * (s - batch["target"]).abs().mean()}
    for k, v in expect.items():
        assert torch.allclose(out[k], v, rtol=1e-5, atol=1e-6), k
    assert torch.allclose(out["student"], sum(expect.values()), rtol=1e-5)


def test_student_step_touches_only_the_student_side():
    d = _ready(_method("gan_kd", feature_weight=1.0, student_layers=["down.1"], teacher_layers=["down.1"]))
    teacher0, student0, adapters0 = state_copy(d.teacher), state_copy(d.student), state_copy(d.adapters)
    d.training_step(_paired_batches()[0])
    assert_states_equal(teacher0, state_copy(d.teacher))
    assert not torch.equal(student0["down.0.0.weight"], d.student.state_dict()["down.0.0.weight"])
    assert not torch.equal(adapters0["0.0.weight"], d.adapters.state_dict()["0.0.weight"])


def test_vem_step_matches_the_paper_order_and_formulas():
    """Energy step on the chain's samples (Eq. 5), then the student's MI term with the updated E (Eq. 8-10)."""
    d = _ready(_method("vem", mi_weight=0.5, langevin_steps=3, langevin_step_size=10.0, langevin_noise=0.01,
                       ssim_weight=0.0, tv_weight=0.0, l1_weight=1.0))
    batch = _paired_batches()[0]
    t, s = _outputs_before_step(d, batch)
    energy0, student0 = copy.deepcopy(d.energy), state_copy(d.student)
    rng = torch.get_rng_state()
    out = d.training_step(batch)
    reference = batch["target"]  # mi_target auto: paired batches use the real target (Sec. 5.3)
    after = torch.get_rng_state()
    torch.set_rng_state(rng)
    energy0.eval()
    t_tilde = langevin_sample(lambda x: energy0(x, s), s, 3, 10.0, 0.01)
    assert torch.equal(torch.get_rng_state(), after)  # the step drew exactly one chain's noise
    energy0.train()
    expect_e = energy0(reference, s).mean() - energy0(t_tilde, s).mean()
    assert torch.allclose(out["energy"], expect_e, rtol=1e-4, atol=1e-6)
    d.energy.eval()
    expect_mi = d.energy(reference, s).mean() - d.energy(t_tilde, s).mean()
    assert torch.allclose(out["mi"], 0.5 * expect_mi, rtol=1e-4, atol=1e-6)
    assert not torch.equal(student0["down.0.0.weight"], d.student.state_dict()["down.0.0.weight"])


def test_vem_energy_update_touches_only_the_energy_model(monkeypatch):
    d = _ready(_method("vem"))
    student0, teacher0 = state_copy(d.student), state_copy(d.teacher)
    energy0 = state_copy(d.energy)
    monkeypatch.setattr(d, "optimizer_step", _only_energy(d))
    with pytest.raises(_Stop):
        d.training_step(_paired_batches()[0])
    params = dict(d.student.named_parameters())  # (its forward, its own, moved its BN statistics)
    assert all(torch.equal(student0[k], params[k]) for k in params)
    assert_states_equal(teacher0, state_copy(d.teacher))
    changed = [k for k in energy0 if not torch.equal(energy0[k], d.energy.state_dict()[k])]
    assert any(k.endswith("original") or "weight" in k for k in changed)
    assert all(p.grad is None for p in d.student.parameters())


class _Stop(Exception):
    pass


def _only_energy(d):
    real = type(d).optimizer_step

    def step(name, loss, **kw):
        if name != "energy":
            raise _Stop
        return real(d, name, loss, **kw)

    return step


@pytest.mark.parametrize("init", ["student", "noise", "teacher"])
def test_chain_start_is_selectable(init):
    d = _ready(_method("vem", chain_init=init, langevin_steps=0, langevin_noise=0.0))
    batch = _paired_batches()[0]
    t = torch.rand(4, 3, SIZE, SIZE)
    s = torch.rand(4, 3, SIZE, SIZE)
    torch.manual_seed(3)
    got = d.sample_chain(t, s)
    torch.manual_seed(3)
    expect = {"student": s, "teacher": t, "noise": torch.randn_like(s)}[init]
    assert torch.equal(got, expect)
    assert batch  # (K = 0: the chain is its start)


def test_mi_reference_follows_mi_target():
    batch = _paired_batches()[0]
    t = torch.zeros(4, 3, SIZE, SIZE)
    for target, expect in (("auto", batch["target"]), ("teacher", t), ("target", batch["target"])):
        d = _method("vem", mi_target=target)
        assert torch.equal(d.mi_reference(t, batch), expect)
    unpaired = {k: v for k, v in batch.items() if k != "target"}
    assert torch.equal(_method("vem").mi_reference(t, unpaired), t)
    with pytest.raises(ValueError, match="paired"):
        _method("vem", mi_target="target").mi_reference(t, unpaired)


def test_crd_and_vid_terms_and_heads():
    batch = _paired_batches()[0]
    d = _ready(_method("gan_crd", mi_target="teacher", patch_size=4, ssim_weight=0.0, l1_weight=1.0))
    t, s = _outputs_before_step(d, batch)
    head = copy.deepcopy(d.mi_head)
    out = d.training_step(batch)
    expect = patch_nce(head(image_patches(s, 4)), head(image_patches(t, 4)))
    assert torch.allclose(out["mi"], expect, rtol=1e-5)
    assert not torch.equal(head[0].weight, d.mi_head[0].weight)  # the head trains with the student

    v = _ready(_method("gan_vid", mi_target="target", init_var=1.0, ssim_weight=0.0, l1_weight=1.0))
    t, s = _outputs_before_step(v, batch)
    mean = copy.deepcopy(v.mi_head["mean"])
    var = F.softplus(v.mi_head.log_scale.detach()) + 1e-5
    out = v.training_step(batch)
    mu = s + mean(s)
    expect = (0.5 * ((batch["target"] - mu) ** 2 / var + var.log())).mean()
    assert torch.allclose(out["mi"], expect, rtol=1e-5)


def test_unconditional_generators_use_fixed_codes_per_sample():
    torch.manual_seed(0)
    teacher = build_model("dcgan_generator", img_size=16, ngf=8, z_dim=16)
    student = build_model("dcgan_generator", img_size=16, ngf=8, z_dim=16, width=0.5)
    real = [{"image": torch.rand(4, 3, 16, 16) * 2 - 1, "index": torch.arange(4) + 4 * i} for i in range(2)]
    d = _ready(build_distiller("vem", student, teacher, real, langevin_steps=2))
    out = d.training_step(real[0])
    assert {"ssim", "energy", "mi", "student"} <= set(out)
    d.eval()
    a = d.predict({"image": real[1]["image"], "index": torch.tensor([5, 6])})
    b = d.predict({"image": real[1]["image"][:1], "index": torch.tensor([6])})
    assert torch.equal(a[1:], b)  # sample 6's code does not depend on its batch
    assert torch.equal(d.teacher_predict({"index": torch.tensor([6]), "image": real[0]["image"][:1]}),
                       teacher(eval_codes(torch.tensor([6]), 16, "cpu")))
    with pytest.raises(ValueError, match="same input"):
        build_distiller("gan_kd", student, build_model("unet_generator", img_size=32, ngf=8), real)


def test_online_teacher_and_discriminator_train_and_are_saved():
    d = _ready(_method("gan_kd", online_teacher=True, gan_weight=0.1))
    teacher0, disc0 = state_copy(d.teacher), state_copy(d.discriminator)
    out = d.training_step(_paired_batches()[0])
    assert {"disc", "teacher", "gan"} <= set(out)
    assert not torch.equal(teacher0["down.0.0.weight"], d.teacher.state_dict()["down.0.0.weight"])
    assert any(not torch.equal(v, d.discriminator.state_dict()[k]) for k, v in disc0.items())
    assert set(d.networks()) == {"student", "discriminator", "teacher"}
    assert any(k.startswith("teacher.") for k in d.state_for_checkpoint())
    offline = _method("gan_kd")
    assert not any(k.startswith("teacher.") for k in offline.state_for_checkpoint())


def test_perceptual_and_style_terms_use_a_named_frozen_network(tmp_path):
    net = build_model("resnet20", num_classes=2)
    torch.save(net.state_dict(), tmp_path / "faces.pt")
    spec = {"name": "resnet20", "kwargs": {"num_classes": 2}, "weights": str(tmp_path / "faces.pt"),
            "layers": ["layer1", "layer2"]}
    d = _ready(_method("gan_kd", perceptual_weight=1.0, style_weight=10.0, feature_net=spec))
    frozen = state_copy(d.feature_net)
    out = d.training_step(_paired_batches()[0])
    assert out["perceptual"] > 0 and out["style"] > 0
    assert_states_equal(frozen, state_copy(d.feature_net))
    assert "resnet20 (faces.pt) at layer1,layer2" == d.feature_net.description
    assert not any(k.startswith("feature_net.") for k in d.state_for_checkpoint())
    with pytest.raises(ValueError, match="feature_net"):
        _method("gan_kd", style_weight=1.0)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        _method("gan_kd", style_weight=1.0, feature_net={**spec, "weights": str(tmp_path / "missing.pt")})


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="chain_init"):
        _method("vem", chain_init="teachr")
    with pytest.raises(ValueError, match="mi_target"):
        _method("gan_vid", mi_target="real")
    with pytest.raises(ValueError, match="gan_loss"):
        _method("gan_kd", gan_loss="wgan")
    with pytest.raises(ValueError, match="pair up"):
        _method("gan_kd", feature_weight=1.0)
    with pytest.raises(ValueError, match="no mutual-information term"):
        _method("gan_kd", mi_weight=0.1)


def _cfg(**kw):
    return TrainConfig(**{**dict(epochs=2, optimizer="adam", lr=1e-3, device="cpu", progress=False, log_every=1,
                                 checkpoint_every=2), **kw})


@pytest.mark.parametrize("name", ["vem", "gan_crd"])
def test_runs_snapshot_and_resume_bit_exact(tmp_path, name):
    loader = _paired_batches()
    whole = _method(name, loader, langevin_steps=2) if name == "vem" else _method(name, loader)
    Trainer(_cfg(), tmp_path / "whole").fit(whole, loader)
    Trainer(_cfg(max_steps=4), tmp_path / "split").fit(
        _method(name, loader, langevin_steps=2) if name == "vem" else _method(name, loader), loader)
    resumed = _method(name, loader, langevin_steps=2) if name == "vem" else _method(name, loader)
    Trainer(_cfg(), tmp_path / "split").fit(resumed, loader, resume=True)
    assert_states_equal(state_copy(whole), state_copy(resumed))
    grids = sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir())
    assert grids == ["samples_epoch001.png", "samples_epoch002.png"]


def test_python_api_distils_a_generator():
    student, teacher = _unets()
    loader = _paired_batches()
    result = kdforge.distill(student, teacher, loader, method="vem", val_loader=loader, evaluator="images",
                             epochs=1, optimizer="adam", lr=1e-3, input_shape=(3, SIZE, SIZE), langevin_steps=1,
                             progress=False, device="cpu")
    assert {"psnr", "ssim"} <= set(result.metrics)
    assert set(result.networks) == {"student", "energy"}


def test_fresh_chain_draws_a_second_chain_under_the_updated_energy():
    """The re-implementation's variant: the student's term uses a new chain, sampled after E's step."""
    batch = _paired_batches()[0]
    draws = {}
    for fresh in (False, True):
        d = _ready(_method("vem", fresh_chain=fresh, langevin_steps=2, langevin_noise=0.01))
        calls = []
        real = d.sample_chain
        d.sample_chain = lambda r, s, _real=real, _calls=calls: _calls.append(1) or _real(r, s)
        d.training_step(batch)
        draws[fresh] = len(calls)
    assert draws == {False: 1, True: 2}


LOGGED_ONLY = {"student", "energy", "disc", "teacher"}  # the total, and other networks' own losses


@pytest.mark.parametrize("name", ["gan_kd", "gan_vid", "gan_crd", "vem"])
def test_every_term_is_weighed_by_its_own_option(name, tmp_path):
    """Term X of a step (as logged) is X_weight times its unweighted value: tripling X_weight triples X and changes
    no other term (the convention of tests/test_distillers.py, here with every term of the family turned on)."""
    from kdforge.config import keyword_parameters

    torch.save(build_model("resnet20").state_dict(), tmp_path / "net.pt")
    every = dict(l1_weight=1.0, ssim_weight=1.0, tv_weight=1.0, target_weight=1.0, gan_weight=1.0,
                 feature_weight=1.0, student_layers=["down.1"], teacher_layers=["down.1"], perceptual_weight=1.0,
                 style_weight=1.0, feature_net={"name": "resnet20", "weights": str(tmp_path / "net.pt"),
                                                "layers": ["layer1"]}, mi_weight=1.0 if name != "gan_kd" else 0.0)
    batch = _paired_batches()[0]

    def step(**weights):
        d = _ready(_method(name, **{**every, **weights}))
        torch.manual_seed(5)  # the chain's noise
        return {k: v for k, v in d.training_step(batch).items() if k not in LOGGED_ONLY}

    one = step()
    options = keyword_parameters(type(_method(name)))
    other_networks = {"energy_reg_weight", "teacher_l1_weight"}  # weigh terms of the energy and online-teacher losses
    terms = {k[:-len("_weight")] for k in options if k.endswith("_weight") and k not in other_networks}
    assert set(one) == terms - ({"mi"} if name == "gan_kd" else set())
    for key in one:
        three = step(**{f"{key}_weight": 3.0})
        for k in one:
            torch.testing.assert_close(three[k], 3.0 * one[k] if k == key else one[k])
