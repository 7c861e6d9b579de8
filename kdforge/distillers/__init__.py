"""Distillation methods, one file each, registered in `kdforge.registry.DISTILLERS`."""
from kdforge.distillers import ad, at, crd, dafl, dfad, fitnet, kd, mfd, mosaic, nst, pkt, rkd, scratch, vid  # noqa: F401,E501  (registration)
from kdforge.distillers.base import Distiller, FeatureTaps, Stage, TeacherCache

__all__ = ["Distiller", "FeatureTaps", "Stage", "TeacherCache"]
