"""kdforge.losses.mfd_loss (Jung et al. 2021, Eq. 5-6) against a naive per-cell reference written from the paper.

The reference loops in Python over classes, groups and sample pairs, evaluating the kernel one pair at a time
with torch scalars (so autograd gives its gradient too), and shares no code with the vectorised loss. The
bandwidths are detached in both, as in the official code, so finite-difference gradchecks do not apply: the
gradients are compared with the reference's instead.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from kdforge.losses import mfd_loss
from kdforge.registry import LOSSES

EPS = 1e-12
C, G = 5, 3
# class 0 and 1: every group, unbalanced; class 2: group 1 empty; class 3: one sample; class 4 absent.
CELLS = ([(0, g) for g in (0, 0, 1, 2, 2, 0, 1)] + [(1, g) for g in (1, 1, 0, 2, 0, 1)]
         + [(2, g) for g in (0, 2, 2, 0, 2, 0)] + [(3, 1)])


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def batch(cells: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and groups of `cells`, in a shuffled order."""
    perm = torch.randperm(len(cells), generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.tensor([cells[i][0] for i in perm]), torch.tensor([cells[i][1] for i in perm])


# ----------------------------------------------------------------------------- naive reference


def naive_mfd(s: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor | None, groups: torch.Tensor | None, *,
              sigma: float = 1.0, kernel: str = "rbf", bandwidth: str = "batch", target: str = "class",
              joint: bool = False) -> torch.Tensor:
    s = s.flatten(1)
    t = (s if t is None else t.flatten(1)).detach()  # MFD-F: the student's own features, detached
    if kernel == "poly":
        s = torch.stack([x / x.norm() for x in s])
        t = torch.stack([x / x.norm() for x in t])
    n = s.shape[0]

    def sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((x - y) ** 2).sum().clamp_min(EPS)

    def mean_sq_dist(ti: list[int], sj: list[int]) -> float:
        return sum(sq_dist(t[i], s[j]).item() for i in ti for j in sj) / (len(ti) * len(sj))

    def k(x: torch.Tensor, y: torch.Tensor, bw: float) -> torch.Tensor:
        if kernel == "poly":
            return (x * y).sum() ** 2
        return torch.exp(-sq_dist(x, y) / (2 * sigma * bw))

    def mean_k(a: torch.Tensor, ia: list[int], b: torch.Tensor, ib: list[int], bw: float) -> torch.Tensor:
        return sum(k(a[i], b[j], bw) for i in ia for j in ib) / (len(ia) * len(ib))

    everyone = list(range(n))
    batch_bw = mean_sq_dist(everyone, everyone)  # every teacher x student pair
    if joint:
        return (mean_k(t, everyone, t, everyone, batch_bw) + mean_k(s, everyone, s, everyone, batch_bw)
                - 2 * mean_k(t, everyone, s, everyone, batch_bw))

    lab, grp = labels.tolist(), groups.tolist()
    total = torch.zeros((), dtype=s.dtype)
    for c in range(int(labels.max()) + 2):  # one beyond: an absent class adds nothing
        in_class = [i for i in range(n) if lab[i] == c]
        if not in_class:
            continue
        group_cells = [[i for i in in_class if grp[i] == g] for g in range(G)]
        group_cells = [cell for cell in group_cells if cell]
        for g in range(G):
            cell = [i for i in in_class if grp[i] == g]
            if not cell:
                continue
            bw = batch_bw if bandwidth == "batch" else mean_sq_dist(in_class, cell)
            if target == "class":
                tt = mean_k(t, in_class, t, in_class, bw)
                ts = mean_k(t, in_class, s, cell, bw)
            else:  # p^T_y = (1/|A_y|) sum_a p^T_{a,y}: a mixture with equal weight per present group
                m = len(group_cells)
                tt = sum(mean_k(t, a, t, b, bw) for a in group_cells for b in group_cells) / (m * m)
                ts = sum(mean_k(t, a, s, cell, bw) for a in group_cells) / m
            total = total + tt + mean_k(s, cell, s, cell, bw) - 2 * ts
    return total


# ----------------------------------------------------------------------------- equality with the reference

OPTIONS = [dict(kernel=k, bandwidth=b, target=tg, teacher=te) for k, b, tg, te in
           itertools.product(("rbf", "poly"), ("batch", "cell"), ("class", "group_mean"), (True, False))]


def _ids(o: dict) -> str:
    return f"{o['kernel']}-{o['bandwidth']}-{o['target']}-{'mfd' if o['teacher'] else 'mfd_f'}"


def _value_and_grad(fn, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.clone().requires_grad_(True)
    out = fn(s)
    return out.detach(), torch.autograd.grad(out, s)[0]


@pytest.mark.parametrize("opt", OPTIONS, ids=[_ids(o) for o in OPTIONS])
def test_matches_naive_per_cell_loop(opt: dict) -> None:
    labels, groups = batch(CELLS)
    s, t = rand(len(CELLS), 2, 2, seed=1), 1.3 * rand(len(CELLS), 2, 2, seed=2) + 0.5
    teacher = t if opt["teacher"] else None
    kw = dict(sigma=0.7, kernel=opt["kernel"], bandwidth=opt["bandwidth"], target=opt["target"])
    got, got_grad = _value_and_grad(lambda x: mfd_loss(x, teacher, labels, groups, num_classes=C, num_groups=G,
                                                       **kw), s)
    want, want_grad = _value_and_grad(lambda x: naive_mfd(x, teacher, labels, groups, **kw), s)
    assert got.dim() == 0 and got > 0
    assert_close(got, want)
    assert_close(got_grad, want_grad)
    assert got_grad.abs().sum() > 0


@pytest.mark.parametrize("kernel", ["rbf", "poly"])
def test_joint_matches_naive(kernel: str) -> None:
    s, t = rand(12, 4, seed=3), rand(12, 4, seed=4) + 0.3
    got, got_grad = _value_and_grad(lambda x: mfd_loss(x, t, None, None, num_classes=C, num_groups=G, sigma=1.5,
                                                       kernel=kernel, joint=True), s)
    want, want_grad = _value_and_grad(lambda x: naive_mfd(x, t, None, None, sigma=1.5, kernel=kernel, joint=True), s)
    assert_close(got, want)
    assert_close(got_grad, want_grad)


def test_defaults_are_the_official_codes() -> None:
    labels, groups = batch(CELLS)
    s, t = rand(len(CELLS), 3, seed=5), rand(len(CELLS), 3, seed=6)
    assert_close(mfd_loss(s, t, labels, groups, num_classes=C, num_groups=G), naive_mfd(s, t, labels, groups))


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("kernel,bandwidth,teacher", list(itertools.product(("rbf", "poly"), ("batch", "cell"),
                                                                             (True, False))))
def test_targets_agree_on_group_balanced_batches(kernel: str, bandwidth: str, teacher: bool) -> None:
    # Balanced within each class: 2 per group in class 0, 3 per present group in class 1, 1 per group in class 2.
    cells = [(0, g) for g in (0, 0, 1, 1, 2, 2)] + [(1, g) for g in (0, 0, 0, 2, 2, 2)] + [(2, 0), (2, 1), (2, 2)]
    labels, groups = batch(cells, seed=7)
    s, t = rand(len(cells), 5, seed=8), rand(len(cells), 5, seed=9)
    kw = dict(num_classes=C, num_groups=G, kernel=kernel, bandwidth=bandwidth)
    t_or_none = t if teacher else None
    by_class, g_class = _value_and_grad(lambda x: mfd_loss(x, t_or_none, labels, groups, target="class", **kw), s)
    by_group, g_group = _value_and_grad(lambda x: mfd_loss(x, t_or_none, labels, groups, target="group_mean",
                                                           **kw), s)
    assert_close(by_class, by_group)
    assert_close(g_class, g_group)
    # ...and not on an unbalanced one, so the agreement above is not vacuous.
    labels, groups = batch(CELLS)
    s, t = rand(len(CELLS), 5, seed=8), rand(len(CELLS), 5, seed=9)
    t_or_none = t if teacher else None
    assert not torch.allclose(mfd_loss(s, t_or_none, labels, groups, target="class", **kw),
                              mfd_loss(s, t_or_none, labels, groups, target="group_mean", **kw))


VARIANTS = list(itertools.product(("rbf", "poly"), ("batch", "cell"), ("class", "group_mean")))


@pytest.mark.parametrize("kernel,bandwidth,target", VARIANTS)
def test_zero_exactly_when_every_cell_matches_its_class_target(kernel: str, bandwidth: str, target: str) -> None:
    """D^2(T_y, S_{y,a}) is zero iff the cell's empirical distribution equals the class target's. So the loss is
    zero when student == teacher AND, within each class, every group holds the same teacher features (the teacher
    carries no group information); a perfect copy of a teacher whose features depend on the group is penalised."""
    kw = dict(num_classes=C, num_groups=G, kernel=kernel, bandwidth=bandwidth, target=target)
    base = {0: rand(3, 4, seed=10), 1: rand(2, 4, seed=11), 2: rand(1, 4, seed=12)}
    present = {0: (0, 1, 2), 1: (0, 2), 2: (1,)}  # class 2 in one group only
    rows = [(c, g, x) for c in base for g in present[c] for x in base[c]]
    labels = torch.tensor([r[0] for r in rows])
    groups = torch.tensor([r[1] for r in rows])
    t = torch.stack([r[2] for r in rows])
    zero = torch.zeros((), dtype=torch.float64)
    assert_close(mfd_loss(t.clone(), t, labels, groups, **kw), zero, atol=1e-10, rtol=0)
    assert_close(mfd_loss(t.clone(), None, labels, groups, **kw), zero, atol=1e-10, rtol=0)  # MFD-F
    assert mfd_loss(t + 0.1 * rand(*t.shape, seed=13), t, labels, groups, **kw) > 1e-6
    # student == teacher, but the teacher's features differ between groups: positive.
    t_grouped = rand(*t.shape, seed=14)
    assert mfd_loss(t_grouped.clone(), t_grouped, labels, groups, **kw) > 1e-6
    assert mfd_loss(t_grouped.clone(), None, labels, groups, **kw) > 1e-6


@pytest.mark.parametrize("kernel", ["rbf", "poly"])
def test_joint_zero_iff_student_equals_teacher(kernel: str) -> None:
    t = rand(10, 6, seed=15)
    zero = torch.zeros((), dtype=torch.float64)
    assert_close(mfd_loss(t.clone(), t, None, None, num_classes=C, num_groups=G, kernel=kernel, joint=True), zero,
                 atol=1e-10, rtol=0)
    s = t + 0.1 * rand(10, 6, seed=16)
    assert mfd_loss(s, t, None, None, num_classes=C, num_groups=G, kernel=kernel, joint=True) > 1e-6


def test_teacher_gets_no_gradient_and_int32_labels_work() -> None:
    labels, groups = batch(CELLS)
    s, t = rand(len(CELLS), 3, seed=17).requires_grad_(True), rand(len(CELLS), 3, seed=18).requires_grad_(True)
    mfd_loss(s, t, labels.int(), groups.int(), num_classes=C, num_groups=G).backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()


def test_float32_far_from_origin_and_under_autocast() -> None:
    labels, groups = batch(CELLS)
    # ReLU-like 256-d features far from the origin: float32 must not cancel |a|^2 + |b|^2 - 2ab into noise.
    s64, t64 = rand(len(CELLS), 256, seed=19).abs() + 30.0, rand(len(CELLS), 256, seed=20).abs() + 30.0
    kw = dict(num_classes=C, num_groups=G)
    want = mfd_loss(s64, t64, labels, groups, **kw)
    got = mfd_loss(s64.float(), t64.float(), labels, groups, **kw)
    assert_close(got.double(), want, rtol=1e-3, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = mfd_loss(s64.float(), t64.float(), labels, groups, **kw)
    assert in_autocast.dtype == torch.float32
    assert_close(in_autocast, got)


def test_validates_inputs_and_options() -> None:
    labels, groups = batch(CELLS)
    s = rand(len(CELLS), 3)
    kw = dict(num_classes=C, num_groups=G)
    with pytest.raises(ValueError, match="kernel 'gauss'"):
        mfd_loss(s, s, labels, groups, kernel="gauss", **kw)
    with pytest.raises(ValueError, match=r"\(20, 3\).*\(20, 4\)"):
        mfd_loss(s, rand(len(CELLS), 4), labels, groups, **kw)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        mfd_loss(s, s, labels, groups, num_classes=3, num_groups=G)
    with pytest.raises(ValueError, match="groups must be"):
        mfd_loss(s, s, labels, None, **kw)
    with pytest.raises(ValueError, match="needs teacher"):
        mfd_loss(s, None, None, None, joint=True, **kw)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        mfd_loss(s, s, labels, groups, sigma=0.0, **kw)
    with pytest.raises(ValueError, match="target must be 'class'"):
        mfd_loss(s, s, None, None, joint=True, target="group_mean", **kw)


def test_registered() -> None:
    assert LOSSES.get("mfd_loss") is mfd_loss
