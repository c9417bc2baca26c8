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
# # 02 · From scores to blocks
#
# ## What you will learn
#
# How NSA decides which `n` blocks of `l'` tokens a query reads in full, one step at a time, on
# real numbers (paper Eq. 8-12, spec sections 5-6):
#
# 1. the compressed attention's probabilities are the importance scores (Eq. 8): no extra scorer;
# 2. they are mapped from compressed blocks (length `l`, stride `d`) to selection blocks (length
#    `l'`) by token overlap (Eq. 9), the weight matrix `reference.overlap_weights`;
# 3. the paper's index formula for Eq. 9 is off by one block, and what that would change;
# 4. the query heads of a GQA group add their scores (Eq. 10) so that they share one selection;
# 5. the forced blocks (initial + local) and the top-`n` (Eq. 11);
# 6. which blocks each head would pick alone, versus what the group picks.
#
# Each step is recomputed by hand and checked against the reference functions.

# %%
import sys
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "reference" / "__init__.py").exists())
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import numpy as np
import torch

from reference import (
    NSAConfig,
    compressed_attention,
    masks,
    nsa_attention,
    overlap_weights,
    select_blocks,
    selection_scores,
)
from reference.compression import mean_pool
from reference.viz import BRANCH_COLORS

CMP, SLC = BRANCH_COLORS["cmp"], BRANCH_COLORS["slc"]

# %% [markdown]
# ## Setup: the paper's defaults, one GQA group of 4 heads
#
# `l=32, d=16, l'=64, n=16` (1 initial + 2 local blocks forced). With `T = 2048` there are
# `T / l' = 32` selection blocks, so the last query has a real choice: 16 of 32.
#
# The data is random with planted structure, so that the heads disagree: each query head `h` has
# its own direction `u_h` and two stretches of keys that point along it (that head's "needles"),
# and one extra stretch points along a direction every head shares. Compression is mean pooling.

# %%
cfg = NSAConfig()
T, HQ, H, D = 2048, 4, 1, 32
l, d, ls, n = cfg.compress_block, cfg.compress_stride, cfg.select_block, cfg.num_selected

g = torch.Generator().manual_seed(0)
q = torch.randn(1, T, HQ, D, generator=g)
k = torch.randn(1, T, H, D, generator=g)
v = torch.randn(1, T, H, D, generator=g)
needles = {}  # head (or "shared") -> list of token starts
directions = torch.nn.functional.normalize(torch.randn(HQ + 1, D, generator=g), dim=-1)
starts = torch.randperm(T // 64 - 4, generator=g)[: 2 * HQ + 1] * 64 + 40  # distinct, spread over the sequence
for h in range(HQ + 1):
    who = "shared" if h == HQ else h
    needles[who] = starts[2 * h : 2 * h + 2].tolist() if h < HQ else [starts[-1].item()]
    if h < HQ:
        q[:, :, h] += 3.0 * directions[h]
    else:
        q += 2.0 * directions[h]
    for s0 in needles[who]:
        k[:, s0 : s0 + 48] += 5.0 * directions[h]
print("needle stretches (48 tokens from):", needles)

k_cmp, v_cmp = mean_pool(k, cfg), mean_pool(v, cfg)
o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, cfg)
TC, NS = k_cmp.shape[1], cfg.num_select_blocks(T)
t0 = T - 1  # the query we follow
print(f"TC = {TC} compressed blocks, NS = {NS} selection blocks; following query t = {t0}")

# %% [markdown]
# ## Step 1 · Compressed attention probabilities are the scores (Eq. 8)
#
# `compressed_attention` returns the log-sum-exp of each query's scores; the probabilities are
# rebuilt from it: `p_cmp[t, h, i] = exp(scale * q_t,h . k~_i - lse[t, h])` for the visible blocks
# `i*d + l - 1 <= t`. No second scoring pass, no extra parameters.

# %%
scale = D**-0.5
i_all = torch.arange(TC)
visible = masks.compressed_visible(torch.tensor([t0]), i_all, cfg)[0]  # [TC]
logits = torch.einsum("hd,id->hi", q[0, t0], k_cmp[0, :, 0]) * scale  # [HQ, TC]
p_cmp = torch.where(visible, torch.exp(logits - lse[0, t0, :, None]), 0.0)  # [HQ, TC]
print("visible blocks:", visible.sum().item(), "| sum of p_cmp per head:", p_cmp.sum(1).numpy().round(6))

fig, axes = plt.subplots(HQ, 1, figsize=(14, 8), sharex=True, layout="constrained")
for h, ax in enumerate(axes):
    ax.bar(i_all.numpy(), p_cmp[h].numpy(), width=0.9, color=CMP)
    for s0 in needles[h]:
        ax.axvspan(s0 / d - 1, (s0 + 48) / d - 0.5, color="0.85", zorder=0)
    for s0 in needles["shared"]:
        ax.axvspan(s0 / d - 1, (s0 + 48) / d - 0.5, color="#f3e2b3", zorder=0)
    ax.set_ylabel(f"head {h}\np_cmp")
axes[0].set_title(f"Compressed attention probabilities of query t={t0}, per head "
                  "(grey: that head's needles, yellow: the shared needle)")
axes[-1].set_xlabel(f"compressed block i (covers tokens [{d}i, {d}i + {l}))")
plt.show()

# %% [markdown]
# ## Step 2 · From compressed blocks to selection blocks: the overlap weights (Eq. 9)
#
# Compressed block `i` covers `[i d, i d + l)`, selection block `j` covers `[j l', (j+1) l')`.
# Each compressed block lends its probability to the selection blocks it overlaps, weighted by the
# overlap measured in strides:
#
# `W[i, j] = |[i d, i d + l) ∩ [j l', (j+1) l')| / d`, and `p_slc = p_cmp @ W`.

# %%
W = overlap_weights(TC, NS, cfg)  # [TC, NS]
show_i, show_j = 20, 5
fig, ax = plt.subplots(figsize=(12, 4.2), layout="constrained")
im = ax.imshow(W[:show_i, :show_j].T.numpy(), cmap="Oranges", vmin=0, aspect="auto")
for i in range(show_i):
    for j in range(show_j):
        w_ij = W[i, j].item()
        if w_ij:
            ax.text(i, j, f"{w_ij:g}", ha="center", va="center", fontsize=9)
ax.set_xticks(range(show_i), [f"{i}\n[{i * d},{i * d + l})" for i in range(show_i)], fontsize=7)
ax.set_yticks(range(show_j), [f"j={j}  [{j * ls},{(j + 1) * ls})" for j in range(show_j)])
ax.set_xlabel("compressed block i [token range]")
ax.set_ylabel("selection block j [token range]")
ax.set_title(f"overlap_weights (first {show_i} x {show_j} of {TC} x {NS}): strides of block i inside block j")
fig.colorbar(im, ax=ax, label="weight = overlap / d")
plt.show()

for j in range(4):
    nz = W[:, j].nonzero().flatten()
    print(f"j={j}: sums i = {nz.tolist()} with weights {W[nz, j].int().tolist()}")
print("every compressed block's weights sum to l/d =", W.sum(1).unique().tolist())

# %% [markdown]
# With the defaults, selection block `j` sums compressed blocks `4j-1 … 4j+3` with weights
# **1, 2, 2, 2, 1**: block `4j-1` straddles the boundary with the previous selection block (one
# stride inside `j`), blocks `4j … 4j+2` lie inside `j` (two strides each), and block `4j+3` straddles
# the boundary with the next one. For `j = 0` there is no block `-1`, so the pattern starts 2, 2, 2, 1.
#
# ## Step 3 · The paper's Eq. 9 index, concretely
#
# The paper writes Eq. 9 as
# `p_slc[j] = sum_{m=0}^{l'/d - 1} sum_{n=0}^{l/d - 1} p_cmp[(l'/d) j - m - n]`.
# Its compressed blocks are numbered from 0 (Eq. 7: block `i` holds tokens `id+1 … id+l`,
# 1-indexed), its selection blocks from 1. Read literally, our selection block `j` is the paper's
# `j + 1`, and the formula sums compressed blocks `4(j+1) - m - n`, i.e. `4j … 4j+4`: every block
# one stride (16 tokens) too late. With 0-indexed selection blocks it would be `4j-4 … 4j`, three
# strides too early. Below, both literal readings side by side with the overlap form, for `j = 0 … 3`.

# %%
def paper_weights(num_cmp, num_sel, config, first_sel_index):
    """Eq. 9 taken literally: W[i, j] = #{(m, n): (l'/d) * (j + first_sel_index) - m - n == i}."""
    r, c = config.select_block // config.compress_stride, config.compress_block // config.compress_stride
    Wp = torch.zeros(num_cmp, num_sel)
    for j in range(num_sel):
        for m in range(r):
            for n_ in range(c):
                i = r * (j + first_sel_index) - m - n_
                if 0 <= i < num_cmp:
                    Wp[i, j] += 1
    return Wp


forms = {
    "overlap (ours, spec section 5)": W,
    "Eq. 9 literal, selection blocks from 1": paper_weights(TC, NS, cfg, 1),
    "Eq. 9 literal, selection blocks from 0": paper_weights(TC, NS, cfg, 0),
}
fig, axes = plt.subplots(3, 1, figsize=(12, 7.5), sharex=True, layout="constrained")
for ax, (name, Wf) in zip(axes, forms.items()):
    im = ax.imshow(Wf[:show_i, :4].T.numpy(), cmap="Oranges", vmin=0, vmax=2, aspect="auto")
    for j in range(4):
        ax.add_patch(plt.Rectangle((j * ls / d - 0.5, j - 0.5), ls / d - 1, 1, fill=False, ec="k", lw=1.5))
        for i in range(show_i):
            if Wf[i, j]:
                ax.text(i, j, f"{Wf[i, j].item():g}", ha="center", va="center", fontsize=9)
    ax.set_yticks(range(4), [f"j={j}" for j in range(4)])
    ax.set_ylabel("selection block")
    ax.set_title(name)
    fig.colorbar(im, ax=ax, label="weight")
axes[-1].set_xticks(range(show_i), [f"{i}\n{i * d}" for i in range(show_i)], fontsize=7)
axes[-1].set_xlabel("compressed block i (and its first token); black box: blocks whose start lies inside j")
plt.show()

print(f"{'j':>2} | {'tokens of j':>11} | {'overlap form: i (tokens)':<34} | Eq. 9 from 1: i (tokens)")
def span(Wf, j):
    """The compressed blocks selection block j sums under weights Wf, and the tokens they cover."""
    nz = Wf[:, j].nonzero().flatten()
    return f"{nz.min().item()}..{nz.max().item()} ([{nz.min().item() * d}, {nz.max().item() * d + l}))"


for j in range(4):
    literal = span(forms["Eq. 9 literal, selection blocks from 1"], j)
    print(f"{j:>2} | [{j * ls:>3}, {(j + 1) * ls:>3}) | {span(W, j):<34} | {literal}")

# %% [markdown]
# The literal 1-based reading gives block `4j+4` (tokens `[64j+64, 64j+96)`, entirely inside the
# *next* selection block) a weight, and forgets block `4j-1`, which does overlap `j`. Does it matter
# for the choice? For our query, rank the candidates under each form (same forced blocks, same top-n
# rule) and compare:

# %%
def top_n(scores, t, config):
    """Forced blocks first, then the highest scores (ties: lower index); returns a sorted list."""
    j = torch.arange(scores.shape[-1])
    cand = masks.select_candidates(torch.tensor([t // config.select_block]), j)[0]
    forced = masks.forced_blocks(torch.tensor([t]), j, config)[0]
    rank = torch.where(forced, float("inf"), scores).masked_fill(~cand, float("-inf"))
    order = torch.sort(rank, descending=True, stable=True).indices[: config.num_selected]
    return sorted(order[rank[order] > float("-inf")].tolist())


picks = {name: top_n((p_cmp @ Wf).sum(0), t0, cfg) for name, Wf in forms.items()}
ours = set(picks["overlap (ours, spec section 5)"])
for name, chosen in picks.items():
    print(f"{name:<40} {chosen}  ({len(set(chosen) - ours)} differ from ours)")

# %% [markdown]
# ## Step 4 · One selection per GQA group (Eq. 10)
#
# The 4 query heads share one kv head, and a kernel loads each selected block once for all of them
# (notebook 04). So they must agree on the blocks: their `p_slc` are summed. `selection_scores`
# returns exactly this group score `[B, T, H, NS]`; we rebuild it from the per-head pieces.

# %%
p_slc = p_cmp @ W  # [HQ, NS] per head
group = selection_scores(q, k_cmp, lse, cfg)[0, t0, 0]  # [NS] the reference's group score
print("max |sum_h p_slc - selection_scores| =", (p_slc.sum(0) - group).abs().max().item())

head_colors = plt.cm.Purples(np.linspace(0.35, 0.9, HQ))
fig, ax = plt.subplots(figsize=(14, 4), layout="constrained")
bottom = np.zeros(NS)
for h in range(HQ):
    ax.bar(range(NS), p_slc[h].numpy(), bottom=bottom, color=head_colors[h], label=f"head {h}")
    bottom += p_slc[h].numpy()
ax.set(xlabel="selection block j", ylabel="p_slc, stacked over heads",
       title=f"Group score of query t={t0}: the sum of the 4 heads' p_slc (Eq. 10)")
ax.set_xticks(range(NS))
ax.legend(ncols=HQ)
plt.show()

# %% [markdown]
# ## Step 5 · Forced blocks and the top-n (Eq. 11)
#
# Candidates are the blocks that start at or before `t` (here all 32). Block 0 (initial) and the
# two local blocks (`floor(t/l')` and the one before) are always taken and count inside `n = 16`;
# the other 13 slots go to the highest group scores, ties to the lower index.

# %%
j_all = torch.arange(NS)
forced = masks.forced_blocks(torch.tensor([t0]), j_all, cfg)[0]
free_scores = group.masked_fill(forced, float("-inf"))
n_free = n - int(forced.sum())
threshold = torch.sort(free_scores, descending=True).values[n_free - 1].item()
chosen_by_hand = top_n(group, t0, cfg)
chosen_ref = select_blocks(q, k_cmp, lse, cfg)[0, t0, 0].tolist()
gates = torch.full((1, T, HQ, 3), 0.5)
aux = nsa_attention(q, k_cmp, v_cmp, k, v, k, v, gates, cfg, return_aux=True)
chosen_nsa = aux.block_idx[0, t0, 0].tolist()
print("forced:", j_all[forced].tolist(), f"| {n_free} free slots | threshold score {threshold:.4f}")
print("by hand:      ", chosen_by_hand)
print("select_blocks:", chosen_ref)
print("nsa_attention:", chosen_nsa)
assert chosen_by_hand == chosen_ref == chosen_nsa

colors = [SLC if j in chosen_ref else "0.75" for j in range(NS)]
fig, ax = plt.subplots(figsize=(14, 4), layout="constrained")
bars = ax.bar(range(NS), group.numpy(), color=colors)
for j in j_all[forced].tolist():
    bars[j].set_hatch("//")
    bars[j].set_edgecolor("k")
ax.axhline(threshold, color="k", ls="--", lw=1, label=f"13th free score = {threshold:.3f}")
from matplotlib.patches import Patch

handles = [ax.get_legend_handles_labels()[0][0], Patch(color=SLC, label="selected by score"),
           Patch(facecolor=SLC, hatch="//", edgecolor="k", label="forced (initial + 2 local)"),
           Patch(color="0.75", label="not selected")]
ax.set(xlabel="selection block j", ylabel="group score P[t, g, j]",
       title=f"Top-{n} for query t={t0}: {int(forced.sum())} forced + {n_free} by score")
ax.set_xticks(range(NS))
ax.legend(handles=handles)
plt.show()

# %% [markdown]
# ## Step 6 · What each head would pick alone
#
# Calling `select_blocks` with a single query head (`q[:, :, h:h+1]`, `lse[:, :, h:h+1]`) makes a
# "group" of one: that head's own choice. Compare with the group's choice for our query, then over
# every query that has a real choice (`t >= n l' = 1024`).

# %%
own = torch.stack([select_blocks(q[:, :, h : h + 1], k_cmp, lse[:, :, h : h + 1], cfg)[0, :, 0] for h in range(HQ)])
grp = select_blocks(q, k_cmp, lse, cfg)[0, :, 0]  # [T, n]


def as_onehot(idx):
    return torch.zeros(*idx.shape[:-1], NS + 1).scatter_(-1, idx.long().clamp_min(-1) % (NS + 1), 1.0)[..., :NS]


table = torch.stack([as_onehot(own[h, t0]) for h in range(HQ)] + [as_onehot(grp[t0])])  # [HQ + 1, NS]
fig, ax = plt.subplots(figsize=(14, 3.2), layout="constrained")
from matplotlib.colors import ListedColormap

im = ax.imshow(table.numpy(), cmap=ListedColormap(["white", SLC]), vmin=0, vmax=1, aspect="auto")
for h in range(HQ):
    for s0 in needles[h]:
        for j in {s0 // ls, (s0 + 47) // ls}:
            ax.text(j, h, "●", ha="center", va="center", fontsize=8)
for s0 in needles["shared"]:
    for j in {s0 // ls, (s0 + 47) // ls}:
        for r in range(HQ + 1):
            ax.text(j, r, "◆", ha="center", va="center", fontsize=8)
ax.set_yticks(range(HQ + 1), [f"head {h} alone" for h in range(HQ)] + ["group (4 heads)"])
ax.set_xticks(range(NS))
ax.set_xlabel("selection block j   (● that head's needle, ◆ shared needle)")
ax.set_title(f"Blocks picked for query t={t0}")
cb = fig.colorbar(im, ax=ax, ticks=[0.25, 0.75])
cb.ax.set_yticklabels(["not picked", "picked"])
plt.show()

# %%
ts = torch.arange(n * ls, T)
recall = []  # share of a head's own free picks that the group also picks
needle_kept = {"alone": [], "group": []}  # share of a head's needle blocks (needle ended before t) picked
for h in range(HQ):
    kept = [(set(own[h, t].tolist()) & set(grp[t].tolist())) for t in ts.tolist()]
    recall.append(np.mean([(len(s) - cfg.num_forced) / (n - cfg.num_forced) for s in kept]))
    for who, idx in (("alone", own[h]), ("group", grp)):
        hits = [j in idx[t].tolist() for t in ts.tolist() for s0 in needles[h] if s0 + 48 <= t
                for j in {s0 // ls, (s0 + 47) // ls}]
        needle_kept[who].append(np.mean(hits))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 3.8), layout="constrained")
ax1.bar([f"head {h}" for h in range(HQ)], recall, color=head_colors)
ax1.set(ylim=(0, 1.1), ylabel="share of the head's own free picks\nthat the group also picks",
        title=f"Agreement with the group, queries t = {n * ls} … {T - 1}")
for h, r in enumerate(recall):
    ax1.text(h, r + 0.02, f"{r:.0%}", ha="center")
x = np.arange(HQ)
ax2.bar(x - 0.2, needle_kept["alone"], 0.4, color="0.6", label="head alone")
ax2.bar(x + 0.2, needle_kept["group"], 0.4, color=SLC, label="group")
ax2.set_xticks(x, [f"head {h}" for h in range(HQ)])
ax2.set(ylim=(0, 1.1), ylabel="share of the head's needle blocks picked",
        title="A head's own needles: picked alone vs by the group")
ax2.legend(loc="lower right")
plt.show()
for h in range(HQ):
    print(f"head {h}: peak p_cmp at t={t0} {p_cmp[h].max().item():.3f}; needle blocks kept alone "
          f"{needle_kept['alone'][h]:.0%}, by the group {needle_kept['group'][h]:.0%}")

# %% [markdown]
# Read the numbers above with the probability plot of step 1. A head that is confident about a
# block (a high, narrow peak in `p_cmp`) contributes a large share of the group score there, so the
# group keeps its needles. A head whose distribution is flatter is easily outvoted by the other
# heads' mass, and the group may drop its needles even though that head alone would have picked
# them. This is the price of sharing one selection per group; the reason for it is speed: the kernel
# loads each selected block once for the whole group, not once per head (notebook 04).
#
# ## What to try next
#
# * Put all needles on one head (the others pure noise): how much does the group follow that head?
# * Set `select_block = compress_block = compress_stride` (e.g. 32, 32, 32 with `num_selected=16`):
#   `overlap_weights` becomes the identity and `p_slc = p_cmp`.
# * Try `l=64, d=16, l'=64`: what pattern of weights does one selection block get now?
# * Replace the literal Eq. 9 weights in `select_blocks` (copy `top_n` above) and measure how often
#   the choice changes over all queries, not just the last.
