"""MosaicKD: its terms against naive references, the networks' shapes, who each optimiser may change, the
generator's gradient through the frozen teacher and student, and a recipe-free run that resumes bit-exact."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_states_equal, state_copy, tiny_net

from kdforge.config import TrainConfig, load_config
from kdforge.distillers.generator_base import keep_running_stats
from kdforge.distillers.mosaic import MosaicKD
from kdforge.engine.trainer import Trainer
from kdforge.losses.mosaic import class_balance, generator_terms, negative_kl, patch_gan_loss, prediction_entropy
from kdforge.models import build_model
from kdforge.recipe import run_recipe

pytestmark = pytest.mark.usefixtures("single_thread")


def _softmax_row(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------------------------------- terms vs naive
def test_terms_equal_naive_loops():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(7, 5, generator=g) * 3, torch.randn(7, 5, generator=g) * 3
    pt, ps = [_softmax_row(r) for r in t.tolist()], [_softmax_row(r) for r in s.tolist()]
    p_bar = [sum(p[c] for p in pt) / len(pt) for c in range(5)]
    assert class_balance(t).item() == pytest.approx(sum(p * math.log2(p) for p in p_bar), rel=1e-5)
    entropy = sum(-sum(p * math.log(p) for p in row) for row in pt) / len(pt)
    assert prediction_entropy(t).item() == pytest.approx(entropy, rel=1e-5)
    kl = sum(sum(a * (math.log(a) - math.log(b)) for a, b in zip(ra, rb)) for ra, rb in zip(pt, ps)) / len(pt)
    assert negative_kl(s, t).item() == pytest.approx(-kl, rel=1e-5)
    pt2 = [_softmax_row([v / 4 for v in r]) for r in t.tolist()]
    ps2 = [_softmax_row([v / 4 for v in r]) for r in s.tolist()]
    kl2 = sum(sum(a * (math.log(a) - math.log(b)) for a, b in zip(ra, rb)) for ra, rb in zip(pt2, ps2)) / 7
    assert negative_kl(s, t, temperature=4.0).item() == pytest.approx(-kl2, rel=1e-5)
    # a uniform marginal reaches the floor -log2(C); one class for all samples gives 0
    assert class_balance(torch.eye(5) * 50).item() == pytest.approx(-math.log2(5), rel=1e-4)
    assert class_balance(torch.tensor([[50.0, 0, 0]] * 4)).item() == pytest.approx(0.0, abs=1e-6)


def test_patch_loss_sums_over_the_map_and_averages_over_images():
    logits = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for real in (True, False):
        y = 1.0 if real else 0.0
        naive = sum(-(y * math.log(1 / (1 + math.exp(-v))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-v))))
                    for v in logits.flatten().tolist()) / 3
        assert patch_gan_loss(logits, real).item() == pytest.approx(naive, rel=1e-5)


def test_each_generator_weight_scales_its_own_term_only():
    g = torch.Generator().manual_seed(2)
    t, s, d = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    base = dict(adv_weight=1.0, align_weight=1.0, local_weight=1.0, balance_weight=1.0)
    one = generator_terms(t, s, d, **base)
    assert set(one) == {"adv", "align", "local", "balance"}
    for name in one:
        three = generator_terms(t, s, d, **{**base, f"{name}_weight": 3.0})
        for k in one:
            torch.testing.assert_close(three[k], 3 * one[k] if k == name else one[k])
        assert name not in generator_terms(t, s, d, **{**base, f"{name}_weight": 0.0})
    with pytest.raises(ValueError, match="discriminator"):
        generator_terms(t, s, None, **base)


# ----------------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("layout", ["official", "paper"])
def test_generator_and_discriminator_shapes(size, layout):
    gen = build_model("mosaic_generator", img_size=size, layout=layout)
    x = gen(gen.sample(2))
    assert x.shape == (2, 3, size, size) and 0 <= x.min() and x.max() <= 1
    for stride, side in ((1, 8), (2, 4), (3, 3), (4, 2)):
        disc = build_model("patch_discriminator", img_size=size, layout=layout, final_stride=stride)
        assert disc(x).shape == (2, 1, side, side)
    assert build_model("image_discriminator", img_size=size)(x).shape == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="img_size"):
        build_model("mosaic_generator", img_size=48)


def test_official_patch_is_ten_pixels():
    """The official discriminator's logit (i, j) sees a 10 x 10 patch: perturbing one pixel changes only logits
    within reach."""
    disc = build_model("patch_discriminator", img_size=32).eval()
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    disc(x)[0, 0, 4, 4].backward()
    rows = (x.grad.abs().sum(dim=(0, 1, 3)) > 0).nonzero().flatten()
    assert int(rows.max() - rows.min()) + 1 == 10


# -------------------------------------------------------------------------------------------- the method
def _mosaic(**kw) -> MosaicKD:
    torch.manual_seed(0)
    kw = {"student_steps": 2, "generator_options": {"ngf": 8}, "discriminator_options": {"ndf": 8}, **kw}
    return MosaicKD(tiny_net(1, width=4), tiny_net(2), input_shape=(3, 16, 16), **kw)


def test_each_optimiser_changes_only_its_network_and_the_teacher_never(aug_loader):
    game = _mosaic()
    game.optimizers = {k: (v[0] if isinstance(v, tuple) else v)
                       for k, v in game.configure_optimizers("main", TrainConfig(lr=0.05), 10).items()}
    nets = {**game.networks(), "teacher": game.teacher}
    teacher0 = state_copy(game.teacher)
    seen = []
    original = game.optimizer_step
    last = {k: state_copy(m) for k, m in nets.items()}

    def spy(name, loss, **kw):
        grads_before = {k: [p.grad is not None for p in m.parameters()] for k, m in nets.items()}
        out = original(name, loss, **kw)
        now = {k: state_copy(m) for k, m in nets.items()}
        # everything that changed since the previous step ended, by tensor
        changed = {(k, n) for k in nets for n, v in now[k].items() if not torch.equal(v, last[k][n])}
        last.update(now)
        seen.append((name, {k for k, _ in changed}))
        params = {(k, n) for k in nets for n, _ in nets[k].named_parameters()}
        if name == "discriminator":  # G's forward for this step and its own moved G's BN statistics only
            assert {(k, n) for k, n in changed if k == "generator"} <= {c for c in changed if c not in params}
            seen[-1] = (name, {k for k, _ in changed} - {"generator"})
        if name == "generator":  # the gradient reached G through the frozen teacher and student ...
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in game.generator.parameters())
            # ... which computed no weight gradient of their own in this step
            for k in ("student", "discriminator", "teacher"):
                assert [p.grad is not None for p in nets[k].parameters()] == grads_before[k]
        return out

    game.optimizer_step = spy
    game.train()
    out = game.training_step(aug_loader.get_batch(0))
    assert [n for n, _ in seen] == ["discriminator", "generator", "student", "student"]
    for name, changed in seen:
        assert changed == {name}, f"the {name} step changed {sorted(changed)}"  # incl. BN statistics
    assert_states_equal(teacher0, state_copy(game.teacher))
    assert set(out) == {"disc", "adv", "align", "local", "balance", "kd"}
    assert all(not v.requires_grad and torch.isfinite(v) for v in out.values())


def test_no_local_term_skips_the_discriminator(aug_loader):
    game = _mosaic(local_weight=0.0)
    game.optimizers = {k: (v[0] if isinstance(v, tuple) else v)
                       for k, v in game.configure_optimizers("main", TrainConfig(lr=0.05), 10).items()}
    assert "discriminator" not in game.optimizers  # nor a schedule stepping an optimiser that never steps
    d0 = state_copy(game.discriminator)
    out = game.train().training_step(aug_loader.get_batch(0))
    assert "disc" not in out and "local" not in out
    assert_states_equal(d0, state_copy(game.discriminator))


def test_keep_running_stats_keeps_running_statistics():
    net = build_model("mosaic_generator", img_size=16, ngf=4).train()
    before = state_copy(net)
    with keep_running_stats(net):
        net(net.sample(4))
    assert_states_equal(before, state_copy(net))
    net(net.sample(4))
    assert not torch.equal(before["stem.0.running_mean"], net.state_dict()["stem.0.running_mean"])


def test_bad_input_is_named(aug_loader):
    with pytest.raises(ValueError, match="student_steps"):
        _mosaic(student_steps=0)
    game = _mosaic(generator_options={"ngf": 8, "img_size": 32})
    game.optimizers = {k: (v[0] if isinstance(v, tuple) else v)
                       for k, v in game.configure_optimizers("main", TrainConfig(lr=0.05), 10).items()}
    with pytest.raises(ValueError, match=r"generator makes \(3, 32, 32\) images but the data's are \(3, 16, 16\)"):
        game.train().training_step(aug_loader.get_batch(0))


def _cfg(**kw):
    return TrainConfig(**{**dict(epochs=2, lr=0.05, device="cpu", progress=False, log_every=1,
                                 checkpoint_every=3), **kw})


@pytest.mark.parametrize("stop_at", [3])
def test_runs_snapshots_and_resumes_bit_exact_mid_epoch(aug_loader, tmp_path, stop_at):
    whole = _mosaic()
    Trainer(_cfg(), tmp_path / "whole").fit(whole, aug_loader)
    Trainer(_cfg(max_steps=stop_at), tmp_path / "split").fit(_mosaic(), aug_loader)
    resumed = _mosaic()
    Trainer(_cfg(), tmp_path / "split").fit(resumed, aug_loader, resume=True)
    assert_states_equal(state_copy(whole), state_copy(resumed))  # student, G, D and the fixed codes
    records = [json.loads(r) for r in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [sum(r["synthetic_class_hist"]) for r in epochs] == [256, 256]
    assert {"lr_student", "lr_generator", "lr_discriminator"} <= set(records[0])
    grids = sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir())
    assert grids == ["synthetic_epoch001.png", "synthetic_epoch002.png"]


# ------------------------------------------------------------------------------------------------ recipes
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "mosaic").glob("*/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_every_mosaic_recipe_runs_two_steps_on_generated_data_of_its_shape(path, tmp_path):
    """In-domain: generated classes 0-9 (evaluated only); OOD: ten other generated classes, as in the demo."""
    cfg = load_config(path)
    sets = [f"out_dir={tmp_path}", "data.name=synthetic", "data.source=null", "data.synthetic_size=32",
            "data.synthetic_train=96", "data.synthetic_test=32", "train.max_steps=2", "train.epochs=2",
            "train.progress=false", "train.device=cpu", "teacher.weights=null"]
    if cfg.data.data_free_steps:  # DAFL, DFAD: no images at all
        sets += ["data.data_free_steps=3", "data.batch_size=16"]
    else:
        sets += ["data.train_name=synthetic", "data.train_source=null", "data.train_split=train",
                 "data.train_options={class_offset: 10, num_classes: 12}",  # a pool with its own labels
                 f"data.batch_size={40 if cfg.method.name == 'mosaic' else 16}"]
    select = cfg.data.train_select
    if select:  # the same rule, sized for 96 images
        sets.append("data.train_select={rule: entropy, k: 80}" if select["rule"] == "entropy"
                    else "data.train_select={rule: balanced, per_class: 4}")
    if cfg.student.name.startswith("torchvision:"):  # MobileNetV2 is slow at any size: one step is enough here
        sets.append("train.max_steps=1")
    result = run_recipe(load_config(path, sets), eval_teacher=False)
    assert result.stopped_early and "top1" in result.metrics


def test_demo_mosaic_quick(tmp_path):
    from kdforge.demo_mosaic import run_mosaic_demo

    table = run_mosaic_demo(tmp_path / "mosaic", quick=True, progress=False)
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert [r.split("|")[1].strip() for r in rows] == [
        "teacher (in-domain data)", "student alone (in-domain data, for reference)", "student: KD on OOD images",
        "student: MosaicKD"]
    assert all(0 <= float(r.split("|")[2]) <= 100 for r in rows)
    run = tmp_path / "mosaic" / "student_mosaic"
    assert (run / "samples" / "synthetic_epoch001.png").exists()
    report = (run / "report.md").read_text()
    assert "samples/synthetic_epoch001.png" in report and "synthetic_class_hist.png" in report
    cfg = load_config(run / "config.yaml")
    assert cfg.data.train_name == "synthetic" and cfg.data.train_options["class_offset"] == 10
