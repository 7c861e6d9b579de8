"""The Distiller contract carries what the later methods need, each shown with a toy method:
a three-optimiser game with gradients through the frozen teacher (MosaicKD, VEM, adversarial debiasing),
an encoder+decoder trained in two stages with one frozen (flow distillation), a generator student scored by an
image evaluator in a recipe run, several named loaders and data-free epochs, group attributes (MFD),
structured teacher outputs through the cache, and mixed precision."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_states_equal, state_copy, tiny_net
from torch import nn

import kdforge
from kdforge.config import TrainConfig, load_config
from kdforge.data import CombinedLoader, DataFree, IndexedDataset
from kdforge.distillers.base import Distiller, Stage
from kdforge.engine.optim import build_optimizer
from kdforge.engine.trainer import Trainer, to_batch
from kdforge.losses import kd_div

pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(**kw):
    base = dict(epochs=2, lr=0.05, device="cpu", progress=False, log_every=1, checkpoint_every=3)
    base.update(kw)
    return TrainConfig(**base)


def _records(run_dir, kind="step"):
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if f'"{kind}"' in r]


# ------------------------------------------------------------------------------------ a three-optimiser game
class Generator(nn.Module):
    def __init__(self, z_dim: int = 8, size: int = 16) -> None:
        super().__init__()
        self.z_dim, self.size = z_dim, size
        self.net = nn.Sequential(nn.Linear(z_dim, 3 * 4 * 4), nn.Unflatten(1, (3, 4, 4)),
                                 nn.Upsample(scale_factor=size // 4), nn.Conv2d(3, 3, 3, padding=1), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class DisagreementGame(Distiller):
    """A MosaicKD-shaped game. The generator makes images where teacher and student disagree (its loss
    reaches it only through the frozen teacher and the student); a critic tells real images from generated
    ones; the student (main optimiser, stepped by the Trainer) imitates the teacher on both."""

    def __init__(self, student, teacher):
        super().__init__(student, teacher)
        torch.manual_seed(5)
        self.generator = Generator()
        self.critic = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.LazyLinear(1))
        self.critic(torch.zeros(1, 3, 16, 16))  # materialise the lazy layer before optimisers see it
        self.teacher_seen: list[tuple[bool, bool]] = []

    def trainable_modules(self):
        return {"student": self.student}

    def configure_optimizers(self, stage, cfg, steps):
        return {"main": build_optimizer(self.student.parameters(), cfg),  # the recipe's schedule (cosine)
                "generator": (torch.optim.Adam(self.generator.parameters(), lr=1e-3), None),  # constant
                "critic": (torch.optim.Adam(self.critic.parameters(), lr=2e-3), "multistep")}

    def training_step(self, batch):
        z = torch.randn(batch["image"].shape[0], self.generator.z_dim, device=batch["image"].device)
        fake = self.generator(z)
        t_fake, _ = self.run_teacher(batch, fake, grad=True)
        self.teacher_seen.append((self.teacher.training, any(p.grad is not None for p in self.teacher.parameters())))
        g_loss = -kd_div(self.student(fake), t_fake, 4.0) + 0.1 * F.softplus(-self.critic(fake)).mean()
        self.optimizer_step("generator", g_loss)
        d_loss = F.softplus(-self.critic(batch["image"])).mean() + F.softplus(self.critic(fake.detach())).mean()
        self.optimizer_step("critic", d_loss)
        x = torch.cat([batch["image"], fake.detach()])
        t_logits, _ = self.run_teacher({"image": x})
        return {"kd": kd_div(self.student(x), t_logits, 4.0), "gen": g_loss.detach(), "critic": d_loss.detach()}


def _game():
    return DisagreementGame(tiny_net(1), tiny_net(2))


def test_game_with_grad_through_teacher_three_optimisers_and_their_own_schedules(aug_loader, tmp_path):
    game = _game()
    before = {k: state_copy(getattr(game, k)) for k in ("generator", "critic", "student")}
    Trainer(_cfg(epochs=2, milestones=(0.5,)), tmp_path).fit(game, aug_loader)
    for name, state in before.items():  # every optimiser stepped its own network
        assert any(not torch.equal(state[k], v) for k, v in getattr(game, name).state_dict().items()), name
    assert set(game.teacher_seen) == {(False, False)}  # the teacher stayed in eval and got no gradient
    steps = _records(tmp_path)
    assert {"lr_main", "lr_generator", "lr_critic", "gen", "critic", "kd"} <= set(steps[0])
    assert {s["lr_generator"] for s in steps} == {1e-3}  # no schedule
    assert steps[0]["lr_critic"] == pytest.approx(2e-3) and steps[-1]["lr_critic"] == pytest.approx(2e-4)
    assert steps[-1]["lr_main"] < steps[0]["lr_main"] < 0.05  # cosine
    assert steps[0]["lr"] == steps[0]["lr_main"]


@pytest.mark.parametrize("stop_at", [3, 5])
def test_game_resumes_bit_exact_mid_epoch(aug_loader, tmp_path, stop_at):
    torch.manual_seed(0)
    whole = _game()
    Trainer(_cfg(), tmp_path / "whole").fit(whole, aug_loader)
    torch.manual_seed(0)
    Trainer(_cfg(max_steps=stop_at), tmp_path / "split").fit(_game(), aug_loader)
    resumed = _game()
    Trainer(_cfg(), tmp_path / "split").fit(resumed, aug_loader, resume=True)
    assert_states_equal(state_copy(whole), state_copy(resumed))  # student, generator, critic, all optimisers
    assert _records(tmp_path / "whole") == [
        {**r, "epoch_time_s": w["epoch_time_s"]} if "epoch_time_s" in r else r
        for r, w in zip(_records(tmp_path / "split"), _records(tmp_path / "whole"))]


def test_game_in_bf16_steps_inner_optimisers_outside_autocast(plain_loader):
    game = _game()
    seen = []
    original = game.optimizer_step

    def spy(name, loss, **kw):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(name, loss, **kw)

    game.optimizer_step = spy
    result = Trainer(_cfg(epochs=1, precision="bf16"), None).fit(game, plain_loader)
    assert seen and all(seen)  # called from inside the autocast region of training_step ...
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result.history[-1].items() if k.startswith("train_"))


def test_inner_backward_runs_with_autocast_off(plain_loader):
    """The Trainer's helper disables autocast around backward and step, as PyTorch advises."""
    game = _game()
    flags = []
    hook = game.generator.net[0].weight.register_hook(lambda g: flags.append(torch.is_autocast_enabled("cpu")))
    Trainer(_cfg(epochs=1, precision="bf16", max_steps=2), None).fit(game, plain_loader)
    hook.remove()
    assert flags and not any(flags)


# ------------------------------------------------------------------------------------ encoder + decoder
class TwoStageAutoencoder(Distiller):
    """A flow-distillation-shaped method: stage 1 trains the encoder (the student) to match the teacher's
    features; stage 2 trains a decoder to invert the frozen encoder. Both are returned as named networks."""

    needs_teacher = True

    def __init__(self, student, teacher):
        super().__init__(student, teacher)
        torch.manual_seed(3)
        self.decoder = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
        self.encoder_mode_in_stage2: list[bool] = []

    def networks(self):
        return {"encoder": self.student, "decoder": self.decoder}

    def stages(self, total_epochs):
        return [Stage("encoder", 1), Stage("decoder", total_epochs - 1, frozen=("student",))]

    def training_step(self, batch):
        x = batch["image"]
        code = self.student(x)
        if self.stage == "encoder":
            with torch.no_grad():
                target = self.teacher(x)
            return {"match": F.mse_loss(code, target)}
        self.encoder_mode_in_stage2.append(self.student.training)
        return {"recon": F.l1_loss(self.decoder(code), x)}

    @torch.no_grad()
    def predict(self, batch):
        return self.decoder(self.student(batch["image"]))


def _encoder(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def test_two_stage_encoder_decoder_keeps_the_frozen_network_in_eval_and_saves_both(plain_loader, tmp_path):
    method = TwoStageAutoencoder(_encoder(1), _encoder(2))
    after_stage1 = {}
    original = method.set_stage

    def record(stage):
        if stage.name == "decoder":
            after_stage1.update(state_copy(method.student))
        original(stage)

    method.set_stage = record
    Trainer(_cfg(epochs=3), tmp_path).fit(method, plain_loader)
    assert method.encoder_mode_in_stage2 and not any(method.encoder_mode_in_stage2)  # eval: BN stats frozen
    assert_states_equal(after_stage1, state_copy(method.student))  # weights and BN running stats untouched
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt["networks"]) == {"encoder", "decoder"}
    decoder = kdforge.load_student(tmp_path / "checkpoints" / "last.pt", nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)), network="decoder")
    assert_states_equal(state_copy(decoder), state_copy(method.decoder))
    with pytest.raises(KeyError, match="no network 'decodr'.*did you mean 'decoder'"):
        kdforge.load_student(tmp_path / "checkpoints" / "last.pt", decoder, network="decodr")


def test_a_stage_that_freezes_an_unknown_module_names_it(plain_loader):
    class Bad(TwoStageAutoencoder):
        def stages(self, total_epochs):
            return [Stage("a", 1, frozen=("encodr",))]

    with pytest.raises(ValueError, match="freezes \\['encodr'\\]"):
        Trainer(_cfg(epochs=1), None).fit(Bad(_encoder(1), _encoder(2)), plain_loader)


# ------------------------------------------------------------------------------------ epoch, loaders, batches
class EpochRecorder(Distiller):
    needs_teacher = False

    def __init__(self, student, teacher=None):
        super().__init__(student, teacher)
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch):
        self.seen.append((self.epoch, self.global_step))
        return {"ce": F.cross_entropy(self.student(batch["image"]), batch["label"])}


def test_distiller_sees_the_epoch_also_after_resume(aug_loader, tmp_path):
    d = EpochRecorder(tiny_net(0))
    Trainer(_cfg(epochs=2), None).fit(d, aug_loader)
    assert d.seen == [(e, s) for s, e in zip(range(8), [0] * 4 + [1] * 4)]
    Trainer(_cfg(epochs=2, max_steps=6), tmp_path).fit(EpochRecorder(tiny_net(0)), aug_loader)
    resumed = EpochRecorder(tiny_net(0))
    Trainer(_cfg(epochs=2), tmp_path).fit(resumed, aug_loader, resume=True)
    assert resumed.seen == [(1, 6), (1, 7)]


class TwoStreams(Distiller):
    """Reads named sub-batches of a CombinedLoader: OOD images to distil on, labelled ones for CE."""

    def training_step(self, batch):
        ood, real = batch["ood"]["image"], batch["real"]
        t, _ = self.run_teacher(batch["ood"])
        return {"kd": kd_div(self.student(ood), t, 4.0),
                "ce": F.cross_entropy(self.student(real["image"]), real["label"])}


def test_combined_loader_cycles_the_shorter_and_resumes_exactly(synth, tmp_path):
    from kdforge.data import BatchAugment, BatchLoader

    def loaders():
        ood = BatchLoader(synth["train"], 16, augment=BatchAugment(crop_pad=2, flip=True), drop_last=True, seed=1)
        real = BatchLoader(synth["test"], 12, augment=BatchAugment(flip=True), drop_last=True, seed=2)
        return CombinedLoader({"ood": ood, "real": real})

    combined = loaders()
    assert len(combined) == 4 and combined.lengths == {"ood": 4, "real": 2}
    combined.set_epoch(1)
    full = list(combined)
    assert torch.equal(full[2]["real"]["index"], combined.loaders["real"].get_batch(0, epoch=1 * 2 + 1)["index"])
    tail = list(combined.iter_from(3))
    assert all(torch.equal(a[k]["image"], b[k]["image"]) for a, b in zip(full[3:], tail) for k in ("ood", "real"))

    torch.manual_seed(0)
    whole = TwoStreams(tiny_net(1), tiny_net(2))
    Trainer(_cfg(), tmp_path / "a").fit(whole, loaders())
    torch.manual_seed(0)
    Trainer(_cfg(max_steps=5), tmp_path / "b").fit(TwoStreams(tiny_net(1), tiny_net(2)), loaders())
    resumed = TwoStreams(tiny_net(1), tiny_net(2))
    Trainer(_cfg(), tmp_path / "b").fit(resumed, loaders(), resume=True)
    assert_states_equal(state_copy(whole), state_copy(resumed))


class DataFreeKD(Distiller):
    """No data at all: the inputs are noise (DAFL/DFAD shaped); the batch says only how many."""

    def training_step(self, batch):
        x = torch.randn(batch["batch_size"], 3, 16, 16)
        t, _ = self.run_teacher({"image": x})
        return {"kd": kd_div(self.student(x), t, 4.0)}


def test_data_free_epochs_of_known_length(val_loader):
    result = Trainer(_cfg(epochs=2, checkpoint_every=None), None).fit(
        DataFreeKD(tiny_net(1), tiny_net(2)), DataFree(steps=3, batch_size=8), val_loader)
    assert [h["step"] for h in result.history] == [3, 6] and "val_top1" in result.history[-1]


def test_tuple_batches_with_a_third_element_are_refused_with_the_fix():
    x, y, g = torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with pytest.raises(TypeError, match="IndexedDataset"):
        to_batch((x, y, g), torch.device("cpu"))
    assert torch.equal(to_batch((x, y, {"group": g}), torch.device("cpu"))["group"], g)
    sample = IndexedDataset(torch.utils.data.TensorDataset(x, y), group=g)[1]
    assert int(sample["index"]) == 1 and int(sample["group"]) == 1


def test_a_loader_without_len_gets_a_clear_error(plain_loader):
    with pytest.raises(TypeError, match="has no len\\(\\).*DataFree"):
        Trainer(_cfg(epochs=1), None).fit(EpochRecorder(tiny_net(0)), iter(plain_loader))


# ------------------------------------------------------------------------------------ groups
class GroupAware(Distiller):
    """Reads the per-sample group attribute carried by every kdforge batch (what MFD needs)."""

    needs_teacher = False
    seen: list[torch.Tensor]

    def training_step(self, batch):
        self.seen.append(batch["group"].clone())
        return {"ce": F.cross_entropy(self.student(batch["image"]), batch["label"])}


def test_batches_carry_group_attributes_into_methods_and_metrics(aug_loader, val_loader, synth):
    d = GroupAware(tiny_net(0))
    d.seen = []
    assert val_loader.num_groups == 2  # read from the data's group column: per-group accuracy in every evaluation
    result = Trainer(_cfg(epochs=1), None).fit(d, aug_loader, val_loader)
    idx = torch.cat([b["index"] for b in aug_loader])
    assert torch.equal(torch.cat(d.seen), torch.as_tensor(synth["train"].attrs["group"])[idx])
    assert len(result.metrics["group_top1"]) == 2


class BalancedCE(Distiller):
    """Asks the loader for group-and-class-balanced epochs (SS in the fairness papers)."""

    needs_teacher = False

    def __init__(self, student, teacher=None):
        super().__init__(student, teacher)
        self.seen = []

    def training_step(self, batch):
        self.seen.append(batch["index"].clone())
        return {"ce": F.cross_entropy(self.student(batch["image"]), batch["label"])}

    def train_sampler(self):
        from kdforge.data import GroupClassBalancedSampler

        return GroupClassBalancedSampler(per_cell=4)


def test_a_method_asks_for_balanced_batches_and_resumes_exactly(aug_loader, synth, tmp_path):
    r = kdforge.distill(tiny_net(0), None, aug_loader, method="test_contracts:BalancedCE", epochs=1, device="cpu",
                        progress=False)
    epoch = aug_loader.with_sampler(r.distiller.train_sampler()).epoch_indices(0)
    cells = torch.as_tensor(synth["train"].attrs["group"])[epoch] * 10 + torch.as_tensor(synth["train"].labels)[epoch]
    assert set(torch.bincount(cells).tolist()) <= {0, 4}  # 4 of every (group, class) cell present
    assert torch.equal(torch.cat(r.distiller.seen), epoch[:64])  # what the method saw: 4 full batches of 16

    def run(run_dir, resume=False, **kw):
        return kdforge.distill(tiny_net(0), None, aug_loader, method="test_contracts:BalancedCE", run_dir=run_dir,
                               resume=resume, epochs=2, device="cpu", progress=False, checkpoint_every=1, **kw)

    whole = run(tmp_path / "a")
    run(tmp_path / "b", max_steps=3)
    resumed = run(tmp_path / "b", resume=True)
    assert_states_equal(state_copy(whole.student), state_copy(resumed.student))


def test_ood_training_data_with_in_domain_evaluation_in_a_recipe(tmp_path):
    """MosaicKD's setting: train on another dataset (3 classes here) and evaluate on the task's (10)."""
    from kdforge.data.prepare import prepare
    from kdforge.recipe import run_recipe

    root = tmp_path / "cache"
    prepare("ood_pool", None, root, format="synthetic", n_train=64, n_test=16, num_classes=3, size=16, seed=7)
    cfg = load_config(None, base={
        "name": "ood", "out_dir": str(tmp_path / "runs"),
        "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "synthetic_size": 16,
                 "train_name": "ood_pool", "root": str(root), "batch_size": 16},
        "student": "resnet20", "teacher": "resnet20", "method": {"name": "kd"},
        "train": {"epochs": 1, "device": "cpu", "progress": False}})
    from kdforge.data.build import build_loaders

    bundle = build_loaders(cfg.data)
    assert bundle.train.num_classes == 3 and bundle.train.data.name == "ood_pool"  # trains on the OOD pool
    assert bundle.val.num_classes == 10 and bundle.num_classes == 10  # and is scored on the task
    result = run_recipe(cfg, eval_teacher=False)
    assert result.student.linear.out_features == 10  # the evaluated task's classes, not the OOD pool's 3
    assert load_config(tmp_path / "runs" / "ood" / "config.yaml").student.kwargs["num_classes"] == 10
    assert "top1" in result.metrics


# ------------------------------------------------------------------------------------ structured teacher outputs
class FlowLikeTeacher(nn.Module):
    """Returns a dict with logits and a tuple of latents, as a flow returns its multi-scale z."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net(2)
        self.calls = 0

    def forward(self, x):
        self.calls += x.shape[0]
        return {"logits": self.net(x), "z": (x.mean(1), x[:, :, ::2, ::2].clone())}


class LatentKD(Distiller):
    def training_step(self, batch):
        out, _ = self.run_teacher(batch)
        s = self.student(batch["image"])
        return {"kd": kd_div(s, out["logits"], 4.0), "z": (out["z"][0].mean() + out["z"][1].mean()).detach()}


def test_structured_teacher_outputs_go_through_the_cache(plain_loader):
    teacher = FlowLikeTeacher()
    d = LatentKD(tiny_net(1), teacher)
    d.enable_teacher_cache()
    Trainer(_cfg(epochs=3, checkpoint_every=None), None).fit(d, plain_loader)
    assert teacher.calls == 64  # each of the 64 training images through the teacher once in 3 epochs
    batch = next(iter(plain_loader))
    cached, _ = d.run_teacher(batch)
    fresh = FlowLikeTeacher.forward(teacher, batch["image"])
    assert torch.equal(cached["logits"], fresh["logits"].detach())
    assert isinstance(cached["z"], tuple) and torch.equal(cached["z"][1], fresh["z"][1])


# ------------------------------------------------------------------------------------ an image student in a recipe
class TinyImageNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x):
        return self.net(x)


class PixelKD(Distiller):
    """The student generator imitates the teacher generator pixel for pixel."""

    def __init__(self, student, teacher, *, l1_weight: float = 1.0):
        super().__init__(student, teacher)
        self.l1_weight = l1_weight

    def training_step(self, batch):
        t, _ = self.run_teacher(batch)
        return {"l1": self.l1_weight * F.l1_loss(self.student(batch["image"]), t)}


def test_generator_student_scored_by_the_image_evaluator_in_a_recipe_run(tmp_path):
    from kdforge.recipe import run_recipe

    torch.manual_seed(0)
    teacher_path = tmp_path / "teacher.pt"
    torch.save(TinyImageNet(16).state_dict(), teacher_path)
    cfg = load_config(None, base={
        "name": "pixel", "out_dir": str(tmp_path / "runs"),
        "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 32, "synthetic_size": 16,
                 "batch_size": 16, "crop_pad": 0, "flip": False},
        # models and the method named by import path, as a user's own code would be
        "student": {"name": "test_contracts:TinyImageNet"},
        "teacher": {"name": "test_contracts:TinyImageNet", "width": 16, "weights": str(teacher_path)},
        "method": {"name": "test_contracts:PixelKD"}, "eval": {"name": "images"},
        "train": {"epochs": 2, "lr": 0.05, "device": "cpu", "progress": False}})
    result = run_recipe(cfg)
    assert {"psnr", "ssim", "l1", "mse"} <= set(result.metrics)
    assert result.history[-1]["val_psnr"] > result.history[0]["val_psnr"] - 1.0
    run = tmp_path / "runs" / "pixel"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"]["name"] == "psnr" and "psnr" in summary["metrics"]
    report = (run / "report.md").read_text()
    assert "psnr" in report.lower() and "top-1" not in report.lower()
    from kdforge.cli import main

    assert main(["eval", str(run / "checkpoints" / "last.pt")]) == 0
