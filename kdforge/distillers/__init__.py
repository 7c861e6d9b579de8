"""Distillation methods, one file each, registered in `kdforge.registry.DISTILLERS`."""
from kdforge.distillers import (  # noqa: F401  (registration)
    ad,
    at,
    crd,
    dafl,
    dcgan,
    dfad,
    fitnet,
    flow_kd,
    flow_mle,
    gan_kd,
    gan_mi,
    kd,
    mfd,
    mosaic,
    nst,
    pix2pix,
    pkt,
    rkd,
    scratch,
    vem,
    vid,
)
from kdforge.distillers.base import Distiller, FeatureTaps, Stage, TeacherCache

__all__ = ["Distiller", "FeatureTaps", "Stage", "TeacherCache"]
