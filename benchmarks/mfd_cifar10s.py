"""The MFD paper's CIFAR-10S table at CPU scale: every row's recipe in recipes/mfd/cifar10s/ (the paper's model,
optimiser and lambda / T), on a fixed subset of the skew-0.8 training set for a few epochs, over seeds; each seed
trains its own biased teacher (same CNN, on the skewed data, as in the paper) and distils it into every student.
Reports accuracy, DEO_A and DEO_M (mean ± std over seeds) on the full CIFAR-10S test set (every test image in
colour and in grey, 20,000) and reads the paper's three claims off the numbers.
    python benchmarks/mfd_cifar10s.py [--train-subset 10000] [--epochs 3] [--seeds 0 1 2] [--methods mfd hkd ...]
Writes results/mfd_cifar10s_cpu.md when every method runs. Needs ../shared/data/cifar10-jpeg.tar.gz.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import publish  # noqa: E402  (benchmarks/ is run as a script folder)

from kdforge.config import load_config
from kdforge.recipe import run_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes/mfd/cifar10s"
ROWS = ["teacher", "hkd", "fitnet", "at", "nst", "ss", "ad", "ss_hkd", "ss_fitnet", "ad_hkd", "mfd", "mfd_k", "mfd_f"]
LABELS = {"teacher": "Teacher (scratch)", "hkd": "HKD", "fitnet": "FitNet", "at": "AT", "nst": "NST", "ss": "SS",
          "ad": "AD", "ss_hkd": "SS+HKD", "ss_fitnet": "SS+FitNet", "ad_hkd": "AD+HKD", "mfd": "MFD",
          "mfd_k": "MFD-K", "mfd_f": "MFD-F"}
DEFAULT = [m for m in ROWS if m != "ss_fitnet"]  # the twelve rows; SS+FitNet on request
PAPER = {"teacher": (79.62, 15.63, 31.32), "mfd": (82.77, 2.73, 6.08)}  # (acc, DEO_A, DEO_M), Table 1


def _ms(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=DEFAULT, choices=ROWS)
    ap.add_argument("--out", default="runs/mfd_cifar10s")
    ap.add_argument("--results", default=None, help="default: results/mfd_cifar10s_cpu.md when every method runs")
    a = ap.parse_args()
    if a.results is None and set(DEFAULT) <= set(a.methods):
        a.results = str(ROOT / "results/mfd_cifar10s_cpu.md")
    common = [f"out_dir={a.out}", f"train.epochs={a.epochs}", f"train.eval_every={a.epochs}",
              f"data.train_subset={a.train_subset}", "train.progress=false"]
    metrics: dict[str, list[dict]] = {m: [] for m in a.methods}
    times: dict[str, list[float]] = {m: [] for m in a.methods}
    for seed in a.seeds:
        teacher_ckpt = Path(a.out) / f"teacher_seed{seed}" / "checkpoints" / "last.pt"
        for m in ["teacher", *[x for x in a.methods if x != "teacher"]]:
            extra = [] if m == "teacher" or load_config(RECIPES / f"{m}.yaml").teacher is None else \
                [f"teacher.weights={teacher_ckpt}"]
            cfg = load_config(RECIPES / f"{m}.yaml", [f"seed={seed}", *common, *extra])
            cfg.name = f"{m}_seed{seed}"
            if m == "teacher" and teacher_ckpt.exists():  # trained by an earlier call with the same budget
                res_metrics = json.loads((teacher_ckpt.parents[1] / "summary.json").read_text())["metrics"]
            else:
                t = time.perf_counter()
                res = run_recipe(cfg, overwrite=True, eval_teacher=False)
                res_metrics = res.metrics
                times.setdefault(m, []).append(time.perf_counter() - t)
                print(f"{cfg.name}: top-1 {res_metrics['top1']:.2f}, DEO_A {res_metrics['deo_a']:.2f}, "
                      f"DEO_M {res_metrics['deo_m']:.2f} ({times[m][-1]:.0f} s)", flush=True)
            if m in metrics:
                metrics[m].append(res_metrics)
    col = {k: {m: [r[k] for r in rs] for m, rs in metrics.items()} for k in ("top1", "deo_a", "deo_m")}
    mean = {k: {m: statistics.fmean(v) if v else float("nan") for m, v in c.items()} for k, c in col.items()}
    lines = ["# MFD on CIFAR-10S at CPU scale", "",
             f"Budget: {a.train_subset} training images (a fixed random subset of CIFAR-10S skew 0.8, itself made from "
             f"the 50,000 CIFAR-10 JPEG training images), {a.epochs} epochs, batch 128, Adam 1e-3 (the plateau "
             f"schedule never fires in {a.epochs} epochs), no augmentation but flips, the paper's 6-conv CNN for "
             f"teacher and students; tested on all 20,000 CIFAR-10S test images; seeds {a.seeds}, each with its "
             "own teacher. Method options are recipes/mfd/cifar10s/ (supplement Table 1's lambda / T). The paper "
             "trains 50 epochs on all 50,000 images.", "",
             "| method | top-1 (%) | DEO_A (%) | DEO_M (%) | paper (acc / DEO_A / DEO_M) | time per run (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m in a.methods:
        paper = " / ".join(f"{v:.2f}" for v in PAPER[m]) if m in PAPER else "-"
        t = f"{statistics.fmean(times[m]):.0f}" if times.get(m) else "-"
        lines.append(f"| {LABELS[m]} | {_ms(col['top1'][m])} | {_ms(col['deo_a'][m])} | {_ms(col['deo_m'][m])} | "
                     f"{paper} | {t} |")
    lines += ["", "## The paper's claims at this budget", ""]
    acc, deo = mean["top1"], mean["deo_m"]

    def verdict(ok: bool) -> str:
        return "holds" if ok else "does not hold"

    if {"teacher", "mfd"} <= set(a.methods):
        ok = acc["mfd"] >= acc["teacher"] and deo["mfd"] <= deo["teacher"] / 2
        lines.append(f"1. MFD at least as accurate as the teacher and DEO_M at most half the teacher's: "
                     f"{verdict(ok)} (top-1 {acc['mfd']:.2f} vs {acc['teacher']:.2f}; DEO_M {deo['mfd']:.2f} vs "
                     f"{deo['teacher']:.2f}).")
    for m in ("hkd", "fitnet"):
        if {"teacher", m} <= set(a.methods):
            ok = acc[m] > acc["teacher"] and deo[m] >= deo["teacher"] - 1.0
            lines.append(f"2. {LABELS[m]} raises accuracy but not fairness: {verdict(ok)} (top-1 {acc[m]:.2f} vs "
                         f"{acc['teacher']:.2f}; DEO_M {deo[m]:.2f} vs {deo['teacher']:.2f}).")
    if {"mfd", "mfd_k", "mfd_f"} <= set(a.methods):
        ok_k, ok_f = deo["mfd"] < deo["mfd_k"], acc["mfd"] > acc["mfd_f"]
        lines.append(f"3. MFD fairer than MFD-K: {verdict(ok_k)} (DEO_M {deo['mfd']:.2f} vs {deo['mfd_k']:.2f}); "
                     f"more accurate than MFD-F: {verdict(ok_f)} (top-1 {acc['mfd']:.2f} vs {acc['mfd_f']:.2f}).")
    lines += ["", f"Produced by `python benchmarks/mfd_cifar10s.py --train-subset {a.train_subset} --epochs {a.epochs} "
              f"--seeds {' '.join(map(str, a.seeds))}` on 2 CPU cores."]
    publish(lines, a.results)


if __name__ == "__main__":
    main()
