"""DAFL and DFAD, the generator-based data-free baselines: their terms against naive loops of the formulas, who each
optimiser may change (the teacher never), the weights, DataFree runs through the Trainer (and a bit-exact resume),
and both recipes for two steps on generated data, with `data.data_free_steps` building the loaders."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import assert_states_equal, state_copy, tiny_net

import kdforge
from kdforge.api import build_distiller
from kdforge.config import ConfigError, TrainConfig, load_config
from kdforge.data import DataFree
from kdforge.data.build import build_loaders
from kdforge.distillers.dafl import dafl_generator_terms
from kdforge.distillers.generator_base import CIFAR10_MEAN, keep_running_stats
from kdforge.engine.checkpoint import load_checkpoint
from kdforge.engine.trainer import Trainer
from kdforge.losses import kd_div
from kdforge.losses.data_free import activation_loss, information_entropy_loss, logit_mae, one_hot_loss
from kdforge.recipe import run_recipe

pytestmark = pytest.mark.usefixtures("single_thread")

RECIPES = [Path(__file__).resolve().parents[1] / "recipes" / "mosaic" / "cifar10" / f"{m}_resnet20_from_resnet56.yaml"
           for m in ("dafl", "dfad")]
SMALL_G = {"generator_options": {"ngf": 8, "z_dim": 16}}


def _softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------------------------------- terms vs naive
def test_terms_equal_naive_loops():
    g = torch.Generator().manual_seed(0)
    t, s, f = torch.randn(7, 5, generator=g) * 3, torch.randn(7, 5, generator=g) * 3, torch.randn(7, 6, generator=g)
    rows = [_softmax_row(r) for r in t.tolist()]
    # L_oh: CE of each row against its own argmax
    naive_oh = sum(-math.log(p[max(range(5), key=lambda c: r[c])]) for p, r in zip(rows, t.tolist())) / 7
    assert one_hot_loss(t).item() == pytest.approx(naive_oh, rel=1e-5)
    # L_a: minus the mean |f| over every element
    assert activation_loss(f).item() == pytest.approx(-sum(abs(v) for r in f.tolist() for v in r) / 42, rel=1e-5)
    # L_ie: sum_c p_bar log10 p_bar, p_bar the batch mean of the softmax
    p_bar = [sum(p[c] for p in rows) / 7 for c in range(5)]
    assert information_entropy_loss(t).item() == pytest.approx(sum(p * math.log10(p) for p in p_bar), rel=1e-5)
    # DFAD's MAE: mean over the batch and the classes of |s - t|
    naive_mae = sum(abs(a - b) for ra, rb in zip(s.tolist(), t.tolist()) for a, b in zip(ra, rb)) / 35
    assert logit_mae(s, t).item() == pytest.approx(naive_mae, rel=1e-5)


def test_term_extremes():
    """L_ie's floor is -log10(C), at a balanced batch, and 0 when every sample is one class; L_oh is ~0 for
    confident rows; the MAE of equal logits is 0."""
    assert information_entropy_loss(torch.eye(4) * 50).item() == pytest.approx(-math.log10(4), rel=1e-4)
    assert information_entropy_loss(torch.tensor([[50.0, 0, 0]] * 3)).item() == pytest.approx(0.0, abs=1e-6)
    assert one_hot_loss(torch.eye(4) * 50).item() == pytest.approx(0.0, abs=1e-6)
    x = torch.randn(3, 4)
    assert logit_mae(x, x).item() == 0.0
    with pytest.raises(ValueError, match="logit_mae"):
        logit_mae(torch.zeros(2, 3), torch.zeros(2, 4))


def test_each_dafl_generator_weight_scales_its_own_term_only():
    g = torch.Generator().manual_seed(2)
    t, f = torch.randn(6, 4, generator=g), torch.randn(6, 8, generator=g)
    base = dict(oh_weight=1.0, activation_weight=1.0, balance_weight=1.0)
    one = dafl_generator_terms(t, f, **base)
    assert set(one) == {"oh", "activation", "balance"}
    for name in one:
        three = dafl_generator_terms(t, f, **{**base, f"{name}_weight": 3.0})
        for k in one:
            torch.testing.assert_close(three[k], 3 * one[k] if k == name else one[k])
        assert name not in dafl_generator_terms(t, f, **{**base, f"{name}_weight": 0.0})


# -------------------------------------------------------------------------------------------- the methods
def _method(name: str, **kw):
    torch.manual_seed(0)
    return kdforge.DISTILLERS.get(name)(tiny_net(1, width=4), tiny_net(2), input_shape=(3, 16, 16),
                                        **{**SMALL_G, **kw})


def _with_optimizers(d):
    d.optimizers = {k: (v[0] if isinstance(v, tuple) else v)
                    for k, v in d.configure_optimizers("main", TrainConfig(lr=0.05), 10).items()}
    return d.train()


@pytest.mark.parametrize("name, order", [("dafl", ["generator", "student"]),
                                         ("dfad", ["student", "student", "generator"])])
def test_each_optimiser_changes_only_its_network_and_the_teacher_never(name, order):
    d = _with_optimizers(_method(name, **({"student_steps": 2} if name == "dfad" else {})))
    assert {id(p) for p in d.optimizers["generator"].param_groups[0]["params"]} == \
        {id(p) for p in d.generator.parameters()}
    assert {id(p) for g in d.optimizers["student"].param_groups for p in g["params"]} == \
        {id(p) for p in d.student.parameters()}
    nets = {"student": d.student, "generator": d.generator, "teacher": d.teacher}
    teacher0 = state_copy(d.teacher)
    last = {k: state_copy(m) for k, m in nets.items()}
    seen = []
    original = d.optimizer_step

    def spy(opt_name, loss, **kw):
        others = {k: [None if p.grad is None else p.grad.clone() for p in m.parameters()]
                  for k, m in nets.items() if k != opt_name}
        out = original(opt_name, loss, **kw)
        now = {k: state_copy(m) for k, m in nets.items()}
        # what changed since the previous step ended: its forward passes and its optimiser step, BN statistics too
        seen.append((opt_name, {k for k in nets for n, v in now[k].items() if not torch.equal(v, last[k][n])}))
        last.update(now)
        for k, grads in others.items():  # no other network got a weight gradient in this step
            after = [p.grad for p in nets[k].parameters()]
            assert all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                       for a, b in zip(grads, after)), f"the {opt_name} step left gradients on the {k}"
        if opt_name == "generator":  # the gradient reached G through the frozen teacher (and DFAD's student)
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.generator.parameters())
        return out

    d.optimizer_step = spy
    out = d.training_step({"batch_size": 8, "step": 0})
    assert [n for n, _ in seen] == order
    for opt_name, changed in seen:
        assert changed == {opt_name}, f"the {opt_name} step changed {sorted(changed)}"
    assert_states_equal(teacher0, state_copy(d.teacher))
    assert not d.teacher.training and all(not p.requires_grad for p in d.teacher.parameters())
    assert all(p.requires_grad for p in d.student.parameters())  # DFAD's generator step gave them back
    assert all(not v.requires_grad and torch.isfinite(v) for v in out.values())


def test_dafl_terms_are_its_formulas_on_one_batch():
    """Every logged term is its weight times its loss on the same generated batch, before anything is stepped."""
    d = _with_optimizers(_method("dafl", oh_weight=0.5, activation_weight=0.2, balance_weight=3.0, kd_weight=2.0,
                                 temperature=4.0))
    g0, s0 = state_copy(d.generator), state_copy(d.student)
    torch.manual_seed(5)
    out = d.training_step({"batch_size": 8})
    # redo the pass with the networks as they were and the same codes
    d.generator.load_state_dict(g0)
    d.student.load_state_dict(s0)
    torch.manual_seed(5)
    with keep_running_stats(d.generator, d.student), torch.no_grad():
        x = d.synthesize(8)
        t_logits, (feat,) = d.run_teacher({}, x)
        s_logits = d.student(x)
    assert feat.shape == (8, 32)  # "auto:in": the pooled penultimate features of TinyNet(width 8)
    torch.testing.assert_close(out["oh"], 0.5 * one_hot_loss(t_logits))
    torch.testing.assert_close(out["activation"], 0.2 * activation_loss(feat))
    torch.testing.assert_close(out["balance"], 3.0 * information_entropy_loss(t_logits))
    torch.testing.assert_close(out["kd"], 2.0 * kd_div(s_logits, t_logits, 4.0))


def test_dfad_weights_scale_their_terms_and_the_game_order():
    """`mae` of a single student step (before any update) scales with mae_weight; `adv` with adv_weight; the student
    steps come first, so mae does not depend on adv_weight (adv does depend on mae_weight: a game)."""
    def step(**kw):
        d = _with_optimizers(_method("dfad", student_steps=1, **kw))
        torch.manual_seed(3)
        return d.training_step({"batch_size": 8})

    one = step()
    torch.testing.assert_close(step(mae_weight=3.0)["mae"], 3 * one["mae"])
    three = step(adv_weight=3.0)
    torch.testing.assert_close(three["adv"], 3 * one["adv"])
    torch.testing.assert_close(three["mae"], one["mae"])
    assert one["adv"] < 0 < one["mae"]  # the generator maximises the MAE
    off = step(adv_weight=0.0)
    assert set(off) == {"mae"}


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="student_steps"):
        _method("dfad", student_steps=0)
    with pytest.raises(ValueError, match="mae_weight"):
        _method("dfad", mae_weight=0.0)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        _method("dafl", oh_weight=0.0, activation_weight=0.0, balance_weight=0.0, kd_weight=0.0)
    with pytest.raises(ValueError, match="generator_schedule 'cosin'.*did you mean 'cosine'"):
        _method("dafl", generator_schedule="cosin")
    with pytest.raises(ValueError, match="img_size=32 but the data's images are"):
        _method("dafl", img_size=32)
    with pytest.raises(ValueError, match="generator makes"):  # a generator of another size than the data's
        _with_optimizers(_method("dfad", generator_options={"ngf": 8, "z_dim": 16, "img_size": 32})).training_step(
            {"batch_size": 4})


def test_defaults_and_what_the_loader_fills_in():
    d = build_distiller("dafl", tiny_net(1, width=4), tiny_net(2), DataFree(2, 4), **SMALL_G)
    assert d.generator.img_size == 32 and d.input_shape is None  # nothing known: 32 px, CIFAR-10's statistics
    torch.testing.assert_close(d.image_mean.flatten(), torch.tensor(CIFAR10_MEAN))
    loader = DataFree(2, 4, image_shape=(3, 16, 16), num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    d = build_distiller("dfad", tiny_net(1, width=4), tiny_net(2), loader, **SMALL_G)
    assert d.generator.img_size == 16 and d.input_shape == (3, 16, 16)
    assert d.image_mean.flatten().tolist() == [0.5] * 3 and d.image_std.flatten().tolist() == [0.25] * 3
    d = build_distiller("dafl", tiny_net(1, width=4), tiny_net(2), DataFree(2, 4), img_size=16, **SMALL_G)
    assert d.generator.img_size == 16
    assert set(d.networks()) == {"student", "generator"}
    opts = d.configure_optimizers("main", TrainConfig(), 10)
    assert opts["generator"][1] is None and opts["generator"][0].param_groups[0]["lr"] == 0.02  # DAFL: constant
    dfad = build_distiller("dfad", tiny_net(1, width=4), tiny_net(2), loader, **SMALL_G)
    assert dfad.configure_optimizers("main", TrainConfig(), 10)["generator"][1] == ""  # DFAD: the recipe's


# --------------------------------------------------------------------------------------- through the Trainer
def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=2, lr=0.05, device="cpu", progress=False, log_every=1,
                                 checkpoint_every=3), **kw})


def _fresh(name: str):
    torch.manual_seed(0)
    loader = DataFree(4, 8, image_shape=(3, 16, 16), num_classes=10)
    return build_distiller(name, tiny_net(1, width=4), tiny_net(2), loader, snapshot_size=16, **SMALL_G), loader


@pytest.mark.parametrize("name", ["dfad", "dafl"])
def test_runs_on_data_free_batches_and_resumes_bit_exact_mid_epoch(name, tmp_path, val_loader):
    whole, loader = _fresh(name)
    fit = Trainer(_cfg(), tmp_path / "whole").fit(whole, loader, val_loader)
    assert [h["step"] for h in fit.history] == [4, 8] and "val_top1" in fit.history[-1]
    assert sum(fit.history[-1]["synthetic_class_hist"]) == 16
    assert {"lr_student", "lr_generator"} <= set(fit.history[-1])
    split, loader = _fresh(name)
    Trainer(_cfg(max_steps=3), tmp_path / "split").fit(split, loader)  # stops mid-epoch, after step 3
    resumed, loader = _fresh(name)
    Trainer(_cfg(), tmp_path / "split").fit(resumed, loader, val_loader, resume=True)
    assert_states_equal(state_copy(whole), state_copy(resumed))  # student, generator, buffers
    ckpt = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    assert set(ckpt["networks"]) == {"student", "generator"}
    assert sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir()) == \
        ["synthetic_epoch001.png", "synthetic_epoch002.png"]


def test_data_free_steps_builds_a_data_free_train_loader():
    cfg = load_config(None, base={"data": {"name": "synthetic", "data_free_steps": 3, "batch_size": 5,
                                           "synthetic_test": 20, "synthetic_size": 16,
                                           "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}})
    data = build_loaders(cfg.data)
    assert isinstance(data.train, DataFree) and len(data.train) == 3
    assert list(data.train) == [{"batch_size": 5, "step": i} for i in range(3)]
    assert data.train.image_shape == (3, 16, 16) and data.train.num_classes == data.num_classes == 10
    assert data.train.mean == (0.5, 0.5, 0.5) and data.train.std == (0.2, 0.2, 0.2)
    assert sum(len(b["label"]) for b in data.val) == 20
    for key, value in (("train_name", "cifar100"), ("train_subset", 10), ("sampler", "group_class_balanced")):
        with pytest.raises(ConfigError, match=f"data.{key} has nothing to apply to"):
            load_config(None, base={"data": {"data_free_steps": 3, key: value}})
    with pytest.raises(ConfigError, match="data.data_free_steps"):
        load_config(None, base={"data": {"data_free_steps": 0}})


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_each_recipe_runs_two_steps_on_generated_data(path, tmp_path):
    cfg = load_config(path, [f"out_dir={tmp_path}", "data.name=synthetic", "data.source=null",
                             "data.synthetic_size=32", "data.synthetic_test=32", "data.batch_size=8",
                             "data.eval_batch_size=32", "train.max_steps=2", "train.epochs=2",
                             "train.progress=false", "train.device=cpu", "teacher.weights=null",
                             "method.snapshot_size=8"])
    assert cfg.data.data_free_steps and cfg.method.name in ("dafl", "dfad")
    result = run_recipe(cfg, eval_teacher=False)
    assert result.stopped_early and "top1" in result.metrics
    assert set(result.networks) == {"student", "generator"}
    ckpt = tmp_path / cfg.name / "checkpoints" / "last.pt"
    generator = kdforge.load_student(ckpt, network="generator")  # rebuilt from the run's config
    assert_states_equal(state_copy(result.networks["generator"]), state_copy(generator))
