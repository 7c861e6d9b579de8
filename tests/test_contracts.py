"""The Distiller contract carries what the later methods need, shown here with toy methods:
a game with two optimisers (MosaicKD, VEM, adversarial debiasing), a student that outputs images with its
own evaluator (GAN generators, flow decoders), group attributes in batches (MFD), and mixed precision."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_states_equal, state_copy, tiny_net
from torch import nn

from kdforge.config import TrainConfig
from kdforge.distillers.base import Distiller
from kdforge.engine.optim import build_optimizer
from kdforge.engine.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")


class CriticGame(Distiller):
    """Student vs a critic that tries to tell student logits from teacher logits; the critic has its own
    optimiser, stepped inside training_step; the Trainer steps the student on the returned loss."""

    def __init__(self, student, teacher):
        super().__init__(student, teacher)
        self.critic = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))

    def trainable_modules(self):
        return {"student": self.student}

    def configure_optimizers(self, stage, cfg, steps):
        return {"main": build_optimizer(self.student.parameters(), cfg),
                "critic": torch.optim.Adam(self.critic.parameters(), lr=1e-3)}

    def training_step(self, batch):
        t, _ = self.run_teacher(batch)
        s = self.student(batch["image"])
        opt = self.optimizers["critic"]
        real, fake = self.critic(t), self.critic(s.detach())
        d_loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
            F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        opt.zero_grad(set_to_none=True)
        d_loss.backward()
        opt.step()
        g = self.critic(s)  # student tries to look like the teacher; grads reach the critic too, cleared later
        return {"ce": F.cross_entropy(s, batch["label"]),
                "adv": 0.1 * F.binary_cross_entropy_with_logits(g, torch.ones_like(g)),
                "critic": d_loss.detach()}


def _cfg(**kw):
    base = dict(epochs=2, lr=0.05, device="cpu", progress=False, log_every=1, checkpoint_every=3)
    base.update(kw)
    return TrainConfig(**base)


def test_game_steps_both_optimisers_and_resumes_exactly(aug_loader, tmp_path):
    def make():
        return CriticGame(tiny_net(1), tiny_net(2))

    game = make()
    critic0 = state_copy(game.critic)
    Trainer(_cfg(), tmp_path / "a").fit(game, aug_loader)
    assert any(not torch.equal(critic0[k], v) for k, v in game.critic.state_dict().items())
    logged = [r for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"critic"' in r]
    assert logged, "the detached critic loss is logged"

    torch.manual_seed(0)
    whole = make()
    Trainer(_cfg(), tmp_path / "b").fit(whole, aug_loader)
    torch.manual_seed(0)
    first = make()
    Trainer(_cfg(max_steps=5), tmp_path / "c").fit(first, aug_loader)
    second = make()
    Trainer(_cfg(), tmp_path / "c").fit(second, aug_loader, resume=True)
    assert_states_equal(state_copy(whole), state_copy(second))  # student, critic: both optimisers restored


class ImageStudent(Distiller):
    """Teacher and student map images to images (a generator or a flow decoder): pixel L1 only."""

    def training_step(self, batch):
        with torch.no_grad():
            t = self.teacher(batch["image"])
        return {"l1": F.l1_loss(self.student(batch["image"]), t)}


def test_image_to_image_method_with_its_own_evaluator(plain_loader, val_loader):
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

    distiller = ImageStudent(net(1), net(2))

    @torch.no_grad()
    def evaluator(d, loader, device):
        err = [F.l1_loss(d.student(b["image"]), d.teacher(b["image"])).item() for b in loader]
        return {"l1": sum(err) / len(err)}

    before = evaluator(distiller, val_loader, "cpu")["l1"]
    result = Trainer(_cfg(epochs=3, lr=0.1), None, evaluator=evaluator).fit(distiller, plain_loader, val_loader)
    assert result.metrics["l1"] < before
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and "val_l1" in result.history[-1]


class GroupAware(Distiller):
    """Reads the per-sample group attribute carried by every kdforge batch (what MFD needs)."""

    needs_teacher = False
    seen: list[torch.Tensor]

    def training_step(self, batch):
        self.seen.append(batch["group"].clone())
        return {"ce": F.cross_entropy(self.student(batch["image"]), batch["label"])}


def test_batches_carry_group_attributes_into_methods_and_metrics(aug_loader, val_loader, synth):
    d = GroupAware(tiny_net(0))
    d.seen = []
    val_loader.num_groups = 2  # per-group accuracy in every evaluation
    result = Trainer(_cfg(epochs=1), None).fit(d, aug_loader, val_loader)
    idx = torch.cat([b["index"] for b in aug_loader])
    assert torch.equal(torch.cat(d.seen), torch.as_tensor(synth["train"].attrs["group"])[idx])
    assert len(result.metrics["group_top1"]) == 2


def test_bf16_mixed_precision_on_cpu(plain_loader):
    d = CriticGame(tiny_net(1), tiny_net(2))
    result = Trainer(_cfg(epochs=1, precision="bf16"), None).fit(d, plain_loader)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result.history[-1].items() if k.startswith("train_"))
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Trainer(_cfg(epochs=1, precision="fp8"), None).fit(d, plain_loader)
