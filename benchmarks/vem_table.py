"""VEM's Table 4 at CPU scale, both tasks, and its lambda_MI sensitivity (Table 5): a trained GAN teacher compressed
into a 4x narrower student (1/16 of the MACs) by the baseline generator distillation alone and with each
mutual-information add-on (+ VID, + CRD, + VEM), beside the student trained alone the way its teacher was.

Tasks (recipes/vem/<task>/): `edges` = utkface_edges, edges -> face with pix2pix (the analogue of Edges -> Shoes),
scored by FID/KID, PSNR/SSIM against the real face and the gender accuracy of a face classifier on generated faces;
`faces` = utkface_faces, unconditional DCGAN faces (the analogue of SAGAN on CelebA), scored by FID/KID. FID's
features are those of the face classifier kdforge trains (recipes/vem/utkface_edges/face_classifier.yaml), not
Inception's: the numbers rank rows within this table and mean nothing beside the paper's.

Every row runs its recipe for one epoch of `--steps` steps (a fixed training subset), as its own process with one
thread, `--jobs` at a time. The teachers and the face classifier are trained once beforehand (`--prepare`, or
`kdforge train` on their recipes with `--set out_dir=<runs>`) and reused by every row.
    python benchmarks/vem_table.py --prepare                         # the face classifier and both teachers
    python benchmarks/vem_table.py [--tasks edges faces] [--steps 600 340] [--seeds 0 1 2] [--jobs 2]
        [--lambdas 0.05 0.2]
Writes results/vem_cpu.md. Needs ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _common import publish, run_logged, run_plan, set_args  # noqa: E402  (benchmarks/ is run as a script folder)

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # task -> (recipe folder, teacher recipe, batch size)
    "edges": ("utkface_edges", "pix2pix_teacher", 32),
    "faces": ("utkface_faces", "dcgan_teacher", 64),
}
ROWS = {  # row -> label
    "student_scratch": "student alone (its teacher's GAN training)",
    "baseline": "baseline distillation (OMGD-style)",
    "vid": "baseline + VID",
    "crd": "baseline + CRD",
    "vem": "baseline + VEM",
}
TEACHER_RUNS = {"edges": "vem_pix2pix_teacher", "faces": "vem_dcgan_teacher_faces"}  # the teacher recipes' names
CLASSIFIER = "recipes/vem/utkface_edges/face_classifier.yaml"
METRICS = {"edges": ["fid", "kid", "psnr", "ssim", "teacher_psnr", "downstream_top1"],
           "faces": ["fid", "kid", "teacher_psnr"]}
LABELS = {"fid": "FID ↓", "kid": "KID ×1e3 ↓", "psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑",
          "teacher_psnr": "PSNR to teacher (dB) ↑", "downstream_top1": "gender acc. on generated (%) ↑"}


def _weights(runs: Path, name: str) -> str:
    return str(runs / name / "checkpoints" / "last.pt")


def prepare(a: argparse.Namespace) -> None:
    """The face classifier (FID features, downstream score), then both teachers, as their recipes say."""
    recipes = [CLASSIFIER] + [f"recipes/vem/{TASKS[t][0]}/{TASKS[t][1]}.yaml" for t in a.tasks]
    for recipe in recipes:
        print(f"kdforge train {recipe} ...", flush=True)
        run_logged([sys.executable, "-m", "kdforge", "train", recipe,
              *set_args([f"out_dir={a.runs}", "train.progress=false"])], a.runs / f"{Path(recipe).stem}.log")


def row_command(a: argparse.Namespace, task: str, row: str, seed: int, steps: int,
                extra: tuple[str, ...] = (), tag: str = "") -> tuple[str, list[str]]:
    folder, teacher, batch = TASKS[task]
    recipe = f"recipes/vem/{folder}/{row}.yaml"
    name = f"{task}_{row}{tag}_seed{seed}"
    classifier = _weights(a.runs, "vem_face_classifier")
    sets = [f"name={name}", f"seed={seed}", f"out_dir={a.runs / 'table'}", "train.progress=false", "train.epochs=1",
            f"data.train_subset={steps * batch}", f"eval.features.weights={classifier}"]
    if task == "edges":
        sets.append(f"eval.classifier.weights={classifier}")
    verb = "train" if row == "student_scratch" else "distill"
    if verb == "distill":
        sets.append(f"teacher.weights={_weights(a.runs, TEACHER_RUNS[task])}")
    return name, [sys.executable, "-m", "kdforge", verb, recipe, *set_args([*sets, *extra]), "--overwrite"]


def teacher_metrics(a: argparse.Namespace, task: str) -> dict:
    """The teacher scored once with the rows' evaluator (it does not depend on a row's seed)."""
    path = a.runs / "table" / f"{task}_teacher.json"
    if not path.exists():
        folder, teacher, _ = TASKS[task]
        run = TEACHER_RUNS[task]
        classifier = _weights(a.runs, "vem_face_classifier")
        sets = [f"eval.features.weights={classifier}"] + ([f"eval.classifier.weights={classifier}"]
                                                          if task == "edges" else [])
        out = subprocess.run([sys.executable, "-m", "kdforge", "eval", _weights(a.runs, run), "--recipe",
                              f"recipes/vem/{folder}/{teacher}.yaml", *set_args(sets)],
                             cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out.stdout[out.stdout.index("{"):])
    return json.loads(path.read_text())


def summary_of(a: argparse.Namespace, name: str) -> dict:
    return json.loads((a.runs / "table" / name / "summary.json").read_text())


def _ms(vals: list[float], scale: float = 1.0, digits: int = 2) -> str:
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--steps", type=int, nargs="+", default=[600, 340], help="steps per run, one per task")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--lambdas", type=float, nargs="*", default=[0.05, 0.2],
                    help="extra lambda_MI values for the sensitivity table (edges task; the recipe's 0.1 is the "
                         "main table's VEM row)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    ap.add_argument("--runs", type=Path, default=ROOT / "benchmarks/runs/vem")
    ap.add_argument("--prepare", action="store_true", help="train the face classifier and the teachers, then stop")
    ap.add_argument("--results", default=str(ROOT / "results/vem_cpu.md"))
    a = ap.parse_args()
    a.runs = a.runs.resolve()
    (a.runs / "table").mkdir(parents=True, exist_ok=True)
    if a.prepare:
        prepare(a)
        return
    steps = dict(zip(a.tasks, a.steps if len(a.steps) == len(a.tasks) else a.steps * len(a.tasks)))
    plan = [row_command(a, t, r, s, steps[t]) for t in a.tasks for s in a.seeds for r in a.rows]
    if "edges" in a.tasks:
        plan += [row_command(a, "edges", "vem", s, steps["edges"], (f"method.mi_weight={lam}",), f"_lambda{lam}")
                 for lam in a.lambdas for s in a.seeds]
    compute = run_plan(plan, a.runs / "table", a.jobs)
    publish(report(a, steps, compute, len(plan)), a.results)


def report(a: argparse.Namespace, steps: dict[str, int], compute: float, n_runs: int) -> list[str]:
    lines = ["# VEM at CPU scale: Table 4 (both tasks) and the lambda_MI sensitivity (Table 5)", ""]
    for task in a.tasks:
        folder, teacher, batch = TASKS[task]
        names = METRICS[task]
        t_metrics = teacher_metrics(a, task)
        first = summary_of(a, f"{task}_baseline_seed{a.seeds[0]}")
        train = first["config"]["train"]
        head = ["row", "params", "MACs", *[LABELS[m] for m in names], "s / step"]
        lines += [f"## {task}: recipes/vem/{folder}/", "",
                  f"Budget: {steps[task]} steps of {batch} per run (one epoch of a fixed {steps[task] * batch}-sample "
                  f"training subset), Adam {train['lr']:g} {tuple(train['betas'])}, {train['schedule']}; seeds "
                  f"{a.seeds}; one thread per run. "
                  f"Scored on the {t_metrics.get('fid_samples', '?')} test samples; FID/KID features: "
                  f"`{t_metrics.get('fid_features', '?')}` (a kdforge-trained face classifier, not Inception).", "",
                  "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        tm = [f"{t_metrics[m] * (1e3 if m == 'kid' else 1.0):.2f}" if t_metrics.get(m) is not None else "-"
              for m in names]
        cost = first["cost"]["teacher"]
        lines.append(f"| teacher `{first['config']['teacher']['name']}` (one run) | {_fmt_count(cost['params'])} | "
                     f"{cost['macs'] / 1e6:.1f} M | " + " | ".join(tm) + " | - |")
        for row in a.rows:
            runs = [summary_of(a, f"{task}_{row}_seed{s}") for s in a.seeds]
            cols = [_ms([r["metrics"].get(m) for r in runs], 1e3 if m == "kid" else 1.0) for m in names]
            per_step = [r["train_time_s"] / steps[task] for r in runs]
            cost = first["cost"]["student"]  # the same student architecture in every row
            lines.append(f"| {ROWS[row]} | {_fmt_count(cost['params'])} | {cost['macs'] / 1e6:.2f} M | "
                         + " | ".join(cols) + f" | {_ms(per_step, digits=3)} |")
        lines += [""] + _claims(a, task) + [""]
    if "edges" in a.tasks and a.lambdas:
        lams = sorted([*a.lambdas, 0.1])
        lines += ["## lambda_MI sensitivity (edges task, + VEM; Table 5 analogue)", "",
                  "| lambda_MI | FID ↓ | PSNR (dB) ↑ | SSIM ↑ | gender acc. on generated (%) ↑ |",
                  "| --- | --- | --- | --- | --- |"]
        for lam in lams:
            tag = "" if lam == 0.1 else f"_lambda{lam}"
            runs = [summary_of(a, f"edges_vem{tag}_seed{s}") for s in a.seeds]
            lines.append(f"| {lam} | " + " | ".join(_ms([r["metrics"].get(m) for r in runs])
                                                     for m in ("fid", "psnr", "ssim", "downstream_top1")) + " |")
        lines += ["", "The paper (OMGD on Cityscapes, mIoU): 47.56 / 48.90 / 49.39 at lambda 0.05 / 0.1 / 0.2.", ""]
    lines += [f"Produced by `python benchmarks/vem_table.py --tasks {' '.join(a.tasks)} --steps "
              f"{' '.join(str(steps[t]) for t in a.tasks)} --seeds {' '.join(map(str, a.seeds))} --jobs {a.jobs}"
              + (f" --lambdas {' '.join(map(str, a.lambdas))}" if a.lambdas else "")
              + f"` on 2 CPU cores: {n_runs} runs, {compute / 60:.0f} min of process time in all (about "
              f"{compute / 60 / a.jobs:.0f} min of wall time at {a.jobs} at once); teachers, classifier not counted."]
    return lines


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.0f} k"


def _claims(a: argparse.Namespace, task: str) -> list[str]:
    """The paper's claim on this task, read plainly: + VEM improves the baseline's FID more than + VID and + CRD."""
    fid = {}
    for row in ("baseline", "vid", "crd", "vem"):
        if row in a.rows:
            fid[row] = statistics.fmean(summary_of(a, f"{task}_{row}_seed{s}")["metrics"]["fid"] for s in a.seeds)
    if len(fid) < 4:
        return []
    gain = {r: fid["baseline"] - fid[r] for r in ("vid", "crd", "vem")}  # > 0: better than the baseline
    holds = gain["vem"] > 0 and gain["vem"] > max(gain["vid"], gain["crd"])
    verdict = "holds" if holds else "does not hold"
    return [f"Claim (+ VEM improves the baseline's FID more than + VID and + CRD do): **{verdict}** here: FID "
            f"change vs the baseline {fid['baseline']:.2f}: + VID {-gain['vid']:+.2f}, + CRD "
            f"{-gain['crd']:+.2f}, + VEM {-gain['vem']:+.2f} (negative is better). The paper (Horse -> Zebra, "
            "OMGD): 57.14 baseline, 65.73 + VID, 70.59 + CRD, 50.83 + VEM."]


if __name__ == "__main__":
    main()
