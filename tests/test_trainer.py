"""The Trainer: exact resume, non-finite losses, atomic checkpoints, schedules, clipping, the frozen teacher,
metrics.jsonl, the teacher-output cache and multi-stage methods. Tiny models, 4 batches per epoch."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import BATCH, assert_states_equal, state_copy, tiny_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdforge
from kdforge.config import TrainConfig
from kdforge.data.loader import BatchLoader
from kdforge.data.transforms import BatchAugment
from kdforge.distillers.fitnet import FitNet
from kdforge.distillers.kd import HintonKD
from kdforge.distillers.scratch import Scratch
from kdforge.engine.checkpoint import atomic_save, load_checkpoint, seed_everything
from kdforge.engine.logging import read_metrics
from kdforge.engine.optim import build_optimizer, build_scheduler, lr_factor
from kdforge.engine.trainer import NonFiniteLossError, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS_PER_EPOCH = 4

COMMON = dict(epochs=2, lr=0.05, device="cpu", progress=False, log_every=1, checkpoint_every=3)


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**COMMON, **kw})


def _run(loader, run_dir: Path | None, *, method: str = "kd", resume: bool = False, **kw):
    """Distil a fresh seeded TinyNet pair: every call starts from the same weights."""
    return kdforge.distill(tiny_net(1, width=4), tiny_net(2), loader, method=method, run_dir=run_dir,
                           resume=resume, **{**COMMON, **kw})


def _fresh_aug_loader(synth) -> BatchLoader:
    return BatchLoader(synth["train"], BATCH, drop_last=True, augment=BatchAugment(2, True), seed=1)


def _tensor_loader(synth) -> DataLoader:
    """A plain torch DataLoader (shuffled by the global RNG): the trainer must replay it on resume."""
    d = synth["train"]
    x = torch.from_numpy(d.images).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(d.labels)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, drop_last=True)


def _step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "step"]


def _epoch_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "epoch"]


# ------------------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("loader_kind", ["batchloader", "dataloader"])
@pytest.mark.parametrize("stop_at", [2, 6])  # mid epoch 1 (no periodic checkpoint there), mid epoch 2
def test_resume_is_bit_identical(tmp_path, synth, loader_kind, stop_at):
    make = _fresh_aug_loader if loader_kind == "batchloader" else _tensor_loader
    full = _run(make(synth), tmp_path / "full")

    first = _run(make(synth), tmp_path / "split", max_steps=stop_at)
    assert first.history == ([] if stop_at < STEPS_PER_EPOCH else [first.history[0]])
    ckpt = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert ckpt["position"]["step"] == stop_at
    assert ckpt["position"]["batch"] == stop_at % STEPS_PER_EPOCH
    resumed = _run(make(synth), tmp_path / "split", resume=True)

    assert_states_equal(state_copy(full.student), state_copy(resumed.student))
    # the run really trained: the final student is not the initial one
    assert not torch.equal(full.student.linear.weight, tiny_net(1, width=4).linear.weight)
    # metrics.jsonl: every step once, in order, and one record per epoch
    steps = [r["step"] for r in _step_records(tmp_path / "split")]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [r["epoch"] for r in _epoch_records(tmp_path / "split")] == [1, 2]
    full_losses = [r["loss"] for r in _step_records(tmp_path / "full")]
    assert [r["loss"] for r in _step_records(tmp_path / "split")] == full_losses


class CrashingKD(HintonKD):
    """Hinton KD that raises (like a killed process) when it is about to take step `crash_at` (1-based)."""

    crash_at: int | None = None

    def training_step(self, batch):
        if self.crash_at is not None and self.global_step + 1 == self.crash_at:
            raise KeyboardInterrupt(f"simulated crash at step {self.crash_at}")
        return super().training_step(batch)


@pytest.mark.parametrize("crash_at", [3, 4])  # checkpoint at step 2; step 3 is lost (and logged, for 4)
def test_resume_after_a_crash_is_bit_identical(tmp_path, synth, crash_at):
    cfg = _train_cfg(checkpoint_every=2)

    def fit(run_dir, crash_at=None, resume=False):
        seed_everything(0)
        # dropout in the student: the global RNG state must be restored too
        distiller = CrashingKD(tiny_net(1, width=4, dropout=0.3), tiny_net(2))
        distiller.crash_at = crash_at
        Trainer(cfg, run_dir).fit(distiller, _fresh_aug_loader(synth), resume=resume)
        return distiller.student

    full = fit(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "crash", crash_at=crash_at)
    assert load_checkpoint(tmp_path / "crash" / "checkpoints" / "last.pt")["position"]["step"] == 2
    resumed = fit(tmp_path / "crash", resume=True)
    assert_states_equal(state_copy(full), state_copy(resumed))
    steps = [r["step"] for r in _step_records(tmp_path / "crash")]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # step 3 logged before the crash is not repeated


@pytest.mark.parametrize("stop_at", [4, 5])  # last step of the hint stage, first step of the kd stage
def test_resume_across_fitnet_stage_boundary(tmp_path, synth, stop_at):
    opts = dict(method="fitnet", hint_epochs=1, student_layer="layer2", teacher_layer="layer2")
    full = _run(_fresh_aug_loader(synth), tmp_path / "full", **opts)
    _run(_fresh_aug_loader(synth), tmp_path / "split", max_steps=stop_at, **opts)
    pos = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["position"]
    assert (pos["stage"], pos["step"]) == ((0, 4) if stop_at == 4 else (1, 5))
    resumed = _run(_fresh_aug_loader(synth), tmp_path / "split", resume=True, **opts)
    assert_states_equal(state_copy(full.distiller), state_copy(resumed.distiller))  # regressor included
    assert [r["stage"] for r in resumed.history] == ["hint", "kd"]
    # the epoch that ended exactly at max_steps is still summarised with its training losses
    assert "train_hint" in resumed.history[0] and "train_kd" in resumed.history[1]


def test_resume_rejects_a_foreign_checkpoint(tmp_path, synth):
    atomic_save({"state_dict": {}}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(ValueError, match="not a kdforge training checkpoint"):
        _run(_fresh_aug_loader(synth), tmp_path, resume=True)


# ------------------------------------------------------------------------------------------ NaN
class NaNAtStep3(HintonKD):
    """Its kd term turns NaN at step 3; it remembers the student's state just before that step."""

    def training_step(self, batch):
        if self.global_step == 2:
            self.before_nan = state_copy(self.student)
        out = super().training_step(batch)
        if self.global_step == 2:
            out["kd"] = out["kd"] * float("nan")
        return out


@pytest.mark.parametrize("every", [1, 2])
def test_nan_loss_stops_naming_term_and_step_and_keeps_last_checkpoint(tmp_path, synth, every):
    distiller = NaNAtStep3(tiny_net(1, width=4), tiny_net(2))
    trainer = Trainer(_train_cfg(checkpoint_every=every), tmp_path)
    with pytest.raises(NonFiniteLossError) as e:
        trainer.fit(distiller, _fresh_aug_loader(synth))
    msg = str(e.value)
    assert "'kd'" in msg and "step 3" in msg and "epoch 1" in msg
    params = dict(distiller.student.named_parameters())  # (BN statistics did see the NaN step's forward)
    assert all(torch.equal(p, distiller.before_nan[k]) for k, p in params.items())  # NaN step not taken
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["position"]["step"] == 2
    assert_states_equal(ckpt["model"], distiller.before_nan)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_checkpoint_restores_a_student(tmp_path, synth):
    _run(_fresh_aug_loader(synth), tmp_path, epochs=1)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    fresh = tiny_net(1, width=4)
    fresh.load_state_dict(ckpt["model"])
    assert not any(k.startswith("teacher.") for k in ckpt["distiller"])  # the frozen teacher is not saved
    assert ckpt["position"] == {"stage": 1, "epoch": 1, "batch": 0, "step": STEPS_PER_EPOCH}


# ------------------------------------------------------------------------------------------ atomic save
def test_atomic_save_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.pt"
    atomic_save({"w": torch.arange(4)}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4))
    assert sorted(os.listdir(path.parent)) == ["last.pt"]  # no temp file left behind


def test_load_checkpoint_names_a_truncated_file(tmp_path):
    path = tmp_path / "cut.pt"
    atomic_save({"w": torch.arange(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(RuntimeError, match="cut.pt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------ schedules
def _sched_cfg(**kw) -> SimpleNamespace:
    base = dict(schedule="cosine", lr=0.1, min_lr=0.0, warmup_epochs=0.0, milestones=(0.5, 0.75), gamma=0.1)
    return SimpleNamespace(**{**base, **kw})


def test_cosine_factor():
    cfg = _sched_cfg()
    assert lr_factor(0, 100, 10, cfg) == 1.0
    assert lr_factor(50, 100, 10, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, cfg) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(s, 100, 10, cfg) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone
    floor = _sched_cfg(min_lr=0.001)
    assert lr_factor(100, 100, 10, floor) == pytest.approx(0.01)  # min_lr / lr
    assert lr_factor(50, 100, 10, floor) == pytest.approx(0.01 + 0.99 * 0.5)


def test_multistep_with_epoch_milestones():
    cfg = _sched_cfg(schedule="multistep", milestones=(3, 6), gamma=0.1)
    f = [lr_factor(s, 100, 10, cfg) for s in (0, 29, 30, 59, 60, 99)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_multistep_with_fractional_milestones():
    cfg = _sched_cfg(schedule="multistep", milestones=(0.5, 0.75), gamma=0.2)
    f = [lr_factor(s, 200, 10, cfg) for s in (0, 99, 100, 149, 150, 199)]  # 20 epochs: bounds 10 and 15
    assert f == pytest.approx([1, 1, 0.2, 0.2, 0.04, 0.04])


def test_linear_warmup_then_schedule():
    cfg = _sched_cfg(warmup_epochs=1.0)
    assert lr_factor(0, 100, 10, cfg) == pytest.approx(0.01)
    assert lr_factor(5, 100, 10, cfg) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, 100, 10, cfg) == pytest.approx(1.0)  # cosine starts where warm-up ends
    assert lr_factor(55, 100, 10, cfg) == pytest.approx(0.5)  # midpoint of the 90 cosine steps
    const = _sched_cfg(schedule="constant", warmup_epochs=0.5)
    expected = [0.01, 0.01 + 0.99 * 0.8, 1, 1]
    assert [lr_factor(s, 100, 10, const) for s in (0, 4, 5, 99)] == pytest.approx(expected)


def test_unknown_schedule_and_optimizer_name_the_item():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*'cosine'"):
        build_scheduler(opt, _sched_cfg(schedule="cosin"), 10, 5)
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'.*'adam'"):
        build_optimizer(model.parameters(), TrainConfig(optimizer="adamm"))
    with pytest.raises(ValueError, match="warmup_epochs"):
        build_scheduler(opt, _sched_cfg(schedule="plateau", warmup_epochs=1, plateau_patience=1), 10, 5)


def test_scheduler_follows_lr_factor_per_step():
    model = nn.Linear(2, 2)
    cfg = TrainConfig(lr=0.1, schedule="multistep", milestones=(1,), gamma=0.5)
    opt = build_optimizer(model.parameters(), cfg)
    sched = build_scheduler(opt, cfg, total_steps=8, steps_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1] * 4 + [0.05] * 4)


def _constant_loss_evaluator(losses):
    it = iter(losses)

    def evaluator(predict, loader, device, **_):
        return {"loss": next(it), "top1": 0.0}

    return evaluator


@pytest.mark.parametrize("val_losses, final_lr", [([1.0, 1.0, 1.0], 0.0125), ([3.0, 2.0, 1.0], 0.05)])
def test_plateau_reduces_lr_when_val_loss_stalls(synth, val_losses, final_lr):
    cfg = _train_cfg(epochs=3, schedule="plateau", plateau_patience=0, gamma=0.5, checkpoint_every=None)
    distiller = HintonKD(tiny_net(1, width=4), tiny_net(2))
    fit = Trainer(cfg, evaluator=_constant_loss_evaluator(val_losses)).fit(
        distiller, _fresh_aug_loader(synth), val_loader=[None])
    assert distiller.optimizers["main"].param_groups[0]["lr"] == pytest.approx(final_lr)
    assert [r["val_loss"] for r in fit.history] == val_losses
    # within an epoch the plateau schedule keeps the lr constant (it steps on evaluations only)
    if final_lr < 0.05:
        assert [r["lr"] for r in fit.history] == pytest.approx([0.05, 0.05, 0.025])


def test_plateau_follows_the_monitored_metric_and_its_mode(synth):
    """An evaluator without a loss (image metrics) drives the plateau schedule through `monitor`."""
    def evaluator(predict, loader, device, **_):
        return {"psnr": 20.0}  # stalls from the first epoch

    cfg = _train_cfg(epochs=3, schedule="plateau", plateau_patience=0, gamma=0.5, checkpoint_every=None)
    distiller = HintonKD(tiny_net(1, width=4), tiny_net(2))
    fit = Trainer(cfg, evaluator=evaluator, monitor="psnr").fit(distiller, _fresh_aug_loader(synth), val_loader=[None])
    assert distiller.optimizers["main"].param_groups[0]["lr"] == pytest.approx(0.0125)
    assert fit.best == {"metric": "psnr", "mode": "max", "value": 20.0, "epoch": 1}
    with pytest.raises(ValueError, match="monitor metric 'top1'.*psnr"):
        Trainer(cfg, evaluator=evaluator, monitor="top1").fit(HintonKD(tiny_net(1, width=4), tiny_net(2)),
                                                               _fresh_aug_loader(synth), val_loader=[None])


# ------------------------------------------------------------------------------------------ grad clip
def _linear_step(clip: float | None) -> float:
    """The norm of one plain-SGD step (lr 1, so the norm of the applied gradient) of a linear classifier."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    batch = {"image": 50 * torch.randn(8, 3, 2, 2), "label": torch.arange(8) % 3}
    cfg = TrainConfig(epochs=1, lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant", grad_clip=clip,
                      device="cpu", progress=False, log_every=0)
    Trainer(cfg).fit(Scratch(model), [batch])
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return float((after - before).norm())


def test_grad_clip_limits_the_global_grad_norm():
    unclipped = _linear_step(None)
    clipped = _linear_step(0.1)
    assert unclipped > 1.0  # the test's gradients are large enough for clipping to matter
    assert clipped == pytest.approx(0.1, rel=1e-4)  # lr 1: the step is the clipped gradient


# ------------------------------------------------------------------------------------------ frozen teacher
def test_teacher_stays_frozen_and_in_eval(synth, val_loader):
    teacher = tiny_net(2)
    with torch.no_grad():  # non-trivial BN statistics, so a drift would show
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    before = state_copy(teacher)
    distiller = HintonKD(tiny_net(1, width=4), teacher)
    assert all(not p.requires_grad for p in teacher.parameters())
    distiller.train()
    teacher.train()  # even a user flipping the teacher itself does not survive the trainer
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    s_before = state_copy(distiller.student)
    Trainer(_train_cfg(checkpoint_every=None)).fit(distiller, _fresh_aug_loader(synth), val_loader)
    assert seen and all(mode == (False, False) for mode in seen)
    assert not teacher.training
    assert_states_equal(before, state_copy(teacher))  # weights and BN buffers (incl. num_batches_tracked)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not torch.equal(s_before["linear.weight"], distiller.student.linear.weight)
    assert distiller.train().teacher.training is False


# ------------------------------------------------------------------------------------------ metrics.jsonl
def test_metrics_jsonl_records(tmp_path, synth, val_loader):
    _run(_fresh_aug_loader(synth), tmp_path, val_loader=val_loader, log_every=3, epochs=3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if r["kind"] == "step"] == [3, 6, 9, 12]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and [r["step"] for r in epochs] == [4, 8, 12]
    for r in epochs:
        assert 0.0 <= r["val_top1"] <= 100.0 and math.isfinite(r["val_loss"])
        assert {"train_ce", "train_kd", "train_loss", "lr", "epoch_time_s"} <= r.keys()
    steps = [r for r in records if r["kind"] == "step"]
    assert all({"ce", "kd", "loss", "lr"} <= r.keys() for r in steps)
    assert steps[0]["lr"] > steps[-1]["lr"]  # cosine


# ------------------------------------------------------------------------------------------ teacher cache
def _count_teacher_calls(teacher: nn.Module) -> list[int]:
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1

    teacher.register_forward_hook(hook)
    return calls


def test_teacher_cache_is_exact_and_runs_the_teacher_once_per_sample(synth, plain_loader):
    results, calls = {}, {}
    for cache in (False, True):
        teacher = tiny_net(2)
        counter = _count_teacher_calls(teacher)
        loader = BatchLoader(synth["train"], BATCH, drop_last=True, seed=1)  # shuffled, not augmented
        r = kdforge.distill(tiny_net(1, width=4), teacher, loader, method="kd", teacher_cache=cache,
                            **{**COMMON, "epochs": 3})
        results[cache], calls[cache] = state_copy(r.student), counter[0]
    assert calls == {False: 3 * STEPS_PER_EPOCH, True: STEPS_PER_EPOCH}
    assert_states_equal(results[False], results[True])


def test_teacher_cache_refuses_random_augmentation(aug_loader):
    with pytest.raises(ValueError, match="random augmentation"):
        kdforge.distill(tiny_net(1, width=4), tiny_net(2), aug_loader, method="kd", teacher_cache=True,
                        **COMMON)


def test_teacher_cache_warns_for_an_unknown_loader(synth):
    with pytest.warns(UserWarning, match="cannot tell whether this loader is deterministic"):
        kdforge.distill(tiny_net(1, width=4), tiny_net(2), _tensor_loader(synth), method="kd",
                        teacher_cache=True, **{**COMMON, "max_steps": 1})


# ------------------------------------------------------------------------------------------ stages
class RecordingFitNet(FitNet):
    """FitNet that records its optimisers, the student at the end of the hint stage, and the kd optimiser
    state when the kd stage takes its first step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made: dict[str, torch.optim.Optimizer] = {}
        self.first_kd_step: dict | None = None

    def configure_optimizers(self, stage, cfg, steps):
        opts = super().configure_optimizers(stage, cfg, steps)
        self.made[stage] = opts["main"]
        return opts

    def set_stage(self, stage):
        if stage.name == "kd":
            self.after_hint = state_copy(self.student)
        super().set_stage(stage)

    def training_step(self, batch):
        if self.stage == "kd" and self.first_kd_step is None:
            opt = self.optimizers["main"]
            self.first_kd_step = {"state": len(opt.state), "lr": opt.param_groups[0]["lr"]}
        return super().training_step(batch)


def test_fitnet_hint_stage_trains_only_the_guided_layers_then_kd_gets_fresh_optimisers(synth):
    student = tiny_net(1, width=4)
    initial = state_copy(student)
    distiller = RecordingFitNet(student, tiny_net(2), student_layer="layer2", teacher_layer="layer2",
                                hint_epochs=1, input_shape=(3, 16, 16))
    Trainer(_train_cfg(checkpoint_every=None, epochs=2)).fit(distiller, _fresh_aug_loader(synth))
    hint = distiller.after_hint
    for name in ("linear.weight", "linear.bias", "layer3.0.weight", "layer3.1.weight"):  # past layer2
        assert torch.equal(hint[name], initial[name]), f"{name} changed during the hint stage"
    for name in ("conv1.weight", "layer1.0.weight", "layer2.0.weight", "layer2.1.weight"):
        assert not torch.equal(hint[name], initial[name]), f"{name} was not trained by the hint stage"
    final = state_copy(student)
    assert not torch.equal(final["linear.weight"], initial["linear.weight"])  # the kd stage trains the head

    assert set(distiller.made) == {"hint", "kd"} and distiller.made["hint"] is not distiller.made["kd"]
    kd_params = {id(p) for g in distiller.made["kd"].param_groups for p in g["params"]}
    assert kd_params == {id(p) for p in student.parameters()}  # the regressor is dropped
    hint_params = {id(p) for g in distiller.made["hint"].param_groups for p in g["params"]}
    assert {id(p) for p in distiller.regressor.parameters()} <= hint_params
    # fresh: no momentum buffers carried over, and the lr schedule restarts at the base lr
    assert distiller.first_kd_step == {"state": 0, "lr": pytest.approx(0.05)}


def test_compile_compiles_teacher_and_student_in_place_and_trains_as_eager(aug_loader, tmp_path, monkeypatch):
    """train.compile: nn.Module.compile on the teacher and the method's networks (torch.compile's "eager" backend
    here, so the test traces the graphs without waiting for a C++ compiler): same weights and checkpoint keys as
    an uncompiled run."""
    compiled = []
    original = nn.Module.compile

    def eager_compile(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        original(self, backend="eager")

    monkeypatch.setattr(nn.Module, "compile", eager_compile)
    runs = {}
    for flag in (False, True):
        result = kdforge.distill(tiny_net(1, width=4), tiny_net(2), aug_loader, method="kd", epochs=1, max_steps=2,
                                 run_dir=tmp_path / str(flag), compile=flag, device="cpu", progress=False, lr=0.05)
        runs[flag] = state_copy(result.student)
    assert compiled == ["TinyNet", "TinyNet"]  # teacher and student, once each
    assert result.student._compiled_call_impl is not None
    assert_states_equal(runs[False], runs[True])  # same keys (no "_orig_mod." prefix), same weights
    with pytest.raises(kdforge.config.ConfigError, match="compile_mode"):
        TrainConfig(compile=True, compile_mode="fastest")
