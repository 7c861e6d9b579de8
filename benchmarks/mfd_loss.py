"""MFD loss (Jung et al. 2021): kdforge's vectorised `mfd_loss` vs a per-cell Python loop over classes x groups.

The loop is the straightforward implementation (as in the authors' code): for every populated (class, group) cell,
mask the batch and build three small kernel matrices. Both run forward + backward on a batch of 128 x 256-d
features, with the official defaults (rbf, one bandwidth per batch) and with the paper's per-cell bandwidth.
Target: vectorised >= 10x faster.
    python benchmarks/mfd_loss.py [--batch 128] [--dim 256] [--steps 20] [--rounds 5] [--threads 1] [--device cpu]
"""
from __future__ import annotations

import torch
from _common import interleaved, timing_args  # noqa: E402

from kdforge.losses import mfd_loss


def loop_mfd(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_classes: int,
             num_groups: int, sigma: float = 1.0, bandwidth: str = "batch") -> torch.Tensor:
    """One cell at a time: what mfd_loss replaces."""
    s, t = s.flatten(1), t.flatten(1).detach()

    def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.t()).clamp_min(1e-12)

    with torch.no_grad():
        batch_bw = sq_dists(t, s).mean()
    total = s.new_zeros(())
    for c in range(num_classes):
        in_class = labels == c
        if not in_class.any():
            continue
        t_c = t[in_class]
        for g in range(num_groups):
            in_cell = in_class & (groups == g)
            if not in_cell.any():
                continue
            s_cg = s[in_cell]
            d_ts = sq_dists(t_c, s_cg)
            bw = batch_bw if bandwidth == "batch" else d_ts.detach().mean()
            k = [torch.exp(-d / (2 * sigma * bw)) for d in (sq_dists(t_c, t_c), sq_dists(s_cg, s_cg), d_ts)]
            total = total + k[0].mean() + k[1].mean() - 2 * k[2].mean()
    return total


def time_pair(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, classes: int,
              groups_n: int, bandwidth: str, steps: int, rounds: int) -> tuple[float, float]:
    """Milliseconds per forward + backward step of the per-cell loop and of mfd_loss."""
    fns = {"loop": lambda: loop_mfd(s, t, labels, groups, classes, groups_n, bandwidth=bandwidth),
           "vec": lambda: mfd_loss(s, t, labels, groups, num_classes=classes, num_groups=groups_n,
                                   bandwidth=bandwidth)}
    torch.testing.assert_close(fns["vec"](), fns["loop"](), rtol=1e-4, atol=1e-6)  # same loss, or timing is moot

    def run(fn) -> None:
        for _ in range(steps):
            s.grad = None
            fn().backward()
        if s.is_cuda:
            torch.cuda.synchronize()

    times = interleaved({k: (lambda fn=fn: run(fn)) for k, fn in fns.items()}, rounds=rounds)
    return times["loop"] / steps * 1e3, times["vec"] / steps * 1e3


def main() -> None:
    ap = timing_args(__doc__)
    ap.set_defaults(batch=128)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    # One thread by default: on a shared 2-core machine, intra-op threads waiting on each other swamp the timing.
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"MFD loss, forward + backward, {a.steps} steps per round, median of {a.rounds} rounds, "
          f"batch {a.batch} x {a.dim}-d, {torch.get_num_threads()} threads, {a.device}")
    print(f"{'layout':<22}{'bandwidth':<11}{'per-cell loop':>15}{'vectorised':>13}{'ratio':>8}")
    for classes, groups_n in ((10, 2), (3, 4)):
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, classes, (a.batch,), generator=g).to(a.device)
        groups = torch.randint(0, groups_n, (a.batch,), generator=g).to(a.device)
        s = torch.randn(a.batch, a.dim, generator=g).relu().to(a.device).requires_grad_(True)
        t = torch.randn(a.batch, a.dim, generator=g).relu().to(a.device)
        for bandwidth in ("batch", "cell"):
            per_loop, per_vec = time_pair(s, t, labels, groups, classes, groups_n, bandwidth, a.steps, a.rounds)
            layout = f"{classes} classes x {groups_n} groups"
            print(f"{layout:<22}{bandwidth:<11}{per_loop:>12.2f} ms{per_vec:>10.2f} ms{per_loop / per_vec:>7.1f}x")


if __name__ == "__main__":
    main()
