"""Readers for public dataset layouts; each returns `{split: DecodedData}`."""
from kdforge.data.formats.cifar_pickle import CIFAR10_CLASSES, detect_cifar_pickle, read_cifar_pickle
from kdforge.data.formats.image_folder import read_image_folder
from kdforge.data.formats.tiny_imagenet import read_tiny_imagenet

__all__ = [
    "CIFAR10_CLASSES", "detect_cifar_pickle", "read_cifar_pickle", "read_image_folder", "read_tiny_imagenet",
]
