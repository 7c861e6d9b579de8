"""kdforge.losses against naive references written from the papers' formulas.

Each reference converts tensors to Python lists and loops over samples / classes / pairs / triplets
with `math`, so it shares no code path (and no torch reduction) with the vectorised implementation.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from kdforge import losses
from kdforge.losses import (
    at_loss,
    attention_map,
    crd_nce,
    crd_scores,
    hint_mse,
    kd_div,
    match_spatial,
    nst_loss,
    pkt_loss,
    rkd_angle,
    rkd_distance,
    rkd_loss,
    vid_loss,
)
from kdforge.registry import LOSSES

B, C, H, W = 5, 4, 4, 4


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def huber(x: float) -> float:  # smooth_l1 with delta 1
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def l2_normalise(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


# ----------------------------------------------------------------------------- naive references


def naive_kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    def softmax(z: list[float]) -> list[float]:
        m = max(z)
        e = [math.exp((v - m) / temp) for v in z]
        return [v / sum(e) for v in e]

    total = 0.0
    for zs, zt in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(zs), softmax(zt)
        total += sum(pt[c] * (math.log(pt[c]) - math.log(ps[c])) for c in range(len(zs)))
    return scalar(temp * temp * total / s.shape[0])


def naive_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, b = s.flatten().tolist(), t.flatten().tolist()
    return scalar(mean([(x - y) ** 2 for x, y in zip(a, b)]))


def naive_pool(chw: list, out_h: int, out_w: int) -> list:
    """Adaptive average pooling: cell i covers [floor(i*H/out), ceil((i+1)*H/out))."""
    h, w = len(chw[0]), len(chw[0][0])
    out = []
    for plane in chw:
        rows = []
        for i in range(out_h):
            r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
            row = []
            for j in range(out_w):
                c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
                cells = [plane[r][c] for r in range(r0, r1) for c in range(c0, c1)]
                row.append(mean(cells))
            rows.append(row)
        out.append(rows)
    return out


def naive_match(s: torch.Tensor, t: torch.Tensor) -> tuple[list, list]:
    """Per-sample [C][H][W] lists, the larger spatial map pooled to the smaller."""
    oh, ow = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    return ([naive_pool(x, oh, ow) for x in s.tolist()], [naive_pool(x, oh, ow) for x in t.tolist()])


def naive_attention(chw: list, p: float) -> list[float]:
    n_c, h, w = len(chw), len(chw[0]), len(chw[0][0])
    am = [mean([abs(chw[c][i][j]) ** p for c in range(n_c)]) for i in range(h) for j in range(w)]
    return l2_normalise(am)


def naive_at(s: torch.Tensor, t: torch.Tensor, p: float) -> torch.Tensor:
    ss, tt = naive_match(s, t)
    sq = []
    for xs, xt in zip(ss, tt):
        qs, qt = naive_attention(xs, p), naive_attention(xt, p)
        sq += [(a - b) ** 2 for a, b in zip(qs, qt)]
    return scalar(mean(sq))


def naive_nst(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ss, tt = naive_match(s, t)
    per_sample = []
    for xs, xt in zip(ss, tt):
        vs = [l2_normalise([v for row in plane for v in row]) for plane in xs]
        vt = [l2_normalise([v for row in plane for v in row]) for plane in xt]
        k_ss = mean([dot(a, b) ** 2 for a in vs for b in vs])
        k_tt = mean([dot(a, b) ** 2 for a in vt for b in vt])
        k_st = mean([dot(a, b) ** 2 for a in vs for b in vt])
        per_sample.append(k_ss + k_tt - 2 * k_st)
    return scalar(mean(per_sample))


def naive_vid(mu: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    terms = []
    m, t, a = mu.tolist(), target.tolist(), alpha.tolist()
    for b in range(mu.shape[0]):
        for c in range(mu.shape[1]):
            var = math.log1p(math.exp(a[c])) + eps
            for i in range(mu.shape[2]):
                for j in range(mu.shape[3]):
                    terms.append(0.5 * ((t[b][c][i][j] - m[b][c][i][j]) ** 2 / var + math.log(var)))
    return scalar(mean(terms))


def naive_crd(pos: torch.Tensor, neg: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    k = neg.shape[1]
    pn = 1.0 / n_data
    total = 0.0
    for hp, hn in zip(pos.tolist(), neg.tolist()):
        term = math.log(hp / (hp + k * pn) + eps)
        for h in hn:
            term += math.log(1.0 - h / (h + k * pn) + eps)
        total += term
    return scalar(-total / pos.shape[0])


def naive_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    def cond(x: torch.Tensor) -> list[list[float]]:
        rows = [l2_normalise(r) for r in x.flatten(1).tolist()]
        k = [[(dot(a, b) + 1) / 2 for b in rows] for a in rows]
        return [[v / sum(r) for v in r] for r in k]

    ps, pt = cond(s), cond(t)
    n = len(ps)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
    return scalar(total / (n * n))  # the official code's mean over all B^2 entries


def naive_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def dists(x: torch.Tensor) -> list[float]:
        rows = x.flatten(1).tolist()
        n = len(rows)
        d = [math.dist(rows[i], rows[j]) for i in range(n) for j in range(n) if i != j]
        mu = mean(d)
        return [v / mu for v in d]

    return scalar(mean([huber(a - b) for a, b in zip(dists(s), dists(t))]))


def naive_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def angles(x: torch.Tensor) -> list[float]:
        rows = x.flatten(1).tolist()
        n = len(rows)
        out = []
        for j in range(n):  # j is the vertex of the angle
            for i in range(n):
                for k in range(n):
                    if len({i, j, k}) < 3:
                        continue
                    e_ij = l2_normalise([a - b for a, b in zip(rows[i], rows[j])])
                    e_kj = l2_normalise([a - b for a, b in zip(rows[k], rows[j])])
                    out.append(dot(e_ij, e_kj))
        return out

    return scalar(mean([huber(a - b) for a, b in zip(angles(s), angles(t))]))


# ----------------------------------------------------------------------------- equality with references


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_div_matches_naive(temp: float) -> None:
    s, t = rand(B, 7, seed=1) * 3, rand(B, 7, seed=2) * 3
    assert_close(kd_div(s, t, temp), naive_kd(s, t, temp))


def test_hint_mse_matches_naive() -> None:
    s, t = rand(B, C, H, W, seed=1), rand(B, C, H, W, seed=2)
    assert_close(hint_mse(s, t), naive_mse(s, t))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_map_matches_naive(p: float) -> None:
    x = rand(B, C, H, W, seed=3)
    expected = torch.tensor([naive_attention(chw, p) for chw in x.tolist()], dtype=torch.float64)
    got = attention_map(x, p)
    assert got.shape == (B, H * W)
    assert_close(got, expected)


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [((B, C, H, W), (B, C, H, W)), ((B, 3, 8, 8), (B, 6, 4, 4)), ((B, 5, 4, 4), (B, 3, 6, 6))],
    ids=["same", "student-larger", "teacher-larger-non-integer-ratio"],
)
def test_at_loss_matches_naive(s_shape: tuple, t_shape: tuple) -> None:
    s, t = rand(*s_shape, seed=4), rand(*t_shape, seed=5)
    assert_close(at_loss(s, t), naive_at(s, t, 2.0))
    assert_close(at_loss(s, t, p=1.0), naive_at(s, t, 1.0))


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [((B, C, H, W), (B, C, H, W)), ((B, 3, 4, 4), (B, 6, 4, 4)), ((B, 3, 8, 8), (B, 5, 4, 4))],
    ids=["same", "different-channels", "different-channels-and-size"],
)
def test_nst_loss_matches_naive(s_shape: tuple, t_shape: tuple) -> None:
    s, t = rand(*s_shape, seed=6), rand(*t_shape, seed=7)
    assert_close(nst_loss(s, t), naive_nst(s, t))


def test_vid_loss_matches_naive() -> None:
    mu, target, alpha = rand(B, C, H, W, seed=8), rand(B, C, H, W, seed=9), rand(C, seed=10)
    assert_close(vid_loss(mu, target, alpha), naive_vid(mu, target, alpha, 1e-5))
    assert_close(vid_loss(mu, target, alpha, eps=0.1), naive_vid(mu, target, alpha, 0.1))


def test_crd_nce_matches_naive() -> None:
    k, n_data = 6, 50
    pos, neg = rand(B, seed=11).exp(), rand(B, k, seed=12).exp() * 0.1
    assert_close(crd_nce(pos, neg, n_data), naive_crd(pos, neg, n_data))
    assert_close(crd_nce(pos.unsqueeze(1), neg, n_data), naive_crd(pos, neg, n_data))  # (B, 1) accepted


def test_crd_scores_matches_naive() -> None:
    k, d, tau = 3, 6, 0.5
    anchor, others = rand(B, d, seed=13), rand(B, 1 + k, d, seed=14)
    a, o = anchor.tolist(), others.tolist()
    expected = torch.tensor([[math.exp(dot(a[b], o[b][j]) / tau) for j in range(1 + k)] for b in range(B)],
                            dtype=torch.float64)
    assert_close(crd_scores(anchor, others, tau), expected)


def test_pkt_loss_matches_naive() -> None:
    s, t = rand(B, C, 2, 2, seed=15), rand(B, 9, seed=16)  # flattened; dims may differ
    assert_close(pkt_loss(s, t), naive_pkt(s, t))
    s64, t64 = rand(64, 6, seed=59), rand(64, 6, seed=60)  # the batch the published weight was tuned at
    assert_close(pkt_loss(s64, t64), naive_pkt(s64, t64))


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [((B, 3, 8, 8), (B, 6, 4, 4)), ((B, 5, 4, 4), (B, 3, 6, 6)), ((B, 2, 8, 4), (B, 2, 4, 8))],
    ids=["student-larger", "teacher-larger-non-integer-ratio", "each-larger-on-one-axis"],
)
def test_match_spatial_pools_the_larger_map_down(s_shape: tuple, t_shape: tuple) -> None:
    s, t = rand(*s_shape, seed=61), rand(*t_shape, seed=62)
    got_s, got_t = match_spatial(s, t)
    want_s, want_t = naive_match(s, t)
    assert_close(got_s, torch.tensor(want_s, dtype=torch.float64))
    assert_close(got_t, torch.tensor(want_t, dtype=torch.float64))


def test_match_spatial_leaves_equal_sizes_and_vectors_alone() -> None:
    s, t = rand(B, 3, H, W, seed=63), rand(B, 6, H, W, seed=64)
    assert all(a is b for a, b in zip(match_spatial(s, t), (s, t)))
    v, u = rand(B, 6, seed=65), rand(B, 6, seed=66)  # pooled features, no spatial axes
    assert all(a is b for a, b in zip(match_spatial(v, u), (v, u)))
    with pytest.raises(ValueError, match=r"\(5, 3, 4, 4\).*\(5, 6\)"):
        match_spatial(s, v)


def test_rkd_matches_naive() -> None:
    s, t = rand(B, 6, seed=17), rand(B, 3, 2, seed=18) * 5  # dims may differ; t is flattened
    dist, ang = naive_rkd_distance(s, t), naive_rkd_angle(s, t)
    assert_close(rkd_distance(s, t), dist)
    assert_close(rkd_angle(s, t), ang)
    assert_close(rkd_loss(s, t), 25.0 * dist + 50.0 * ang)
    assert_close(rkd_loss(s, t, dist_weight=1.0, angle_weight=2.0), dist + 2.0 * ang)


def test_rkd_distance_exercises_both_huber_branches() -> None:
    # A wide spread of normalised distances, so the |x| >= 1 branch of smooth_l1 is covered too.
    s = torch.cat([rand(4, 3, seed=19), rand(1, 3, seed=20) + 30.0])
    t = rand(B, 3, seed=21)
    assert_close(rkd_distance(s, t), naive_rkd_distance(s, t))


# ----------------------------------------------------------------------------- properties


def test_kd_div_zero_iff_same_distribution() -> None:
    s = rand(B, 10, seed=22)
    assert kd_div(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert kd_div(s, s + 3.0).item() == pytest.approx(0.0, abs=1e-12)  # softmax ignores a shift
    assert kd_div(s, rand(B, 10, seed=23)).item() > 1e-3


def test_kd_div_validates() -> None:
    with pytest.raises(ValueError, match=r"\(5, 10\).*\(5, 9\)"):
        kd_div(rand(B, 10), rand(B, 9))
    with pytest.raises(ValueError, match="temperature"):
        kd_div(rand(B, 10), rand(B, 10), temperature=0.0)


def test_hint_mse_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError) as err:
        hint_mse(rand(B, 8, H, W), rand(B, 16, H, W))
    assert "(5, 8, 4, 4)" in str(err.value) and "(5, 16, 4, 4)" in str(err.value)


def test_at_and_nst_reject_batch_mismatch() -> None:
    for fn in (at_loss, nst_loss):
        with pytest.raises(ValueError, match=r"\(5, 4, 4, 4\).*\(4, 4, 4, 4\)"):
            fn(rand(B, C, H, W), rand(B - 1, C, H, W))


def test_at_and_nst_zero_for_identical_maps_and_positive_otherwise() -> None:
    s, t = rand(B, 3, H, W, seed=24), rand(B, 6, H, W, seed=25)
    for fn in (at_loss, nst_loss):
        assert fn(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
        assert fn(s, t).item() > 1e-6


def test_vid_loss_decreases_as_mean_approaches_target() -> None:
    target, noise, alpha = rand(B, C, H, W, seed=26), rand(B, C, H, W, seed=27), rand(C, seed=28)
    values = [vid_loss(target + lam * noise, target, alpha).item() for lam in (2.0, 1.0, 0.5, 0.1, 0.0)]
    assert all(a > b for a, b in itertools.pairwise(values)), values


def test_vid_loss_validates_log_scale() -> None:
    with pytest.raises(ValueError, match=r"log_scale \(3,\)"):
        vid_loss(rand(B, C, H, W), rand(B, C, H, W), rand(3))


def test_crd_nce_lower_when_positives_score_higher() -> None:
    k, n_data = 8, 100
    good = crd_nce(torch.full((B,), 5.0), torch.full((B, k), 0.01), n_data)
    bad = crd_nce(torch.full((B,), 0.01), torch.full((B, k), 5.0), n_data)
    assert good.item() < bad.item()
    # and monotone in the positive score
    neg = torch.full((B, k), 0.05)
    vals = [crd_nce(torch.full((B,), h), neg, n_data).item() for h in (0.01, 0.1, 1.0, 10.0)]
    assert all(a > b for a, b in itertools.pairwise(vals)), vals


def test_crd_validates_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(5,\).*\(4, 3\)"):
        crd_nce(rand(B).exp(), rand(4, 3).exp(), 10)
    with pytest.raises(ValueError, match=r"\(5, 6\).*\(5, 4, 7\)"):
        crd_scores(rand(B, 6), rand(B, 4, 7), 0.1)


def test_rkd_distance_invariant_to_scaling_student() -> None:
    s, t = rand(B, 6, seed=29), rand(B, 6, seed=30)
    base = rkd_distance(s, t)
    assert base.item() > 1e-4
    for scale in (0.01, 3.0, 100.0):
        assert_close(rkd_distance(scale * s, t), base)
    assert rkd_distance(7.0 * t, t).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_angle(7.0 * t + 1.0, t).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_distance_float32_far_from_origin() -> None:
    # Features offset far from the origin: naive |a|^2 + |b|^2 - 2ab would lose most digits in float32.
    s, t = rand(B, 16, seed=31), rand(B, 16, seed=32)
    ref = rkd_distance(s, t)
    got = rkd_distance((s + 1000.0).float(), (t - 1000.0).float())
    assert_close(got.double(), ref, rtol=1e-3, atol=1e-5)


def test_rkd_gradients_finite_with_coincident_samples() -> None:
    s = rand(B, 6, seed=33)
    s[1] = s[0]  # a zero distance and a zero difference vector
    s.requires_grad_(True)
    (rkd_loss(s, rand(B, 6, seed=34)) + pkt_loss(s, rand(B, 6, seed=35))).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_relational_losses_reject_bad_batches() -> None:
    with pytest.raises(ValueError, match=r"\(5, 6\).*\(4, 6\)"):
        rkd_distance(rand(B, 6), rand(4, 6))
    with pytest.raises(ValueError, match="at least 3"):
        rkd_angle(rand(2, 6), rand(2, 6))


# (name, function, student args, other args): gradcheck w.r.t. every student-side argument.
GRAD_CASES = [
    ("kd_div", lambda s: kd_div(s, rand(3, 5, seed=40), 2.0), (rand(3, 5, seed=41),)),
    ("hint_mse", lambda s: hint_mse(s, rand(2, 3, 2, 2, seed=42)), (rand(2, 3, 2, 2, seed=43),)),
    ("at_loss", lambda s: at_loss(s, rand(2, 4, 2, 2, seed=44)), (rand(2, 3, 4, 4, seed=45),)),
    ("nst_loss", lambda s: nst_loss(s, rand(2, 4, 2, 2, seed=46)), (rand(2, 3, 4, 4, seed=47),)),
    ("vid_loss", lambda m, a: vid_loss(m, rand(2, 3, 2, 2, seed=48), a),
     (rand(2, 3, 2, 2, seed=49), rand(3, seed=50))),
    ("crd_nce", lambda p, n: crd_nce(p, n, 20), (rand(3, seed=51).exp(), rand(3, 4, seed=52).exp())),
    ("crd_scores", lambda a: crd_scores(a, rand(3, 4, 5, seed=53), 0.5), (rand(3, 5, seed=54),)),
    ("pkt_loss", lambda s: pkt_loss(s, rand(4, 3, seed=55)), (rand(4, 5, seed=56),)),
    ("rkd_loss", lambda s: rkd_loss(s, rand(4, 3, seed=57)), (rand(4, 5, seed=58),)),
]


@pytest.mark.parametrize("name,fn,args", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_reach_student_and_match_finite_differences(name: str, fn, args: tuple) -> None:
    args = tuple(a.clone().requires_grad_(True) for a in args)
    out = fn(*args)
    if name != "crd_scores":
        assert out.dim() == 0, f"{name} must return a scalar"
    out.sum().backward()
    for a in args:
        assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(fn, tuple(a.detach().requires_grad_(True) for a in args))


def test_every_export_is_registered_under_its_name() -> None:
    helpers = {"attention_map", "crd_scores", "match_spatial"}  # return tensors, not losses
    for name in losses.__all__:
        assert hasattr(losses, name)
        if name in helpers:
            assert name not in LOSSES
        else:
            assert LOSSES.get(name) is getattr(losses, name)
    assert set(losses.__all__) - helpers <= set(LOSSES.names())
