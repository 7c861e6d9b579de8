"""Flow distillation's speed claim, measured side by side: the Glow teacher's decoder (latents -> image) and encoder
against the paper's CNN students (encoder (K, L) = (6, 3); decoders (2, 3), (1, 3), (3, 2)), per image on this CPU at
equal resolution, with parameters and MACs (FlopCounterMode). Speed does not depend on the weights, so every network
is built from its recipe (recipes/flow/utkface/) with random weights; interleaved rounds, medians.
Target (issue 18): the smallest student decoder >= 5x faster than the Glow decoder per image.
    python benchmarks/flow_speed.py [--batch 1] [--rounds 7] [--threads 1]
"""
from __future__ import annotations

import argparse

import torch
from _common import interleaved  # noqa: E402  (benchmarks/ is run as a script folder)

from kdforge.config import load_config
from kdforge.models.cost import count_macs
from kdforge.recipe import build_model_from_config


class GlowDecoder(torch.nn.Module):
    """The flow's decode as a module of its own, so FlopCounterMode counts it like the students."""

    def __init__(self, glow: torch.nn.Module) -> None:
        super().__init__()
        self.glow = glow

    def forward(self, *latents: torch.Tensor) -> torch.Tensor:
        return self.glow.decode(list(latents), standardized=True)


RECIPES = {"(2, 3)": "rdb_students", "(1, 3)": "rdb_students_k1", "(3, 2)": "rdb_students_l2"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=10, help="calls per timed round")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(f"recipes/flow/utkface/{RECIPES['(2, 3)']}.yaml")
    torch.manual_seed(0)
    glow = build_model_from_config(cfg.teacher, load=False).eval()
    size = glow.img_size
    x = torch.rand(a.batch, 3, size, size) - 0.5
    glow.initialize_actnorm(torch.rand(16, 3, size, size) - 0.5)
    with torch.no_grad():
        z = glow.encode(x, standardized=True)
    nets = {"Glow encoder": (lambda: glow.encode(x, standardized=True), glow, (x,))}
    decoders = {"Glow decoder": (lambda: glow.decode(z, standardized=True), GlowDecoder(glow), tuple(z))}
    for label, recipe in RECIPES.items():
        student = build_model_from_config(load_config(f"recipes/flow/utkface/{recipe}.yaml").student,
                                          load=False).eval()
        if label == "(2, 3)":
            nets["student encoder (6, 3)"] = (lambda s=student: s.encoder(x), student.encoder, (x,))
        decoders[f"student decoder {label}"] = (lambda s=student: s.decoder(z), student.decoder, tuple(z))

    def repeat(fn):
        return lambda: [fn() for _ in range(a.repeats)]

    with torch.no_grad():
        times = interleaved({k: repeat(v[0]) for k, v in {**nets, **decoders}.items()}, rounds=a.rounds)
    print(f"{size} px, batch {a.batch}, {a.threads} thread(s), {a.rounds} interleaved rounds of {a.repeats} calls "
          "(medians); ms per image")
    per_image = {k: v / a.repeats / a.batch * 1e3 for k, v in times.items()}
    base = per_image["Glow decoder"]
    for name, (_, module, inputs) in {**nets, **decoders}.items():
        n_params = sum(p.numel() for p in module.parameters())
        macs = f"{count_macs(module, *[t[:1] for t in inputs]) / 1e6:.1f} M"
        speedup = f", {base / per_image[name]:.1f}x the Glow decoder's speed" if "decoder" in name else ""
        print(f"  {name:26s} {per_image[name]:8.2f} ms  {n_params / 1e6:.2f} M params  MACs {macs}{speedup}")


if __name__ == "__main__":
    main()
