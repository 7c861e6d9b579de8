"""GAN teacher training (pix2pix, dcgan): each step's losses against the papers' formulas written out here, which
network each optimiser may change, learning a trivial target, fixed snapshots, bit-exact resume, and `kdforge
train` keeping a teacher-free method (on generated data) while still forcing scratch on a distillation recipe."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_states_equal, state_copy

import kdforge
from kdforge.cli import main
from kdforge.config import TrainConfig, load_config
from kdforge.distillers.dcgan import DCGAN
from kdforge.distillers.gan_base import eval_codes
from kdforge.distillers.pix2pix import Pix2Pix
from kdforge.engine.trainer import Trainer
from kdforge.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]
ADAM = TrainConfig(optimizer="adam", lr=2e-4, betas=(0.5, 0.999), weight_decay=0.0)


def _paired_batches(n_batches: int = 3, batch: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """32 px 'edge maps' in [-1, 1] and targets that are a fixed function of them (a paired task)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        x = (torch.rand(batch, 3, 32, 32, generator=g) > 0.8).float() * 2 - 1
        y = torch.tanh(x.roll(1, dims=1) * 0.7 + 0.1)
        out.append({"image": x, "target": y, "index": torch.arange(i * batch, (i + 1) * batch)})
    return out


def _pix2pix(**kw) -> Pix2Pix:
    torch.manual_seed(0)
    gen = build_model("unet_generator", img_size=32, ngf=8)
    return Pix2Pix(gen, input_shape=(3, 32, 32), discriminator_options={"ndf": 8}, **kw)


def _dcgan(**kw) -> DCGAN:
    torch.manual_seed(0)
    gen = build_model("dcgan_generator", img_size=16, ngf=8, z_dim=16)
    return DCGAN(gen, input_shape=(3, 16, 16), discriminator_options={"ndf": 8}, **kw)


def _with_optimizers(game, cfg: TrainConfig = ADAM):
    game.optimizers = {k: (v[0] if isinstance(v, tuple) else v)
                       for k, v in game.configure_optimizers("main", cfg, 10).items()}
    return game.train()


def _spy(game) -> list[tuple[str, float, dict]]:
    """Record each optimiser step: its name, its loss and the networks' states right after it."""
    seen, original = [], game.optimizer_step

    def spy(name, loss, **kw):
        out = original(name, loss, **kw)
        seen.append((name, float(loss.detach()), {k: copy.deepcopy(m) for k, m in game.networks().items()}))
        return out

    game.optimizer_step = spy
    return seen


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    p = torch.sigmoid(logits.double())
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("gan_loss", ["vanilla", "lsgan"])
def test_pix2pix_step_losses_are_the_papers(gan_loss):
    game = _with_optimizers(_pix2pix(gan_loss=gan_loss, l1_weight=100.0, gan_weight=0.5))
    g0, d0 = copy.deepcopy(game.student), copy.deepcopy(game.discriminator)
    batch = _paired_batches(1)[0]
    seen = _spy(game)
    out = game.training_step(batch)
    assert [s[0] for s in seen] == ["discriminator", "generator"]

    def adv(logits, target):  # BCE on logits (vanilla) or squared error (lsgan), averaged over the patch map
        return _bce(logits, target) if gan_loss == "vanilla" else ((logits.double() - target) ** 2).mean()

    x, y = batch["image"], batch["target"]
    with torch.no_grad():
        fake = g0(x)  # in training mode, as the step (BatchNorm on the batch)
        loss_d = 0.5 * (adv(d0(y, x), 1.0) + adv(d0(fake, x), 0.0))
        d1 = seen[0][2]["discriminator"]  # G's loss goes through D after D's step
        gan = adv(d1(fake, x), 1.0)
        l1 = (fake.double() - y.double()).abs().mean()
    assert seen[0][1] == pytest.approx(float(loss_d), rel=1e-5)
    assert seen[1][1] == pytest.approx(float(0.5 * gan + 100.0 * l1), rel=1e-5)
    assert float(out["gan"]) == pytest.approx(float(0.5 * gan), rel=1e-5)  # logged as weighted
    assert float(out["l1"]) == pytest.approx(float(100.0 * l1), rel=1e-5)
    assert all(not v.requires_grad for v in out.values())


@pytest.mark.parametrize("gan_loss", ["hinge", "vanilla"])
def test_dcgan_step_losses_are_the_papers(gan_loss, aug_loader):
    game = _with_optimizers(_dcgan(gan_loss=gan_loss))
    g0, d0 = copy.deepcopy(game.student), copy.deepcopy(game.discriminator)
    real = aug_loader.get_batch(0)["image"]
    seen = _spy(game)
    torch.manual_seed(7)
    out = game.training_step({"image": real})
    torch.manual_seed(7)  # the step's codes: one draw for D's step, a fresh one for G's
    z_d, z_g = torch.randn(len(real), 16), torch.randn(len(real), 16)
    with torch.no_grad():
        real_logits, fake_logits = d0(real), d0(g0(z_d))  # D's order: its power iteration runs per forward
        g_logits = seen[0][2]["discriminator"](g0(z_g))
    if gan_loss == "hinge":
        loss_d = torch.clamp(1 - real_logits, min=0).mean() + torch.clamp(1 + fake_logits, min=0).mean()
        loss_g = -g_logits.mean()
    else:
        loss_d, loss_g = _bce(real_logits, 1.0) + _bce(fake_logits, 0.0), _bce(g_logits, 1.0)
    assert [s[0] for s in seen] == ["discriminator", "generator"]
    assert seen[0][1] == pytest.approx(float(loss_d), rel=1e-5)
    assert seen[1][1] == pytest.approx(float(loss_g), rel=1e-5)
    assert float(out["disc"]) == pytest.approx(float(loss_d), rel=1e-5)


# --------------------------------------------------------------------------------------- who changes what
def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("which", ["pix2pix", "dcgan"])
def test_each_step_changes_only_its_own_network(which, aug_loader):
    game = _with_optimizers(_pix2pix() if which == "pix2pix" else _dcgan(d_steps=2))
    batch = _paired_batches(1)[0] if which == "pix2pix" else aug_loader.get_batch(0)
    nets = game.networks()
    last = {k: _params(m) for k, m in nets.items()}
    d_buffers = state_copy(game.discriminator)
    steps, original = [], game.optimizer_step

    def spy(name, loss, **kw):
        d_grads = [None if p.grad is None else p.grad.clone() for p in game.discriminator.parameters()]
        out = original(name, loss, **kw)
        now = {k: _params(m) for k, m in nets.items()}
        steps.append((name, {k for k in nets if _changed(last[k], now[k])}))
        last.update(now)
        if name == "generator":  # G's loss went through D: D's gradients are those its own step left
            for before, p in zip(d_grads, game.discriminator.parameters()):
                assert before is not None and torch.equal(before, p.grad)
            if which == "pix2pix":  # BatchNorm statistics too (D's spectral norm iterates in every forward)
                assert_states_equal(d_buffers, state_copy(game.discriminator))
        else:
            d_buffers.update(state_copy(game.discriminator))
        return out

    game.optimizer_step = spy
    game.training_step(batch)
    expected = ["discriminator"] * (2 if which == "dcgan" else 1) + ["generator"]
    assert [n for n, _ in steps] == expected
    assert [changed for _, changed in steps] == [{"discriminator"}] * (len(expected) - 1) + [{"student"}]


def test_pix2pix_learns_a_trivial_target():
    game = _with_optimizers(_pix2pix(), TrainConfig(optimizer="adam", lr=2e-3, betas=(0.5, 0.999), weight_decay=0))
    batch = _paired_batches(1, batch=8)[0]
    l1 = [float(game.training_step(batch)["l1"]) for _ in range(25)]
    assert l1[-1] < 0.5 * l1[0], l1


# ------------------------------------------------------------------------------------- snapshots, predict
def test_snapshots_are_fixed_and_touch_nothing(aug_loader):
    game = _with_optimizers(_pix2pix(snapshot_size=8))
    assert game.epoch_snapshot() == {}  # nothing remembered before the first step
    batches = _paired_batches(2)
    game.training_step(batches[0])
    game.training_step(batches[1])  # the first batch's samples stay
    state, rng = state_copy(game), torch.get_rng_state()
    grid = game.epoch_snapshot()["translation"]
    assert grid.shape == (12, 3, 32, 32) and 0 <= grid.min() and grid.max() <= 1  # rows input | G | target, n=4
    torch.testing.assert_close(grid[:4], batches[0]["image"] * 0.5 + 0.5)
    torch.testing.assert_close(grid[8:], batches[0]["target"] * 0.5 + 0.5)
    assert_states_equal(state, state_copy(game))
    assert torch.equal(rng, torch.get_rng_state())

    gan = _dcgan(snapshot_size=6, snapshot_seed=3)
    assert torch.equal(gan.snapshot_z, torch.randn(6, 16, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(1)
    first = gan.epoch_snapshot()["samples"]
    torch.manual_seed(2)
    assert first.shape == (6, 3, 16, 16) and torch.equal(first, gan.epoch_snapshot()["samples"])
    gan.eval()  # predict: sample i always from its own eval code, whatever the batch
    both = gan.predict({"image": torch.zeros(2, 3, 16, 16), "index": torch.tensor([3, 5])})
    torch.testing.assert_close(both[1:], gan.predict({"image": torch.zeros(1, 3, 16, 16), "index": torch.tensor([5])}))
    torch.testing.assert_close(both, gan.student(eval_codes(torch.tensor([3, 5]), 16, "cpu")))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="gan_loss must be one of hinge, vanilla, lsgan"):
        _pix2pix(gan_loss="wgan")
    with pytest.raises(ValueError, match="d_steps"):
        _dcgan(d_steps=0)
    with pytest.raises(TypeError, match="z_dim"):
        DCGAN(build_model("unet_generator", img_size=32, ngf=8), input_shape=(3, 32, 32))
    game = _with_optimizers(_dcgan(d_steps=2))
    with pytest.raises(ValueError, match="cannot feed d_steps=2"):
        game.training_step({"image": torch.zeros(1, 3, 16, 16)})


# ------------------------------------------------------------------------------------------ exact resume
def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=2, optimizer="adam", lr=2e-4, betas=(0.5, 0.999), weight_decay=0.0,
                                 device="cpu", progress=False, log_every=1), **kw})


@pytest.mark.parametrize("which", ["pix2pix", "dcgan"])
def test_resume_is_bit_exact_mid_epoch(which, aug_loader, tmp_path):
    make = _pix2pix if which == "pix2pix" else _dcgan
    loader = _paired_batches(3) if which == "pix2pix" else aug_loader  # 3 and 4 batches an epoch
    whole = make()
    Trainer(_cfg(), tmp_path / "whole").fit(whole, loader)
    Trainer(_cfg(max_steps=4), tmp_path / "split").fit(make(), loader)  # stops in the second epoch
    resumed = make()
    Trainer(_cfg(), tmp_path / "split").fit(resumed, loader, resume=True)
    assert_states_equal(state_copy(whole), state_copy(resumed))  # G, D, the snapshot buffers
    name = "translation" if which == "pix2pix" else "samples"
    assert sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir()) == [
        f"{name}_epoch001.png", f"{name}_epoch002.png"]
    records = [json.loads(r) for r in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert {"lr_generator", "lr_discriminator"} <= set(records[0])


# ----------------------------------------------------------------------------------------- kdforge train
def test_kdforge_train_still_forces_scratch_on_a_distillation_recipe(tmp_path):
    recipe = {"name": "kd_tiny", "out_dir": str(tmp_path), "student": "resnet20",
              "teacher": {"name": "resnet20", "weights": "/no/such/teacher.pt"},
              "method": {"name": "kd", "temperature": 4.0},
              "data": {"name": "synthetic", "synthetic_train": 32, "synthetic_test": 16, "synthetic_size": 16,
                       "batch_size": 16},
              "train": {"epochs": 1, "max_steps": 1, "progress": False}}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    assert load_config(tmp_path / "kd_tiny" / "config.yaml").method.name == "scratch"


def test_api_train_takes_a_teacher_free_method(aug_loader):
    torch.manual_seed(0)
    gen = build_model("dcgan_generator", img_size=16, ngf=8, z_dim=16)
    result = kdforge.train(gen, aug_loader, method="dcgan", discriminator_options={"ndf": 8}, epochs=1,
                           max_steps=2, optimizer="adam", lr=2e-4, progress=False)
    assert result.student is gen and set(result.networks) == {"student", "discriminator"}
