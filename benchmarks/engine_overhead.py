"""Engine overhead: a Trainer epoch vs a bare PyTorch loop, same model, same batches, same optimiser.

Target (issue 10): Trainer <= 1.03x the bare loop. Prints the medians of interleaved rounds and the ratio.
    python benchmarks/engine_overhead.py [--model resnet20] [--steps 20] [--batch 64] [--rounds 5]
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from _common import fixed_batches, interleaved, timing_args  # noqa: E402  (benchmarks/ is run as a script folder)

import kdforge
from kdforge.config import TrainConfig
from kdforge.distillers.scratch import Scratch
from kdforge.engine.trainer import Trainer


def main() -> None:
    ap = timing_args(__doc__)
    ap.add_argument("--model", default="resnet20")
    a = ap.parse_args()
    torch.manual_seed(0)
    batches = fixed_batches(a.steps, a.batch)
    model_a = kdforge.MODELS.build(a.model, num_classes=10)
    model_b = copy.deepcopy(model_a)
    cfg = TrainConfig(epochs=1, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine", progress=False,
                      log_every=10, device="cpu")

    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def bare() -> None:
        model_a.train()
        for b in batches:
            opt_a.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model_a(b["image"]), b["label"])
            loss.backward()
            opt_a.step()

    distiller = Scratch(model_b)
    trainer = Trainer(cfg, None)

    def engine() -> None:
        trainer.fit(distiller, batches)

    t = interleaved({"bare loop": bare, "Trainer": engine}, rounds=a.rounds)
    ratio = t["Trainer"] / t["bare loop"]
    print(f"engine overhead ({a.model}, batch {a.batch}, {a.steps} steps, median of {a.rounds} interleaved rounds)")
    print(f"  bare PyTorch loop : {t['bare loop']:.3f} s  ({a.steps * a.batch / t['bare loop']:.0f} img/s)")
    print(f"  kdforge Trainer   : {t['Trainer']:.3f} s  ({a.steps * a.batch / t['Trainer']:.0f} img/s)")
    print(f"  ratio Trainer / bare = {ratio:.3f}  (target <= 1.03)")


if __name__ == "__main__":
    main()
