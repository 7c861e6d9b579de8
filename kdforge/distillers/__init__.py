"""Distillation methods, one file each, registered in `kdforge.registry.DISTILLERS`."""
from kdforge.distillers import ad, at, crd, fitnet, kd, mfd, nst, pkt, rkd, scratch, vid  # noqa: F401  (registration)
from kdforge.distillers.base import Distiller, FeatureTaps, Stage, TeacherCache

__all__ = ["Distiller", "FeatureTaps", "Stage", "TeacherCache"]
