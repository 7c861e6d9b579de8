"""Anonymise and deanonymise a folder of face images with a trained flow (issue 18): what `kdforge anonymize` and
`kdforge deanonymize` do, on top of the pure functions of kdforge/privacy/anonymize.py.

    load_flow_pair(run, encoder=..., decoder=...)   -> encode([0, 1] images) -> latents, decode(latents) -> images
    anonymize_folder(run, src, dst, key_seed=N)     every image of src -> its fake face, as a PNG in dst
    deanonymize_folder(run, src, dst, key_seed=N)   every fake of src -> the face back (same seed, alpha, pairing)

Where the flow comes from: a run folder (or its checkpoint file) of
- flow_kd (kdforge/distillers/flow_kd.py): "teacher" is the Glow named by the run's config (`teacher.weights`, read
  from the current directory when relative, as the run read it), "student" the run's trained student encoder or
  decoder. The latents are those the run distilled (its `latent` option): standardized eps_l by default, for both
  sides, or raw z_l when the run said `latent: raw`. Any pairing works (the paper's Fig. 5); the Glow's weights are
  loaded only when a side is the teacher (with students alone it only supplies `preprocess`).
- flow_mle (kdforge/distillers/flow_mle.py): the run trained the Glow itself (its "student" network), so only
  "teacher" exists; asking for a student fails. Standardized latents (why: kdforge/privacy/anonymize.py).

Images: every .png / .jpg / .jpeg of `src` (case-insensitive), searched recursively, sorted by relative path
(recursive so that class or split subfolders keep their layout; when dst lies inside src it is left out of the
search). Each is read with torchvision.io as RGB (grey and RGBA converted, 16-bit PNGs scaled to 8 bits), resized
to the flow's square img_size with an antialiased bilinear filter when it is another size (no crop: a non-square
image is stretched, as aligned face crops are square already), and kept as 8-bit values. Everything is read before
anything is written, so a missing or corrupt image fails naming the file and leaves dst untouched. Outputs are 8-bit
RGB PNGs at the flow's size with the same relative names (suffix .png; two inputs mapping to one output name fail),
in dst (created); an existing output is replaced only with `overwrite=True`.

From the flow's model space back to [0, 1]: `Glow.preprocess` puts the 8-bit value k at its bin centre,
x = (k + 0.5) / 256 - 0.5, so x + 0.5 is up to half a level off k / 255 (+0.5/256 at k = 0, -0.5/256 at k = 255):
it still rounds back to k at 8 bits, but an in-memory comparison sees the shift (62 dB where the images are the
same) and with n_bits < 8 it is off by whole levels. `model_to_unit` is the exact inverse of preprocess instead (for
n_bits < 8, Glow's `postprocess` without its floor): an exact flow's decode(encode(x)) is x to 1e-4 of a level.

The key is `secret_key(D, key_seed)` with D = 3 img_size^2 (3072 at 32 px; ~3 s to draw, growing as D^3).
THE KEY SEED IS THE SECRET: whoever knows it and has the flow (the run, or any network trained to invert it) can
deanonymise every fake made with it, so keep it apart from the fakes, and pick it at random from a large range
(e.g. `python -c "import secrets; print(secrets.randbits(63))"`): a small seed can be found by trying seeds in turn.
Without the seed the orthogonal key is a Haar-random D x D rotation (kdforge/privacy/anonymize.py for what a wrong
guess recovers). alpha (the temperature of the paper's A.3.2) must be the same on both sides and nonzero.

How well it undoes itself: a fake is an image, so it is rounded to 8 bits (written as a PNG, and `preprocess`
quantises whatever the encoder is given anyway) and clipped to [0, 1]. With the teacher on both sides these are the
only losses, carried back through the inverse map (which divides by alpha): on the tests' tiny untrained 16 px Glow
the recovery is 49 dB (mean PSNR) at alpha 0.5 and drops to 39 dB at alpha 1, where 2.4% of its fake values fall
outside [0, 1] (a trained flow's fakes, typical samples of its faces, should stay mostly inside: not measured here;
the result's `clipped` gives the share).
With a student on either side it is as good as the students invert each other. `anonymize_folder` reports the
PSNR between each original and its fake (low is the point: the fake does not look like the person);
`deanonymize_folder` reports the PSNR against `reference` (the originals) when given.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.privacy.anonymize import Decoder, Encoder, Latents, anonymize, deanonymize, secret_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIDES = ("teacher", "student")
MAX_KEY_SEED = 2 ** 64  # torch.Generator seeds are unsigned 64-bit


@dataclass
class FlowPairInfo:
    """What `load_flow_pair` loaded, to print and to keep with the results."""

    run: str  # the run's name (its config's `name`)
    checkpoint: Path
    method: str  # flow_kd | flow_mle
    encoder: str  # teacher | student
    decoder: str
    latent: str  # standardized | raw
    img_size: int
    n_bits: int
    teacher_weights: str | None  # the Glow's weights file (flow_kd with a teacher side), else None

    @property
    def dim(self) -> int:
        """D, the numbers per image and the key's side (RGB only: the folder functions read RGB)."""
        return 3 * self.img_size ** 2

    def describe(self) -> str:
        def side(which: str, part: str) -> str:
            if which == "student":
                return f"student {part}"
            if self.method == "flow_mle":
                return f"Glow {part} (the run's trained flow)"
            return f"teacher Glow {part} ({self.teacher_weights})"

        return (f"run {self.run} ({self.method}, {self.checkpoint}): {side(self.encoder, 'encoder')}, "
                f"{side(self.decoder, 'decoder')}; {self.latent} latents, {self.img_size} px, D = {self.dim}")


def model_to_unit(x: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """A flow's model-space image ([-0.5, 0.5], `Glow.preprocess`'s bin centres) -> [0, 1], not clamped: the exact
    inverse of preprocess at the bin centres (module docstring), so an 8-bit value k comes back as k / 255."""
    n_bins = 2 ** n_bits
    return ((x + 0.5) * n_bins - 0.5) * (256 / n_bins) / 255


@dataclass
class _Pair:
    encode: Encoder  # [0, 1] images -> latents
    decode_unclamped: Decoder  # latents -> [0, 1] images, values outside [0, 1] kept (to count clipping)
    info: FlowPairInfo
    device: torch.device


def _check_side(name: str, value: str) -> None:
    if value not in SIDES:
        raise ValueError(f"{name} must be 'teacher' or 'student', got {value!r}")


def _run_config(ckpt: dict[str, Any], path: Path):
    """The run's config: the one the checkpoint carries, else config.yaml of its run folder."""
    from kdforge.config import load_config

    conf = ckpt.get("config")
    if isinstance(conf, dict) and "student" in conf:
        return load_config(None, base=conf)
    beside = path.parent.parent / "config.yaml"
    if path.parent.name == "checkpoints" and beside.is_file():
        return load_config(beside)
    raise ValueError(f"{path} carries no run config: anonymisation needs a kdforge flow_kd or flow_mle run")


def _check_glow(model: nn.Module, what: str) -> None:
    missing = [m for m in ("encode", "decode", "preprocess", "img_size", "n_bits") if not hasattr(model, m)]
    if missing:
        raise ValueError(f"{what} ({type(model).__name__}) is not a Glow-like flow: it lacks {', '.join(missing)}")


def _flow_kd_latent(cfg) -> str:
    """The run's `latent` option, with flow_kd's own default when the recipe left it out."""
    from kdforge.distillers.flow_kd import FlowKD

    default = inspect.signature(FlowKD.__init__).parameters["latent"].default
    return str(cfg.method.kwargs.get("latent", default))


def _load_pair(run_or_checkpoint: str | Path, encoder: str, decoder: str, device: str | torch.device) -> _Pair:
    from kdforge.config import expand_path
    from kdforge.deploy.sources import checkpoint_path
    from kdforge.engine.checkpoint import load_checkpoint
    from kdforge.engine.trainer import resolve_device
    from kdforge.models import load_weights
    from kdforge.recipe import build_model_from_config, student_from_config, uses_teacher
    from kdforge.registry import DISTILLERS

    _check_side("encoder", encoder)
    _check_side("decoder", decoder)
    path = checkpoint_path(run_or_checkpoint)
    ckpt = load_checkpoint(path)  # read once: config and weights
    cfg = _run_config(ckpt, path)
    method = cfg.method.name
    if getattr(DISTILLERS.get(method), "model_kind", None) != "flow":
        raise ValueError(f"{path} is a {method} run, not a flow run: anonymisation needs a flow_kd run (teacher and "
                         "students) or a flow_mle run (the Glow)")
    trained = student_from_config(ckpt, path, None, None)  # the run's "student" network, weights loaded below
    state = (ckpt.get("networks") or {}).get("student", ckpt.get("model"))
    if state is None:
        raise ValueError(f"{path} holds no trained student network")
    load_weights(trained, {"model": state})
    wants_teacher = "teacher" in (encoder, decoder)
    teacher_weights = None
    if uses_teacher(cfg):  # flow_kd: a Glow teacher and a student with .encoder / .decoder
        student = trained
        if not (hasattr(student, "encoder") and hasattr(student, "decoder")):
            raise ValueError(f"{path}: the {method} run's student ({type(student).__name__}) has no encoder and "
                             "decoder")
        if wants_teacher:
            teacher_weights = expand_path(cfg.teacher.weights)
            if not teacher_weights:
                raise ValueError(f"{path}: the run's teacher has no weights (teacher.weights); an untrained Glow "
                                 "would make meaningless fakes")
            if not Path(teacher_weights).is_file():
                raise FileNotFoundError(f"the run's teacher weights are not found: {teacher_weights} (a relative "
                                        "path is read from the current directory, as the run read it)")
        # with students on both sides the Glow only supplies `preprocess`: its weights are not needed
        glow = build_model_from_config(cfg.teacher, role="teacher", load=wants_teacher)
        _check_glow(glow, f"{path}: the run's teacher")
        latent = _flow_kd_latent(cfg)
    else:  # flow_mle: the trained network is the Glow; there is no student pair
        if "student" in (encoder, decoder):
            raise ValueError(f"{path} is a {method} run: it trained the Glow itself and has no student encoder or "
                             "decoder; use encoder='teacher' and decoder='teacher' (--encoder teacher --decoder "
                             "teacher)")
        glow, student, latent = trained, None, "standardized"
        _check_glow(glow, f"{path}: the run's flow")
    if latent not in ("standardized", "raw"):
        raise ValueError(f"{path}: unknown latent option {latent!r} (standardized or raw)")

    dev = resolve_device(str(device))
    glow = glow.to(dev).eval()  # eval: preprocess puts values at bin centres, no noise
    if student is not None:
        student = student.to(dev).eval()
    standardized = latent == "standardized"
    n_bits = int(glow.n_bits)

    def prepare(x01: torch.Tensor) -> torch.Tensor:
        return glow.preprocess(x01.to(dev))

    @torch.no_grad()
    def encode(x01: torch.Tensor) -> Latents:
        x = prepare(x01)
        if encoder == "teacher":
            return glow.encode(x, standardized=standardized)
        return student.encoder(x)

    @torch.no_grad()
    def decode_unclamped(latents: Latents) -> torch.Tensor:
        if decoder == "teacher":
            x = glow.decode(latents, standardized=standardized)
        else:
            x = student.decoder(latents)
        return model_to_unit(x, n_bits)

    info = FlowPairInfo(run=cfg.name, checkpoint=path, method=method, encoder=encoder, decoder=decoder,
                        latent=latent, img_size=int(glow.img_size), n_bits=n_bits,
                        teacher_weights=teacher_weights)
    return _Pair(encode, decode_unclamped, info, dev)


def load_flow_pair(run_or_checkpoint: str | Path, *, encoder: str = "teacher", decoder: str = "teacher",
                   device: str | torch.device = "cpu") -> tuple[Encoder, Decoder, FlowPairInfo]:
    """The encoder and decoder of a flow run, as the callables `anonymize` / `deanonymize` take.

    `run_or_checkpoint`: a run folder (its checkpoints/last.pt) or a checkpoint file of a flow_kd run (encoder and
    decoder each "teacher", the Glow, or "student", the trained student) or of a flow_mle run ("teacher" only: the
    trained Glow). encode(x) takes (B, 3, S, S) images in [0, 1] and returns the latents the run uses (standardized
    unless the flow_kd run said `latent: raw`); decode(latents) returns [0, 1] images, clamped (module docstring).
    Networks in eval mode on `device` ("auto": CUDA when there is one), called without grad. `info` says what was
    loaded. Raises FileNotFoundError (no such run, missing teacher weights) or ValueError (not a flow run, a student
    asked of a flow_mle run, no config)."""
    pair = _load_pair(run_or_checkpoint, encoder, decoder, device)

    def decode(latents: Latents) -> torch.Tensor:
        return pair.decode_unclamped(latents).clamp(0, 1)

    return pair.encode, decode, pair.info


# ---------------------------------------------------------------------------------------- folders of images
def _list_images(folder: Path, skip: Path | None = None) -> list[Path]:
    """Relative paths of the images under `folder` (recursive, sorted), leaving out `skip` and what is under it."""
    if not folder.exists():
        raise FileNotFoundError(f"no such image folder: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    skip = skip.resolve() if skip is not None else None
    found = []
    for path in folder.rglob("*"):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        found.append(path.relative_to(folder))
    return sorted(found, key=lambda p: p.as_posix())


def _output_names(images: Sequence[Path], src: Path) -> list[Path]:
    outputs, first = [], {}
    for rel in images:
        out = rel.with_suffix(".png")
        if out in first:
            raise ValueError(f"{src / first[out]} and {src / rel} would both be written as {out}; rename one")
        first[out] = rel
        outputs.append(out)
    return outputs


def read_image(path: Path, size: int) -> torch.Tensor:
    """One image file -> (3, size, size) uint8 RGB, resized (antialiased bilinear) when it is another size.
    ValueError naming the file when it cannot be decoded."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    if tuple(image.shape[1:]) == (size, size) and image.dtype == torch.uint8:
        return image
    scale = 65535.0 if image.dtype == torch.uint16 else 255.0
    x = image.float().unsqueeze(0) / scale
    if tuple(image.shape[1:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x[0].clamp(0, 1) * 255).round().to(torch.uint8)


def _read_all(folder: Path, names: Sequence[Path], size: int) -> torch.Tensor:
    """Every image (relative `names`) of `folder` as one (N, 3, size, size) uint8 tensor: all read before anything
    is written, so a bad file stops the run before it changes dst. N 3 size^2 bytes (60 MB for 20k at 32 px)."""
    return torch.stack([read_image(folder / rel, size) for rel in names])


def _to_bytes(x01: torch.Tensor) -> torch.Tensor:
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8)


def _psnr_capped(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of two uint8 batches; identical images count as one value off by one level (the least
    error two different 8-bit images can have: 10 log10(3 S^2 255^2), 83 dB at 32 px), so means stay finite."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    floor = 1.0 / a[0].numel()
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(floor))


def _check_options(key_seed: int, alpha: float, batch_size: int) -> None:
    if isinstance(key_seed, bool) or not isinstance(key_seed, int) or not 0 <= key_seed < MAX_KEY_SEED:
        raise ValueError(f"key_seed must be an integer in 0 .. 2^64 - 1, got {key_seed!r}")
    if not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"alpha must be a finite nonzero number (alpha = 0 sends every face to one fake and cannot "
                         f"be undone), got {alpha}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _run_folder(direction: str, run: str | Path, src: str | Path, dst: str | Path, *, key_seed: int, alpha: float,
                encoder: str, decoder: str, batch_size: int, device: str | torch.device, overwrite: bool,
                reference: str | Path | None, progress: Callable[[str], None] | None) -> dict[str, Any]:
    from torchvision.io import write_png

    from kdforge.deploy.sources import checkpoint_path

    _check_options(key_seed, alpha, batch_size)
    _check_side("encoder", encoder)
    _check_side("decoder", decoder)
    checkpoint_path(run)  # a missing run is named before anything about the folders
    src, dst = Path(src), Path(dst)
    names = _list_images(src, skip=dst)
    if not names:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {src}")
    outputs = _output_names(names, src)
    existing = [dst / out for out in outputs if (dst / out).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} of the outputs exist already, e.g. {existing[0]}; pass "
                              "overwrite=True (--overwrite) to replace them")
    ref_names = None
    if reference is not None:  # each input's original: same relative name, any image suffix
        reference = Path(reference)
        by_stem = {rel.with_suffix(""): rel for rel in _list_images(reference)}
        missing = [rel for rel in names if rel.with_suffix("") not in by_stem]
        if missing:
            raise FileNotFoundError(f"the reference folder {reference} has no image for {src / missing[0]} "
                                    f"({len(missing)} missing)")
        ref_names = [by_stem[rel.with_suffix("")] for rel in names]

    pair = _load_pair(run, encoder, decoder, device)
    size = pair.info.img_size
    images = _read_all(src, names, size)
    originals = _read_all(reference, ref_names, size) if ref_names is not None else None
    key = secret_key(pair.info.dim, key_seed).to(pair.device)  # moved once, not per batch
    transform = anonymize if direction == "anonymize" else deanonymize

    psnrs, clipped = [], 0
    for start in range(0, len(names), batch_size):
        batch = images[start:start + batch_size]
        result = transform(batch.float() / 255, pair.encode, pair.decode_unclamped, key, alpha).cpu()
        clipped += int(((result < 0) | (result > 1)).sum())
        written = _to_bytes(result)
        for out, image in zip(outputs[start:start + batch_size], written):
            target = dst / out
            target.parent.mkdir(parents=True, exist_ok=True)
            write_png(image, str(target))
        compare = batch if direction == "anonymize" else (
            originals[start:start + batch_size] if originals is not None else None)
        if compare is not None:
            psnrs.append(_psnr_capped(compare, written))
        if progress is not None:
            progress(f"{min(start + batch_size, len(names))}/{len(names)} images")

    all_psnr = torch.cat(psnrs) if psnrs else None
    compared_with = ("the originals" if direction == "anonymize" else
                     f"the reference folder {reference}" if originals is not None else None)
    return {"direction": direction, "images": len(names), "written": len(outputs), "src": str(src),
            "dst": str(dst), "loaded": pair.info.describe(), "encoder": encoder, "decoder": decoder,
            "latent": pair.info.latent, "img_size": size, "key_dim": pair.info.dim, "alpha": alpha,
            "psnr": None if all_psnr is None else float(all_psnr.mean()),
            "psnr_min": None if all_psnr is None else float(all_psnr.min()),
            "psnr_compared_with": compared_with,
            "clipped": clipped / (len(names) * pair.info.dim)}


def anonymize_folder(run: str | Path, src: str | Path, dst: str | Path, *, key_seed: int, alpha: float = 1.0,
                     encoder: str = "student", decoder: str = "student", batch_size: int = 64,
                     device: str | torch.device = "cpu", overwrite: bool = False,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Replace every face image of `src` by its fake, x_fake = decode(alpha K encode(x)) with K =
    secret_key(D, key_seed), written as PNGs of the same relative names into `dst` (module docstring: which images,
    sizes, the flow `run` and the pairing). Whoever knows `key_seed` can undo it (`deanonymize_folder`): keep it
    secret and apart from the fakes.

    Returns counts ("images", "written"), what was loaded ("loaded"), "psnr" / "psnr_min": the mean and lowest
    per-image PSNR (dB) between each original (at the flow's size) and its fake: low is the point, "clipped": the
    share of fake values outside [0, 1] clipped when written (lost to the way back). `progress` gets a line per
    batch. Raises ValueError (no images, unreadable image, bad alpha or seed, not a flow run), FileNotFoundError,
    FileExistsError (outputs exist, without `overwrite`)."""
    return _run_folder("anonymize", run, src, dst, key_seed=key_seed, alpha=alpha, encoder=encoder, decoder=decoder,
                       batch_size=batch_size, device=device, overwrite=overwrite, reference=None, progress=progress)


def deanonymize_folder(run: str | Path, src: str | Path, dst: str | Path, *, key_seed: int, alpha: float = 1.0,
                       encoder: str = "student", decoder: str = "student", batch_size: int = 64,
                       device: str | torch.device = "cpu", overwrite: bool = False,
                       reference: str | Path | None = None,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Undo `anonymize_folder`: every fake of `src` -> decode(K^T encode(x_fake) / alpha), written as PNGs of the same
    relative names into `dst`. Needs the same run, `key_seed` and `alpha`; a wrong seed gives other faces, not the
    originals. The pairing need not be the one that anonymised (any encoder inverts any decoder as well as it can).

    `reference`: a folder holding the originals under the same relative names (any image suffix): then "psnr" /
    "psnr_min" are the mean and lowest PSNR (dB) of each recovered face against its original (at the flow's size),
    else None. Otherwise as `anonymize_folder`."""
    return _run_folder("deanonymize", run, src, dst, key_seed=key_seed, alpha=alpha, encoder=encoder,
                       decoder=decoder, batch_size=batch_size, device=device, overwrite=overwrite,
                       reference=reference, progress=progress)
