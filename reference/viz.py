"""Small plotting helpers shared by the notebooks: one colour per NSA branch, masks drawn the same way everywhere.

The branch palette comes from ``reference.plotting.BRANCH_COLORS`` when that module exists, so every
figure in the project uses the same three colours; otherwise it is defined here. matplotlib is imported
lazily, so importing ``reference`` never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

try:  # the project-wide palette (reference/plotting.py), if present
    from .plotting import BRANCH_COLORS, MASK_COLORS
except ImportError:  # pragma: no cover - depends on which modules exist
    BRANCH_COLORS = {"cmp": "#4C72B0", "slc": "#DD8452", "win": "#55A868"}
    MASK_COLORS = {**BRANCH_COLORS, "full": "#444444"}

BRANCH_LABELS = {"cmp": "compressed", "slc": "selected", "win": "sliding window"}
FULL_COLOR = MASK_COLORS.get("full", "#444444")  # full causal attention, the baseline every branch is compared with


def color_of(name: str) -> str:
    """A branch's colour (``"cmp"``, ``"slc"``, ``"win"``) or the full-attention grey for anything else."""
    return BRANCH_COLORS.get(name, FULL_COLOR)


def binary_cmap(color: str):
    """White (masked) to ``color`` (read): the colormap of one boolean mask."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(["white", color])


def show_mask(ax, mask: torch.Tensor, name: str, title: str | None = None, colorbar: bool = True):
    """Draw a boolean ``[queries, keys]`` mask in the colour of branch ``name`` with a 0/1 colorbar."""
    m = np.asarray(mask.detach().cpu().numpy(), dtype=float)
    im = ax.imshow(m, cmap=binary_cmap(color_of(name)), vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_xlabel("key position s")
    ax.set_ylabel("query position t")
    ax.set_title(title if title is not None else BRANCH_LABELS.get(name, name))
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, ticks=[0.25, 0.75], shrink=0.8)
        cb.ax.set_yticklabels(["not read", "read"])
    return im


def mask_rgb(masks: Mapping[str, torch.Tensor], mix: bool = False) -> np.ndarray:
    """``[T, S, 3]`` image of several boolean masks, white where none is set.

    By default a pixel takes the colour of the *last* listed mask that sets it, so with the order
    (cmp, slc, win) every pair shows the finest resolution at which NSA reads it. With ``mix=True`` a
    pixel gets the mean colour of all the masks that set it.
    """
    from matplotlib.colors import to_rgb

    first = next(iter(masks.values()))
    rgb = np.ones((*first.shape, 3))
    total = np.zeros((*first.shape, 3))
    count = np.zeros(first.shape)
    for name, mask in masks.items():
        m = np.asarray(mask.detach().cpu().numpy(), dtype=bool)
        colour = np.array(to_rgb(color_of(name)))
        rgb[m] = colour
        total += m[..., None] * colour
        count += m
    if mix:
        seen = count > 0
        rgb[seen] = total[seen] / count[seen, None]
    return rgb


def branch_legend(ax, names=("cmp", "slc", "win"), **kwargs):
    """A legend with one coloured patch per branch (for images, where a colorbar cannot name categories)."""
    from matplotlib.patches import Patch

    handles = [Patch(color=color_of(n), label=BRANCH_LABELS.get(n, n)) for n in names]
    return ax.legend(handles=handles, **kwargs)
