"""A CPU-scale result: ResNet-56 -> ResNet-20 Hinton KD on CIFAR-10 vs ResNet-20 alone, same epochs and seed.

Runs the shipped recipes (recipes/kd/cifar10/resnet20_from_resnet56.yaml and
recipes/train/cifar10/resnet20.yaml) with a short cosine schedule, then writes the aggregated table to
results/cifar10_kd_vs_scratch.md. Needs ../shared/data (CIFAR-10 JPEG tar.gz and the ResNet-56 weights).
    python benchmarks/cifar10_kd_vs_scratch.py [--epochs 3] [--seeds 0] [--out runs/cifar10_cpu]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import publish  # noqa: E402  (benchmarks/ is run as a script folder)

from kdforge.config import load_config
from kdforge.recipe import run_recipe
from kdforge.report import aggregate, find_runs

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"kd": ROOT / "recipes/kd/cifar10/resnet20_from_resnet56.yaml",
           "scratch": ROOT / "recipes/train/cifar10/resnet20.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/cifar10_cpu")
    ap.add_argument("--results", default=str(ROOT / "results/cifar10_kd_vs_scratch.md"))
    ap.add_argument("--report-only", action="store_true", help="rebuild the table from the runs under --out")
    a = ap.parse_args()
    for seed in [] if a.report_only else a.seeds:
        for method, recipe in RECIPES.items():
            cfg = load_config(recipe, [f"seed={seed}", f"out_dir={a.out}", f"name={method}_seed{seed}",
                                       f"train.epochs={a.epochs}", "train.schedule=cosine", "train.lr=0.05"])
            t = time.perf_counter()
            res = run_recipe(cfg, overwrite=True)
            print(f"{method} seed {seed}: top-1 {res.metrics['top1']:.2f}% in {time.perf_counter() - t:.0f} s",
                  flush=True)
    # the table covers every run under --out, so seeds run at different times add up
    summaries = [json.loads((r / "summary.json").read_text()) for r in find_runs([a.out])]
    table = aggregate([a.out])
    teacher = next((s["teacher_metrics"] for s in summaries if s.get("teacher_metrics")), None)
    seeds = sorted({s["seed"] for s in summaries})
    text = ["# CIFAR-10 on CPU: ResNet-56 -> ResNet-20, Hinton KD vs ResNet-20 alone", "",
            f"{a.epochs} epochs, SGD 0.05 with cosine decay, batch 64, weight decay 5e-4, crop+flip, "
            f"seeds {seeds}; train on the 50,000 JPEG training images, test on the 10,000 JPEG test images "
            "(../shared/data/cifar10-jpeg.tar.gz). KD: T = 4, CE 0.1 + KD 0.9; teacher: the published ResNet-56 "
            "weights (akamaster), frozen.", "",
            f"Teacher ResNet-56 on this test set: top-1 {teacher['top1']:.2f}%, top-5 {teacher['top5']:.2f}%."
            if teacher else "", "", table,
            "| run | seed | top-1 (%) | training time (s) |", "| --- | --- | --- | --- |"]
    text += [f"| {s['method']} | {s['seed']} | {s['metrics']['top1']:.2f} | {s['train_time_s']:.0f} |"
             for s in sorted(summaries, key=lambda s: (s["method"], s["seed"]))]
    by_seed = {(s["method"], s["seed"]): s["metrics"]["top1"] for s in summaries}
    gains = [by_seed[("kd", sd)] - by_seed[("scratch", sd)] for sd in seeds
             if ("kd", sd) in by_seed and ("scratch", sd) in by_seed]
    if gains:
        text += ["", "KD minus scratch, paired by seed (points): " + ", ".join(f"{g:+.2f}" for g in gains)
                 + f"; mean {sum(gains) / len(gains):+.2f}."]
    text += ["", "Produced by `python benchmarks/cifar10_kd_vs_scratch.py "
             f"--epochs {a.epochs} --seeds {' '.join(map(str, seeds))}` on 2 CPU cores (training time includes "
             "per-epoch evaluation; other jobs shared the cores during some epochs)."]
    publish(text, a.results)
    print(json.dumps({"results": a.results}))


if __name__ == "__main__":
    main()
