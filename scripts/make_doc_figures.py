"""Generate the documentation figures (docs/assets/*.png) and tables (docs/_snippets/*.md).

Every picture is computed by the reference itself (``reference.masks``, ``reference.nsa_attention``,
``reference.overlap_weights``, ``reference.decode_tokens_read``) on small random problems, so what the
docs show is what the code does. Run from the repository root:

    .venv/bin/python scripts/make_doc_figures.py

The outputs are committed; the docs build does not run this script (it needs torch, the build must not).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap, to_rgb
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle
from matplotlib.ticker import MaxNLocator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reference as nsa  # noqa: E402
from reference import masks  # noqa: E402

# One palette for the whole project: the notebooks' plotting helpers own it (reference.plotting, re-exported by
# reference.viz); the fallback is the same colours, for a checkout where neither exists.
try:
    from reference.plotting import BRANCH_COLORS as _SHARED_COLORS  # type: ignore[import-not-found]
except ImportError:
    try:
        from reference.viz import BRANCH_COLORS as _SHARED_COLORS  # type: ignore[import-not-found]
    except ImportError:
        _SHARED_COLORS = {}
BRANCH_COLORS = {"cmp": "#4C72B0", "slc": "#DD8452", "win": "#55A868"}
BRANCH_COLORS.update({key: _SHARED_COLORS[key] for key in BRANCH_COLORS if key in _SHARED_COLORS})

BRANCH_NAMES = {"cmp": "compressed", "slc": "selected", "win": "sliding window"}
ASSETS = ROOT / "docs" / "assets"
SNIPPETS = ROOT / "docs" / "_snippets"
DPI = 110

# A small configuration whose blocks are visible in a 128 x 128 picture (the paper's is l=32, d=16, l'=64, n=16, w=512).
SMALL = nsa.NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4, window=24)
SMALL_T = 128


def branch_cmap(key: str) -> ListedColormap:
    """White for 'not read', the branch colour for 'read'."""
    return ListedColormap([(1.0, 1.0, 1.0), to_rgb(BRANCH_COLORS[key])])


def branch_gradient(key: str) -> ListedColormap:
    """White to the branch colour, for continuous values."""
    rgb = np.array(to_rgb(BRANCH_COLORS[key]))
    ramp = np.linspace(0.0, 1.0, 256)[:, None]
    return ListedColormap((1 - ramp) * np.ones(3) + ramp * rgb)


def random_problem(config: nsa.NSAConfig, T: int, HQ: int = 4, H: int = 2, D: int = 16, seed: int = 0):
    """q, compressed K/V, per-branch K/V and gates with a little structure so that selection varies."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = randn(1, T, HQ, D) * 1.5
    k = randn(1, T, H, D)
    v = randn(1, T, H, D)
    # Compressed keys by mean pooling (phi = mean): the simplest parameter-free choice, fine for pictures.
    TC = config.num_compressed(T)
    starts = [i * config.compress_stride for i in range(TC)]
    k_cmp = torch.stack([k[:, s : s + config.compress_block].mean(1) for s in starts], dim=1) * 3.0
    v_cmp = torch.stack([v[:, s : s + config.compress_block].mean(1) for s in starts], dim=1)
    gates = torch.sigmoid(randn(1, T, HQ, 3))
    return q, k, v, k_cmp, v_cmp, gates


def mask_axes(ax: plt.Axes, title: str, T: int) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key position s")
    ax.set_ylabel("query position t")
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(T - 0.5, -0.5)


def save(fig: plt.Figure, name: str) -> None:
    path = ASSETS / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT)}")


def fig_overview() -> None:
    """The three branches' token masks for one GQA group, and which branch covers each (t, s)."""
    config, T = SMALL, SMALL_T
    q, k, v, k_cmp, v_cmp, gates = random_problem(config, T)
    out = nsa.nsa_attention(q, k_cmp, v_cmp, k, v, k, v, gates, config, return_aux=True)
    m_cmp = masks.compressed_token_mask(T, config)
    m_slc = masks.selected_token_mask(out.block_idx[0, :, 0].long(), config)
    m_win = masks.window_token_mask(T, config)

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6))
    for ax, key, m in zip(axes[:3], ("cmp", "slc", "win"), (m_cmp, m_slc, m_win)):
        ax.imshow(m.numpy(), cmap=branch_cmap(key), vmin=0, vmax=1, interpolation="nearest")
        mask_axes(ax, f"{BRANCH_NAMES[key]}: tokens behind the keys read", T)
    axes[0].set_title("compressed: tokens summarised by\nthe visible blocks (i d + l - 1 <= t)", fontsize=10)
    axes[1].set_title(
        f"selected: the n = {config.num_selected} blocks of l' = {config.select_block}\nchosen for kv head 0 (s <= t)",
        fontsize=10,
    )
    axes[2].set_title(f"sliding window: t - w < s <= t, w = {config.window}", fontsize=10)

    # Union, coloured by the branch that reads the key with the finest resolution (win > slc > cmp).
    rgb = np.ones((T, T, 3))
    for key, m in (("cmp", m_cmp), ("slc", m_slc), ("win", m_win)):
        rgb[m.numpy()] = to_rgb(BRANCH_COLORS[key])
    axes[3].imshow(rgb, interpolation="nearest")
    mask_axes(axes[3], "all three (drawn cmp, then slc, then win on top)", T)
    axes[3].legend(
        handles=[Patch(color=BRANCH_COLORS[key], label=BRANCH_NAMES[key]) for key in ("cmp", "slc", "win")],
        loc="lower left",
        fontsize=8,
        framealpha=0.95,
    )
    fig.suptitle(
        f"NSA on T = {T} random tokens (l = {config.compress_block}, d = {config.compress_stride}, "
        f"l' = {config.select_block}, n = {config.num_selected}, w = {config.window})",
        fontsize=12,
        y=1.03,
    )
    save(fig, "overview.png")


def fig_compression() -> None:
    """Compressed blocks: what each covers, and when each becomes visible."""
    config = nsa.NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4, window=24)
    T = 48
    l, d = config.compress_block, config.compress_stride
    TC = config.num_compressed(T)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.2, 1]})
    color = BRANCH_COLORS["cmp"]
    for i in range(TC):
        ax0.add_patch(Rectangle((i * d - 0.5, i - 0.4), l, 0.8, color=color, alpha=0.75))
        ax0.plot([i * d + l - 1], [i], marker="|", color="black", markersize=10)
    ax0.set_xlim(-0.5, T - 0.5)
    ax0.set_ylim(TC - 0.5, -0.5)
    ax0.set_xlabel("token position")
    ax0.set_ylabel("compressed block i")
    ax0.set_title(
        f"block i summarises tokens [i d, i d + l), l = {l}, d = {d};\n"
        f"| marks its last token i d + l - 1; T = {T} gives TC = {TC}",
        fontsize=10,
    )
    ax0.grid(axis="x", alpha=0.3)

    t = torch.arange(T)
    vis = masks.compressed_visible(t, torch.arange(TC), config)
    ax1.imshow(vis.numpy().T, cmap=branch_cmap("cmp"), vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    n_t = [max(0, (tt + 1 - l) // d + 1) for tt in range(T)]
    ax1.step(
        range(T), [n - 0.5 for n in n_t], where="mid", color="black", lw=1.2, label="n_t = floor((t + 1 - l) / d) + 1"
    )
    ax1.set_xlabel("query position t")
    ax1.set_ylabel("compressed block i")
    ax1.set_title("visible to query t iff i d + l - 1 <= t", fontsize=10)
    ax1.legend(loc="lower right", fontsize=8)
    save(fig, "compression.png")


def fig_selection() -> None:
    """Eq. 9 overlap weights, the group scores of Eq. 10, and the blocks Eq. 11 keeps."""
    paper = nsa.NSAConfig()
    W = nsa.overlap_weights(paper.num_compressed(320), paper.num_select_blocks(320), paper)  # [TC, NS]
    config, T = SMALL, SMALL_T
    q, _, _, k_cmp, v_cmp, _ = random_problem(config, T, seed=3)
    _, lse = nsa.compressed_attention(q, k_cmp, v_cmp, config)
    scores = nsa.selection_scores(q, k_cmp, lse, config)[0, :, 0]  # [T, NS] kv head 0
    block_idx = nsa.select_blocks(q, k_cmp, lse, config)[0, :, 0]  # [T, n]
    NS = scores.shape[1]

    fig, axes = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    ax = axes[0]
    im = ax.imshow(W.numpy().T, cmap=branch_gradient("slc"), aspect="auto", vmin=0, vmax=2)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            if W[i, j] > 0:
                ax.text(i, j, f"{W[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("compressed block i (tokens [16 i, 16 i + 32))")
    ax.set_ylabel("selection block j (tokens [64 j, 64 j + 64))")
    ax.set_title(
        "Eq. 9 as overlap: |block i ∩ block j| / d\n(paper defaults l = 32, d = 16, l' = 64: weights 1,2,2,2,1)",
        fontsize=10,
    )
    fig.colorbar(im, ax=ax, label="weight (strides of overlap)")

    ax = axes[1]
    shown = scores.numpy().copy()
    cand = masks.select_candidates(torch.arange(T) // config.select_block, torch.arange(NS)).numpy()
    shown[~cand] = np.nan
    score_cmap = branch_gradient("slc")
    score_cmap.set_bad("#d9d9d9")
    im = ax.imshow(shown, cmap=score_cmap, aspect="auto", interpolation="nearest")
    ax.set_xlabel("selection block j")
    ax.set_ylabel("query position t")
    ax.set_title(
        "group score P[t, g, j] (Eq. 8-10), kv head 0\n(grey: block starts after t, not a candidate)", fontsize=10
    )
    fig.colorbar(im, ax=ax, label="summed probability over the group's heads")

    ax = axes[2]
    state = np.zeros((T, NS))  # 0 not selected, 1 chosen by score, 2 forced
    forced = masks.forced_blocks(torch.arange(T), torch.arange(NS), config).numpy()
    for t in range(T):
        for j in block_idx[t].tolist():
            if j >= 0:
                state[t, j] = 2 if forced[t, j] else 1
    state[~cand] = np.nan
    cmap = ListedColormap([(1, 1, 1), to_rgb(BRANCH_COLORS["slc"]), (0.35, 0.35, 0.35)])
    cmap.set_bad("#d9d9d9")
    ax.imshow(state, cmap=cmap, vmin=-0.5, vmax=2.5, aspect="auto", interpolation="nearest")
    ax.set_xlabel("selection block j")
    ax.set_ylabel("query position t")
    ax.set_title(f"selected (n = {config.num_selected}, forced: 1 initial + 2 local)", fontsize=10)
    ax.legend(
        handles=[
            Patch(color=(0.35, 0.35, 0.35), label="forced"),
            Patch(color=BRANCH_COLORS["slc"], label="top score"),
            Patch(facecolor="white", edgecolor="grey", label="candidate, not chosen"),
            Patch(color="#d9d9d9", label="not a candidate (starts after t)"),
        ],
        loc="lower left",
        fontsize=8,
    )
    fig.suptitle(
        f"Block selection on T = {T} random tokens (l = {config.compress_block}, d = {config.compress_stride}, "
        f"l' = {config.select_block})",
        fontsize=12,
        y=1.04,
    )
    save(fig, "selection.png")


def fig_window() -> None:
    config = nsa.NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4, window=16)
    T, w = 64, config.window
    m = masks.window_token_mask(T, config).numpy()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax0.imshow(m, cmap=branch_cmap("win"), vmin=0, vmax=1, interpolation="nearest")
    t_star = 40
    ax0.add_patch(Rectangle((t_star - w + 0.5, t_star - 0.5), w, 1, fill=False, edgecolor="black", lw=1.5))
    ax0.annotate(
        f"t = {t_star}: keys {t_star - w + 1} … {t_star}",
        (t_star - w / 2, t_star - 1),
        xytext=(2, 58),
        fontsize=9,
        arrowprops={"arrowstyle": "->"},
    )
    mask_axes(ax0, f"window mask, w = {w}: t - w < s <= t", T)
    counts = m.sum(axis=1)
    ax1.plot(range(T), counts, color=BRANCH_COLORS["win"], lw=2, label="keys read by query t")
    ax1.axhline(w, color="black", ls="--", lw=1, label=f"w = {w} (reached at t = w - 1 = {w - 1})")
    ax1.set_xlabel("query position t")
    ax1.set_ylabel("number of keys")
    ax1.set_title("exactly w keys once t >= w - 1 (not w + 1)", fontsize=10)
    ax1.legend(fontsize=8, loc="lower right")
    save(fig, "window.png")


def fig_gating() -> None:
    """A block diagram of Eq. 5: independent K/V per branch, one gate per query head per branch."""
    fig, ax = plt.subplots(figsize=(12, 4.6))
    ax.set_xlim(0, 12)
    ax.set_ylim(0.4, 6.3)
    ax.axis("off")

    def box(x, y, w, h, text, color="#eeeeee", fontsize=9):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=color, ec="black", lw=1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)

    def arrow(x0, y0, x1, y1):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, lw=1))

    box(0.2, 2.5, 1.3, 1.0, "layer input\n$x_t$")
    ys = {"cmp": 4.3, "slc": 2.5, "win": 0.7}
    kv = {
        "cmp": r"$W^{cmp}_K, W^{cmp}_V$ then $\varphi$" + "\n" + r"$\tilde K^{cmp}, \tilde V^{cmp}$",
        "slc": r"$W^{slc}_K, W^{slc}_V$" + "\n" + r"$K^{slc}, V^{slc}$ (raw tokens)",
        "win": r"$W^{win}_K, W^{win}_V$" + "\n" + r"$K^{win}, V^{win}$ (raw tokens)",
    }
    for key, y in ys.items():
        light = tuple(0.55 + 0.45 * c for c in to_rgb(BRANCH_COLORS[key]))
        box(2.3, y, 2.6, 1.0, kv[key], color=light, fontsize=8)
        box(5.6, y, 2.2, 1.0, f"Attn($q_t$, {key})\n{BRANCH_NAMES[key]}", color=light, fontsize=9)
        arrow(1.5, 3.0, 2.3, y + 0.5)
        arrow(4.9, y + 0.5, 5.6, y + 0.5)
        arrow(7.8, y + 0.5, 9.4, 3.0)
        ax.text(
            8.35, (y + 0.5 + 3.0) / 2 + 0.2, f"$\\times g^{{{key}}}_{{t,h}}$", fontsize=10, color=BRANCH_COLORS[key]
        )
    box(2.3, 5.65, 2.6, 0.5, r"$q_t = W_Q x_t$ (shared)", fontsize=8)
    box(9.4, 2.5, 1.1, 1.0, r"$\sum$" + "\n" + r"$o^*_{t,h}$", fontsize=10)
    box(9.0, 4.9, 2.8, 1.0, "gate MLP + sigmoid on $x_t$\n$g_{t,h} \\in (0,1)^3$ per query head", fontsize=8)
    arrow(10.0, 4.9, 9.95, 3.5)
    ax.set_title(
        "Eq. 5: three branches with their own keys and values, mixed by per-head, per-branch gates", fontsize=11
    )
    save(fig, "gating.png")


def table_decode() -> None:
    """Table 4 recomputed with reference.decode_tokens_read, and a plot over context lengths."""
    config = nsa.NSAConfig()
    paper = {8192: 2048, 16384: 2560, 32768: 3584, 65536: 5632}
    lines = [
        "| context s | full attention | NSA: T<sub>C</sub>(s) + min(n l', s) + min(w, s) "
        "| paper Table 4 (NSA) | ratio full / NSA | paper ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s, p in paper.items():
        ours = nsa.decode_tokens_read(s, config)
        tc = config.num_compressed(s)
        sel = min(config.num_selected * config.select_block, s)
        win = min(config.window, s)
        lines.append(f"| {s} | {s} | {tc} + {sel} + {win} = **{ours}** | {p} | {s / ours:.1f}x | {s / p:.1f}x |")
    SNIPPETS.mkdir(parents=True, exist_ok=True)
    (SNIPPETS / "decode_table.md").write_text(
        "<!-- generated by scripts/make_doc_figures.py with reference.decode_tokens_read; do not edit -->\n"
        + "\n".join(lines)
        + "\n"
    )
    print(f"wrote {(SNIPPETS / 'decode_table.md').relative_to(ROOT)}")

    s_all = np.unique(np.logspace(np.log10(64), np.log10(131072), 200).astype(int))
    ours = np.array([nsa.decode_tokens_read(int(s), config) for s in s_all])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.4))
    ax0.loglog(s_all, s_all, color="black", lw=1.5, label="full attention: s")
    ax0.loglog(s_all, ours, color=BRANCH_COLORS["slc"], lw=2, label="NSA: T_C(s) + min(n l', s) + min(w, s)")
    ax0.scatter(list(paper), list(paper.values()), color="black", marker="x", zorder=3, label="paper Table 4")
    ax0.set_xlabel("context length s (tokens)")
    ax0.set_ylabel("key/value tokens read per decode step")
    ax0.set_title("tokens read per decode step (l=32, d=16, l'=64, n=16, w=512)", fontsize=10)
    ax0.legend(fontsize=8)
    ax0.grid(alpha=0.3, which="both")
    tc = np.array([config.num_compressed(int(s)) for s in s_all])
    sel = np.minimum(config.num_selected * config.select_block, s_all)
    win = np.minimum(config.window, s_all)
    ax1.stackplot(
        s_all,
        tc,
        sel,
        win,
        colors=[BRANCH_COLORS[k] for k in ("cmp", "slc", "win")],
        labels=["compressed T_C(s)", "selected min(n l', s)", "window min(w, s)"],
        alpha=0.85,
    )
    ax1.set_xscale("log")
    ax1.set_xlabel("context length s (tokens)")
    ax1.set_ylabel("tokens read per step")
    ax1.set_title("where the NSA reads come from", fontsize=10)
    ax1.legend(fontsize=8, loc="upper left")
    save(fig, "decode_tokens.png")


def table_flops() -> None:
    """Forward FLOPs and the HBM-byte floor per branch at the benchmark shape, from benchmarks/flops.py (arithmetic)."""
    try:
        from benchmarks import flops as fl
    except ImportError as exc:  # the benchmarks package is optional for the docs
        print(f"skipped kernel_flops.md: {exc}")
        return
    config = nsa.NSAConfig()
    shape = fl.AttnShape(batch=1, heads_q=64, heads_kv=4, dim_k=128, dim_v=128, elem_bytes=2)
    parts = ["compressed", "selection", "selected", "window", "core", "full"]
    names = {"core": "NSA total", "full": "full causal"}
    head = "| T | " + " | ".join(names.get(p, p) for p in parts) + " | full / NSA |"
    rows = [head, "|---:|" + "---:|" * (len(parts) + 1)]
    brows = ["| T | " + " | ".join(names.get(p, p) for p in parts) + " |", "|---:|" + "---:|" * len(parts)]
    for T in (8192, 16384, 32768, 65536):
        f = fl.branch_flops(T, shape, config)
        b = fl.branch_bytes(T, shape, config)
        cells = " | ".join(f"{f[p] / 1e12:.2f}" for p in parts)
        rows.append(f"| {T // 1024}k | {cells} | {f['full'] / f['core']:.1f}x |")
        brows.append(f"| {T // 1024}k | " + " | ".join(f"{b[p] / 1e6:.0f}" for p in parts) + " |")
    note = "<!-- generated by scripts/make_doc_figures.py from benchmarks/flops.py; do not edit -->\n"
    (SNIPPETS / "kernel_flops.md").write_text(note + "\n".join(rows) + "\n")
    (SNIPPETS / "kernel_bytes.md").write_text(note + "\n".join(brows) + "\n")
    print("wrote docs/_snippets/kernel_flops.md, kernel_bytes.md")


def fig_kernel_union() -> None:
    """Selected-attention tiles: BM = 16 rows = 16 / G positions x G heads; how many distinct blocks a tile visits."""
    config = nsa.NSAConfig()
    T, D, BM = 4096, 64, 16
    g = torch.Generator().manual_seed(0)
    k_cmp = torch.randn(1, config.num_compressed(T), 1, D, generator=g, dtype=torch.float64)
    v_cmp = torch.zeros_like(k_cmp)
    groups = [1, 2, 4, 8, 16]
    kinds = {
        "independent random queries (worst case)": lambda G: torch.randn(1, T, G, D, generator=g, dtype=torch.float64),
        "slowly varying queries (neighbours agree)": lambda G: (
            torch.nn.functional.avg_pool1d(
                torch.randn(1, T + 63, G * D, generator=g, dtype=torch.float64).transpose(1, 2), 64, stride=1
            )
            .transpose(1, 2)
            .reshape(1, T, G, D)
            * 8.0
        ),
    }
    t0 = config.num_selected * config.select_block  # from here on every query has more candidates than n
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [1, 1.3]})
    width = 0.38
    for k, (label, make_q) in enumerate(kinds.items()):
        means = []
        for G in groups:
            q = make_q(G) * 2.0
            _, lse = nsa.compressed_attention(q, k_cmp, v_cmp, config)
            idx = nsa.select_blocks(q, k_cmp, lse, config)[0, t0:, 0]  # [T - t0, n]
            per_tile = BM // G
            sizes = []
            for start in range(0, idx.shape[0] - per_tile + 1, per_tile):
                blocks = idx[start : start + per_tile].flatten()
                sizes.append(len(set(blocks[blocks >= 0].tolist())))
            means.append(float(np.mean(sizes)))
        x = np.arange(len(groups)) + (k - 0.5) * width
        ax0.bar(x, means, width, label=label, color=BRANCH_COLORS["slc"], alpha=1.0 if k == 0 else 0.55)
    ax0.axhline(config.num_selected, color="black", ls="--", lw=1, label=f"n = {config.num_selected} (no waste)")
    ax0.set_xticks(range(len(groups)), [f"G = {G}\n{BM // G} pos./tile" for G in groups])
    ax0.set_xlabel("query heads per kv head (G) and positions per 16-row tile")
    ax0.set_ylabel("distinct blocks a tile visits (mean)")
    ax0.set_title(
        f"selected-attention tiles of BM = {BM} rows\n(T = {T}, l' = 64, n = 16, queries t >= n l')", fontsize=10
    )
    ax0.legend(fontsize=8)

    # One tile at G = 4: which blocks each of its 4 positions selected, and the union the program loops over.
    G = 4
    q = kinds["independent random queries (worst case)"](G) * 2.0
    _, lse = nsa.compressed_attention(q, k_cmp, v_cmp, config)
    idx = nsa.select_blocks(q, k_cmp, lse, config)[0, :, 0]
    start = 3000 - 3000 % (BM // G)
    NS = config.num_select_blocks(start + BM // G)
    grid = np.zeros((BM // G + 1, NS))
    for r in range(BM // G):
        for j in idx[start + r].tolist():
            if j >= 0:
                grid[r, j] = 1
    grid[-1] = grid[:-1].max(axis=0) * 2
    cmap = ListedColormap([(1, 1, 1), to_rgb(BRANCH_COLORS["slc"]), (0.3, 0.3, 0.3)])
    ax1.imshow(grid, cmap=cmap, vmin=-0.5, vmax=2.5, aspect="auto", interpolation="nearest")
    ax1.set_yticks(range(BM // G + 1), [f"t = {start + r}" for r in range(BM // G)] + ["union"])
    ax1.set_xlabel("selection block j")
    ax1.set_title(
        f"one tile at G = {G} ({BM // G} positions x {G} heads, random queries):\nthe program visits the union, "
        f"{int((grid[-1] > 0).sum())} blocks for {config.num_selected} per position",
        fontsize=10,
    )
    ax1.legend(
        handles=[
            Patch(color=BRANCH_COLORS["slc"], label="selected by this position"),
            Patch(color="0.3", label="union"),
        ],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        ncol=2,
    )
    for r in range(BM // G):
        ax1.axhline(r + 0.5, color="white", lw=2)
    save(fig, "kernel_union.png")


def main() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    fig_overview()
    fig_compression()
    fig_selection()
    fig_window()
    fig_gating()
    table_decode()
    table_flops()
    fig_kernel_union()


if __name__ == "__main__":
    main()
