"""MosaicKD's CIFAR-10 table at CPU scale: a pretrained CIFAR-10 teacher distilled into a smaller student without
the in-domain training data, from Tiny-ImageNet (near OOD) and from UTKFace faces (far OOD), by blind KD on the
OOD images, the Balanced transfer set, FitNet on OOD, the data-free DAFL and DFAD, and MosaicKD; plus the student
trained on in-domain data as the reference. Every row is a recipe in recipes/mosaic/cifar10/ with the same
number of student steps (each on `--batch` real images; MosaicKD's and the data-free methods' also on as many
synthetic ones), evaluated on the CIFAR-10 JPEG test set, over seeds.
    python benchmarks/mosaic_cifar10.py [--teacher resnet20] [--student wrn16_1] [--steps 600] [--batch 64]
        [--seeds 0 1 2] [--rows kd_tinyimagenet mosaic_tinyimagenet ...]
Writes results/mosaic_cifar10_cpu.md when every default row runs. Needs ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from _common import machine, publish, set_args  # noqa: E402  (benchmarks/ is run as a script folder)

from kdforge.config import load_config
from kdforge.recipe import run_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes/mosaic/cifar10"
# teacher -> (its model, its weights): the published ResNets in ../shared/data, or a kdforge-trained WRN-40-2
# (`kdforge train recipes/train/cifar10/wrn40_2.yaml`; give its checkpoint with --teacher-weights)
TEACHERS = {"resnet20": ("{name: resnet20}", "${KDFORGE_SHARED_DATA}/cifar10-resnets/resnet20-12fca82f.th"),
            "resnet56": ("{name: resnet56}", "${KDFORGE_SHARED_DATA}/cifar10-resnets/resnet56-4bfd9763.th"),
            "wrn40_2": ("{name: wide_resnet, depth: 40, widen_factor: 2}", None)}
STUDENTS = {"wrn16_1": "{name: wide_resnet, depth: 16, widen_factor: 1}",
            "wrn16_2": "{name: wide_resnet, depth: 16, widen_factor: 2}", "resnet20": "resnet20"}
POOL = 10000  # OOD images per pool: Tiny-ImageNet val has 10,000; UTKFace keeps its 10,000 highest-entropy faces
# row -> (recipe file, label); the in-domain reference is built from the KD recipe with the CIFAR-10 train split
ROWS = {
    "in_domain": ("kd_resnet20_from_resnet56_tinyimagenet.yaml", "student alone, in-domain data (reference)"),
    "kd_tinyimagenet": ("kd_resnet20_from_resnet56_tinyimagenet.yaml", "KD on OOD, Tiny-ImageNet"),
    "balanced_tinyimagenet": ("balanced_resnet20_from_resnet56_tinyimagenet.yaml", "Balanced, Tiny-ImageNet"),
    "fitnet_tinyimagenet": ("fitnet_resnet20_from_resnet56_tinyimagenet.yaml", "FitNet on OOD, Tiny-ImageNet"),
    "mosaic_tinyimagenet": ("resnet20_from_resnet56_tinyimagenet.yaml", "MosaicKD, Tiny-ImageNet"),
    "kd_utkface": ("kd_resnet20_from_resnet56_utkface.yaml", "KD on OOD, UTKFace"),
    "balanced_utkface": ("balanced_resnet20_from_resnet56_utkface.yaml", "Balanced, UTKFace"),
    "fitnet_utkface": ("fitnet_resnet20_from_resnet56_utkface.yaml", "FitNet on OOD, UTKFace"),
    "mosaic_utkface": ("resnet20_from_resnet56_utkface.yaml", "MosaicKD, UTKFace"),
    "dafl": ("dafl_resnet20_from_resnet56.yaml", "DAFL (data-free)"),
    "dfad": ("dfad_resnet20_from_resnet56.yaml", "DFAD (data-free)"),
}


def _ms(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.2f}"


def pair_options(doc: str | None, steps: int) -> argparse.ArgumentParser:
    """The options every MosaicKD table takes: the pair, the budget in student steps, the seeds."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="resnet20", choices=sorted(TEACHERS))
    ap.add_argument("--teacher-weights", default=None,
                    help="the teacher's checkpoint (a kdforge run's checkpoints/last.pt); default: the published "
                         "weights of a ResNet teacher")
    ap.add_argument("--student", default="wrn16_1", choices=sorted(STUDENTS))
    ap.add_argument("--steps", type=int, default=steps, help="student steps per run (rounded up to whole epochs)")
    ap.add_argument("--batch", type=int, default=64, help="real images per student step")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every run, after the table's own (e.g. train.precision=bf16 on a GPU)")
    return ap


def teacher_spec(a: argparse.Namespace) -> str:
    """The teacher as a recipe mapping: its model and weights (--teacher-weights, else the published file)."""
    model, published = TEACHERS[a.teacher]
    weights = a.teacher_weights or published
    if weights is None:
        raise SystemExit(f"--teacher {a.teacher} has no published weights here: train it with kdforge train and "
                         "give its checkpoint with --teacher-weights")
    return model[:-1] + f", weights: '{weights}'}}"


def row_config(row: str, a: argparse.Namespace, seed: int, extra: tuple[str, ...] = ()):
    """The row's recipe, sized to `a.steps` student steps of `a.batch` real images, with the chosen pair;
    `extra` are more --set overrides (the ablations')."""
    path = RECIPES / ROWS[row][0]
    cfg = load_config(path)
    k = int(cfg.method.kwargs.get("student_steps", 1)) if cfg.method.name == "mosaic" else 1
    sets = [f"seed={seed}", f"out_dir={a.out}", "train.progress=false", f"student={STUDENTS[a.student]}",
            f"teacher={teacher_spec(a)}",
            f"data.batch_size={a.batch * k}", "train.eval_every=1000"]
    if row == "in_domain":  # the same steps on a same-sized subset of the CIFAR-10 training set, with its labels
        sets += ["data.train_name=null", "data.train_source=null", "data.train_split=train", "data.train_options={}",
                 f"data.train_subset={POOL}", "method={name: scratch}"]
        per_epoch = POOL // a.batch
    elif cfg.method.name in ("dafl", "dfad"):  # one data-free epoch; DFAD makes student_steps student steps a step
        per_step = int(cfg.method.kwargs.get("student_steps", 5)) if cfg.method.name == "dfad" else 1
        per_epoch = math.ceil(a.steps / per_step) * per_step
        sets += [f"data.data_free_steps={per_epoch // per_step}"]
    else:
        per_epoch = (POOL if not cfg.data.train_select or cfg.data.train_select.get("rule") == "entropy"
                     else 10 * cfg.data.train_select["per_class"]) // (a.batch * k)
        per_epoch *= k
    two_stage = cfg.method.name == "fitnet" and cfg.method.kwargs.get("two_stage", True)  # a hint epoch, a KD one
    sets.append(f"train.epochs={max(2 if two_stage else 1, math.ceil(a.steps / per_epoch))}")
    cfg = load_config(path, [*sets, *extra, *a.sets])
    cfg.name = f"{row}_seed{seed}"
    return cfg


def main() -> None:
    ap = pair_options(__doc__, steps=600)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--out", default="runs/mosaic_cifar10")
    ap.add_argument("--results", default=None, help="default: results/mosaic_cifar10_cpu.md when every row runs")
    a = ap.parse_args()
    if a.results is None and set(ROWS) <= set(a.rows):
        a.results = str(ROOT / "results/mosaic_cifar10_cpu.md")
    top1: dict[str, list[float]] = {r: [] for r in a.rows}
    times: dict[str, list[float]] = {r: [] for r in a.rows}
    teacher_top1 = None
    for seed in a.seeds:
        for row in a.rows:
            cfg = row_config(row, a, seed)
            t = time.perf_counter()
            res = run_recipe(cfg, overwrite=True, eval_teacher=teacher_top1 is None and row != "in_domain")
            times[row].append(time.perf_counter() - t)
            top1[row].append(res.metrics["top1"])
            if teacher_top1 is None and row != "in_domain":
                summary = json.loads((Path(a.out) / cfg.name / "summary.json").read_text())
                teacher_top1 = (summary.get("teacher_metrics") or {}).get("top1")
            print(f"{cfg.name}: top-1 {top1[row][-1]:.2f} ({times[row][-1]:.0f} s, {cfg.train.epochs} epochs)",
                  flush=True)
    mean = {r: statistics.fmean(v) for r, v in top1.items() if v}
    lines = ["# MosaicKD on CIFAR-10 at CPU scale", "",
             f"Budget: teacher {a.teacher} ({a.teacher_weights or 'the pretrained weights in ../shared/data'}, "
             f"{teacher_top1 if teacher_top1 is None else f'{teacher_top1:.2f}'} % on the CIFAR-10 JPEG test set), "
             f"student {a.student} from random weights; about {a.steps} student steps of {a.batch} real images "
             f"each (whole epochs over a {POOL}-image pool; MosaicKD, DAFL and DFAD add {a.batch} synthetic images a "
             "step), SGD 0.1 cosine; the recipes' weights otherwise. OOD pools at 32 px: the 10,000 Tiny-ImageNet "
             "val images (near OOD) and the 10,000 UTKFace faces the teacher is least sure of (far OOD, appendix "
             f"Algorithm 1). Tested on the 10,000 CIFAR-10 JPEG test images; seeds {a.seeds}. The paper runs 200 "
             "epochs of 50,000 OOD images (196k student steps of 256 + 256 images).", "",
             "| method | top-1 (%) | time per run (s) |", "| --- | --- | --- |"]
    for r in a.rows:
        lines.append(f"| {ROWS[r][1]} | {_ms(top1[r])} | {statistics.fmean(times[r]):.0f} |")
    lines += ["", "## The paper's claims at this budget", ""]
    for ood in ("tinyimagenet", "utkface"):
        if {f"kd_{ood}", f"mosaic_{ood}"} <= set(mean):
            gap = mean[f"mosaic_{ood}"] - mean[f"kd_{ood}"]
            lines.append(f"- MosaicKD beats KD on the same OOD data ({ood}): "
                         f"{'holds' if gap > 0 else 'does not hold'} ({mean[f'mosaic_{ood}']:.2f} vs "
                         f"{mean[f'kd_{ood}']:.2f}, {gap:+.2f} points).")
    if {"kd_tinyimagenet", "mosaic_tinyimagenet", "kd_utkface", "mosaic_utkface"} <= set(mean):
        near = mean["mosaic_tinyimagenet"] - mean["kd_tinyimagenet"]
        far = mean["mosaic_utkface"] - mean["kd_utkface"]
        lines.append(f"- ... and by more on far OOD: {'holds' if far > near else 'does not hold'} (gain {far:+.2f} "
                     f"on UTKFace vs {near:+.2f} on Tiny-ImageNet).")
    weights = f" --teacher-weights {a.teacher_weights}" if a.teacher_weights else ""
    lines += ["", f"Produced by `python benchmarks/mosaic_cifar10.py --teacher {a.teacher}{weights} "
              f"--student {a.student} --steps {a.steps} --batch {a.batch} --seeds {' '.join(map(str, a.seeds))}"
              f"{''.join(' ' + arg for arg in set_args(a.sets))}` on {machine()}."]
    publish(lines, a.results)


if __name__ == "__main__":
    main()
