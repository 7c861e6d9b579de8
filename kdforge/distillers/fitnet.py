"""Romero et al. 2015, "FitNets: hints for thin deep nets".

Two stages by default, as in the paper: a hint stage that trains the student up to its guided layer (and
a regressor) to match the teacher's hint layer, then Hinton KD on the whole student with fresh
optimisers. `two_stage: false` gives the one-stage variant CE + alpha*KD + beta*hint used by the CRD
benchmark.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.distillers.base import Batch, Stage
from kdforge.distillers.feature_base import FeatureDistiller, check_pairs, conv_regressor, match_spatial
from kdforge.losses import hint_mse, kd_div
from kdforge.registry import DISTILLERS


@DISTILLERS.register("fitnet")
class FitNet(FeatureDistiller):
    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layer: str = "layer2",
                 teacher_layer: str = "layer2", two_stage: bool = True, hint_epochs: float = 0.5,
                 beta: float = 100.0, alpha: float = 0.9, temperature: float = 4.0,
                 input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        super().__init__(student, teacher, student_layers=[student_layer], teacher_layers=[teacher_layer],
                         beta=beta, alpha=alpha, temperature=temperature)
        self.two_stage, self.hint_epochs = two_stage, hint_epochs
        (s,), (t,) = self.feature_shapes(tuple(input_shape))
        check_pairs("fitnet", [s], [t], [(student_layer, teacher_layer)])
        self.regressor = conv_regressor(s[1], t[1]) if len(s) == 4 else nn.Linear(s[1], t[1])

    def stages(self, total_epochs: int) -> list[Stage]:
        if not self.two_stage:
            return [Stage("main", total_epochs)]
        hint = int(round(self.hint_epochs * total_epochs)) if self.hint_epochs < 1 else int(self.hint_epochs)
        if not 0 < hint < total_epochs:
            raise ValueError(f"fitnet: hint_epochs={self.hint_epochs} leaves no epochs for one of the two stages "
                             f"of a {total_epochs}-epoch run")
        return [Stage("hint", hint), Stage("kd", total_epochs - hint)]

    def hint(self, s_feat: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
        return hint_mse(match_spatial(self.regressor(s_feat), t_feat), t_feat)

    def training_step(self, batch: Batch):
        if self.stage == "hint":
            _, (t_feat,) = self.run_teacher(batch)
            # only the guided part of the student and the regressor receive gradients here
            _, (s_feat,) = self.run_student(batch["image"])
            return {"hint": self.hint(s_feat, t_feat.float())}
        t_logits, (t_feat,) = self.run_teacher(batch)
        s_logits, (s_feat,) = self.run_student(batch["image"])
        if self.stage == "kd":
            return {"ce": (1 - self.alpha) * F.cross_entropy(s_logits, batch["label"]),
                    "kd": self.alpha * kd_div(s_logits, t_logits.float(), self.temperature)}
        # one stage: CE + beta * hint (+ alpha * KD when asked)
        out = {"ce": F.cross_entropy(s_logits, batch["label"]),
               "hint": self.beta * self.hint(s_feat, t_feat.float())}
        return out

    def trainable_modules(self) -> dict[str, nn.Module]:
        if self.stage == "kd":  # the regressor has served its purpose
            return {"student": self.student}
        return super().trainable_modules()
