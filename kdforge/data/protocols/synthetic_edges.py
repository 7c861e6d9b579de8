"""Generated edges -> shape pairs: utkface_edges' task on kdforge's generated shapes, for demos and tests.

The images are the generated shapes of kdforge.data.synthetic (`make_synthetic`: a striped, coloured shape on a
cluttered background, with a distractor blob and pixel noise), the targets; the inputs are their edge maps,
computed exactly as utkface_edges computes a face's (`edge_maps`, kornia on the grey image). Each pair is stored
side by side like utkface_edges' (columns [0, W) the edge map, grey replicated to 3 channels; [W, 2W) the image),
so `PairedBatchLoader` serves it as `image` = edges and `target` = the shapes image, cropping and flipping both
with one draw. Nothing is downloaded: the builder takes no source (`data.source` stays null) and a recipe
prepares it into the decoded cache on first use, keyed by its options, like any other dataset.

Edges: canny with thresholds 0.15 / 0.3 (utkface_edges' detector, lower thresholds). Measured at 32 px on 2,000
generated images (share of edge pixels per image; "blank": under 1 %): 0.15 / 0.3 gives 7.9 % and 1.3 % blank,
outlines of the shape, its stripes and the distractor with a few background specks; utkface_edges' 0.2 / 0.4
gives cleaner strokes, 5.7 %, but 8.3 % blank (low-contrast shapes vanish); 0.1 / 0.2 gives 14 %, much of it
background clutter; sobel 0.1 gives 3.3 % in broken strokes. Canny with hysteresis on 2,000 images at 32 px took
about 4 s on 2 busy cores (sobel: 1 s).

Colour: `make_synthetic` greys about half of the images (its fairness `group`). group_bias 0.5 (the default
here) greys every class with probability 1/2 in train as in test, so the two splits come from one distribution;
whether an image is grey cannot be seen in its edges, which is part of what a generator cannot know, as the
background colour is. Label: the synthetic class (shape-hue-texture); attribute `group` (0 colour, 1 grey).

Options: n_train (2000), n_test (500), size (32; unet_generator needs a power of two >= 32), seed (0),
group_bias (0.5), edges ('canny'), low_threshold (0.15), high_threshold (0.3), sobel_threshold (0.1).
With the same n_train, n_test, size, seed and group_bias, the targets are the images of the plain `synthetic`
dataset (data.name synthetic, seed 0): a classifier trained on that train split never saw a test target.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kdforge.data.protocols.record import ProtocolData
from kdforge.data.protocols.utkface_edges import PairedBatchLoader, _check_edge_options, edge_maps, split_pairs
from kdforge.data.synthetic import make_synthetic
from kdforge.registry import DATASETS

VERSION = 1
REFERENCE = ("kdforge's generated shapes (kdforge.data.synthetic) paired with their kornia edge maps, as pix2pix's "
             "Edges -> Shoes (Isola et al., CVPR 2017)")


@DATASETS.register("synthetic_edges")
def synthetic_edges(
    source: str | Path | None = None, *, n_train: int = 2000, n_test: int = 500, size: int = 32, seed: int = 0,
    group_bias: float = 0.5, edges: str = "canny", low_threshold: float = 0.15, high_threshold: float = 0.3,
    sobel_threshold: float = 0.1,
) -> dict[str, ProtocolData]:
    """Generated shapes paired with their edge maps, side by side (see the module); `source` is ignored."""
    _check_edge_options(edges, low_threshold, high_threshold, sobel_threshold)
    if int(size) < 8:
        raise ValueError(f"synthetic_edges: size must be >= 8 (32 for unet_generator), got {size}")
    shapes = make_synthetic(int(n_train), int(n_test), size=int(size), seed=int(seed), group_bias=float(group_bias))
    options = {"n_train": int(n_train), "n_test": int(n_test), "size": int(size), "seed": int(seed),
               "group_bias": float(group_bias), "edges": edges, "low_threshold": float(low_threshold),
               "high_threshold": float(high_threshold), "sobel_threshold": float(sobel_threshold)}
    import kornia

    detector = (f"kornia.filters.canny(grey, {low_threshold}, {high_threshold}) with 8-connected hysteresis"
                if edges == "canny" else f"kornia.filters.sobel(grey) > {sobel_threshold}")
    detector += f" (kornia {kornia.__version__})"  # another version may draw other edges
    out: dict[str, ProtocolData] = {}
    for split, data in shapes.items():
        images = np.asarray(data.images)
        edge = edge_maps(images, edges=edges, low_threshold=low_threshold, high_threshold=high_threshold,
                         sobel_threshold=sobel_threshold)
        h, w = images.shape[1:3]
        pairs = np.empty((len(images), h, 2 * w, 3), dtype=np.uint8)
        left, right = split_pairs(pairs)
        left[...] = edge[..., None]  # grey replicated to 3 channels, as utkface_edges stores it
        right[...] = images
        density = float(edge.mean() / 255.0) if len(edge) else 0.0
        out[split] = ProtocolData(
            pairs, data.labels, data.classes, attrs=dict(data.attrs), source=f"generated (seed {int(seed)})",
            protocol={"protocol": "synthetic_edges", "version": VERSION, "reference": REFERENCE, "split": split,
                      "options": options,
                      "rule": f"make_synthetic(n_train, n_test, size, seed, group_bias)['{split}']; edges: {detector}",
                      "layout": f"side by side, {h} x {2 * w}: columns [0, {w}) the edge map (255 = edge, the "
                                f"input), [{w}, {2 * w}) the generated image (the target)",
                      "classes": list(data.classes), "edge_density": round(density, 4)})
    return out


synthetic_edges.loader_class = PairedBatchLoader  # build_loaders serves its pairs as `image` (edges) and `target`
synthetic_edges.generated = True  # no source: build_loaders prepares it into the cache from its options alone

