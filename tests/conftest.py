"""Shared fixtures: tiny synthetic data, tiny models and loaders, so engine and method tests run in seconds.

`TinyNet` names its parts like the CIFAR ResNets (`layer1`..`layer3`, `avgpool`, `linear`), so every
method's default feature layers exist in it, and it has BatchNorm (running statistics to check) but no
dropout. Everything is seeded: two calls with the same seed give the same weights and the same batches.
"""
from __future__ import annotations

import copy
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdforge  # noqa: F401  (registers models and distillers)
from kdforge.data.decoded import DecodedData
from kdforge.data.loader import BatchLoader
from kdforge.data.synthetic import make_synthetic
from kdforge.data.transforms import BatchAugment

IMAGE_SIZE = 16
N_TRAIN, N_TEST, BATCH = 64, 32, 16  # 4 batches per epoch


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class TinyNet(nn.Module):
    """conv stem, three stages (stride 1, 2, 2), global pooling and a linear head: ResNet-like names."""

    def __init__(self, num_classes: int = 10, width: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = _block(width, width, 1)
        self.layer2 = _block(width, 2 * width, 2)
        self.layer3 = _block(2 * width, 4 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()  # dropout draws from the global RNG
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.drop(self.avgpool(x).flatten(1)))


def tiny_net(seed: int = 0, width: int = 8, num_classes: int = 10, dropout: float = 0.0) -> TinyNet:
    """A TinyNet whose initial weights depend only on `seed` (the global RNG is left untouched)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return TinyNet(num_classes, width, dropout)
    finally:
        torch.set_rng_state(state)


@pytest.fixture
def single_thread():
    """One intra-op thread: these models are so small that a second thread only adds contention (measured:
    5 ms vs 100 ms a step on 2 busy cores). Restored afterwards, for test files that use bigger models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth() -> dict[str, DecodedData]:
    """64 train / 32 test generated 16x16 images, 10 classes."""
    return make_synthetic(N_TRAIN, N_TEST, num_classes=10, size=IMAGE_SIZE, seed=0)


@pytest.fixture
def aug_loader(synth) -> BatchLoader:
    """Shuffled, random crop + flip: not deterministic."""
    return BatchLoader(synth["train"], BATCH, drop_last=True, augment=BatchAugment(2, True), seed=1)


@pytest.fixture
def plain_loader(synth) -> BatchLoader:
    """Shuffled, no augmentation: deterministic per sample index."""
    return BatchLoader(synth["train"], BATCH, drop_last=True, seed=1)


@pytest.fixture
def val_loader(synth) -> BatchLoader:
    return BatchLoader(synth["test"], 32, shuffle=False, prefetch=0)


@pytest.fixture
def student() -> TinyNet:
    return tiny_net(seed=1, width=4)


@pytest.fixture
def teacher() -> TinyNet:
    return tiny_net(seed=2, width=8)


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy({k: v.detach().clone() for k, v in module.state_dict().items()})


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical state dicts; the message names the first tensor that differs."""
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max() if a[k].shape == b[k].shape else "shape"
        assert torch.equal(a[k], b[k]), f"tensor {k!r} differs (max abs diff {diff})"


def fake_utkface(root: Path, n: int = 16) -> Path:
    """UTKFace-named PNG 'faces' (a bright oval and two dark eyes on a noisy ground), for utkface_edges."""
    image = pytest.importorskip("PIL.Image")
    pytest.importorskip("kornia")
    rng = np.random.default_rng(0)
    folder = root / "UTKFace"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:32, :32]
    for k in range(n):
        face = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
        cx, cy = rng.integers(12, 20, 2)
        face[((xx - cx) / 9) ** 2 + ((yy - cy) / 12) ** 2 < 1] = rng.integers(150, 255, 3)
        face[cy - 3:cy - 1, [cx - 4, cx + 3]] = 20
        image.fromarray(face).save(folder / f"{20 + k}_{k % 2}_{k % 5}_20170101120000{k:03d}.jpg.chip.jpg",
                                   format="PNG")
    return root


def free_port() -> int:
    """A free loopback port for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(nproc: int) -> list[str]:
    """The command prefix that runs a script on `nproc` local processes (torchrun on loopback), or plainly for 1."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]


def torchrun_env() -> dict[str, str]:
    """This environment without a torchrun world of its own (a test may itself run under one), one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env
