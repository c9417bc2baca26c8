"""The project's branch palette and the mask figures of ``reference.demo`` (reusable in notebooks).

One colour per NSA branch everywhere (demo, notebooks, docs): compressed, selected, window, plus the
union of the three and full causal attention for comparison. matplotlib is imported inside the
functions, so importing ``reference`` never needs it; the caller picks the backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

BRANCH_COLORS = {"cmp": "#4C72B0", "slc": "#DD8452", "win": "#55A868"}  # compressed, selected, window
MASK_COLORS = {**BRANCH_COLORS, "union": "#8172B3", "full": "#444444"}
MASK_TITLES = {
    "cmp": "compressed",
    "slc": "selected",
    "win": "sliding window",
    "union": "union (NSA)",
    "full": "full causal",
}


def downsample_mask(mask: torch.Tensor, max_rows: int, max_cols: int) -> tuple[np.ndarray, int, int]:
    """Max-pool a bool mask [R, C] to at most [max_rows, max_cols]: a pixel is set if any token in it is read.

    Returns the pooled float array and the pooling factors (rows, cols).
    """
    R, C = mask.shape
    fr, fc = max(1, -(-R // max_rows)), max(1, -(-C // max_cols))
    padded = torch.nn.functional.pad(mask.float(), (0, -C % fc, 0, -R % fr))
    pooled = torch.nn.functional.max_pool2d(padded[None, None], (fr, fc))[0, 0]
    return pooled.numpy(), fr, fc


def plot_mask_panels(
    masks: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    title: str,
    row_start: int = 0,
    col_start: int = 0,
    max_pixels: int = 512,
) -> Path:
    """One panel per mask (keys of ``MASK_COLORS``), bool [queries, keys] each; saves a PNG at ``path``.

    ``row_start``/``col_start`` are the token positions of the masks' first query and key (for the axes).
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, axes = plt.subplots(1, len(masks), figsize=(3.6 * len(masks), 3.9), squeeze=False)
    for ax, (name, mask) in zip(axes[0], masks.items()):
        image, fr, fc = downsample_mask(mask, max_pixels, max_pixels)
        R, C = mask.shape
        extent = (col_start - 0.5, col_start + C - 0.5, row_start + R - 0.5, row_start - 0.5)
        cmap = ListedColormap(["white", MASK_COLORS[name]])
        ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto", extent=extent)
        share = mask.float().mean().item()
        pooled = f", {fr}x{fc} tokens/pixel" if fr * fc > 1 else ""
        ax.set_title(f"{MASK_TITLES[name]} ({100 * share:.1f}% of pairs{pooled})", fontsize=9)
        ax.set_xlabel("key position s")
        ax.set_ylabel("query position t")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_query_rows(
    rows: Sequence[tuple[str, str, torch.Tensor]], path: str | Path, *, title: str, max_pixels: int = 1024
) -> Path:
    """Which keys one query reads: ``rows`` of (label, colour key of ``MASK_COLORS``, bool [S]); saves a PNG."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    S = rows[0][2].shape[0]
    image = np.ones((len(rows), min(S, max_pixels), 3))  # white: not read
    for r, (_, name, keys) in enumerate(rows):
        pooled, _, _ = downsample_mask(keys[None, :], 1, max_pixels)
        image[r, pooled[0] > 0] = to_rgb(MASK_COLORS[name])
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.4))
    ax.imshow(image, interpolation="nearest", aspect="auto", extent=(-0.5, S - 0.5, len(rows) - 0.5, -0.5))
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows])
    ax.set_xlabel("key position s")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_gate_histograms(gates: torch.Tensor, path: str | Path, *, title: str) -> Path:
    """Histogram of each branch's gate values, gates [..., 3] in the order (cmp, slc, win); saves a PNG."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = gates.detach().reshape(-1, 3).float()
    for c, name in enumerate(BRANCH_COLORS):
        ax.hist(values[:, c].numpy(), bins=50, range=(0, 1), alpha=0.6, color=BRANCH_COLORS[name], label=name)
    ax.set_xlabel("gate value g (sigmoid)")
    ax.set_ylabel("count (query heads x tokens)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: object, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return path
