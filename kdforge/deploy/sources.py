"""What `kdforge export` and `kdforge bench` are pointed at, as models: a run folder (its checkpoints/last.pt),
a checkpoint file, or a pretrained model as NAME=WEIGHTS; with the data a run was scored on and an example
input that is real where it can be (test images of the run's data; latent codes for a generator).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.config import ConfigError, ModelConfig, RunConfig, expand_path, load_config

LAST = Path("checkpoints") / "last.pt"


@dataclass
class Source:
    label: str  # the table row's name: the run's name, the checkpoint's, the teacher's
    model: nn.Module
    kind: str  # run | checkpoint | pretrained | module
    path: Path | None = None  # the checkpoint or weights file
    config: RunConfig | None = None  # the run's saved config (its data, its evaluator), when it has one
    network: str = "student"


def checkpoint_path(path: str | Path) -> Path:
    """A run folder's checkpoints/last.pt, or the checkpoint file itself; FileNotFoundError naming what is missing."""
    p = Path(expand_path(str(path)))
    if p.is_dir():
        if not (p / LAST).is_file():
            raise FileNotFoundError(f"{p} is not a kdforge run folder: it has no {LAST}")
        return p / LAST
    if not p.exists():
        raise FileNotFoundError(f"no such run folder or checkpoint: {p}")
    return p


def saved_config(checkpoint: Path) -> RunConfig | None:
    """The run config a checkpoint carries (or the config.yaml of its run folder), None when it has neither."""
    from kdforge.engine.checkpoint import load_checkpoint

    conf = load_checkpoint(checkpoint).get("config")
    if isinstance(conf, dict) and "student" in conf:
        return load_config(None, base=conf)
    beside = checkpoint.parent.parent / "config.yaml"
    if checkpoint.parent.name == "checkpoints" and beside.is_file():
        return load_config(beside)
    return None


def load_source(spec: str | Path, *, network: str = "student") -> Source:
    """A run folder or checkpoint as a Source: `network` ("student", or another the method trained, e.g.
    "generator") with the checkpoint's weights, its architecture from the saved config."""
    from kdforge.api import load_student

    ckpt = checkpoint_path(spec)
    cfg = saved_config(ckpt)
    model = load_student(ckpt, network=network)
    is_run = Path(expand_path(str(spec))).is_dir()
    label = cfg.name if cfg is not None else (ckpt.parent.parent.name if is_run else ckpt.stem)
    if network != "student":
        label += f":{network}"
    return Source(label, model, "run" if is_run else "checkpoint", ckpt, cfg, network)


def pretrained_source(spec: str, num_classes: int | None) -> Source:
    """NAME=WEIGHTS (a model name of `kdforge list models` and a weights file) as a Source, e.g.
    resnet56=../shared/data/cifar10-resnets/resnet56-4bfd9763.th."""
    from kdforge.recipe import build_model_from_config

    name, sep, weights = spec.partition("=")
    if not sep or not name or not weights:
        raise ValueError(f"--teacher {spec!r}: write it NAME=WEIGHTS, e.g. resnet56=resnet56-4bfd9763.th")
    weights = expand_path(weights)
    if not Path(weights).is_file():
        raise FileNotFoundError(f"--teacher {name}: no such weights file: {weights}")
    model = build_model_from_config(ModelConfig(name, weights, {}), num_classes, role="teacher")
    return Source(name, model, "pretrained", Path(weights))


def data_config(data: str | Path | RunConfig | None, fallback: RunConfig | None = None) -> RunConfig | None:
    """The config whose `data` and `eval` sections say what every model is scored on: a RunConfig, a recipe
    path, a dataset name (its cache prepared already: `kdforge prepare NAME`), else `fallback` (a run's own)."""
    if data is None:
        return fallback
    if isinstance(data, RunConfig):
        return data
    text = str(data)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return load_config(text)
    if "/" in text or "\\" in text:
        raise FileNotFoundError(f"recipe not found: {text}")
    from kdforge.registry import DATASETS

    DATASETS.get(text)  # an unknown name fails here, with the closest ones
    return load_config(None, [f"data.name={text}"])


def eval_loader(cfg: RunConfig) -> tuple[Any, int]:
    """The val/test loader of a config's data and its class count (train split not needed, but built: the
    class count and normalisation come with it)."""
    from kdforge.data.build import build_loaders

    bundle = build_loaders(cfg.data, seed=cfg.seed)
    return bundle.val, bundle.num_classes


def _shape(text: str | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(text, tuple):
        return text
    try:
        shape = tuple(int(s) for s in str(text).replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--input-shape {text!r}: write the shape of one input without the batch, "
                          "e.g. 3,32,32") from None
    if not shape or min(shape) < 1:
        raise ConfigError(f"--input-shape {text!r}: sizes must be positive integers, e.g. 3,32,32")
    return shape


def input_shapes(model: nn.Module, image_shape: tuple[int, ...] = (3, 32, 32)) -> list[tuple[int, ...]]:
    """The shapes (without the batch) of the inputs `model` takes: a latent code for a generator (it says its
    `z_dim`), the per-level latents of a flow decoder (it says its `input_latent_shapes`), else one image per
    required positional argument of `forward` (VEM's energy net takes two), and a condition image when the model is
    built with `cond_channels` (a conditional PatchGAN). Images take the model's own `in_channels` and `img_size`
    where it has them, else `image_shape`."""
    z_dim = getattr(model, "z_dim", None)
    if isinstance(z_dim, int):
        return [(z_dim,)]
    latents = getattr(model, "input_latent_shapes", None)  # a flow's (or a flow student's) decoder: one per level
    if latents:
        return [tuple(s) for s in latents]
    c, *hw = image_shape
    own_c, size = getattr(model, "in_channels", None), getattr(model, "img_size", None)
    c = own_c if isinstance(own_c, int) else c
    hw = [size, size] if isinstance(size, int) else hw
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    required = [p for p in params if p.default is p.empty]
    shapes = [(c, *hw)] * max(1, len(required))
    cond = getattr(model, "cond_channels", 0)
    if isinstance(cond, int) and cond > 0 and len(params) > len(required):
        shapes.append((cond, *hw))
    return shapes


def example_input(model: nn.Module, cfg: RunConfig | None, *, n: int = 8,
                  input_shape: str | tuple[int, ...] | None = None,
                  seed: int = 0) -> tuple[tuple[torch.Tensor, ...], str]:
    """An example batch of `n` for each input of `model` (see `input_shapes`) and what it is: latent codes for a
    generator, real test images of the run's data where they load and fit, else a seeded random input of
    `input_shape` (C,H,W)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(getattr(model, "z_dim", None), int):
        (shape,) = input_shapes(model)
        return (torch.randn(n, *shape, generator=g),), f"{n} random latent codes z ~ N(0, I) of size {shape[0]}"
    why = "the checkpoint carries no data config" if cfg is None else ""
    if cfg is not None:
        try:
            loader, _ = eval_loader(cfg)
            images = next(iter(loader))["image"][:n]
            shapes = input_shapes(model, tuple(images.shape[1:]))
            if all(s == tuple(images.shape[1:]) for s in shapes):
                what = f"{len(images)} real test images of {cfg.data.name} ({cfg.data.val_split} split)"
                return tuple(images for _ in shapes), what
            why = f"the model's inputs {shapes} are not the data's images {tuple(images.shape[1:])}"
        except (OSError, ValueError, StopIteration) as e:
            why = f"the run's data is not available: {e}"
    if input_shape is None:
        raise ConfigError(f"no example input: {why}; pass --input-shape, e.g. 3,32,32")
    shapes = input_shapes(model, _shape(input_shape))
    inputs = tuple(torch.randn(n, *s, generator=g) for s in shapes)
    what = "random input" + ("s" if len(shapes) > 1 else "") + " of shape " + ", ".join(
        f"{n}x{'x'.join(map(str, s))}" for s in shapes)
    return inputs, what + (f" ({why})" if why else "")
