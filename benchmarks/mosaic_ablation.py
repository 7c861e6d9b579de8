"""MosaicKD's appendix ablations at CPU scale, on the pair and budget of benchmarks/mosaic_cifar10.py:
C.1, the patch discriminator's final stride 1-4 (a larger stride, less overlap between judged patches), and
C.2, the generator's regularisation: none (no discriminator, local_weight 0), a full-image discriminator, and the
patch discriminator (MosaicKD itself, stride 1). OOD data: Tiny-ImageNet (near OOD), as the paper's CIFAR rows.
    python benchmarks/mosaic_ablation.py [--steps 150] [--seeds 0 1 2] [--rows stride1 stride2 ...]
Writes results/mosaic_ablation_cpu.md and, for C.2, seed 0's last synthetic grid of each regularisation beside
it (results/mosaic_ablation_<row>.png), when every row runs. Needs ../shared/data.
"""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from _common import machine, publish, set_args  # noqa: E402  (benchmarks/ is run as a script folder)
from mosaic_cifar10 import ROOT, _ms, pair_options, row_config

from kdforge.recipe import run_recipe

# row -> (--set overrides on MosaicKD's Tiny-ImageNet recipe, label)
ROWS = {
    "stride1": ((), "patch D, final stride 1 (MosaicKD's default)"),
    "stride2": (("method.discriminator_options={final_stride: 2}",), "patch D, final stride 2"),
    "stride3": (("method.discriminator_options={final_stride: 3}",), "patch D, final stride 3"),
    "stride4": (("method.discriminator_options={final_stride: 4}",), "patch D, final stride 4"),
    "no_reg": (("method.local_weight=0",), "no regularisation (no discriminator)"),
    "image_d": (("method.discriminator=image_discriminator",), "full-image discriminator"),
}
PAPER_C1 = "61.01 / 59.56 / 42.35 / 46.07"  # appendix Table 4, CIFAR-100, WRN-40-2 -> WRN-16-1, strides 1-4


def main() -> None:
    ap = pair_options(__doc__, steps=150)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--out", default="runs/mosaic_ablation")
    ap.add_argument("--results", default=None, help="default: results/mosaic_ablation_cpu.md when every row runs")
    a = ap.parse_args()
    if a.results is None and set(ROWS) <= set(a.rows):
        a.results = str(ROOT / "results/mosaic_ablation_cpu.md")
    top1: dict[str, list[float]] = {r: [] for r in a.rows}
    times: dict[str, list[float]] = {r: [] for r in a.rows}
    epochs = None
    for seed in a.seeds:
        for row in a.rows:
            cfg = row_config("mosaic_tinyimagenet", a, seed, extra=ROWS[row][0])
            cfg.name = f"{row}_seed{seed}"
            epochs = cfg.train.epochs
            t = time.perf_counter()
            res = run_recipe(cfg, overwrite=True, eval_teacher=False)
            times[row].append(time.perf_counter() - t)
            top1[row].append(res.metrics["top1"])
            print(f"{cfg.name}: top-1 {top1[row][-1]:.2f} ({times[row][-1]:.0f} s)", flush=True)
    lines = ["# MosaicKD's appendix ablations at CPU scale", "",
             f"Budget: teacher {a.teacher} (pretrained CIFAR-10 weights), student {a.student} from random weights, "
             f"MosaicKD's Tiny-ImageNet recipe (recipes/mosaic/cifar10/resnet20_from_resnet56_tinyimagenet.yaml "
             f"with the pair swapped), {epochs} epoch(s) over the 10,000 Tiny-ImageNet val images at 32 px (about "
             f"{a.steps} student steps of {a.batch} real + {a.batch} synthetic images); tested on the 10,000 "
             f"CIFAR-10 JPEG test images; seeds {a.seeds}. Only the discriminator changes between rows.", "",
             "| generator regularisation | top-1 (%) | time per run (s) |", "| --- | --- | --- |"]
    for r in a.rows:
        lines.append(f"| {ROWS[r][1]} | {_ms(top1[r])} | {statistics.fmean(times[r]):.0f} |")
    mean = {r: statistics.fmean(v) for r, v in top1.items() if v}
    lines += ["", "## The paper's claims at this budget", ""]
    strides = [f"stride{i}" for i in range(1, 5)]
    if set(strides) <= set(mean):
        best = max(strides, key=mean.get)
        lines.append(f"- C.1, a larger final stride does not help (paper, CIFAR-100 WRN-40-2 -> WRN-16-1: "
                     f"{PAPER_C1}): {'holds' if best == 'stride1' else 'does not hold'} (best: {ROWS[best][1]}; "
                     + " / ".join(f"{mean[s]:.2f}" for s in strides) + ").")
    if {"stride1", "no_reg", "image_d"} <= set(mean):
        ok = mean["stride1"] > max(mean["no_reg"], mean["image_d"])
        lines.append(f"- C.2, patch regularisation beats none and a full-image discriminator (the paper shows "
                     f"samples only): {'holds' if ok else 'does not hold'} ({mean['stride1']:.2f} vs "
                     f"{mean['no_reg']:.2f} and {mean['image_d']:.2f}).")
    if a.results:
        for row in ("no_reg", "image_d", "stride1"):
            grids = sorted((Path(a.out) / f"{row}_seed{a.seeds[0]}" / "samples").glob("synthetic_epoch*.png"))
            if grids:
                shutil.copyfile(grids[-1], ROOT / f"results/mosaic_ablation_{row}.png")
        lines += ["", "Seed 0's synthetic images after the last epoch, as the appendix's Figure 1: "
                  "[none](mosaic_ablation_no_reg.png), [full image](mosaic_ablation_image_d.png), "
                  "[patch](mosaic_ablation_stride1.png)."]
    lines += ["", f"Produced by `python benchmarks/mosaic_ablation.py --teacher {a.teacher} --student {a.student} "
              f"--steps {a.steps} --batch {a.batch} --seeds {' '.join(map(str, a.seeds))}"
              f"{''.join(' ' + arg for arg in set_args(a.sets))}` on {machine()}."]
    publish(lines, a.results)


if __name__ == "__main__":
    main()
