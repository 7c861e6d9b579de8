"""Classic knowledge-distillation losses as pure functions: tensors in, scalar tensor out.

Each is registered in `kdforge.registry.LOSSES` under its function name, states its paper's formula in
its docstring, and is checked against a naive loop in tests/test_losses.py.
"""
from kdforge.losses import (
    gan,  # noqa: F401  (registers the GAN losses of kdforge.losses.gan)
    image,  # noqa: F401  (registers the wavelet loss of kdforge.losses.image)
    vem,  # noqa: F401  (registers VEM's and the generator-KD losses of kdforge.losses.vem)
)
from kdforge.losses.crd import crd_nce, crd_scores
from kdforge.losses.features import at_loss, attention_map, hint_mse, match_spatial, nst_loss
from kdforge.losses.logits import kd_div
from kdforge.losses.mfd import mfd_loss
from kdforge.losses.relational import pkt_loss, rkd_angle, rkd_distance, rkd_loss
from kdforge.losses.vid import vid_loss

__all__ = [
    "at_loss",
    "attention_map",
    "crd_nce",
    "crd_scores",
    "hint_mse",
    "kd_div",
    "match_spatial",
    "mfd_loss",
    "nst_loss",
    "pkt_loss",
    "rkd_angle",
    "rkd_distance",
    "rkd_loss",
    "vid_loss",
]
