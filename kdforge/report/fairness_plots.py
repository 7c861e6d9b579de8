"""Fairness pictures for a run folder: per-(group, class) accuracy bars and t-SNE of penultimate features.

Figures are built with matplotlib's object API (no pyplot: no global state, no GUI backend) and written as
PNG by the Agg renderer. t-SNE needs scikit-learn, imported only when a t-SNE plot is asked for.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# MFD supplement 1.4 (Jung et al., CVPR 2022), the settings of their Figure 5; scikit-learn defaults otherwise
MFD_TSNE = {"n_components": 3, "perplexity": 200.0, "early_exaggeration": 1.0, "max_iter": 250, "metric": "cosine",
            "random_state": 5}


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    # summary.json keeps NaN as the string 'nan'; float() reads it back
    return np.asarray([[float(v) for v in row] for row in x] if _is_table(x) else x)


def _is_table(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(r, (list, tuple)) for r in x)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / max(1, n - 1)) for i in range(n)]


def group_accuracy_bars(table: Any, path: str | Path, class_names: Sequence[str] | None = None,
                        group_names: Sequence[str] | None = None, *, title: str | None = None) -> Path:
    """A grouped bar chart of a (groups, classes) accuracy table in % (`group_class_top1`): one cluster of bars
    per class, one bar per group; an empty cell (NaN) has no bar. Returns the PNG's path."""
    from matplotlib.figure import Figure

    acc = _as_array(table).astype(float)
    if acc.ndim != 2:
        raise ValueError(f"group accuracy table must be (groups, classes), got shape {acc.shape}")
    g_n, c_n = acc.shape
    class_names = list(class_names) if class_names is not None else [str(c) for c in range(c_n)]
    group_names = list(group_names) if group_names is not None else [f"group {g}" for g in range(g_n)]
    if len(class_names) != c_n or len(group_names) != g_n:
        raise ValueError(f"{len(class_names)} class names and {len(group_names)} group names for a table of "
                         f"{g_n} groups x {c_n} classes")
    fig = Figure(figsize=(min(40.0, max(5.0, 0.35 * c_n * max(2, g_n) + 1.5)), 3.4))
    ax = fig.subplots()
    width = 0.8 / g_n
    xs = np.arange(c_n)
    for g, colour in zip(range(g_n), _colours(g_n)):
        heights = np.nan_to_num(acc[g], nan=0.0)
        bars = ax.bar(xs - 0.4 + width * (g + 0.5), heights, width, label=group_names[g], color=colour)
        for bar, value in zip(bars, acc[g]):
            bar.set_visible(bool(np.isfinite(value)))  # an empty cell is not a 0% cell
    ax.set_xticks(xs, class_names, rotation=45 if c_n > 12 or max(map(len, class_names)) > 6 else 0,
                  ha="right" if c_n > 12 else "center", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("class")
    ax.set_title(title or "accuracy per class and group")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach the top
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def tsne_embedding(features: Any, *, seed: int = 5, **tsne: Any) -> np.ndarray:
    """scikit-learn t-SNE of (n, d) features with the MFD supplement's settings (`MFD_TSNE`), any of them
    overridden by keyword. The perplexity is lowered to (n - 1) / 3 when n is too small for it (scikit-learn
    needs perplexity < n)."""
    from sklearn.manifold import TSNE

    x = _as_array(features)
    x = x.reshape(len(x), -1).astype(np.float32)
    opts = {**MFD_TSNE, "random_state": seed, **tsne}
    opts["perplexity"] = min(float(opts["perplexity"]), max(1.0, (len(x) - 1) / 3))
    return TSNE(**opts).fit_transform(x)


def tsne_plot(features: Any, labels: Any, groups: Any, path: str | Path, *, max_samples: int = 2000, seed: int = 5,
              class_names: Sequence[str] | None = None, group_names: Sequence[str] | None = None,
              title: str | None = None, **tsne: Any) -> Path:
    """Two t-SNE panels of penultimate features (MFD Figure 5): points coloured by class, then by group.

    t-SNE runs with the MFD supplement 1.4 settings (3-d embedding, perplexity 200, early exaggeration 1,
    250 iterations, cosine metric, random state 5); keyword arguments override them (e.g. `n_components=2`).
    At most `max_samples` points are embedded, a subsample drawn with `seed`, so a CPU run takes seconds to a
    minute. Returns the PNG's path.
    """
    from matplotlib.figure import Figure

    x = _as_array(features)
    y = _as_array(labels).astype(int).reshape(-1)
    a = _as_array(groups).astype(int).reshape(-1)
    if not len(x) == len(y) == len(a):
        raise ValueError(f"{len(x)} feature rows, {len(y)} labels and {len(a)} group ids: they must match")
    if len(x) < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {len(x)}")
    if len(x) > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_samples, replace=False))
        x, y, a = x[keep], y[keep], a[keep]
    emb = tsne_embedding(x, seed=seed, **tsne)
    dims = emb.shape[1]
    if dims not in (2, 3):
        raise ValueError(f"t-SNE plots need a 2-d or 3-d embedding, got n_components={dims}")

    fig = Figure(figsize=(11, 5))
    panels = [("class", y, class_names), ("group", a, group_names)]
    for i, (what, ids, names) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1, **({"projection": "3d"} if dims == 3 else {}))
        values = np.unique(ids)
        colours = _colours(int(values.max()) + 1)
        for v in values:
            pts = emb[ids == v]
            label = names[v] if names is not None and v < len(names) else f"{what} {v}"
            ax.scatter(*pts.T, s=4, color=colours[v], label=label, alpha=0.7, linewidths=0)
        ax.set_title(f"coloured by {what}")
        if len(values) <= 20:
            ax.legend(fontsize=6, markerscale=3, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
        if dims == 3:
            ax.set_zticks([])
    fig.suptitle(title or f"t-SNE of penultimate features ({len(emb)} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


@torch.no_grad()
def penultimate_features(model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device | str = "cpu", *,
                         layer: str = "auto:in", max_samples: int | None = 2000, group_key: str = "group",
                         to_batch: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(features, labels, groups) of the first `max_samples` samples of `loader`, on the CPU.

    Features are taken by a forward hook (kdforge.distillers.base.FeatureTaps), so any model works: the default
    `auto:in` is the input of the last nn.Linear, i.e. the pooled penultimate feature; any module path (with
    `:in` for its input) can be named instead. Features are flattened per sample. `groups` is None when batches
    carry no `group_key`. The model runs in eval mode and is put back in its previous mode afterwards.
    """
    from kdforge.distillers.base import FeatureTaps

    taps = FeatureTaps(model, [layer])
    was_training = model.training
    model.eval()
    feats, labels, groups = [], [], []
    seen, limit = 0, math.inf if max_samples is None else max_samples
    try:
        for raw in loader:
            if seen >= limit:
                break
            batch = to_batch(raw, device) if to_batch else raw
            model(batch["image"].to(device))
            take = int(min(len(batch["label"]), limit - seen))
            feats.append(taps[layer].detach().flatten(1)[:take].float().cpu())
            labels.append(batch["label"][:take].cpu())
            if group_key in batch:
                groups.append(batch[group_key][:take].cpu())
            seen += take
    finally:
        taps.remove()
        model.train(was_training)
    if not feats:
        raise ValueError("penultimate_features: the loader yielded no samples")
    has_groups = len(groups) == len(feats)  # every batch carried groups
    return torch.cat(feats), torch.cat(labels), torch.cat(groups) if has_groups else None
