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
# # 04 · Inside the kernels
#
# ## What you will learn
#
# * How the Triton kernel for the **selected** branch (`optimized/selected.py`) divides its work:
#   the query heads of one GQA group and a few query positions form the rows of one tile, the grid
#   runs over (row tiles, kv heads), and each program loops over the selected blocks inside.
# * Why this layout suits NSA: the heads of a group share their blocks (notebook 02), so each key
#   block is loaded from memory once for all of them.
# * How to run the `optimized` kernels next to the `reference` (same function names, same arguments)
#   and measure the error per branch, on a CPU through the Triton interpreter.
# * How the selection kernel keeps each query's top-`n` blocks while it streams their scores, and why
#   a random stream needs few insertions.
# * Where to find the GPU benchmark results.
#
# The Triton interpreter (`TRITON_INTERPRET=1`) runs `@triton.jit` kernels on CPU tensors, one
# program after another, which is slow but exact enough to check the arithmetic. It must be set
# before `optimized` is imported, so the first code cell does that when there is no GPU.

# %%
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before `optimized` (and triton.jit) is imported

import json
import sys
import time
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "reference" / "__init__.py").exists())
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle

import optimized
import reference
from reference import NSAConfig
from reference.compression import mean_pool
from reference.viz import BRANCH_COLORS, BRANCH_LABELS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print("device:", DEVICE, "| TRITON_INTERPRET =", os.environ.get("TRITON_INTERPRET"))

# %% [markdown]
# ## The problem we look at
#
# Small enough for the interpreter: `T = 128` tokens, 8 query heads in 2 GQA groups of `G = 4`
# (`HQ = 8, H = 2`), head dim 32, and `l=16, d=8, l'=16, n=4, w=32`, so that queries from
# `t = 64` on choose 4 of up to 8 blocks. The block indices come from the reference.

# %%
cfg = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4, window=32)
T, HQ, H, D = 128, 8, 2, 32
G = HQ // H
g = torch.Generator().manual_seed(0)
q = torch.randn(1, T, HQ, D, generator=g)
k = torch.randn(1, T, H, D, generator=g)
v = torch.randn(1, T, H, D, generator=g)
k_cmp, v_cmp = mean_pool(k, cfg), mean_pool(v, cfg)
gates = torch.rand(1, T, HQ, 3, generator=g)
ref = reference.nsa_attention(q, k_cmp, v_cmp, k, v, k, v, gates, cfg, return_aux=True)
block_idx = ref.block_idx  # [1, T, H, n]
print("block_idx", tuple(block_idx.shape), "| query 101, kv head 0 reads blocks", block_idx[0, 101, 0].tolist())

# %% [markdown]
# ## How the selected-attention kernel tiles its work
#
# The paper (section 3.4) puts the query positions on the grid and loads *all the query heads of a
# GQA group* for a position together, because they share the selected blocks. Our kernel does the
# same with one refinement: tensor-core tiles want at least 16 rows, so the `G` heads of `16 / G`
# consecutive positions are flattened into the `BM = 16` rows of one tile, row `r = t G + g`
# (with `G = 16`, the paper's group size, a tile is exactly one position).
#
# * **Grid**: `(number of row tiles, H)`: program `(i, h)` owns rows `16 i … 16 i + 15` of kv head `h`.
# * **Inside a program**: load the tile's queries `[BM, DK]` and its positions' block lists once; loop
#   over the *union* of those blocks in ascending order; for each block load its `l'` keys and values
#   once and run one online-softmax step for all 16 rows, masking the rows whose position did not
#   select that block and the keys after each row's position.

# %%
BM = 16  # rows per tile, as in optimized/selected.py
n_tiles = T * G // BM
tile, head = (101 * G) // BM, 0  # the program that owns query position 101 of kv head 0
rows = np.arange(tile * BM, (tile + 1) * BM)
pos, hq = rows // G, rows % G
print(f"grid = ({n_tiles} row tiles, {H} kv heads) = {n_tiles * H} programs")
print(f"program ({tile}, {head}) owns positions {sorted(set(pos.tolist()))}, query heads "
      f"{sorted({head * G + x for x in hq.tolist()})}")

fig, ax = plt.subplots(figsize=(14, 3.6), layout="constrained")
for i in range(n_tiles):
    for h in range(H):
        chosen = (i, h) == (tile, head)
        ax.add_patch(Rectangle((i, h), 0.92, 0.9, color=BRANCH_COLORS["slc"] if chosen else "0.85"))
        if i % 4 == 0 or chosen:
            ax.text(i + 0.46, h + 0.45, f"t {i * BM // G}-{(i + 1) * BM // G - 1}", ha="center", va="center",
                    fontsize=8, rotation=90)
ax.set(xlim=(0, n_tiles), ylim=(0, H), xlabel=f"program_id(0): row tile i (rows 16i … 16i+15 = {BM // G} positions x "
       f"{G} heads)", ylabel="program_id(1): kv head h", title="The selected-attention grid: one cell = one program "
       "(orange: the program drawn below)")
ax.set_yticks([0.45, 1.45], ["h = 0", "h = 1"])
ax.set_xticks(np.arange(0, n_tiles, 4) + 0.46, [str(i) for i in range(0, n_tiles, 4)])
plt.show()

# %% [markdown]
# Now one program. Left: its 16 rows, `(position t, head g)`, and the block list of each position
# (real `block_idx`, shared by the group's heads). Right: the loop. For each block of the union, the
# `[16 rows x l']` score tile the program computes: orange entries count, grey ones are computed but
# masked (the row's position did not choose the block, or the key comes after the row's position),
# white ones are never loaded (keys past the tile's last position).

# %%
lists = {int(t): [int(j) for j in block_idx[0, t, head].tolist() if j >= 0] for t in sorted(set(pos.tolist()))}
union = sorted(set().union(*lists.values()))
ls = cfg.select_block
print("block lists:", lists)
print("union, in loop order:", union)

fig = plt.figure(figsize=(16, 5.5), layout="constrained")
gs = fig.add_gridspec(1, len(union) + 2, width_ratios=[2.2] + [1] * len(union) + [0.12])
ax0 = fig.add_subplot(gs[0, 0])
table = np.zeros((BM, cfg.num_selected))
for r in range(BM):
    table[r] = [union.index(j) + 1 for j in lists[int(pos[r])]]
ax0.imshow(table, cmap="Oranges", vmin=0, vmax=len(union) + 1, aspect="auto")
for r in range(BM):
    for c, j in enumerate(lists[int(pos[r])]):
        ax0.text(c, r, str(j), ha="center", va="center", fontsize=9)
ax0.set_yticks(range(BM), [f"r={rows[r]}: t={pos[r]}, g={hq[r]}" for r in range(BM)], fontsize=8)
ax0.set_xticks(range(cfg.num_selected), [f"slot {c}" for c in range(cfg.num_selected)])
ax0.set_title(f"program ({tile}, {head}): rows and their blocks\n(shade: the loop step that visits the block)",
              fontsize=10)

mask_cmap = ListedColormap(["white", "0.8", BRANCH_COLORS["slc"]])
last_t = pos.max()
for step, j in enumerate(union):
    ax = fig.add_subplot(gs[0, step + 1])
    s = j * ls + np.arange(ls)
    selected_row = np.array([j in lists[int(t)] for t in pos])[:, None]
    loaded = (s <= last_t)[None, :].repeat(BM, 0)
    kept = selected_row & (s[None, :] <= pos[:, None])
    im = ax.imshow(np.where(kept, 2, np.where(loaded, 1, 0)), cmap=mask_cmap, vmin=0, vmax=2, aspect="auto")
    ax.set_title(f"step {step + 1}: block {j}\nkeys {s[0]}-{s[-1]}", fontsize=9)
    ax.set_xlabel("key offset in block")
    ax.set_yticks([])
cb = fig.colorbar(im, cax=fig.add_subplot(gs[0, -1]), ticks=[1 / 3, 1, 5 / 3])
cb.ax.set_yticklabels(["not loaded", "computed, masked", "kept"])
fig.suptitle("One program of the selected-attention kernel: rows = 4 positions x 4 heads, loop over the union "
             "of their blocks; each K/V block is loaded once for all 16 rows")
plt.show()

kept_total = sum(((np.array([j in lists[int(t)] for t in pos])[:, None]) & ((j * ls + np.arange(ls))[None, :]
                  <= pos[:, None])).sum() for j in union)
computed_total = sum(BM * int(((j * ls + np.arange(ls)) <= last_t).sum()) for j in union)
print(f"this program loads {len(union)} blocks once each (a per-head kernel would load "
      f"{sum(len(b) for b in lists.values()) * G}), and {kept_total / computed_total:.0%} of the "
      f"score entries it computes are kept")

# %% [markdown]
# How big is the union in general? At most `16 / G = 4` times `n`, when the tile's positions share
# no block. The forced initial block is shared by all of them, and the local blocks by neighbours
# in the same selection block, so it is always smaller. Over every program of this problem:

# %%
union_sizes = np.array([
    len(set(block_idx[0, i * BM // G : (i + 1) * BM // G, h].flatten().tolist()) - {-1})
    for i in range(n_tiles) for h in range(H)
])
choice = np.arange(n_tiles).repeat(H) * BM // G >= cfg.num_selected * cfg.select_block  # tiles with a real choice
print(f"union size over all {union_sizes.size} programs: mean {union_sizes.mean():.2f} blocks (n = {cfg.num_selected},"
      f" at most {cfg.num_selected * BM // G}); over the programs whose queries have a choice "
      f"(t >= n l' = {cfg.num_selected * cfg.select_block}): mean {union_sizes[choice].mean():.2f}, "
      f"max {union_sizes[choice].max()}")

# %% [markdown]
# On random data the positions' free picks are nearly independent, so this is close to the worst
# case for these forced blocks; with real data the union shrinks as far as neighbouring positions
# rank the same blocks highly. With the paper's `G = 16` heads per group a tile is exactly one
# position and the union is just its `n` blocks: nothing is computed and then thrown away except
# the causal part of the current block.
#
# The other kernels follow the same row layout (`G` heads x positions per tile): the compressed and
# window branches loop over a contiguous range of keys instead of a block list, and the selection
# kernel (`optimized/selection.py`) recomputes the compressed scores block by block, maps them with
# the overlap weights and keeps a running top-`n`, so the `[T, NS]` score matrix is never written to
# memory.
#
# ## Turning the loop around for small groups
#
# The tile loop gathers every selected block once per tile: `l' (DK + DV)` key and value elements,
# which serve the `G` heads of a position. With `G = 16` that is a good deal; with `G = 4` or `G = 1`
# it is not, and the union above is mostly blocks that only one position of the tile wanted. The
# *block-major* forward (`optimized.selected`, the default for `G <= 4` from 16k tokens on; the idea
# is FSA's, Yan et al. 2025) loops the other way: for each (kv head, block), the positions that chose
# it, the inverted lists that the dK/dV pass also uses. A program loads one block once and gathers
# the query rows of its positions (`G DK` elements each); each row's softmax over that one block is
# stored as a partial (its output and log-sum-exp), and a second kernel merges a row's `n` partials.
# The inverted list of block 2 of kv head 0 in this problem:

# %%
from optimized.selected import invert_blocks, selected_attention_fwd

idx32 = block_idx[0].to(torch.int32)  # [T, H, n], ascending, -1 padded
key, start, end, entry_of, *_, NB = invert_blocks(idx32, [T], cfg.select_block, chunk=16)
chunks = [w for w in range(key.numel()) if int(key[w]) == 0 * NB + 2 and int(end[w]) > int(start[w])]
H_kv, n = idx32.shape[1:]
positions = [int(entry_of[e]) // (H_kv * n) for w in chunks for e in range(int(start[w]), int(end[w]))]
print(f"block 2 of kv head 0 was chosen by {len(positions)} positions, in {len(chunks)} chunks of at most 16:",
      positions[:12], "...")

# %% [markdown]
# Both loop orders compute the same attention (up to float32 rounding here; in bf16 the partials add a
# rounding of their own), and the bytes each moves per (position, kv head, selected block) decide which is faster:

# %%
args = (q, k, v, block_idx, cfg, D**-0.5, None)
o_tiles, _ = selected_attention_fwd(*args, block_major=False)
o_blocks, _ = selected_attention_fwd(*args, block_major=True)
print(f"max |tiles - block-major| = {float((o_tiles - o_blocks).abs().max()):.1e}")

ls_paper, d_paper = 64, 128  # the paper's l' and head dims, bf16 (2 bytes)
groups = np.array([1, 2, 4, 8, 16])
tiles_kb = np.full(groups.shape, ls_paper * 2 * d_paper * 2 / 1024)  # the block's keys and values
blocks_kb = groups * ((d_paper + 2 * d_paper) * 2 + 2 * 4) / 1024  # G query rows in, G partials out and back (+ lse)
# the rates each design reads at, measured on an H100 (`benchmarks/bounds.py`): the tiles' gather of the real
# 64k selections (mostly L2 hits) and the card's copy rate (HBM), which the query rows and partials go through
bounds = json.loads((ROOT / "benchmarks" / "results" / "bounds.json").read_text())
gather = next(r for r in bounds["records"] if r["config"] == "default" and r["seq_len"] == 65536)
gather_tbps, copy_tbps = gather["gather_tbps"], bounds["copy_tbps"]
pairs = gather["gather_bytes"] / (tiles_kb[0] * 1024)  # (position, kv head, block) pairs at 64k
fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(11, 3.2))
ax.plot(groups, tiles_kb, "o-", label="tiles: gather the block's K/V")
ax.plot(groups, blocks_kb, "s-", label="block-major: q rows + partials")
ax.set(xscale="log", xticks=groups, xticklabels=groups, xlabel="G (query heads per kv head)",
       ylabel="KB per (position, head, block)", title="Bytes moved per selected block")
ax.legend()
ax_t.plot(groups, tiles_kb * 1024 / gather_tbps * 1e-3, "o-", label=f"tiles at {gather_tbps:.1f} TB/s")
ax_t.plot(groups, blocks_kb * 1024 / copy_tbps * 1e-3, "s-", label=f"block-major at {copy_tbps:.2f} TB/s")
measured = {"tiles, H100": ([4], [15.11]), "block-major, H100": ([1, 4], [2.21, 5.82])}  # ms at 64k, G = 1, 4
for (label, (g, ms)), marker in zip(measured.items(), ("o", "s")):
    ax_t.plot(g, np.array(ms) * 1e6 / pairs, marker, mfc="none", ms=10, color="k" if marker == "o" else "gray",
              label=f"{label} (measured)")
ax_t.set(xscale="log", xticks=groups, xticklabels=groups, xlabel="G (query heads per kv head)",
         ylabel="ns per (position, head, block)", title="...over the rate each reads at")
ax_t.legend(fontsize=8)
plt.show()
print(f"{pairs / 1e6:.2f} M pairs at 64k; G = 16: tiles {tiles_kb[-1] * 1024 / gather_tbps * pairs * 1e-9:.1f} ms, "
      f"block-major {blocks_kb[-1] * 1024 / copy_tbps * pairs * 1e-9:.1f} ms")

# %% [markdown]
# At `G = 4` block-major moves about a tenth of the bytes, and on an H100 at 64k tokens the branch
# went from 15.1 to 5.8 ms (`G = 1`: 11.7 to 2.2 ms). The hollow markers are those times per pair: the
# block-major ones sit above their line (the kernels do more than move bytes), the tiles' at `G = 4` a little
# below it (a tile's 4 positions share some blocks). At `G = 16` block-major would still move fewer bytes (12 KB against
# 32), but the tiles' gather is mostly L2 hits while the query rows and partials go through HBM, three
# times slower: priced per pair, the two designs come out even (the right panel at `G = 16`), about
# 16 ms for the 64k selections either way. That is the floor under the 64k forward target
# (docs: Performance, "Floors"); `default` keeps the paper's order.
#
# ## How the selection keeps its top-n while it streams
#
# The selection kernel never holds a query's whole row of block scores (1024 blocks at 64k tokens):
# it sees them in *chunks* of `BS` blocks (16) and keeps the `n` best so far as a list sorted ascending.
# A chunk goes in as a **merge of two sorted lists**: the chunk's keys are sorted descending (a bitonic
# network, `tl.topk`), and each slot keeps the larger of the two lists' entries there. If the list is
# ascending and the chunk descending, the two laid end to end rise then fall (a *bitonic* sequence), and the
# slot-wise maximum is the first step of a bitonic sorter, the half-cleaner: it holds exactly the `n`
# largest keys of both, again bitonic, which `tl.bitonic_merge` sorts ascending in `log2 n`
# compare-exchange stages. The work per chunk is fixed, 14 stages at 16 keys, whatever the scores, with no
# data-dependent loop: an earlier kernel inserted the chunk's keys one round at a time (3.7 rounds per
# chunk on random scores at 64k, each a chain of dependent reductions), and the warps spent their time
# waiting on those chains.
#
# Below, one merge step drawn, then a stream of random rows checked against a full sort.

# %%
N_BLK, N_SEL, BS = 1024, 16, 16


def half_clean(top: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """Top (ascending) against the chunk sorted descending, slot-wise max: the top n of both, bitonic."""
    return np.maximum(top, np.sort(chunk)[::-1])


def merge_chunk(top: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """The kernel's rule: the half-cleaned list sorted again (tl.bitonic_merge: log2(n) stages)."""
    return np.sort(half_clean(top, chunk))


rng = np.random.default_rng(0)
top = np.sort(rng.random(N_SEL))  # a row's list after a few chunks
chunk = rng.random(BS)
bitonic = half_clean(top, chunk)
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.plot(top, "o-", ms=4, label="list (ascending)")
ax.plot(np.sort(chunk)[::-1], "s-", ms=4, label="chunk (sorted descending)")
ax.plot(bitonic, "k^--", ms=5, label="slot-wise max: the top n, bitonic")
ax.set(xlabel="slot", ylabel="score")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

rows = rng.random((200, N_BLK))
for row in rows:
    top = np.full(N_SEL, -1.0)  # empty slots: below every score
    for c0 in range(0, N_BLK, BS):
        top = merge_chunk(top, row[c0 : c0 + BS])
    assert np.array_equal(top, np.sort(row)[-N_SEL:])
print(f"{len(rows)} rows of {N_BLK} scores streamed in chunks of {BS}: every top-{N_SEL} equals a full sort's")

# %% [markdown]
# Real rows are not random: trained models score neighbouring blocks alike, and the forced blocks (the
# first one, the two local ones) enter with an infinite score; the merge does not care. Measured on an
# H100 at 64k tokens (the selection alone, both designs in one run): `G = 16` 10.87 -> 8.91 ms, `G = 4`
# 4.79 -> 3.50 ms; the performance log in `benchmarks/README.md` has the rest.
#
# ## Running the kernels against the reference
#
# Same inputs, same call, `optimized` instead of `reference`. `return_aux=True` returns every branch,
# the log-sum-exp and the block indices, so we can compare branch by branch. To keep the interpreter
# run short we take the first GQA group only (query heads 0-3, kv head 0). Since the kernels'
# selection equals the reference's (checked below), the selected-attention error compares the
# selected kernel on the very same blocks.

# %%
# kv head 0's group only (4 query heads, 1 kv head): half the programs, the interpreter is slow
sub = (q[:, :, :G], k_cmp[:, :, :1], v_cmp[:, :, :1], k[:, :, :1], v[:, :, :1], k[:, :, :1], v[:, :, :1],
       gates[:, :, :G])
ref1 = reference.nsa_attention(*sub, cfg, return_aux=True)
args = [x.to(DEVICE) for x in sub]
start = time.perf_counter()
opt = optimized.nsa_attention(*args, cfg, return_aux=True)
elapsed = time.perf_counter() - start
print(f"optimized kernels took {elapsed:.1f} s on {DEVICE}"
      + (" (interpreter: one program at a time, not a benchmark)" if DEVICE == "cpu" else ""))
errors = {
    name: (getattr(opt, field).float().cpu() - getattr(ref1, field).float()).abs().max().item()
    for name, field in [("cmp", "o_cmp"), ("slc", "o_slc"), ("win", "o_win"), ("gated sum", "o")]
}
finite = torch.isfinite(ref1.lse_cmp)
errors["lse (cmp)"] = (opt.lse_cmp.float().cpu()[finite] - ref1.lse_cmp[finite]).abs().max().item()
same_blocks = torch.equal(opt.block_idx.cpu().int(), ref1.block_idx.int())
print(f"block_idx identical to the reference: {same_blocks}")
for name, err in errors.items():
    print(f"max |optimized - reference| {name:>10}: {err:.2e}")
assert same_blocks and max(errors.values()) < 1e-4, "the kernels disagree with the reference"

# %%
names = list(errors)
colors = [BRANCH_COLORS.get(n, "0.4") for n in ["cmp", "slc", "win"]] + ["0.2", BRANCH_COLORS["cmp"]]
fig, ax = plt.subplots(figsize=(8, 3.5), layout="constrained")
ax.bar([BRANCH_LABELS.get(n, n) for n in names], [max(e, 1e-12) for e in errors.values()], color=colors)
ax.set(yscale="log", ylabel="max |optimized - reference|",
       title=f"Kernels vs reference, float32, T={T}, HQ={G}, H=1, D={D} ({DEVICE})")
ax.axhline(1e-5, color="k", ls="--", lw=0.8, label="1e-5")
ax.legend()
plt.show()

# %% [markdown]
# In float32 the errors printed above are at rounding level: the kernels add the same terms in a
# different order (tiles, online softmax, `exp2`). On a GPU, Triton's `tl.dot` would default to TF32
# for float32 inputs (errors around `1e-2`); the kernels ask for IEEE precision instead
# (`optimized._common.dot_precision`), so float32 stays exact there too. Half-precision inputs
# (fp16, bf16) are tested on the GPU only (`make test-gpu`): the interpreter's bf16 `tl.dot` is
# not reliable.
#
# ## Benchmarks
#
# The GPU benchmarks (`make bench`, on the GPU machine) write their plots to `benchmarks/results/`.

# %%
from IPython.display import Image, display

pngs = sorted((ROOT / "benchmarks" / "results").glob("*.png"))
if not pngs:
    print("No benchmark plot in benchmarks/results/ yet: run `make bench` on a GPU machine to create one.")
for png in pngs:
    print(png.relative_to(ROOT))
    display(Image(filename=str(png)))

# %% [markdown]
# ## What to try next
#
# * Set `HQ = 32, H = 2` (`G = 16`): each program is then exactly one position, as in the paper's
#   kernel; redraw the tile and check that nothing is computed and masked except after `t`.
# * Give every position in a tile a different random block list (random `block_idx`, respecting
#   causality) and watch the union, and the wasted grey area, grow.
# * Read `optimized/selected.py`: find the `for i_u in range(0, n_union)` loop that walks the union,
#   and the mask `m_s` drawn above.
# * On a GPU, compare float32 and bfloat16 errors, and time `optimized.nsa_attention` against the
#   reference at `T = 8192`.
# * Time `selected_attention_fwd(..., block_major=True)` against `block_major=False` for `G = 1, 4, 16`
#   at a few lengths (`scripts/selected_tiles.py --block-major` does it): where does the crossing fall?
#   The backward still walks the query tiles for `dq`; a block-major `dq` would write per-block partials
#   and sum them (no rescaling: `dq` is a plain sum over blocks), or add them with atomics.
