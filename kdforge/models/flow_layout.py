"""The multi-scale layout a Glow flow and its CNN students share (Kingma & Dhariwal 2018; Dinh et al. 2017), so a
student encoder produces exactly the teacher's latents and a student decoder takes them.

An image (C, H, W) goes through L levels. Each level squeezes (2 x 2 space-to-depth: C, H, W -> 4C, H/2, W/2), runs
K steps, and, except the last, splits off half its channels as that level's latent z_l; the other half goes on.
With C = 3 at 32 px and L = 3 the latents are [(6, 16, 16), (12, 8, 8), (48, 4, 4)]: 3,072 numbers, as many as the
image (a flow keeps the dimension). Latents travel as that list, first level first; `flatten_latents` joins them
into one (B, D) vector (the space the anonymisation key rotates) and `unflatten_latents` splits it back.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2 x 2 block's pixels become channels, channel c's four sub-pixels
    at 4c .. 4c+3 in the order (0, 0), (0, 1), (1, 0), (1, 1)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze2d needs an even height and width, got {tuple(x.shape)}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `squeeze2d`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c4, h, w = x.shape
    if c4 % 4:
        raise ValueError(f"unsqueeze2d needs channels divisible by 4, got {tuple(x.shape)}")
    x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


def latent_shapes(channels: int, size: int, levels: int) -> list[tuple[int, int, int]]:
    """The per-level latent shapes (C_l, H_l, W_l) for square (channels, size, size) images and `levels` levels."""
    if levels < 1 or size % (2 ** levels):
        raise ValueError(f"a {levels}-level flow needs an image side divisible by {2 ** levels}, got {size}")
    shapes, c, s = [], channels, size
    for level in range(levels):
        c, s = 4 * c, s // 2
        if level < levels - 1:
            shapes.append((c // 2, s, s))
            c //= 2
        else:
            shapes.append((c, s, s))
    return shapes


def flatten_latents(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """[z_1, ..., z_L] -> (B, D), level after level."""
    return torch.cat([z.flatten(1) for z in latents], dim=1)


def unflatten_latents(flat: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """(B, D) -> [z_1, ..., z_L] with `shapes` (from `latent_shapes`)."""
    sizes = [int(torch.tensor(s).prod()) for s in shapes]
    if flat.shape[1] != sum(sizes):
        raise ValueError(f"a latent vector of {flat.shape[1]} numbers does not fit the shapes {list(shapes)} "
                         f"({sum(sizes)} numbers)")
    return [part.reshape(flat.shape[0], *shape) for part, shape in zip(flat.split(sizes, dim=1), shapes)]
