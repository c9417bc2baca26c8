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
# # 03 · Gates and selection in a trained model
#
# ## What you will learn
#
# The first two notebooks looked at NSA's masks and block selection on random numbers. Here we open
# a small language model whose attention layers are `NativeSparseAttention`, trained (by
# `examples/train.py`, not here) on a task that *needs* long-range attention:
#
# 1. the task: find a (key, value) pair planted far outside the sliding window, and why a
#    window-only model cannot beat chance on it;
# 2. how the gates (paper Eq. 5) of each branch move from their initial value to a learned,
#    position-dependent mix, per layer and per head;
# 3. what the selection scores (Eq. 8-10) look like for the query that must find the needle, and
#    whether the top-`n` selection (Eq. 11) picks the needle's block;
# 4. which branch actually carries the answer, by switching each branch's gate off.
#
# Everything runs on the CPU from the committed checkpoint in `examples/checkpoints/` in well under
# a minute.

# %%
import json
import sys
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "reference" / "__init__.py").exists())
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import numpy as np
import torch

from examples.tiny_lm import TinyLM, load_checkpoint, make_batch
from reference import selection_scores
from reference.compression import compress
from reference.viz import BRANCH_COLORS, BRANCH_LABELS

BRANCHES = ("cmp", "slc", "win")
CHECKPOINTS = ROOT / "examples" / "checkpoints"
torch.set_grad_enabled(False)

# %% [markdown]
# ## The trained model and the baselines
#
# `examples/checkpoints/nsa.pt` holds the state dict of the trained NSA model and `nsa.json` its
# configuration; `results.json` records the held-out accuracy of the same model with NSA, with the
# sliding window alone, and with full causal attention (`examples/README.md` has the commands).

# %%
results = json.loads((CHECKPOINTS / "results.json").read_text())
for name, r in results.items():
    print(
        f"{name:>6}: held-out accuracy {r['heldout_accuracy']:.3f} (chance {r['chance']:.3f}) "
        f"after {r['steps']} steps, {r['train_seconds']:.0f} s on {r['device']}"
    )

trained, task = load_checkpoint(CHECKPOINTS / "nsa.pt")
torch.manual_seed(results["nsa"]["seed"])  # the same seed as train.py: the model before training
fresh = TinyLM(trained.config).eval()
cfg = trained.config.nsa_config
print(task)
print(cfg)
print(f"{sum(p.numel() for p in trained.parameters()):,} parameters, {trained.config.num_layers} layers")

# %% [markdown]
# ## The task
#
# Each sequence is random filler with one (key, value) pair planted at least `min_gap` tokens before
# the end; the last token repeats the key and the model must predict the value. `min_gap` is
# `layers × w`, so even a stack of window layers cannot relay the value to the last position: the
# window-only model's accuracy sits at chance, `1 / num_values`. Below, one sequence: the last
# query's window is shaded, the grid lines are the selection blocks of `l'` tokens.

# %%
batch = make_batch(task, 32, torch.Generator().manual_seed(2024))  # held-out: a seed train.py never uses
T, ls = task.seq_len, cfg.select_block
b0 = 0
kind = np.zeros(T)
kind[batch.tokens[b0].numpy() >= task.first_key] = 1
kind[batch.tokens[b0].numpy() >= task.first_value] = 2

fig, ax = plt.subplots(figsize=(11, 1.8))
ax.axvspan(T - cfg.window - 0.5, T - 0.5, color=BRANCH_COLORS["win"], alpha=0.25, label="window of the last query")
ax.bar(np.arange(T), kind, color=["#bbbbbb" if k == 0 else "#d62728" for k in kind], width=1.0)
for j in range(0, T + 1, ls):
    ax.axvline(j - 0.5, color="k", lw=0.3)
ax.set_yticks([0, 1, 2], ["filler", "key", "value"])
ax.set_xlabel("position t")
pos = int(batch.value_pos[b0])
ax.set_title(f"One sequence: the value at t={pos} is {T - 1 - pos} tokens before the question")
ax.legend(loc="upper center", fontsize=8)
plt.show()

# %% [markdown]
# ## Running both models with `return_aux`
#
# `TinyLM(tokens, return_aux=True)` returns each layer's `NSALayerAux`: the gates `[B, T, HQ, 3]`, the
# branch outputs, the compressed attention's log-sum-exp and the selected blocks `[B, T, H, n]`. To
# rebuild the selection scores (Eq. 8-10) we also need each layer's queries and compressed keys, so a
# forward pre-hook records the input of every attention layer and we call the layer's own `project`
# and `compress` on it.


# %%
def inspect(model: TinyLM, tokens: torch.Tensor) -> dict:
    """Logits, and per layer: gates, selected blocks and selection scores [B, T, H, NS]."""
    inputs: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for block in model.blocks]
    try:
        logits, auxes = model(tokens, return_aux=True)
    finally:
        for hook in hooks:
            hook.remove()
    scores = []
    for block, x, aux in zip(model.blocks, inputs, auxes):
        q, kv = block.attn.project(x)
        k_cmp = compress(kv.k_cmp, block.attn.compress_k, cfg)
        scores.append(selection_scores(q, k_cmp, aux.lse_cmp, cfg))
    return {
        "logits": logits,
        "gates": [aux.gates for aux in auxes],
        "block_idx": [aux.block_idx for aux in auxes],
        "scores": scores,
    }


runs = {"init": inspect(fresh, batch.tokens), "trained": inspect(trained, batch.tokens)}
for name, run in runs.items():
    acc = (run["logits"][:, -1].argmax(-1) == batch.targets).float().mean()
    print(f"{name:>7}: accuracy on these {len(batch.targets)} sequences {acc:.3f}")

# %% [markdown]
# ## Gates across positions
#
# The mean gate of each branch (over the batch and the query heads) at every position, per layer.
# At initialisation all gates sit near `sigmoid(0) = 0.5`: every branch counts equally. After
# training they are a learned function of the token: the last position (the question) is the
# only one whose prediction is trained, so look at how its gates differ from the filler's. In the
# committed checkpoint the first layer keeps its gates near 0.5 except at the question, where the
# selected gate rises and the window's falls; the second layer turns all three down away from the
# question (the selected branch most) and back up at it.

# %%
L = trained.config.num_layers
fig, axes = plt.subplots(L, 2, figsize=(12, 2.6 * L), sharex=True, sharey=True, squeeze=False)
for col, (name, run) in enumerate(runs.items()):
    for layer in range(L):
        ax = axes[layer, col]
        g = run["gates"][layer].mean(dim=(0, 2))  # [T, 3]
        for c, branch in enumerate(BRANCHES):
            ax.plot(g[:, c], color=BRANCH_COLORS[branch], label=BRANCH_LABELS[branch])
        ax.set_title(f"{name}, layer {layer}")
        ax.set_ylabel("mean gate")
        ax.set_ylim(0, 1)
axes[-1, 0].set_xlabel("position t")
axes[-1, 1].set_xlabel("position t")
axes[0, 0].legend(fontsize=8)
fig.suptitle("Gate per branch across positions (mean over sequences and heads)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Gates per head at the question
#
# The same gates at the last position only, per layer and query head: one row per (layer, head), one
# column per branch. Heads in the same GQA group share their selected blocks but not their gates. In
# the committed checkpoint, heads 0 and 1 of the first layer (kv head 0's group) open their
# long-range gates at the question: this group has become the retrieval head, as the next plots show.

# %%
HQ = trained.config.num_heads
fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * L * HQ + 1.5), sharey=True)
for ax, (name, run) in zip(axes, runs.items()):
    g = torch.stack([gates[:, -1].mean(0) for gates in run["gates"]])  # [L, HQ, 3]
    im = ax.imshow(g.flatten(0, 1).numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(3), [BRANCH_LABELS[b] for b in BRANCHES])
    ax.set_yticks(range(L * HQ), [f"layer {i} head {h}" for i in range(L) for h in range(HQ)])
    ax.set_title(f"{name}: gates at the question")
    for (r, c), value in np.ndenumerate(g.flatten(0, 1).numpy()):
        ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8)
fig.colorbar(im, ax=axes, label="gate value (mean over sequences)")
plt.show()

# %% [markdown]
# ## Selection scores for the question
#
# For the last query, the selection scores `P[t, g, j]` (Eq. 8-10: compressed attention probabilities
# mapped to blocks of `l'` and summed over the group's heads), per layer and kv head. The needle's
# block (the block of the value token) is shaded red; the bars of the blocks the query selected
# (forced ones included) are in the selected branch's colour.

# %%
H = trained.config.num_kv_heads
needle_block = int(batch.value_pos[b0]) // ls
fig, axes = plt.subplots(2 * L, H, figsize=(12, 2.2 * 2 * L), sharex=True, squeeze=False)
for m, (name, run) in enumerate(runs.items()):
    for layer in range(L):
        for h in range(H):
            ax = axes[m * L + layer, h]
            s = run["scores"][layer][b0, -1, h].numpy()
            chosen = set(run["block_idx"][layer][b0, -1, h].tolist()) - {-1}
            colors = [BRANCH_COLORS["slc"] if j in chosen else "#bbbbbb" for j in range(len(s))]
            ax.axvspan(needle_block - 0.5, needle_block + 0.5, color="#d62728", alpha=0.2)
            ax.bar(range(len(s)), s, color=colors)
            ax.set_title(f"{name}, layer {layer}, kv head {h}", fontsize=9)
            ax.set_ylabel("score")
for ax in axes[-1]:
    ax.set_xlabel(f"selection block j (l' = {ls} tokens)")
fig.suptitle(f"Selection scores of the last query; red: needle block {needle_block}; coloured bars: selected")
fig.tight_layout()
plt.show()

# %% [markdown]
# The same scores for *every* query of the sequence, for the trained model's layers: rows are query
# positions, columns blocks, each row divided by its maximum (early queries have few candidates and
# large scores). Blocks after the query are not candidates (score 0). Only the last query's answer
# was trained: does the needle's column light up for it alone, or for every query after the needle?

# %%
fig, axes = plt.subplots(L, H, figsize=(5 * H, 4 * L), squeeze=False)
for layer in range(L):
    for h in range(H):
        ax = axes[layer, h]
        s = runs["trained"]["scores"][layer][b0, :, h]  # [T, NS]
        s = s / s.amax(-1, keepdim=True).clamp_min(1e-12)  # queries with no complete block yet: all 0
        im = ax.imshow(s.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.axvline(needle_block, color="c", lw=1, ls="--", label="needle block")
        ax.set_title(f"trained, layer {layer}, kv head {h}")
        ax.set_xlabel("selection block j")
        ax.set_ylabel("query position t")
        fig.colorbar(im, ax=ax, label="selection score / row max")
axes[0, 0].legend(loc="lower left", fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## How often does the selection find the needle?
#
# Over all held-out sequences of the batch: the fraction in which the last query's selected blocks
# include the needle's block, per layer and kv head. Of the `n` blocks, the first and the two local
# ones are forced; the local ones never hold the needle (it is at least `min_gap` tokens back), so
# apart from needles in block 0 only the free slot can find it. At initialisation that is luck; after
# training, kv head 0 of the first layer selects the needle's block in almost every sequence, while
# the other groups have learned to look elsewhere.

# %%
fig, ax = plt.subplots(figsize=(8, 3))
width = 0.38
labels = [f"L{layer} h{h}" for layer in range(L) for h in range(H)]
needle = (batch.value_pos // ls)[:, None]
for m, (name, run) in enumerate(runs.items()):
    hits = [
        float((run["block_idx"][layer][:, -1, h] == needle).any(-1).float().mean())
        for layer in range(L)
        for h in range(H)
    ]
    ax.bar(np.arange(len(labels)) + (m - 0.5) * width, hits, width, label=name)
    print(name, [f"{x:.2f}" for x in hits])
ax.set_xticks(range(len(labels)), labels)
ax.set_ylim(0, 1.05)
ax.set_xlabel("layer and kv head")
ax.set_ylabel("needle block selected")
ax.set_title("Fraction of sequences whose last query selects the needle's block")
ax.legend()
plt.show()

# %% [markdown]
# ## Which branch carries the answer?
#
# Switch one branch off in every layer (its gate forced to 0, the others untouched) and measure the
# trained model's accuracy again. A large drop means the model relies on that branch.
#
# In the committed checkpoint both long-range branches carry the answer: without the compressed branch
# accuracy halves, without the selected branch it drops by about a fifth, and without the window it
# hardly moves. With a single needle, a compressed summary of `l` tokens can already tell which value
# is in it, so the compressed branch is a route of its own and not only the selection's scorer; the
# selected branch reads the needle's tokens exactly. (32 sequences: each one is 3 points of accuracy.)


# %%
def accuracy_without(model: TinyLM, branch: str | None) -> float:
    """Accuracy on the batch with ``branch``'s gate forced to 0 in every layer (None: unchanged)."""
    layers = [block.attn for block in model.blocks]
    if branch is not None:
        for layer in layers:
            layer.gates = lambda x, f=layer.gates: f(x) * (torch.arange(3) != BRANCHES.index(branch))
    try:
        return float((model(batch.tokens)[:, -1].argmax(-1) == batch.targets).float().mean())
    finally:
        for layer in layers:
            layer.__dict__.pop("gates", None)  # back to the class's method


ablation = {"none": accuracy_without(trained, None)} | {b: accuracy_without(trained, b) for b in BRANCHES}
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(
    ["none", *[BRANCH_LABELS[b] for b in BRANCHES]],
    list(ablation.values()),
    color=["#444444", *[BRANCH_COLORS[b] for b in BRANCHES]],
)
ax.axhline(1 / task.num_values, color="k", ls=":", label="chance")
ax.set_ylabel("accuracy")
ax.set_ylim(0, 1.05)
ax.set_xlabel("gates forced to 0 in every layer")
ax.set_title("Trained model with one branch switched off")
ax.legend(loc="center left", bbox_to_anchor=(1, 0.5))
plt.show()
print(ablation)

# %% [markdown]
# ## What to try next
#
# * Make the task harder: `--num-pairs 4` plants four pairs and asks for one, so the query must match
#   its key rather than find the only value token (an induction-head circuit across two layers).
# * Shrink the budget: `--num-selected 3` with `num_local` forced blocks leaves no free slot; which
#   branch takes over?
# * Compare `compression="mean"` with the MLP $\varphi$ (edit `Block` in `examples/tiny_lm.py`): do
#   the selection scores still find the needle?
# * Train at a longer context on the GPU with the Triton kernels (`examples/README.md` has the
#   command) and load that checkpoint here instead.
