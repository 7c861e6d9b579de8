"""Romero et al. 2015, "FitNets: hints for thin deep nets".

Two stages by default, as in the paper: a hint stage that trains the student up to its guided layer (and
a regressor) to match the teacher's hint layer, then Hinton KD on the whole student with fresh optimisers:

    hint stage:  hint_weight * hint
    KD stage:    ce_weight * CE + kd_weight * T^2 KL

`two_stage: false` gives the one-stage variant of the CRD benchmark, all terms together:

    ce_weight * CE + kd_weight * T^2 KL + hint_weight * hint

Weights left unset take the chosen variant's defaults: two stages hint 1, ce 0.1, kd 0.9 (the KD stage is
`kd`'s default); one stage ce 1, kd 0, hint 100 (the CRD benchmark's FitNet).
"""
from __future__ import annotations

import torch
from torch import nn

from kdforge.distillers.base import Batch, Stage
from kdforge.distillers.feature_base import FeatureDistiller, check_pairs, check_weights, conv_regressor, logit_terms
from kdforge.losses import hint_mse, match_spatial
from kdforge.registry import DISTILLERS

_DEFAULTS = {True: {"ce": 0.1, "kd": 0.9, "hint": 1.0}, False: {"ce": 1.0, "kd": 0.0, "hint": 100.0}}


@DISTILLERS.register("fitnet")
class FitNet(FeatureDistiller):
    loss_names = ("hint",)

    def __init__(self, student: nn.Module, teacher: nn.Module, *, student_layer: str = "layer2",
                 teacher_layer: str = "layer2", two_stage: bool = True, hint_epochs: float = 0.5,
                 ce_weight: float | None = None, kd_weight: float | None = None, hint_weight: float | None = None,
                 temperature: float = 4.0, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        default = _DEFAULTS[bool(two_stage)]
        ce_weight = default["ce"] if ce_weight is None else ce_weight
        kd_weight = default["kd"] if kd_weight is None else kd_weight
        hint_weight = default["hint"] if hint_weight is None else hint_weight
        super().__init__(student, teacher, student_layers=[student_layer], teacher_layers=[teacher_layer],
                         weights={"hint": hint_weight}, ce_weight=ce_weight, kd_weight=kd_weight,
                         temperature=temperature)
        if two_stage:  # each stage needs a term of its own
            check_weights("FitNet hint stage", hint_weight=hint_weight)
            check_weights("FitNet KD stage", ce_weight=ce_weight, kd_weight=kd_weight)
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
        """Unweighted hint loss; maps of different spatial sizes are matched by `match_spatial`."""
        return hint_mse(*match_spatial(self.regressor(s_feat), t_feat))

    def feature_losses(self, s_feats, t_feats, batch):
        return {"hint": self.hint(s_feats[0], t_feats[0])}

    def training_step(self, batch: Batch):
        if self.stage == "hint":
            _, (t_feat,) = self.run_teacher(batch)
            # only the guided part of the student and the regressor receive gradients here
            _, (s_feat,) = self.run_student(batch["image"])
            return {"hint": self.weights["hint"] * self.hint(s_feat, t_feat.float())}
        if self.stage == "kd":
            t_logits, _ = self.run_teacher(batch)
            s_logits, _ = self.run_student(batch["image"])
            return logit_terms(s_logits, t_logits, batch["label"], ce_weight=self.ce_weight,
                               kd_weight=self.kd_weight, temperature=self.temperature)
        return super().training_step(batch)  # one stage: CE, KD and hint together

    def trainable_modules(self) -> dict[str, nn.Module]:
        if self.stage == "kd":  # the regressor has served its purpose
            return {"student": self.student}
        return super().trainable_modules()
