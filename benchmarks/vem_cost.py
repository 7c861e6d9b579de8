"""What VEM costs: a + VEM training step against the baseline's, measured side by side in one process (interleaved
rounds, medians: these machines are noisy), the share of it spent in the Langevin chain, and the student's
inference time after each (VEM's energy model is a training-time network only: the student is the same network).

Built from the recipes (recipes/vem/<task>/baseline.yaml and vem.yaml) with random teacher weights (speed does not
depend on them) on in-memory batches, so data loading is not what is measured.
    python benchmarks/vem_cost.py [--task edges|faces] [--rounds 5] [--steps 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import interleaved  # noqa: E402  (benchmarks/ is run as a script folder)

from kdforge.api import build_distiller
from kdforge.config import load_config
from kdforge.models.cost import count_macs
from kdforge.recipe import build_model_from_config

TASKS = {"edges": ("utkface_edges", 32), "faces": ("utkface_faces", 64)}


def _distiller(recipe: str, batch: dict) -> torch.nn.Module:
    cfg = load_config(recipe)
    torch.manual_seed(0)
    student = build_model_from_config(cfg.student, load=False)
    teacher = build_model_from_config(cfg.teacher, load=False)
    d = build_distiller(cfg.method.name, student, teacher, [batch], input_shape=(3, 32, 32), **cfg.method.kwargs)
    d.optimizers = {k: (v[0] if isinstance(v, tuple) else v)
                    for k, v in d.configure_optimizers("main", cfg.train, 100).items()}
    return d.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="edges", choices=list(TASKS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    folder, b = TASKS[a.task]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, "index": torch.arange(b)}
    if a.task == "edges":
        batch["target"] = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    base = _distiller(f"recipes/vem/{folder}/baseline.yaml", batch)
    vem = _distiller(f"recipes/vem/{folder}/vem.yaml", batch)

    def steps(d):
        return lambda: [d.training_step(batch) for _ in range(a.steps)]

    x = batch["image"] if a.task == "edges" else torch.randn(b, vem.z_dim)
    with torch.no_grad():
        s, t = vem.student(x), vem.teacher(x)
    step = interleaved({"baseline": steps(base), "vem": steps(vem),
                        "chain": lambda: [vem.sample_chain(t, s) for _ in range(a.steps)]}, rounds=a.rounds)
    for d in (base, vem):
        d.student.eval()
    one = x[:1]
    infer = interleaved({"after baseline": lambda: [base.student(one) for _ in range(50)],
                         "after vem": lambda: [vem.student(one) for _ in range(50)]}, rounds=a.rounds)
    n_params = {k: sum(p.numel() for p in d.student.parameters()) for k, d in (("baseline", base), ("vem", vem))}
    print(f"task {a.task}, batch {b}, {a.threads} thread(s), {a.rounds} interleaved rounds of {a.steps} steps "
          f"(medians), {time.strftime('%Y-%m-%d')}")
    ms = {k: v / a.steps * 1e3 for k, v in step.items()}
    print(f"training step: baseline {ms['baseline']:.0f} ms, + VEM {ms['vem']:.0f} ms -> ratio "
          f"{step['vem'] / step['baseline']:.2f}x; the Langevin chain alone ({vem.chain['steps']} steps): "
          f"{ms['chain']:.0f} ms = {step['chain'] / step['vem']:.0%} of a VEM step")
    print(f"student inference, batch 1: after baseline {infer['after baseline'] / 50 * 1e3:.2f} ms, after VEM "
          f"{infer['after vem'] / 50 * 1e3:.2f} ms -> ratio {infer['after vem'] / infer['after baseline']:.2f}x "
          f"(same network: {n_params['baseline']:,} vs {n_params['vem']:,} parameters, "
          f"{count_macs(base.student, one) / 1e6:.2f} vs {count_macs(vem.student, one) / 1e6:.2f} M MACs; the energy "
          f"model, {sum(p.numel() for p in vem.energy.parameters()):,} parameters, is not part of it)")


if __name__ == "__main__":
    main()
