"""Reversible face anonymisation with a flow and a secret key (issue 18; the appendix of "Defender of privacy and
fairness", sections A.2-A.3): encode a face to its latent, rotate the latent by a secret orthogonal matrix, decode
the rotated latent to a fake face; whoever holds the key undoes the rotation and gets the face back.

    anonymize:    z = E(x),  z_fake = alpha K z,            x_fake = D(z_fake)
    deanonymize:  z_fake = E(x_fake),  z = K^T z_fake / alpha,  x_rec = D(z)

`encode` and `decode` are plain callables, so the teacher (kdforge/models/glow.py), the CNN students
(kdforge/models/flow_students.py) and any mixed pairing plug in alike. Latents may be a list [z_1 .. z_L] (the
multi-scale layout of kdforge/models/flow_layout.py) or one tensor; the key acts on them flattened to (B, D), and
`decode` gets back the same form `encode` gave. With an exact flow on both sides (Glow's encode and decode)
`deanonymize(anonymize(x))` is x up to float error (~1e-6 on a float32 Glow); with a student on either side it is
only as close as the students are to inverting each other (the paper's Fig. 5).

Why an orthogonal key: it keeps the latent's norm, so a standard-normal latent stays standard normal (the fake face
is a typical sample of the model) and the key is undone by a transpose, exactly. The privacy argument (Lemma 1 of
A.2, from Wu et al. 2020) is about an adversary guessing the key: a guess within the (theta, A)-ball, a small
Frobenius distance from the key, counts as a successful recovery. `perturbed_key` draws such wrong keys at a chosen
distance, to measure how recovery degrades as the guess moves away (an untrained 32 px Glow, K = 4: PSNR of the
recovery 129 dB with the key, 86 / 66 / 46 / 26 dB at distances 0.01 / 0.1 / 1 / 10, and 8 dB at 78, as low as the
fake itself).

The temperature alpha (A.3.2, "fairness enhancement"): the paper writes X'_fake = D(alpha Z_enc) with Z_enc the
encrypted (rotated) latent and alpha in [0, 1] (Fig. 6): alpha -> 0 shrinks every fake latent towards the origin, the
mode of the Gaussian prior, so the fakes become less diverse, more "average" faces. Here alpha multiplies the
rotated latent, z_fake = alpha K z; as K is linear that equals K (alpha z), so it does not matter whether one
scales before or after rotating. Deanonymising divides by the same alpha, so any alpha != 0 stays reversible (with
an exact flow); alpha = 0 maps every face to D(0) and cannot be undone. For Glow, "the origin" is z = 0 of its raw
latents; its learned priors are N(mu_l, sigma_l), so to shrink towards the prior means instead pass
`lambda x: glow.encode(x, standardized=True)` and `lambda z: glow.decode(z, standardized=True)` (Glow's
reduced-temperature sampling scales the standardised latents the same way). The same pair also makes the key
distribution-preserving for such a Glow: its raw latents have a different mean and scale per level, which a
rotation mixes, while the standardised ones are N(0, I) under the model, as the rotation assumes.

Keys: `secret_key(D, seed)` is a Haar-random (uniformly distributed) orthogonal D x D matrix, drawn in float64
from its own torch.Generator (never the global RNG, so making a key does not shift a run's randomness) and stored
as float32 by default. At D = 3072 (32 px RGB), the float32 key's round trip z -> K z -> K^T K z is off by at most
2.4e-6 (relative RMS 5e-7) on standard-normal latents, against 1e-14 for a float64 key: far below an 8-bit pixel
(1/256), so float32 is the default; pass dtype=torch.float64 for the reference. The QR takes ~3 s at D = 3072 on one
core and grows as D^3 (about 64x, with a 1.2 GB float64 matrix, at 64 px's D = 12288).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from kdforge.models.flow_layout import flatten_latents, unflatten_latents

Latents = list[torch.Tensor] | torch.Tensor
Encoder = Callable[[torch.Tensor], Latents]
Decoder = Callable[[Latents], torch.Tensor]


def _haar_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A (dim, dim) float64 orthogonal matrix, uniformly (Haar) distributed: Q of the QR of a Gaussian matrix with
    each column's sign flipped to make diag(R) positive (Mezzadri 2007). Without that correction the QR routine's
    sign convention biases the distribution."""
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)  # a zero pivot has probability 0; keep Q then
    return q * signs


def secret_key(dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A secret key: a Haar-random orthogonal (dim, dim) matrix, the same for the same seed, drawn from its own
    generator (torch's global RNG is left untouched), computed in float64 and returned in `dtype` (module docstring:
    float32 costs 2.4e-6 of round-trip error at dim = 3072)."""
    if dim < 1:
        raise ValueError(f"secret_key: dim must be >= 1, got {dim}")
    generator = torch.Generator().manual_seed(seed)
    return _haar_orthogonal(dim, generator).to(dtype)


def _flat_latents(latents: Latents) -> tuple[torch.Tensor, list[tuple[int, ...]], bool]:
    """Latents in either form -> ((B, D), per-part shapes, whether they were a list): what `_restore` needs to hand
    the decoder the form the encoder gave."""
    if isinstance(latents, torch.Tensor):
        return latents.flatten(1), [tuple(latents.shape[1:])], False
    if not isinstance(latents, Sequence) or not latents:
        raise TypeError(f"encode must return a tensor or a non-empty list of tensors, got {type(latents).__name__}")
    return flatten_latents(latents), [tuple(z.shape[1:]) for z in latents], True


def _restore(flat: torch.Tensor, shapes: list[tuple[int, ...]], as_list: bool) -> Latents:
    parts = unflatten_latents(flat, shapes)
    return parts if as_list else parts[0]


def _rotate(flat: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """flat @ matrix, in the wider of the two dtypes (a float64 key keeps its precision on float32 latents), on the
    latents' device, returned in the latents' dtype."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != flat.shape[1]:
        raise ValueError(f"the key must be ({flat.shape[1]}, {flat.shape[1]}) for latents of {flat.shape[1]} numbers "
                         f"per image, got {tuple(matrix.shape)}")
    wide = torch.promote_types(flat.dtype, matrix.dtype)
    return (flat.to(wide) @ matrix.to(device=flat.device, dtype=wide)).to(flat.dtype)


def anonymize(x: torch.Tensor, encode: Encoder, decode: Decoder, key: torch.Tensor,
              alpha: float = 1.0) -> torch.Tensor:
    """The fake face x_fake = decode(alpha * key @ z) for z = encode(x), per image (module docstring).

    x: a batch of images in the flow's input space (Glow: [-0.5, 0.5]); key: (D, D) orthogonal, D the latent size;
    alpha: the temperature of A.3.2 (1 = plain anonymisation, towards 0 = more average faces)."""
    flat, shapes, as_list = _flat_latents(encode(x))
    fake = alpha * _rotate(flat, key.T)  # row vectors: (K z)^T = z^T K^T
    return decode(_restore(fake, shapes, as_list))


def deanonymize(x_fake: torch.Tensor, encode: Encoder, decode: Decoder, key: torch.Tensor,
                alpha: float = 1.0) -> torch.Tensor:
    """The inverse of `anonymize` with the same key and alpha: decode(key^T @ encode(x_fake) / alpha). Exact up to
    float error when encode and decode are an exact flow's; approximate with students. A wrong key (e.g.
    `perturbed_key`) gives a wrong face, the further off the further the key."""
    if alpha == 0:
        raise ValueError("deanonymize: alpha = 0 sends every face to decode(0); nothing is left to recover")
    flat, shapes, as_list = _flat_latents(encode(x_fake))
    original = _rotate(flat / alpha, key)  # row vectors: (K^T z)^T = z^T K
    return decode(_restore(original, shapes, as_list))


def max_key_distance(dim: int) -> float:
    """The largest Frobenius distance `perturbed_key` reaches for a (dim, dim) key: 2 sqrt(2 floor(dim / 2)), i.e.
    2 sqrt(dim) for even dim (the key's negative) and 2 sqrt(dim - 1) for odd dim (where -K has the other
    determinant, so no rotation of K reaches it)."""
    return 2.0 * math.sqrt(2 * (dim // 2))


def perturbed_key(key: torch.Tensor, distance: float, seed: int) -> torch.Tensor:
    """A wrong key at Frobenius distance `distance` from `key`, still orthogonal: an adversary's guess on the
    sphere of radius `distance` of the (theta, A)-ball experiment (A.2.1, Definition 3).

    K' = K exp(t S) with S = B J B^T skew-symmetric: B a Haar-random orthogonal matrix drawn from `seed` (the
    direction of the error) and J block-diagonal with 2 x 2 blocks [[0, -1], [1, 0]] (and a 0 for odd D). So
    exp(t S) = B R(t) B^T, R(t) a rotation by the same angle t in each of the m = floor(D / 2) planes, computed
    without a matrix exponential. Because K is orthogonal, ||K - K'||_F = ||I - R(t)||_F, and each plane adds
    ||I - R_2(t)||_F^2 = 8 sin^2(t / 2), hence the closed form

        distance = sqrt(8 m) sin(t / 2),   t = 2 asin(distance / sqrt(8 m)),

    valid up to `max_key_distance(D)` = sqrt(8 m) (t = pi). Same seed, same direction: the wrong keys of growing
    distance for one seed lie on one geodesic from K. One equal angle in every plane is a choice (any spectrum
    reaching the distance would do); it spreads the error over the whole latent instead of a few directions.
    For scale: an independent random key lies at about sqrt(2 D) from K (78 at D = 3072), as E tr(K^T K'') = 0.
    Computed in float64, returned in key's dtype."""
    dim = key.shape[0]
    if key.dim() != 2 or key.shape[1] != dim:
        raise ValueError(f"perturbed_key: the key must be square, got {tuple(key.shape)}")
    reach = max_key_distance(dim)
    if not 0 <= distance <= reach * (1 + 1e-12):
        raise ValueError(f"perturbed_key: a rotation of a ({dim}, {dim}) key lies within Frobenius distance "
                         f"[0, {reach:.4f}] of it, got {distance}")
    planes = dim // 2
    if distance == 0 or planes == 0:
        return key.clone()
    angle = 2.0 * math.asin(min(distance / reach, 1.0))
    cos, sin = math.cos(angle), math.sin(angle)
    # R(t) - I on the 2m paired coordinates (2i, 2i + 1); an odd last coordinate is left as it is
    rotation_minus_identity = torch.zeros(dim, dim, dtype=torch.float64)
    even, odd = torch.arange(0, 2 * planes, 2), torch.arange(1, 2 * planes, 2)
    rotation_minus_identity[even, even] = cos - 1.0
    rotation_minus_identity[odd, odd] = cos - 1.0
    rotation_minus_identity[even, odd] = -sin
    rotation_minus_identity[odd, even] = sin
    basis = _haar_orthogonal(dim, torch.Generator().manual_seed(seed))
    wide_key = key.to(device="cpu", dtype=torch.float64)
    wrong = wide_key + wide_key @ basis @ rotation_minus_identity @ basis.T  # K B R B^T = K + K B (R - I) B^T
    return wrong.to(device=key.device, dtype=key.dtype)
