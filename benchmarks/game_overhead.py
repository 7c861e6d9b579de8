"""Game overhead: a three-optimiser game (generator, critic, student; MosaicKD-shaped) run by the Trainer,
whose inner steps go through `Distiller.optimizer_step`, vs the same game written as a bare PyTorch loop.

Target (issue 13): Trainer <= 1.05x the bare loop. Prints the medians of interleaved rounds and the ratio.
    python benchmarks/game_overhead.py [--steps 20] [--batch 64] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from _common import fixed_batches, interleaved, timing_args  # noqa: E402  (benchmarks/ is run as a script folder)
from torch import nn

import kdforge
from kdforge.config import TrainConfig
from kdforge.distillers.base import Distiller
from kdforge.engine.optim import build_optimizer
from kdforge.engine.trainer import Trainer
from kdforge.losses import kd_div

Z_DIM = 64


def make_generator() -> nn.Module:
    return nn.Sequential(nn.Linear(Z_DIM, 64 * 8 * 8), nn.Unflatten(1, (64, 8, 8)), nn.BatchNorm2d(64),
                         nn.Upsample(scale_factor=2), nn.Conv2d(64, 32, 3, padding=1), nn.BatchNorm2d(32),
                         nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2), nn.Conv2d(32, 3, 3, padding=1), nn.Tanh())


def make_critic() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(32, 64, 4, 2, 1),
                         nn.LeakyReLU(0.2), nn.Conv2d(64, 1, 3, 1, 1))  # a patch critic


class Game(Distiller):
    def __init__(self, student, teacher, generator, critic):
        super().__init__(student, teacher)
        self.generator, self.critic = generator, critic

    def trainable_modules(self):
        return {"student": self.student}

    def configure_optimizers(self, stage, cfg, steps):
        return {"main": build_optimizer(self.student.parameters(), cfg),
                "generator": (torch.optim.Adam(self.generator.parameters(), lr=1e-3), None),
                "critic": (torch.optim.Adam(self.critic.parameters(), lr=1e-3), None)}

    def training_step(self, batch):
        real = batch["image"]
        z = torch.randn(real.shape[0], Z_DIM)
        fake = self.generator(z)
        t_fake, _ = self.run_teacher(batch, fake, grad=True)
        g_loss = -kd_div(self.student(fake), t_fake, 4.0) + 0.1 * F.softplus(-self.critic(fake)).mean()
        self.optimizer_step("generator", g_loss)
        d_loss = F.softplus(-self.critic(real)).mean() + F.softplus(self.critic(fake.detach())).mean()
        self.optimizer_step("critic", d_loss)
        x = torch.cat([real, fake.detach()])
        t_logits, _ = self.run_teacher({"image": x})
        return {"kd": kd_div(self.student(x), t_logits, 4.0), "gen": g_loss.detach(), "critic": d_loss.detach()}


def main() -> None:
    ap = timing_args(__doc__)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both loops (pinned: less noise)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batches = fixed_batches(a.steps, a.batch)
    nets = [kdforge.MODELS.build("resnet20"), kdforge.MODELS.build("resnet32"), make_generator(), make_critic()]
    s_a, t_a, g_a, d_a = nets
    s_b, t_b, g_b, d_b = copy.deepcopy(nets)
    t_a.eval().requires_grad_(False)
    cfg = TrainConfig(epochs=1, lr=0.05, schedule="cosine", progress=False, log_every=10, device="cpu")

    opt_s = torch.optim.SGD(s_a.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda i: 0.5 * (1 + math.cos(math.pi * i / a.steps)))
    opt_g, opt_d = torch.optim.Adam(g_a.parameters(), lr=1e-3), torch.optim.Adam(d_a.parameters(), lr=1e-3)

    def bare() -> None:
        for m in (s_a, g_a, d_a):
            m.train()
        for b in batches:
            real = b["image"]
            z = torch.randn(real.shape[0], Z_DIM)
            fake = g_a(z)
            g_loss = -kd_div(s_a(fake), t_a(fake), 4.0) + 0.1 * F.softplus(-d_a(fake)).mean()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            d_loss = F.softplus(-d_a(real)).mean() + F.softplus(d_a(fake.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            x = torch.cat([real, fake.detach()])
            with torch.no_grad():
                t_logits = t_a(x)
            loss = kd_div(s_a(x), t_logits, 4.0)
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            sched.step()

    game = Game(s_b, t_b, g_b, d_b)
    trainer = Trainer(cfg, None)

    def engine() -> None:
        trainer.fit(game, batches)

    t = interleaved({"bare loop": bare, "Trainer": engine}, rounds=a.rounds)
    ratio = t["Trainer"] / t["bare loop"]
    print(f"game overhead (ResNet-32 teacher -> ResNet-20 student, generator + patch critic, batch {a.batch}, "
          f"{a.steps} steps, {a.threads} thread(s), median of {a.rounds} interleaved rounds)")
    print(f"  bare PyTorch loop : {t['bare loop']:.3f} s")
    print(f"  kdforge Trainer   : {t['Trainer']:.3f} s")
    print(f"  ratio Trainer / bare = {ratio:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
