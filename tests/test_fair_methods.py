"""MFD, adversarial debiasing and group-balanced batches as methods: their losses inside the distillers, the
adversary's game, the balanced sampler, and every MFD recipe (two steps on generated data of its shape)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import state_copy, tiny_net

import kdforge
from kdforge.config import load_config
from kdforge.data import BatchLoader, GroupClassBalancedSampler
from kdforge.distillers.ad import AdversarialDebiasing, reverse_grad
from kdforge.distillers.mfd import MFD
from kdforge.losses.mfd import mfd_loss
from kdforge.recipe import run_recipe

pytestmark = pytest.mark.usefixtures("single_thread")
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "mfd").glob("*/*.yaml"))


def test_mfd_term_is_half_lambda_times_the_loss_on_penultimate_features(aug_loader):
    batch = aug_loader.get_batch(0)
    d = MFD(tiny_net(1, width=4), tiny_net(2, width=4), num_classes=10, num_groups=2, mfd_weight=3.0)
    out = d.training_step(batch)
    s_logits, (s_feat,) = d.run_student(batch["image"])
    _, (t_feat,) = d.run_teacher(batch)
    expected = 1.5 * mfd_loss(s_feat, t_feat, batch["label"], batch["group"], num_classes=10, num_groups=2)
    torch.testing.assert_close(out["mfd"], expected)
    torch.testing.assert_close(out["ce"], F.cross_entropy(s_logits, batch["label"]))
    assert float(out["mfd"].detach()) > 0


def test_mfd_ablations_and_errors(aug_loader):
    batch = aug_loader.get_batch(0)
    no_teacher = MFD(tiny_net(1, width=4), None, num_classes=10, num_groups=2, bandwidth="cell")  # MFD-F
    assert set(no_teacher.training_step(batch)) == {"ce", "mfd"}
    joint = MFD(tiny_net(1, width=4), tiny_net(2, width=4), num_classes=10, num_groups=2, joint=True)  # MFD-K
    assert float(joint.training_step(batch)["mfd"].detach()) > 0
    with pytest.raises(ValueError, match="batch\\['group'\\]"):
        joint.training_step({k: v for k, v in batch.items() if k != "group"})
    with pytest.raises(ValueError, match="kd_weight > 0 needs a teacher"):
        MFD(tiny_net(1), None, num_classes=10, num_groups=2, kd_weight=1.0)


def test_reverse_grad_negates_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    (g_plain,) = torch.autograd.grad((x * torch.arange(3.0)).sum(), x)
    (g_rev,) = torch.autograd.grad((reverse_grad(x) * torch.arange(3.0)).sum(), x)
    assert torch.equal(g_rev, -g_plain)


def test_adversary_step_changes_only_the_adversary_and_the_student_gets_the_reversed_gradient(aug_loader):
    batch = aug_loader.get_batch(0)
    d = AdversarialDebiasing(tiny_net(1, width=4), None, num_classes=10, num_groups=2, adv_weight=1.0)
    d.optimizers = {k: v[0] if isinstance(v, tuple) else v
                    for k, v in d.configure_optimizers("main", kdforge.TrainConfig(), 1).items()}
    student0, adv0 = state_copy(d.student), state_copy(d.adversary)
    out = d.training_step(batch)
    assert all(torch.equal(v, student0[k]) for k, v in d.student.state_dict().items() if "running" not in k
               and "num_batches" not in k)  # the adversary's own step leaves the student's weights alone
    assert any(not torch.equal(v, adv0[k]) for k, v in d.adversary.state_dict().items())
    # the student's gradient from the returned term is the negated gradient of the adversary's loss
    logits = d.student(batch["image"])
    (g_adv,) = torch.autograd.grad(F.cross_entropy(d.adversary(reverse_grad(logits), batch["label"]), batch["group"]),
                                   logits)
    (g_plain,) = torch.autograd.grad(F.cross_entropy(d.adversary(logits, batch["label"]), batch["group"]), logits)
    torch.testing.assert_close(g_adv, -g_plain)
    assert out["adv"].requires_grad


def test_class_adversaries_are_independent_per_class():
    d = AdversarialDebiasing(tiny_net(1), None, num_classes=3, num_groups=2)
    x = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = d.adversary(x, y)
    a = d.adversary
    for i in range(6):  # a plain MLP with the class's own weights
        h = F.relu(x[i] @ a.w1[y[i]] + a.b1[y[i]])
        torch.testing.assert_close(out[i], h @ a.w2[y[i]] + a.b2[y[i]])


def test_balanced_batches_hold_every_cell_equally_and_resume_exactly(synth):
    data = synth["train"]
    loader = BatchLoader(data, 40, drop_last=True, sampler=GroupClassBalancedSampler(batchwise=True), seed=3)
    cells = torch.as_tensor(data.attrs["group"]) * 10 + torch.as_tensor(data.labels)
    k = len(cells.unique())
    for b in loader:
        counts = torch.bincount(cells[b["index"]], minlength=20)[cells.unique()]
        assert len(b["index"]) == 40 and int(counts.min()) >= 40 // k and int(counts.max()) <= 40 // k + 1
    loader.set_epoch(1)
    full = [b["index"] for b in loader]
    assert all(torch.equal(a["index"], f) for a, f in zip(loader.iter_from(2), full[2:]))
    again = BatchLoader(data, 40, drop_last=True, sampler=GroupClassBalancedSampler(batchwise=True), seed=3)
    again.set_epoch(1)
    assert all(torch.equal(a["index"], f) for a, f in zip(again, full))


def test_mfd_asks_for_balanced_batches(synth):
    loader = BatchLoader(synth["train"], 40, drop_last=True)
    r = kdforge.distill(tiny_net(1, width=4), tiny_net(2, width=4), loader, method="mfd", balanced_batches=True,
                        epochs=1, max_steps=1, device="cpu", progress=False)
    assert isinstance(r.distiller.train_sampler(), GroupClassBalancedSampler)


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_every_mfd_recipe_runs_two_steps_on_generated_data_of_its_shape(path, tmp_path):
    cfg = load_config(path)
    size = {"cifar10s": 32}.get(path.parent.name, 32)  # the faces at 32 px keep the test quick
    classes = {"cifar10s": 10, "utkface": 3, "celeba": 2}[path.parent.name]
    cfg = load_config(path, [f"out_dir={tmp_path}", "data.name=synthetic", "data.source=null",
                             f"data.options={{num_classes: {classes}}}", f"data.synthetic_size={size}",
                             "data.synthetic_train=128", "data.synthetic_test=64", "data.batch_size=32",
                             "train.max_steps=2", "train.epochs=2", "train.progress=false", "train.device=cpu",
                             "train.plateau_patience=0"]
                      + (["teacher.weights=null"] if cfg.teacher is not None else []))
    result = run_recipe(cfg, eval_teacher=False)
    assert result.stopped_early and {"top1", "deo_a", "deo_m"} <= set(result.metrics)


def test_demo_fair_quick(tmp_path, capsys):
    from kdforge.demo_fair import run_fair_demo

    table = run_fair_demo(tmp_path / "fair", quick=True, progress=False)
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["teacher (scratch, biased data)", "student + Hinton KD",
                                                       "student + MFD"]
    for r in rows:
        top1, deo_a, deo_m = (float(v) for v in r.split("|")[2:5])
        assert 0 <= top1 <= 100 and 0 <= deo_a <= deo_m <= 100
    cfg = load_config(tmp_path / "fair" / "student_mfd" / "config.yaml")
    assert cfg.teacher.weights.endswith("teacher/checkpoints/last.pt") and cfg.eval.name == "fairness"
    assert (tmp_path / "fair" / "student_mfd" / "group_accuracy.png").exists()


def test_a_recipe_run_draws_the_tsne_of_penultimate_features(tmp_path):
    cfg = load_config(None, base={
        "name": "tsne", "out_dir": str(tmp_path), "student": "resnet20", "method": {"name": "scratch"},
        "data": {"name": "synthetic", "synthetic_train": 64, "synthetic_test": 80, "synthetic_size": 16,
                 "batch_size": 32},
        "train": {"epochs": 1, "device": "cpu", "progress": False}, "eval": {"name": "fairness", "tsne": 60}})
    run_recipe(cfg)
    assert (tmp_path / "tsne" / "tsne.png").exists()
    assert "tsne.png" in (tmp_path / "tsne" / "report.md").read_text()


def test_ad_fitnet_adds_the_one_stage_hint_through_a_trained_regressor(aug_loader):
    """AD+FitNet (MFD supplement 1.3): CE + KD + hint at once, plus the adversary."""
    batch = aug_loader.get_batch(0)
    d = AdversarialDebiasing(tiny_net(1, width=4), tiny_net(2), num_classes=10, num_groups=2, kd_weight=1.0,
                             hint_weight=2.0, input_shape=(3, 16, 16))
    d.optimizers = {"adversary": torch.optim.Adam(d.adversary.parameters(), lr=1e-3)}
    out = d.training_step(batch)
    assert set(out) == {"ce", "adv", "kd", "hint"}
    _, (s_feat,) = d.run_student(batch["image"])
    _, (t_feat,) = d.run_teacher(batch)
    torch.testing.assert_close(out["hint"], 2.0 * F.mse_loss(d.regressor(s_feat), t_feat))
    assert "regressor" in d.trainable_modules()
    with pytest.raises(ValueError, match="hint_weight > 0 \\(AD\\+FitNet\\) need a teacher"):
        AdversarialDebiasing(tiny_net(1), None, num_classes=10, num_groups=2, hint_weight=1.0)
