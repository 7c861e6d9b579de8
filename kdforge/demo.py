"""`kdforge demo`: the main job on a built-in default, start to finish in about two minutes on 2 CPU cores.

Generated data (no download), a teacher trained from scratch, the student trained alone, then the
teacher distilled into the student with Hinton KD and with attention transfer; one table at the end.
Every step is an ordinary recipe run through `run_recipe`, so each leaves a full run folder.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from kdforge.config import load_config
from kdforge.recipe import run_recipe

# The embedded default recipe; the demo's runs differ from it only where noted below.
DEMO_RECIPE: dict[str, Any] = {
    # 16 px keeps a CPU demo near a minute; the generated classes still need a real network to separate
    "data": {"name": "synthetic", "synthetic_train": 6000, "synthetic_test": 2000, "synthetic_size": 16,
             "batch_size": 64, "eval_batch_size": 500, "crop_pad": 2, "flip": True},
    "student": {"name": "wide_resnet", "depth": 10, "widen_factor": 1},  # WRN-10-1, 0.08 M parameters
    "teacher": {"name": "resnet20"},  # 0.27 M parameters
    "train": {"epochs": 5, "lr": 0.05, "schedule": "cosine", "warmup_epochs": 0.2, "weight_decay": 5e-4},
}
TEACHER_EPOCHS = 8
QUICK = {"data": {"synthetic_train": 640, "synthetic_test": 256}, "train_epochs": 1, "teacher_epochs": 1}


def demo_config(base: dict[str, Any], name: str, out: Path, method: dict[str, Any], *, progress: bool,
                quick_data: dict[str, Any] | None = None, epochs: int | None = None,
                data: dict[str, Any] | None = None, **extra: Any) -> Any:
    """One demo step's RunConfig: `base` with the step's name, folder, method, data overrides and sections
    (`extra`: teacher, student, ...); `quick_data` shrinks the generated data for quick runs."""
    tree = copy.deepcopy(base)
    tree["data"].update(copy.deepcopy({**(data or {}), **(quick_data or {})}))
    tree.update({"name": name, "out_dir": str(out), "method": method, **extra})
    tree["train"] = {**tree["train"], "progress": progress, **({"epochs": epochs} if epochs else {})}
    return load_config(None, base=tree)


def _recipe(name: str, out: Path, method: dict[str, Any], epochs: int, quick: bool, progress: bool,
            **extra: Any) -> Any:
    return demo_config(DEMO_RECIPE, name, out, method, progress=progress, epochs=epochs,
                       quick_data=QUICK["data"] if quick else None, **extra)


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, progress: bool = True) -> str:
    out = Path(out)
    t_ep = QUICK["teacher_epochs"] if quick else TEACHER_EPOCHS
    s_ep = QUICK["train_epochs"] if quick else DEMO_RECIPE["train"]["epochs"]
    rows = []
    t0 = time.perf_counter()

    def step(label: str, cfg: Any) -> Any:
        start = time.perf_counter()
        print(f"[demo] {label} ...", flush=True)
        res = run_recipe(cfg, overwrite=True)  # KD runs score their teacher too, for the report
        n_params = sum(p.numel() for p in res.student.parameters())
        rows.append((label, cfg.student.name, n_params, res.metrics.get("top1", float("nan")),
                     time.perf_counter() - start))
        return res

    teacher_cfg = _recipe("teacher", out, {"name": "scratch"}, t_ep, quick, progress,
                          student=DEMO_RECIPE["teacher"], teacher=None)
    step("teacher (scratch)", teacher_cfg)
    teacher_weights = str(out / "teacher" / "checkpoints" / "last.pt")
    teacher = {**DEMO_RECIPE["teacher"], "weights": teacher_weights}
    step("student (scratch)", _recipe("student_scratch", out, {"name": "scratch"}, s_ep, quick, progress,
                                      teacher=None))
    kd = {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    step("student + Hinton KD", _recipe("student_kd", out, kd, s_ep, quick, progress, teacher=teacher))
    at = {"name": "at", "ce_weight": 1.0, "at_weight": 1000.0}
    step("student + AT", _recipe("student_at", out, at, s_ep, quick, progress, teacher=teacher))

    lines = ["| run | model | params | top-1 (%) | time (s) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r[0]} | {r[1]} | {r[2] / 1e6:.2f} M | {r[3]:.2f} | {r[4]:.0f} |" for r in rows]
    table = "\n".join(lines)
    size = DEMO_RECIPE["data"]["synthetic_size"]
    header = (f"# kdforge demo\n\nGenerated {size}x{size} data ({'quick' if quick else 'default'} size), "
              f"teacher {t_ep} epochs, students {s_ep} epochs, total {time.perf_counter() - t0:.0f} s.\n\n")
    (out / "report.md").write_text(header + table + "\n\nEach run's folder holds its own report.md.\n")
    print("\n" + table)
    print(f"\nrun folders and report: {out}/")
    return table
