"""MMD-based fair feature distillation (MFD: Jung et al., CVPR 2021, "Fair Feature Distillation for Visual
Recognition"), the class-wise, group-conditioned MMD of Eq. 5-6, computed for every (class, group) cell at once."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.registry import LOSSES

KERNELS = ("rbf", "poly")
BANDWIDTHS = ("batch", "cell")
TARGETS = ("class", "group_mean")
_EPS = 1e-12  # the official code's clamp on squared distances


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"mfd_loss: unknown {name} {value!r}; use one of {', '.join(map(repr, allowed))}")


def _check(student_feat: Tensor, teacher_feat: Tensor | None) -> None:
    s_shape = tuple(student_feat.shape)
    if student_feat.dim() < 2 or student_feat.shape[0] == 0:
        raise ValueError(f"mfd_loss: expected (B, ...) student features with B >= 1, got {s_shape}")
    if teacher_feat is not None and (teacher_feat.dim() < 2 or teacher_feat.shape[0] != student_feat.shape[0]
                                     or teacher_feat[0].numel() != student_feat[0].numel()):
        raise ValueError(f"mfd_loss: student {s_shape} and teacher {tuple(teacher_feat.shape)} features must have the "
                         "same batch size and the same number of features per sample (the kernel compares them)")


def _class_ranks(labels: Tensor | None, groups: Tensor | None, num_classes: int, num_groups: int,
                 batch: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Check labels and groups; return them as int64, each sample's rank within its class, and the largest class
    count M. One host sync, for the checks and M together."""
    for name, x in (("labels", labels), ("groups", groups)):
        if x is None or tuple(x.shape) != (batch,):
            got = None if x is None else tuple(x.shape)
            raise ValueError(f"mfd_loss: {name} must be a ({batch},) tensor, got {got}")
    labels, groups = labels.long(), groups.long()
    one_c = F.one_hot(labels.clamp(0, num_classes - 1), num_classes)  # clamped only until checked below
    stats = torch.stack([labels.min(), labels.max(), groups.min(), groups.max(), one_c.sum(dim=0).max()]).tolist()
    for name, (lo, hi), n in (("labels", stats[0:2], num_classes), ("groups", stats[2:4], num_groups)):
        if lo < 0 or hi >= n:
            raise ValueError(f"mfd_loss: {name} must lie in [0, {n}), got values in [{lo}, {hi}]")
    rank = (one_c.cumsum(dim=0) * one_c).sum(dim=1) - 1
    return labels, groups, rank, stats[4]


def _quad(a: Tensor, k: Tensor, b: Tensor) -> Tensor:
    """a_r^T K b_r for each row r: a, b (C, R, M) (broadcastable) with K (C, M, M) shared by a class's rows, or
    (C, G, M) with K (C, G, M, M), one kernel per cell. Returns (C, R) or (C, G)."""
    if k.dim() == 3:
        return ((a @ k) * b).sum(dim=-1)
    return ((a.unsqueeze(-2) @ k).squeeze(-2) * b).sum(dim=-1)


@LOSSES.register("mfd_loss")
def mfd_loss(
    student_feat: Tensor,
    teacher_feat: Tensor | None,
    labels: Tensor | None,
    groups: Tensor | None,
    *,
    num_classes: int,
    num_groups: int,
    sigma: float = 1.0,
    kernel: str = "rbf",
    bandwidth: str = "batch",
    target: str = "class",
    joint: bool = False,
) -> Tensor:
    """MFD regulariser (Jung et al. 2021, Eq. 5 and its estimate in Eq. 6), returned as the plain SUM over cells:

        L_MFD = sum_y sum_a D^2(p^T_y, p^S_{a,y})                                                   (Eq. 5)
        D^2(T, S) = mean_{i,j} k(t_i, t_j) + mean_{i,j} k(s_i, s_j) - 2 mean_{i,j} k(t_i, s_j)   (Eq. 6)

    the biased estimator (diagonals included). S_{y,a} are the student features of the batch samples of class y in
    group a; T_y (target="class", the official code's) the teacher features of ALL class-y samples, whatever their
    group. Empty cells and absent classes add nothing. The CALLER weighs the sum: Eq. 6 and the official code use
    lambda / 2 (lambda = 3 for CIFAR-10S and UTKFace, 7 for CelebA). Features are flattened per sample; the
    teacher's are detached here.

    Computation: no loop over cells. Each class's teacher and student samples go to one zero-padded row of a
    (C, 2M) grid (M the largest class count), so one kernel holds K(T,T), K(T,S) and K(S,S) as a batch of C (2M, 2M)
    blocks, about 4 B^2 / C entries rather than 4 B^2; every cell is a weight vector u = [w; -v] over its class's
    row (w the class target's weights, v = 1 / n_{y,a} on the cell's members) and Eq. 6 is the one quadratic form
    u^T K u. Costs one host sync (the label checks and M). Runs in float32 or better with
    autocast off: exp of differences of large squared distances is meaningless in 16-bit.

    Kernels (`kernel`):
        "rbf"  (default, on raw features): k(x, x') = exp(-||x - x'||^2 / (2 * sigma * bw)), squared distances
               clamped >= 1e-12. The paper writes exp(-||x - x'||^2 / (2 sigma^2)) and sets "the kernel parameter
               sigma^2 as the mean of squared distance between all data points for each pair" (sec. 4.2,
               "Mini-batch optimization"); `sigma` multiplies that mean, as the official --sigma (default 1) does.
        "poly" (the official --kernel poly): k(x, x') = (x^T x')^2 on L2-normalised features; sigma and bandwidth
               play no part.
    Bandwidth bw (`bandwidth`, rbf only; computed without gradient):
        "batch" (the official code): ONE bw per batch, the mean squared distance over all B x B teacher x student
                pairs (in closed form: mean |t|^2 + mean |s|^2 - 2 mean(t).mean(s)).
        "cell"  (the paper's "for each pair" (a, y)): bw_{y,a} = the mean squared distance over all pairs
                (t in T_y, s in S_{y,a}), i.e. between the two samples D^2 compares, each pair counted once
                (whatever the target's weights); the official scratch_mmd code (MFD-F) computes its bandwidth so.
    Target (`target`):
        "class"      T_y weighs every class-y teacher sample 1 / n_y: the empirical class-conditional p^T_y.
        "group_mean" the paper's group-averaged p^T_y = E_A[p^T_{A,y}], with A uniform over the groups present in
                     class y in the batch: a sample of group a weighs 1 / (|A_y| n_{y,a}). On batches that are
                     group-balanced within each class (n_{y,a} equal over the present groups, as the paper's
                     sampler makes them) every weight is 1 / n_y, so the two targets agree.
    Variants:
        joint=True          MFD-K (the official --jointfeature): one D^2(all teacher, all student) over the batch;
                            labels and groups are ignored (may be None); target must be "class".
        teacher_feat=None   MFD-F (the teacher-free ablation, sec. 5.3; official scratch_mmd): the target of cell
                            (y, a) is the student's own class-y features, DETACHED: the paper "substituted ... with
                            the distance D^2(p^S_y, p^S_{a,y}), and only used gradients obtained from p^S_{a,y}",
                            and the code detaches the target. To match that code also pass bandwidth="cell" and
                            weigh the sum by lambda / (2 * num_groups) (Lemma 2's 1/(2|A|)); it also uses sigma^2
                            where MFD's code uses sigma (the same at the default 1).

    Args:
        student_feat: (B, ...) student features (the official code: the penultimate layer, or ResNet's layer4 map).
        teacher_feat: (B, ...) teacher features with as many values per sample as the student's, or None (MFD-F).
        labels, groups: (B,) integer class labels in [0, num_classes) and group labels in [0, num_groups).
    Returns:
        A scalar: the sum of D^2 over populated cells (the one D^2 when joint).
    """
    _choice("kernel", kernel, KERNELS)
    _choice("bandwidth", bandwidth, BANDWIDTHS)
    _choice("target", target, TARGETS)
    if not sigma > 0:
        raise ValueError(f"mfd_loss: sigma must be > 0, got {sigma}")
    if joint and teacher_feat is None:
        raise ValueError("mfd_loss: joint=True (MFD-K) needs teacher features; against the student's own detached "
                         "features the whole-batch MMD is identically zero")
    if joint and target != "class":
        raise ValueError("mfd_loss: joint=True (MFD-K) ignores classes and groups; target must be 'class'")
    _check(student_feat, teacher_feat)
    n = student_feat.shape[0]
    if joint:  # MFD-K is the one-class, one-group case: a single cell holding the whole batch
        rank = torch.arange(n, device=student_feat.device)
        labels = groups = torch.zeros_like(rank)
        num_classes = num_groups = 1
        m = n
    else:
        labels, groups, rank, m = _class_ranks(labels, groups, num_classes, num_groups, n)

    with torch.autocast(student_feat.device.type, enabled=False):
        s = student_feat.flatten(1)
        if s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()
        t = (s if teacher_feat is None else teacher_feat.flatten(1).to(s.dtype)).detach()
        dtype = s.dtype
        if kernel == "poly":
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        else:
            # Distances ignore a common shift; centring keeps |a|^2 + |b|^2 - 2ab from cancelling in float32.
            t_mean, s_mean = t.mean(dim=0), s.detach().mean(dim=0)
            centre = (t_mean + s_mean) / 2
            s, t = s - centre, t - centre
            mean_dot = -(t_mean - s_mean).pow(2).sum() / 4  # mean(t).mean(s) after centring: -|mean(t)|^2

        # Kernels are only needed within a class, so each class's samples go to one zero-padded row of a (C, M)
        # grid, M the largest class count, teacher slots first and student slots after: every kernel is a batch of
        # C (2M, 2M) blocks, about 4 B^2 / C entries instead of 4 B^2. Padding slots get zero weight everywhere.
        slot = labels * m + rank
        both = torch.cat([t, s], dim=0)
        where = torch.cat([slot + labels * m, slot + labels * m + m])  # class y's row starts at 2 M y
        x = both.new_zeros(num_classes * 2 * m, both.shape[1]).index_copy(0, where, both).view(num_classes, 2 * m, -1)
        gram = x @ x.transpose(1, 2)  # (C, 2M, 2M): [[TT, TS], [ST, SS]]
        if kernel == "poly":
            k = gram.pow(2)
        else:  # squared distances; |x_i|^2 come free from the Gram diagonal
            sq = gram.diagonal(dim1=1, dim2=2)
            d = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2.0 * gram).clamp_min(_EPS)

        # Cell membership on the grid, and the weights that turn Eq. 6 into ONE quadratic form per cell:
        # D^2 = w'K_TT w + v'K_SS v - 2 w'K_TS v = u'K u with u = [w; -v] over the stacked slots.
        one_g = F.one_hot(groups, num_groups).to(dtype)
        member = one_g.new_zeros(num_classes * m, num_groups).index_copy(0, slot, one_g)
        member = member.view(num_classes, m, num_groups).transpose(1, 2)  # (C, G, M)
        n_cell = member.sum(dim=2)  # (C, G)
        in_class = member.sum(dim=1)  # (C, M)
        n_class = in_class.sum(dim=1)  # (C,)
        v = member / n_cell.clamp_min(1).unsqueeze(2)  # each cell's student weights: 1 / n_{y,a}
        if target == "class":
            w = in_class / n_class.clamp_min(1).unsqueeze(1)  # 1 / n_y
        else:  # the mean of the present groups' cell weights
            w = v.sum(dim=1) / (n_cell > 0).sum(dim=1).clamp_min(1).unsqueeze(1)
        u = torch.cat([w.unsqueeze(1).expand(-1, num_groups, -1), -v], dim=2)  # (C, G, 2M)

        if kernel == "rbf":
            with torch.no_grad():
                if bandwidth == "batch":
                    # mean |t|^2 + mean |s|^2 - 2 mean(t).mean(s): all three terms >= 0 after centring, so nothing
                    # cancels (the padding's |x|^2 is 0).
                    bw = (sq.sum() / n - 2.0 * mean_dot).clamp_min(_EPS)
                    scale = -1.0 / (2.0 * sigma * bw)
                else:  # mean |t - s|^2 over the (class-y teacher, cell (y, a) student) pairs
                    pairs = n_class.unsqueeze(1) * n_cell
                    bw = _quad(in_class.unsqueeze(1), d[:, :m, m:], member) / pairs.clamp_min(1)
                    bw = torch.where(pairs > 0, bw.clamp_min(_EPS), torch.ones_like(bw))  # empty cells: unused
                    scale = (-1.0 / (2.0 * sigma * bw))[..., None, None]  # (C, G, 1, 1): one kernel per cell
            k = ((d.unsqueeze(1) if bandwidth == "cell" else d) * scale).exp()

        d2 = _quad(u, k, u)  # (C, G): Eq. 6 for every cell
        return (d2 * (n_cell > 0).to(dtype)).sum()
