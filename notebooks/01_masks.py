# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · The three masks
#
# ## What you will learn
#
# * Which keys each NSA branch reads for every query: the **compressed** branch (summaries of blocks
#   that have ended), the **selected** branch (the `n` blocks of `l'` tokens the group picked) and the
#   **sliding window** (the last `w` tokens).
# * How their union compares with full causal attention, for one sequence and one query.
# * How many keys a query reads per branch as the context grows, and why that number stops growing.
# * How each hyper-parameter (`l`, `d`, `l'`, `n`, `w`) changes the picture.
#
# Every mask here comes from `reference.masks`, the same functions the branch modules use to
# build their attention masks; the selected blocks come from a real call of
# `reference.nsa_attention(..., return_aux=True)`. Nothing is drawn by hand.
# Branch colours are the same in every notebook: see `reference.viz.BRANCH_COLORS`.

# %%
import sys
from pathlib import Path

# Make the repository importable however the notebook is launched (from notebooks/ or the root).
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "reference" / "__init__.py").exists())
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import numpy as np
import torch

from reference import NSAConfig, masks, nsa_attention
from reference.compression import mean_pool
from reference.viz import BRANCH_COLORS, BRANCH_LABELS, FULL_COLOR, branch_legend, mask_rgb, show_mask

print("branch colours:", BRANCH_COLORS)

# %% [markdown]
# ## A small configuration and some data
#
# The paper's defaults (`l=32, d=16, l'=64, n=16, w=512`) only show their shape at many thousand
# tokens, too many pixels for a first picture. We start with everything scaled down by about 2-8x:
#
# | symbol | field | small | paper |
# |---|---|---|---|
# | `l` | `compress_block` | 16 | 32 |
# | `d` | `compress_stride` | 8 | 16 |
# | `l'` | `select_block` | 32 | 64 |
# | `n` | `num_selected` | 4 | 16 |
# | `w` | `window` | 64 | 512 |
#
# The data is random, with one twist: a few 24-token stretches of keys share a direction `u` with
# every query, so the compressed scores have something to find and the selection is not a coin toss.
# Compression is mean pooling (`reference.compression.mean_pool`), the parameter-free choice of
# `phi`. One kv head with a group of 4 query heads (`HQ=4, H=1`) keeps the picture to one group.

# %%
SMALL = NSAConfig(compress_block=16, compress_stride=8, select_block=32, num_selected=4, window=64)
PAPER = NSAConfig()  # l=32, d=16, l'=64, n=16, w=512


def make_inputs(T, config, HQ=4, H=1, D=32, n_needles=6, seed=0):
    """Random q, k, v [1, T, *, D] with a few 'needle' stretches of keys aligned with the queries."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, HQ, D, generator=g)
    k = torch.randn(1, T, H, D, generator=g)
    v = torch.randn(1, T, H, D, generator=g)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    q = q + 3.0 * u
    for start in torch.randint(0, T - 24, (n_needles,), generator=g).tolist():
        k[:, start : start + 24] += 5.0 * u
    return q, k, v


def run_nsa(T, config, seed=0, **kw):
    """nsa_attention on random data, every branch returned (NSAOutput). Same k/v for the three branches."""
    q, k, v = make_inputs(T, config, seed=seed, **kw)
    k_cmp, v_cmp = mean_pool(k, config), mean_pool(v, config)
    gates = torch.full((*q.shape[:3], 3), 0.5)
    out = nsa_attention(q, k_cmp, v_cmp, k, v, k, v, gates, config, return_aux=True)
    return out, (q, k, v)


T = 512
out, (q, k, v) = run_nsa(T, SMALL)
block_idx = out.block_idx[0, :, 0]  # [T, n]: the blocks kv head 0's group reads at each query
print("block_idx", tuple(out.block_idx.shape), "(B, T, H, n); query 400 reads blocks", block_idx[400].tolist())

# %% [markdown]
# ## The token-level masks for one sequence
#
# Each mask is a `[T, T]` boolean matrix: row `t` is a query, column `s` a key token.
#
# * **compressed**: token `s` is "covered" if it lies in a compressed block that query `t` can see,
#   i.e. a block `i` with `i*d + l - 1 <= t` (the block has ended). The query reads one summary per
#   block, not the tokens; the mask shows which tokens those summaries stand for.
# * **selected**: the tokens of the `n` blocks in `block_idx[t]`, cut at `s <= t`.
# * **window**: `t - w < s <= t`.

# %%
t_idx = torch.arange(T)
M = {
    "cmp": masks.compressed_token_mask(T, SMALL),
    "slc": masks.selected_token_mask(block_idx, SMALL),
    "win": masks.window_token_mask(T, SMALL),
}
union = M["cmp"] | M["slc"] | M["win"]
full = masks.causal(t_idx, t_idx)

fig, axes = plt.subplots(1, 5, figsize=(26, 5), layout="constrained")
for ax, name in zip(axes[:3], ["cmp", "slc", "win"]):
    show_mask(ax, M[name], name, f"{BRANCH_LABELS[name]}: {M[name].sum().item():,} pairs")
axes[3].imshow(mask_rgb(M), interpolation="nearest", aspect="auto")
axes[3].set(title=f"union: {union.sum().item():,} pairs\n(colour = finest branch reading the pair)",
            xlabel="key position s", ylabel="query position t")
branch_legend(axes[3], loc="upper right", fontsize=8)
show_mask(axes[4], full, "full", f"full causal: {full.sum().item():,} pairs")
fig.suptitle(f"Which keys each query reads, T={T}, small config {SMALL}")
plt.show()

full_res = (M["slc"] | M["win"]).sum().item() / full.sum().item()
print(f"the union covers {union.sum().item() / full.sum().item():.1%} of the causal (query, key) pairs,")
print(f"but only {full_res:.1%} at full resolution (selected or window); the rest only through compressed summaries")

# %% [markdown]
# The union panel colours each pair by the *finest* branch that reads it: window over selected over
# compressed. Blue there means "seen only through a compressed summary".
#
# Things to notice:
#
# * The union covers **every** causal pair: no past token is out of reach. What NSA saves is
#   resolution, not reach: most old tokens are seen only through a compressed summary of `l` tokens.
# * The compressed mask is a **staircase** with steps of `d` tokens: a block becomes visible only
#   once its last token has arrived, so the most recent `l - 1` tokens or so are never covered by it;
#   that is exactly what the window is for.
# * The selected mask is made of **vertical stripes** `l'` tokens wide: the chosen blocks change
#   from query to query, but the first block (forced initial) and the band along the diagonal
#   (the forced current and previous blocks) are always there.
# * The window is a **band** of width `w` along the diagonal.
#
# ### The masks are what the code reads
#
# A mask is only useful if it is exact. For one query we perturb every key and value that its mask
# says is *not* read and check that the branch's output at that query does not move; then we perturb
# a single token that *is* read and check that it does.

# %%
from reference import compressed_attention, select_blocks, selected_attention, sliding_window_attention

t0 = 400


def branch_output(name, k_, v_):
    if name == "cmp":
        return compressed_attention(q, mean_pool(k_, SMALL), mean_pool(v_, SMALL), SMALL)[0]
    if name == "slc":
        return selected_attention(q, k_, v_, out.block_idx, SMALL)
    return sliding_window_attention(q, k_, v_, SMALL)


for name in ["cmp", "slc", "win"]:
    base = branch_output(name, k, v)[0, t0]
    unread = ~M[name][t0]
    k2, v2 = k.clone(), v.clone()
    k2[0, unread] += 10.0
    v2[0, unread] += 10.0
    moved_unread = (branch_output(name, k2, v2)[0, t0] - base).abs().max().item()
    s_read = int(M[name][t0].nonzero()[0])
    k3, v3 = k.clone(), v.clone()
    v3[0, s_read] += 10.0
    moved_read = (branch_output(name, k3, v3)[0, t0] - base).abs().max().item()
    print(f"{BRANCH_LABELS[name]:>15}: change {unread.sum().item():3d} unread tokens -> "
          f"output moves {moved_unread:.1e};"
          f" change read token {s_read:3d} -> moves {moved_read:.2f}")
    assert moved_unread == 0.0 and moved_read > 0

# %% [markdown]
# ## One query up close
#
# Row `t = 400` of each mask, as a strip over the key positions. The selected blocks and the number
# of compressed summaries are printed underneath.

# %%
rows = {"cmp": M["cmp"][t0], "slc": M["slc"][t0], "win": M["win"][t0]}
strip = np.ones((5, T, 3))
for r, name in enumerate(["cmp", "slc", "win"]):
    strip[r] = mask_rgb({name: rows[name][None]})[0]
strip[3] = mask_rgb({n: rows[n][None] for n in rows})[0]
strip[4] = mask_rgb({"full": full[t0][None]})[0]

fig, ax = plt.subplots(figsize=(14, 2.8))
ax.imshow(strip, aspect="auto", interpolation="nearest")
ax.set_yticks(range(5), ["compressed", "selected", "window", "union", "full causal"])
ax.set_xlabel("key position s")
ax.set_title(f"keys read by query t={t0} (small config); dashed lines: selection block boundaries")
for b in range(0, T, SMALL.select_block):
    ax.axvline(b - 0.5, color="0.7", lw=0.5, ls="--")
ax.axvline(t0 + 0.5, color="k", lw=1)
branch_legend(ax, loc="upper left", fontsize=8, bbox_to_anchor=(1.0, 1.0))
plt.show()

n_t = masks.compressed_visible(torch.tensor([t0]), torch.arange(SMALL.num_compressed(T)), SMALL).sum().item()
print(f"compressed: {n_t} summaries, standing for tokens 0..{rows['cmp'].nonzero().max().item()}")
print(f"selected:   blocks {block_idx[t0].tolist()} -> {rows['slc'].sum().item()} tokens "
      f"(the current block {t0 // SMALL.select_block} is cut at s <= {t0})")
print(f"window:     {rows['win'].sum().item()} tokens, {t0 - SMALL.window + 1}..{t0}")
print(f"keys read:  {n_t + rows['slc'].sum().item() + rows['win'].sum().item()} vs {t0 + 1} for full attention")

# %% [markdown]
# ## The paper's defaults at T = 2048
#
# Same picture with `l=32, d=16, l'=64, n=16, w=512`: 32 selection blocks, of which each query
# reads 16. A 2048 x 2048 image has more pixels than the screen, so each pixel below is a 4 x 4
# cell and its colour shows the **fraction** of the cell's (query, key) pairs that the branch reads.

# %%
T_big, cell = 2048, 4
out_big, _ = run_nsa(T_big, PAPER)
tb = torch.arange(T_big)
M_big = {
    "cmp": masks.compressed_token_mask(T_big, PAPER),
    "slc": masks.selected_token_mask(out_big.block_idx[0, :, 0], PAPER),
    "win": masks.window_token_mask(T_big, PAPER),
}
M_big["full"] = masks.causal(tb, tb)


def pooled(mask):
    return torch.nn.functional.avg_pool2d(mask.float()[None, None], cell)[0, 0].numpy()


from matplotlib.colors import LinearSegmentedColormap

fig, axes = plt.subplots(1, 5, figsize=(26, 5), layout="constrained")
for ax, name in zip([axes[0], axes[1], axes[2], axes[4]], ["cmp", "slc", "win", "full"]):
    colour = BRANCH_COLORS.get(name, FULL_COLOR)
    cmap = LinearSegmentedColormap.from_list(name, ["white", colour])
    im = ax.imshow(pooled(M_big[name]), cmap=cmap, vmin=0, vmax=1, extent=(0, T_big, T_big, 0))
    frac = M_big[name].sum().item() / M_big["full"].sum().item()
    ax.set(title=f"{BRANCH_LABELS.get(name, 'full causal')}: {frac:.1%} of causal pairs",
           xlabel="key position s", ylabel="query position t")
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"fraction of {cell}x{cell} cell read")
sub = {name: M_big[name][::cell, ::cell] for name in ["cmp", "slc", "win"]}  # every 4th query and key
axes[3].imshow(mask_rgb(sub), interpolation="nearest", extent=(0, T_big, T_big, 0))
axes[3].set(title="union, finest branch per pair\n(every 4th query and key)", xlabel="key position s",
            ylabel="query position t")
branch_legend(axes[3], loc="upper right", fontsize=8)
fig.suptitle(f"Paper defaults {PAPER}, T={T_big}")
plt.show()

# %% [markdown]
# ## Keys read per query as the context grows
#
# How many keys does one query read? Per branch, for query `t` (with `T_C(t+1)` compressed blocks
# visible and `floor(t / l') + 1` candidate selection blocks):
#
# * compressed: `n_t = floor((t + 1 - l) / d) + 1` summaries, growing like `t / d`;
# * selected: `min(n, candidates)` blocks; all are full except the current one, cut at `t`;
# * window: `min(w, t + 1)`.
#
# We write these counts as vectorised formulas (so that we can go to 128k tokens) and first check
# them, query by query, against the row sums of the real masks of the T=512 example.

# %%
def keys_read(T, config):
    """Keys read by every query t < T, per branch: dict of int64 tensors [T] (compressed counts summaries)."""
    t = torch.arange(T)
    l, d, ls, n, w = (config.compress_block, config.compress_stride, config.select_block,
                      config.num_selected, config.window)
    cmp = torch.where(t + 1 >= l, torch.div(t + 1 - l, d, rounding_mode="floor") + 1, 0)
    candidates = t // ls + 1
    blocks = torch.clamp(candidates, max=n)
    slc = (blocks - 1) * ls + (t % ls + 1)  # full earlier blocks + the causally cut current block
    win = torch.clamp(t + 1, max=w)
    return {"cmp": cmp, "slc": slc, "win": win}


counts = keys_read(T, SMALL)
visible_blocks = masks.compressed_visible(t_idx, torch.arange(SMALL.num_compressed(T)), SMALL).sum(1)
assert torch.equal(counts["cmp"], visible_blocks)
assert torch.equal(counts["slc"], M["slc"].sum(1))
assert torch.equal(counts["win"], M["win"].sum(1))
print("formulas agree with the masks for all", T, "queries")

# %%
Ts = 2 ** np.arange(6, 18)  # 64 ... 131072
last = {name: [] for name in ["cmp", "slc", "win"]}
mean_total, mean_full = [], []
for T_ in Ts:
    c = keys_read(int(T_), PAPER)
    for name in last:
        last[name].append(c[name][-1].item())
    mean_total.append(sum(c[n].double().mean().item() for n in c))
    mean_full.append((T_ + 1) / 2)
total_last = np.sum([last[n] for n in last], axis=0)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
for name in last:
    ax1.plot(Ts, last[name], "o-", color=BRANCH_COLORS[name], label=BRANCH_LABELS[name])
ax1.plot(Ts, total_last, "s-", color="black", label="NSA total")
ax1.plot(Ts, Ts, "--", color=FULL_COLOR, label="full attention (t + 1)")
ax1.set(xscale="log", yscale="log", xlabel="context length T (query t = T - 1)",
        ylabel="keys read by the query", title="Keys read by the last query, paper defaults")
ax1.legend()
ax1.grid(True, which="both", alpha=0.3)

ratio = np.array(mean_full) / np.array(mean_total)
ax2.plot(Ts, ratio, "o-", color="black", label="mean over the T queries")
ax2.plot(Ts, Ts / total_last, "s--", color="0.5", label="last query only")
ax2.axhline(1, color=FULL_COLOR, lw=0.8)
ax2.set(xscale="log", yscale="log", xlabel="context length T",
        ylabel="full keys / NSA keys", title="How many times fewer keys than full attention")
ax2.legend()
ax2.grid(True, which="both", alpha=0.3)
plt.tight_layout()
plt.show()

for T_, tl, r in zip(Ts, total_last, ratio):
    if T_ >= 1024:
        print(f"T={T_:>6}: last query reads {tl:>5} keys ({T_ / tl:5.1f}x fewer), whole sequence {r:5.1f}x fewer")

# %% [markdown]
# Selected and window counts **saturate** at `n*l' = 1024` and `w = 512`; only the compressed branch
# keeps growing, like `T / d = T / 16`. On short contexts NSA reads *more* keys than full
# attention (three branches over the same few tokens): the printout shows the break-even between
# 1k and 2k tokens for the last query, and between 2k and 4k averaged over a whole sequence. NSA
# pays off on long contexts only. The branches' keys overlap (the window and the local blocks read the same recent
# tokens); the count here is what each branch computes, the cost that matters for speed.
#
# ## How each hyper-parameter changes the picture
#
# One parameter at a time, around the small configuration (middle row), at T = 512. Each title gives
# the share of causal pairs read at full resolution (selected or window).
# The selection is recomputed each time on the same random data, with the first two steps of
# `nsa_attention` only (`compressed_attention`, then `select_blocks`: the block indices are all the
# masks need). As above, each pair is coloured by the finest branch that reads it.

# %%
T_sm = 512


def select_only(T, config, seed=0):
    """block_idx [1, T, H, n] from compressed attention + selection, the first half of nsa_attention."""
    q, k, _ = make_inputs(T, config, seed=seed)
    k_cmp = mean_pool(k, config)
    _, lse = compressed_attention(q, k_cmp, k_cmp, config)  # values do not matter for the selection
    return select_blocks(q, k_cmp, lse, config)


base = dict(compress_block=16, compress_stride=8, select_block=32, num_selected=4, window=64)
variations = [
    ("compress_block", "l", [8, 32]),
    ("compress_stride", "d", [4, 16]),
    ("select_block", "l'", [16, 64]),
    ("num_selected", "n", [3, 8]),
    ("window", "w", [16, 128]),
]
fig, axes = plt.subplots(3, 5, figsize=(22, 13))
t_sm = torch.arange(T_sm)
full_pairs = masks.causal(t_sm, t_sm).sum().item()
for col, (field, symbol, (low, high)) in enumerate(variations):
    for row, value in enumerate([low, base[field], high]):
        cfg = NSAConfig(**{**base, field: value})
        chosen = select_only(T_sm, cfg)
        Mv = {
            "cmp": masks.compressed_token_mask(T_sm, cfg),
            "slc": masks.selected_token_mask(chosen[0, :, 0], cfg),
            "win": masks.window_token_mask(T_sm, cfg),
        }
        read = (Mv["slc"] | Mv["win"]).sum().item() / full_pairs  # read at full resolution
        ax = axes[row, col]
        ax.imshow(mask_rgb(Mv), interpolation="nearest")
        ax.set_title(f"{symbol} = {value}" + (" (base)" if row == 1 else "") + f": {read:.0%} full-res",
                     fontsize=10, fontweight="bold" if row != 1 else "normal")
        ax.set_xlabel("key s")
        ax.set_ylabel("query t")
branch_legend(axes[0, 0], loc="upper right", fontsize=8)
fig.suptitle(f"Union of the three masks at T={T_sm}, coloured by the finest branch reading each pair; "
             "one parameter changed per column",
             fontsize=14)
plt.tight_layout()
plt.show()

# %% [markdown]
# Reading the columns:
#
# * **`l`** (compressed block length): longer blocks push the compressed staircase further from the
#   diagonal (a block must end before it is visible) and make each summary coarser.
# * **`d`** (stride): a smaller stride means more, more overlapping summaries, finer steps in the
#   staircase and more compressed keys to read (`~T/d`).
# * **`l'`** (selection block): wider stripes; with `n` fixed, more tokens read in full.
# * **`n`** (blocks selected): `n = 3` leaves only the forced blocks (initial + 2 local), no
#   choice at all; a larger `n` reads more of the past.
# * **`w`** (window): the width of the diagonal band.
#
# ## What to try next
#
# * Change `make_inputs` so the needles sit at fixed positions (say, tokens 100-124) and watch the
#   selected stripes line up with them for every later query.
# * Set `num_initial=0, num_local=0` in the small config: which stripes disappear?
# * Compare the count of keys read with the paper's Table 4 in notebook 05 (decoding): the
#   last-query curve above is the same formula.
# * Try `l = l' = d` (e.g. 32, 32, 32): the compressed and selection blocks coincide, and
#   `selection_scores` equals the compressed probabilities (notebook 02).
