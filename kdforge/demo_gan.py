"""`kdforge demo gan`: VEM's story (GAN-generator compression) on generated data in about two minutes on 2 CPU cores.

The task is pix2pix's edges -> image on generated shapes (`synthetic_edges`: the input is the edge map of a
striped, coloured shape on a cluttered background, the target the image itself), the toy-scale twin of the
UTKFace edges -> face recipes in recipes/vem/utkface_edges/. A pix2pix U-Net teacher is trained first; then the
same U-Net at a quarter of its width (1/12 of its MACs) is trained three ways for the same number of steps:
alone with pix2pix's loss, distilled with the OMGD-style baseline (`gan_kd`: L1 and SSIM to the teacher's image,
total variation, adapter-matched features of two layers), and with VEM (Kang et al. 2022: the same baseline plus
a variational energy-based bound on the mutual information between the student's image and the real target,
its energy model sampled by 10-step Langevin chains); the baseline runs once more with another seed, the one
yardstick for noise the demo affords.

Departures from the real recipes, each measured at this size: the teacher is ngf 16, not 32 (in the same time,
8 epochs of ngf 16 reached FID 3.5 and 4 of ngf 32 FID 7.3); Adam's lr is 1e-3, not pix2pix's 2e-4, which is
tuned for thousands of steps (ngf 32, 3 epochs: FID 9.9 at 2e-4, 7.4 at 1e-3); the baseline has no perceptual
or style term (the real recipes take them from a frozen ResNet-20; the only network here is the FID network,
and a training loss must not optimise the score's own features), and an L1 term to the teacher's image stands
in for them (without it the distilled student trailed the one trained alone: FID 10.5 against 10.0, teacher_psnr
15.7 dB; with l1 10: FID 5.2, teacher_psnr 19.4 dB).

FID needs a feature network and none is downloaded: a WRN-10-1 is trained first on the train split's targets
(the plain `synthetic` dataset with the same sizes and seed gives exactly those images) and its pooled
penultimate features score every generator against the test targets, which it never saw. These FIDs are not the
Inception FIDs of the literature and only compare runs of this demo. PSNR and SSIM are against the real target
(whose random background no generator can know, hence the low values); teacher_psnr is the student's fidelity to
its teacher (distilled runs only). The report ends with what VEM costs per training step and a reading of the
numbers against the baseline's seed-to-seed spread.

Measured at the default size: teacher FID 3.53; student alone 9.96; baseline 5.15 (seed 1: 5.52); VEM 4.96,
PSNR -0.03 dB against the baseline, at 4.2x its time per step (178 ms against 43 ms). VEM's -0.19 FID is half
the baseline's own 0.37 between two seeds: at this size the demo shows what VEM costs, not a gain. The whole
demo took 133 s (128 s of CPU) with torch on one thread, on 2 cores shared with other jobs (load 5-6); with
torch's default two threads the same busy cores took 2-30x longer per step (its threads wait on each other; the
quick demo: 112 s against 7 s), so on busy cores run it with OMP_NUM_THREADS=1.
Every step is an ordinary recipe run through `run_recipe`, so each leaves a full run folder with its report
(the generators' samples per epoch in its samples/); the generated pairs are prepared once into <out>/data.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from kdforge.demo import demo_config
from kdforge.models.cost import count_macs
from kdforge.recipe import run_recipe

SIZE = 32  # unet_generator's smallest size: 5 levels down to 1 x 1
DATA: dict[str, Any] = {  # the utkface_edges recipes' data section, on generated pairs
    "name": "synthetic_edges", "options": {"n_train": 2000, "n_test": 500, "size": SIZE},
    "batch_size": 32, "eval_batch_size": 250, "crop_pad": 0, "flip": True,
    "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],  # generators work in [-1, 1] (tanh)
}
TEACHER = {"name": "unet_generator", "img_size": SIZE, "ngf": 16}
STUDENT = {**TEACHER, "width": 0.25}  # ngf 4, as the real recipes' student is a quarter of their teacher
ADAM = {"optimizer": "adam", "lr": 1e-3, "betas": [0.5, 0.999], "weight_decay": 0.0}  # pix2pix's, at a demo's lr
TEACHER_RUN = {"epochs": 8, "batch_size": 16}  # the real teacher recipe's batch: twice the updates of batch 32
STUDENT_EPOCHS = 3
FEATURES = {"name": "wide_resnet", "depth": 10, "widen_factor": 1}  # WRN-10-1: the FID network
FEATURE_EPOCHS = 4
PIX2PIX = {"name": "pix2pix", "l1_weight": 100.0, "gan_weight": 1.0, "gan_loss": "vanilla",
           "discriminator_options": {"ndf": 16}}
BASELINE = {"name": "gan_kd", "l1_weight": 10.0, "ssim_weight": 10.0, "tv_weight": 1e-5, "feature_weight": 10.0,
            "student_layers": ["down.2", "up.1"], "teacher_layers": ["down.2", "up.1"]}
VEM = {**BASELINE, "name": "vem", "mi_weight": 0.1, "langevin_steps": 10, "langevin_step_size": 100.0,
       "langevin_noise": 0.005, "energy_options": {"nef": 8}, "energy_lr": 1e-4}  # the real vem recipe's
STUDENTS = {  # label -> (run name, method): the same student, data and steps for all
    "student alone (pix2pix)": ("student_scratch", PIX2PIX),
    "student + baseline (gan_kd)": ("student_gan_kd", BASELINE),
    "student + VEM": ("student_vem", VEM),
    # the yardstick for every difference above: how far the baseline moves with nothing changed but the seed
    "student + baseline, seed 1": ("student_gan_kd_seed1", BASELINE),
}
QUICK = {"n_train": 256, "n_test": 64, "epochs": 1}


def _data(out: Path, quick: bool) -> dict[str, Any]:
    """The pairs' data section: generated into <out>/data (not the shared cache), the quick sizes when quick."""
    data = copy.deepcopy(DATA)
    data["root"] = str(out / "data")
    if quick:
        data["options"].update(n_train=QUICK["n_train"], n_test=QUICK["n_test"])
    return data


def _feature_recipe(out: Path, quick: bool, progress: bool) -> Any:
    """The FID network's run: the shapes of the pairs' train split (same sizes, seed 0), labelled by class."""
    sizes = _data(out, quick)["options"]
    base = {"data": {"name": "synthetic", "synthetic_train": sizes["n_train"], "synthetic_test": sizes["n_test"],
                     "synthetic_size": SIZE, "options": {"group_bias": 0.5},  # synthetic_edges' default
                     "batch_size": 64, "eval_batch_size": 500, "crop_pad": 2, "flip": True},
            "student": FEATURES,
            "train": {"epochs": FEATURE_EPOCHS, "lr": 0.05, "schedule": "cosine", "warmup_epochs": 0.2,
                      "weight_decay": 5e-4}}
    return demo_config(base, "features", out, {"name": "scratch"}, progress=progress,
                       epochs=QUICK["epochs"] if quick else None)


def _gan_recipe(name: str, out: Path, method: dict[str, Any], quick: bool, progress: bool, *, epochs: int,
                batch_size: int | None = None, **extra: Any) -> Any:
    data = _data(out, quick)
    if batch_size:
        data["batch_size"] = batch_size
    features = {"name": FEATURES["name"], "kwargs": {k: v for k, v in FEATURES.items() if k != "name"},
                "weights": str(out / "features" / "checkpoints" / "last.pt")}  # layer auto:in, the pooled features
    base = {"data": data, "student": STUDENT, "train": {"epochs": epochs, "schedule": "cosine", **ADAM},
            "eval": {"name": "generation", "features": features,
                     "kid_subset_size": min(500, data["options"]["n_test"])}}
    return demo_config(base, name, out, method, progress=progress, epochs=QUICK["epochs"] if quick else None,
                       **extra)


def seconds_per_step(res: Any) -> float:
    """A run's training time (the epochs' epoch_time_s, evaluation excluded) over the steps it took."""
    steps = res.history[-1]["step"] if res.history else 0
    return sum(h.get("epoch_time_s", 0.0) for h in res.history) / max(1, steps)


def _cost(generator: torch.nn.Module) -> tuple[int, int]:
    """(parameters, MACs of one image) of a generator, counted by torch; eval mode, as BatchNorm cannot
    normalise the U-Net's 1 x 1 innermost level over a batch of one."""
    generator.eval()
    return sum(p.numel() for p in generator.parameters()), count_macs(generator, torch.zeros(1, 3, SIZE, SIZE))


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "—"


def _reading(metrics: dict[str, dict[str, Any]]) -> str:
    """What this run's numbers say, in words: the comparisons the story is about, against the one yardstick for
    noise the demo has (the baseline's two seeds), and nothing more."""
    alone, base, vem, base_again = (metrics[k] for k in STUDENTS)
    spread = abs(base_again["fid"] - base["fid"])
    gain = alone["fid"] - base["fid"]
    kd = "improved on" if gain > spread else "trailed" if -gain > spread else "was within the seed spread of"
    moved = vem["fid"] - base["fid"]
    if moved >= 0 or abs(moved) <= spread:
        verdict = "no evidence here that VEM helps at this size"
    else:
        verdict = "a lead larger than that spread, from one seed of each: suggestive at most"
    return (f"Reading (this run): the distilled baseline {kd} the student trained alone (FID {alone['fid']:.2f} -> "
            f"{base['fid']:.2f}); VEM's term moved the baseline's FID by {moved:+.2f} and its PSNR by "
            f"{vem['psnr'] - base['psnr']:+.2f} dB, while the baseline itself moved by {spread:.2f} FID from one "
            f"seed to another: {verdict}.")


def run_gan_demo(out: str | Path = "runs/demo/gan", *, quick: bool = False, progress: bool = True) -> str:
    out = Path(out)
    t0 = time.perf_counter()
    rows, results = [], {}

    def step(label: str, cfg: Any) -> Any:
        print(f"[demo gan] {label} ...", flush=True)
        t = time.perf_counter()
        res = run_recipe(cfg, overwrite=True, eval_teacher=False)
        results[label] = res
        if cfg.eval.name == "generation":
            params, macs = _cost(res.student)
            m = res.metrics
            rows.append((label, params, macs, m.get("fid"), m.get("psnr"), m.get("ssim"), m.get("teacher_psnr"),
                         time.perf_counter() - t))
        return res

    features = step("FID network", _feature_recipe(out, quick, progress))
    step("teacher (pix2pix)", _gan_recipe("teacher", out, PIX2PIX, quick, progress, student=TEACHER,
                                          **TEACHER_RUN))
    teacher = {**TEACHER, "weights": str(out / "teacher" / "checkpoints" / "last.pt")}
    for label, (name, method) in STUDENTS.items():
        extra = {} if method is PIX2PIX else {"teacher": teacher}  # pix2pix trains alone
        if name.endswith("_seed1"):
            extra["seed"] = 1
        step(label, _gan_recipe(name, out, method, quick, progress, epochs=STUDENT_EPOCHS, **extra))

    lines = ["| run | params | MACs / image | FID | PSNR vs target (dB) | SSIM | teacher_psnr (dB) | time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r[0]} | {r[1] / 1e6:.3f} M | {r[2] / 1e6:.2f} M | {_num(r[3], '.2f')} | {_num(r[4], '.2f')} | "
              f"{_num(r[5], '.3f')} | {_num(r[6], '.2f')} | {r[7]:.0f} |" for r in rows]
    table = "\n".join(lines)

    base, vem = results["student + baseline (gan_kd)"], results["student + VEM"]
    base_step, vem_step = seconds_per_step(base), seconds_per_step(vem)
    energy = vem.networks.get("energy")
    energy_params = sum(p.numel() for p in energy.parameters()) if energy is not None else 0
    student = next(r for r in rows if r[0] == "student + VEM")
    cost = (f"VEM's training step: {1e3 * vem_step:.0f} ms against the baseline's {1e3 * base_step:.0f} ms "
            f"({vem_step / max(base_step, 1e-9):.1f}x; each run's epoch_time_s over its steps, batch "
            f"{DATA['batch_size']}). The student it yields is the same network at the same inference cost "
            f"({student[1] / 1e6:.3f} M parameters, {student[2] / 1e6:.2f} M MACs an image): the energy model "
            f"({energy_params / 1e6:.3f} M parameters) only trains alongside it and is not part of it.")
    reading = _reading({k: results[k].metrics for k in STUDENTS})
    sizes = _data(out, quick)["options"]
    feature_steps = features.history[-1]["step"] if features.history else 0
    student_steps = base.history[-1]["step"] if base.history else 0
    header = (f"# kdforge demo gan\n\nEdges -> image on generated {SIZE} px shapes ({sizes['n_train']} train / "
              f"{sizes['n_test']} test pairs, {'quick' if quick else 'default'} size, one seed, total "
              f"{time.perf_counter() - t0:.0f} s). Teacher: pix2pix U-Net ngf {TEACHER['ngf']}; students: the "
              f"same U-Net at width {STUDENT['width']}, {student_steps} steps each. FID (lower is better; not "
              f"Inception FID) on the pooled penultimate features of a WRN-10-1 trained {feature_steps} steps on "
              f"the train targets, {features.metrics.get('top1', float('nan')):.1f} % top-1 on the test "
              "targets.\n\n")
    (out / "report.md").write_text(header + table + "\n\n" + cost + "\n\n" + reading
                                   + "\n\nEach run's folder holds its own report.md.\n")
    print("\n" + table + "\n\n" + cost + "\n\n" + reading)
    return table
