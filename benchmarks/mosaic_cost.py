"""MosaicKD's cost: one outer iteration (D step, G step through the frozen teacher and student, `student_steps`
student steps on synthetic + real OOD images) vs the same number of KD-on-OOD student steps on the same models
and real images, measured side by side; and where an outer iteration's time goes (torch.profiler over the
method's record_function labels, and the teacher's forward passes timed alone).
    python benchmarks/mosaic_cost.py [--teacher resnet56] [--student resnet20] [--batch 64] [--student-steps 5]
        [--rounds 5] [--threads 0]
Random weights (timing only); 32 x 32 inputs, batch = real images per student step (as many synthetic).
"""
from __future__ import annotations

import time

import torch
from _common import interleaved, timing_args  # noqa: E402  (benchmarks/ is run as a script folder)
from torch.profiler import ProfilerActivity, profile

from kdforge.config import TrainConfig
from kdforge.distillers.kd import HintonKD
from kdforge.distillers.mosaic import MosaicKD
from kdforge.models import build_model

LABELS = ("mosaic/generate", "mosaic/discriminator", "mosaic/generator", "mosaic/student_inputs", "mosaic/student")


def _ready(distiller, cfg: TrainConfig):
    specs = distiller.configure_optimizers("main", cfg, 1000)
    distiller.optimizers = {k: (v[0] if isinstance(v, tuple) else v) for k, v in specs.items()}
    return distiller.train()


def main() -> None:
    ap = timing_args(__doc__)
    ap.add_argument("--teacher", default="resnet56")
    ap.add_argument("--student", default="resnet20")
    ap.add_argument("--student-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # random weights trained on random images drift into denormals, slow on CPUs
    k, b = a.student_steps, a.batch
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    teacher = build_model(a.teacher, num_classes=10)
    mosaic = _ready(MosaicKD(build_model(a.student, num_classes=10), teacher, input_shape=(3, 32, 32),
                             student_steps=k), cfg)
    kd = _ready(HintonKD(build_model(a.student, num_classes=10), teacher, ce_weight=0.0, kd_weight=1.0,
                   temperature=1.0), cfg)
    real = torch.randn(k * b, 3, 32, 32)
    outer = {"image": real, "index": torch.arange(k * b)}
    kd_batches = [{"image": c, "label": torch.zeros(b, dtype=torch.long)} for c in real.chunk(k)]

    def run_kd() -> None:  # the Trainer's step, as for any single-optimiser method
        for batch in kd_batches:
            losses = kd.training_step(batch)
            kd.optimizer_step("main", sum(losses.values()))

    times = interleaved({"mosaic": lambda: mosaic.training_step(outer), "kd": run_kd}, rounds=a.rounds)
    print(f"{a.teacher} -> {a.student}, {torch.get_num_threads()} threads, {k} student steps of {b} real "
          f"(+ {b} synthetic for MosaicKD) images, median of {a.rounds} interleaved rounds")
    print(f"one MosaicKD outer iteration: {times['mosaic'] * 1e3:.0f} ms; {k} KD-on-OOD steps: "
          f"{times['kd'] * 1e3:.0f} ms; ratio {times['mosaic'] / times['kd']:.2f}x")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            mosaic.training_step(outer)
    spent = {e.key: e.cpu_time_total / 2 / 1e3 for e in prof.key_averages() if e.key in LABELS}
    traced = sum(spent.values()) or 1.0
    total = times["mosaic"] * 1e3
    print("where an outer iteration goes (share of the traced labels' CPU time; tracing slows every part):")
    for label in LABELS:
        print(f"  {label:<24}{100 * spent.get(label, 0.0) / traced:5.1f} %")
    with torch.no_grad():
        x = torch.randn(2 * b, 3, 32, 32)
        teacher(x)
        t = time.perf_counter()
        for _ in range(3):
            teacher(x)
        fwd = (time.perf_counter() - t) / 3 * 1e3
    print(f"  teacher forward on {2 * b} images: {fwd:.0f} ms, {k} of them per iteration: {k * fwd:.0f} ms "
          f"({100 * k * fwd / total:.1f} %), plus one forward + backward to the generator's images in the G step")


if __name__ == "__main__":
    main()
