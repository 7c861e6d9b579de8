"""Every classic method's CIFAR-10 recipe at CPU scale: ResNet-56 -> ResNet-20 on a fixed training subset,
same epochs, schedule and seed for all, next to ResNet-20 trained alone. A check that each method trains
and helps on real data, not a reproduction of the papers' 240-epoch numbers.
    python benchmarks/cifar10_methods.py [--train-subset 10000] [--epochs 3] [--seeds 0] [--recipes STEM ...]
Writes results/cifar10_methods_cpu.md; with --recipes (a subset, e.g. `resnet20 pkt_resnet20_from_resnet56`) the
table is printed and written only where --results says. Needs ../shared/data (CIFAR-10 JPEG tar.gz and the
ResNet-56 weights).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--val-subset", type=int, default=None, help="default: the whole 10,000-image test set")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/cifar10_methods")
    ap.add_argument("--recipes", nargs="+", default=None, metavar="STEM",
                    help="run only these recipes, by file stem (resnet20 is the scratch baseline); default: all")
    ap.add_argument("--results", default=None,
                    help="default: results/cifar10_methods_cpu.md when every recipe runs, nowhere for a subset")
    a = ap.parse_args()
    kd_dir = ROOT / "recipes/kd/cifar10"
    recipes = [ROOT / "recipes/train/cifar10/resnet20.yaml", *sorted(kd_dir.glob("*.yaml"))]
    if a.recipes:
        unknown = sorted(set(a.recipes) - {r.stem for r in recipes})
        if unknown:
            ap.error(f"unknown recipe(s) {unknown}; choose from {[r.stem for r in recipes]}")
        recipes = [r for r in recipes if r.stem in a.recipes]
    elif a.results is None:
        a.results = str(ROOT / "results/cifar10_methods_cpu.md")
    first_kd = next((r for r in recipes if r.parent == kd_dir), None)  # evaluates the teacher once
    for seed in a.seeds:
        for recipe in recipes:
            cfg = load_config(recipe, [f"seed={seed}", f"out_dir={a.out}", f"train.epochs={a.epochs}",
                                       "train.schedule=cosine", f"data.train_subset={a.train_subset}",
                                       f"data.val_subset={'null' if a.val_subset is None else a.val_subset}",
                                       "train.progress=false"])
            cfg.name = f"{recipe.stem}_seed{seed}"
            t = time.perf_counter()
            res = run_recipe(cfg, overwrite=True, eval_teacher=(recipe == first_kd and seed == a.seeds[0]))
            print(f"{cfg.name}: top-1 {res.metrics['top1']:.2f}% ({time.perf_counter() - t:.0f} s)", flush=True)
    summaries = [json.loads((r / "summary.json").read_text()) for r in find_runs([a.out])]
    teacher = next((s["teacher_metrics"] for s in summaries if s.get("teacher_metrics")), None)
    scratch = [s["metrics"]["top1"] for s in summaries if s["method"] == "scratch"]
    lines = ["# Classic KD methods on CIFAR-10 at CPU scale", "",
             f"ResNet-56 (published weights, frozen) -> ResNet-20; {a.train_subset} training images (a fixed random "
             f"subset of the 50,000 JPEG training images), {a.epochs} epochs, SGD 0.05 with cosine decay, batch 64, "
             f"weight decay 5e-4, crop+flip; tested on "
             f"{'all 10,000' if a.val_subset is None else a.val_subset} JPEG test images; seeds "
             f"{sorted({s['seed'] for s in summaries})}. Method options are the shipped recipes' "
             "(recipes/kd/cifar10/).", ""]
    if teacher:
        lines += [f"Teacher ResNet-56 on this test set: top-1 {teacher['top1']:.2f}%.", ""]
    lines += [aggregate([a.out]), "| recipe | seed | top-1 (%) | vs scratch (points) | training time (s) |",
              "| --- | --- | --- | --- | --- |"]
    base = sum(scratch) / len(scratch) if scratch else float("nan")
    for s in sorted(summaries, key=lambda s: -s["metrics"]["top1"]):
        lines.append(f"| {s['name']} | {s['seed']} | {s['metrics']['top1']:.2f} | "
                     f"{s['metrics']['top1'] - base:+.2f} | {s['train_time_s']:.0f} |")
    only = f" --recipes {' '.join(a.recipes)}" if a.recipes else ""
    lines += ["", f"Produced by `python benchmarks/cifar10_methods.py --train-subset {a.train_subset} "
              f"--epochs {a.epochs} --seeds {' '.join(map(str, a.seeds))}{only}` on 2 CPU cores."]
    publish(lines, a.results)


if __name__ == "__main__":
    main()
