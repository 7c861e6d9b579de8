"""MFD training step vs a Hinton KD step: same models (the MFD paper's CIFAR-10S CNN, teacher of the same
architecture), same batches with groups, both through the Trainer. The fairness term should come almost free.

Target (issue 15): MFD step <= 1.15x the KD step. Prints the medians of interleaved rounds and the ratio.
    python benchmarks/mfd_step.py [--steps 20] [--batch 128] [--rounds 5]
"""
from __future__ import annotations

import copy

import torch
from _common import fixed_batches, interleaved, timing_args  # noqa: E402  (benchmarks/ is run as a script folder)

import kdforge
from kdforge.config import TrainConfig
from kdforge.distillers.kd import HintonKD
from kdforge.distillers.mfd import MFD
from kdforge.engine.trainer import Trainer


def main() -> None:
    a = timing_args(__doc__).parse_args()
    a.batch = a.batch if a.batch != 64 else 128  # the paper's batch unless asked otherwise
    torch.manual_seed(0)
    batches = fixed_batches(a.steps, a.batch)
    g = torch.Generator().manual_seed(1)
    for b in batches:
        b["group"] = torch.randint(0, 2, (a.batch,), generator=g)
    student, teacher = kdforge.MODELS.build("mfd_cnn"), kdforge.MODELS.build("mfd_cnn")
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", progress=False,
                      log_every=10, device="cpu")
    kd = HintonKD(copy.deepcopy(student), copy.deepcopy(teacher), temperature=3.0, ce_weight=1.0, kd_weight=1.0)
    mfd = MFD(copy.deepcopy(student), copy.deepcopy(teacher), num_classes=10, num_groups=2, mfd_weight=3.0)
    t = interleaved({"kd": lambda: Trainer(cfg).fit(kd, batches), "mfd": lambda: Trainer(cfg).fit(mfd, batches)},
                    rounds=a.rounds)
    print(f"MFD vs Hinton KD step (mfd_cnn teacher and student, batch {a.batch}, {a.steps} steps, "
          f"median of {a.rounds} interleaved rounds)")
    print(f"  Hinton KD : {t['kd']:.3f} s")
    print(f"  MFD       : {t['mfd']:.3f} s")
    print(f"  ratio MFD / KD = {t['mfd'] / t['kd']:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
