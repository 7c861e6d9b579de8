"""Models: CIFAR ResNets, WRNs, the MFD CNN, GAN parts (gan.py, image_gan.py), torchvision nets, and external
models resolved by name.

Importing this package registers every model in ``MODELS`` and the ``torchvision:`` / ``timm:`` resolvers.
"""

from kdforge.models import cifar_resnet, flow_students, gan, glow, image_gan, mfd_cnn, torchvision_nets, wrn  # noqa: F401
from kdforge.models.external import build_model, import_factory
from kdforge.models.weights import load_weights
from kdforge.registry import MODELS

__all__ = ["MODELS", "build_model", "import_factory", "load_weights"]
