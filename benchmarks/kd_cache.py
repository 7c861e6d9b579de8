"""Hinton KD step with cached teacher logits vs a student-only step (and KD without the cache).

Target (issue 10): cached KD <= 1.05x student-only. The cache is filled before timing (as after the first
epoch of a run whose loader has no random augmentation).
    python benchmarks/kd_cache.py [--teacher resnet56] [--student resnet20] [--steps 20] [--batch 64]
"""
from __future__ import annotations

import torch
from _common import fixed_batches, interleaved, timing_args  # noqa: E402

import kdforge
from kdforge.config import TrainConfig
from kdforge.distillers.kd import HintonKD
from kdforge.distillers.scratch import Scratch
from kdforge.engine.trainer import Trainer


def main() -> None:
    ap = timing_args(__doc__)
    ap.add_argument("--teacher", default="resnet56")
    ap.add_argument("--student", default="resnet20")
    a = ap.parse_args()
    torch.manual_seed(0)
    batches = fixed_batches(a.steps, a.batch)
    teacher = kdforge.MODELS.build(a.teacher, num_classes=10)
    cfg = TrainConfig(epochs=1, lr=0.01, progress=False, log_every=10, device="cpu")
    trainer = Trainer(cfg, None)

    scratch = Scratch(kdforge.MODELS.build(a.student, num_classes=10))
    cached = HintonKD(kdforge.MODELS.build(a.student, num_classes=10), teacher)
    cached.enable_teacher_cache()
    for b in batches:  # fill the cache: what the first epoch does
        cached.run_teacher(b)
    plain = HintonKD(kdforge.MODELS.build(a.student, num_classes=10), teacher)

    t = interleaved({"student only": lambda: trainer.fit(scratch, batches),
                     "KD, cached teacher": lambda: trainer.fit(cached, batches),
                     "KD, live teacher": lambda: trainer.fit(plain, batches)}, rounds=a.rounds)
    base = t["student only"]
    print(f"KD step cost ({a.teacher} -> {a.student}, batch {a.batch}, {a.steps} steps, "
          f"median of {a.rounds} interleaved rounds)")
    for k, v in t.items():
        print(f"  {k:<20}: {v:.3f} s   ratio to student-only = {v / base:.3f}")
    print(f"  cached KD / student-only = {t['KD, cached teacher'] / base:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
