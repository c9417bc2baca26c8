r"""``make demo``: run one NSA layer on a sample sequence and show what each query reads.

    python -m reference.demo [--length 4096] [--heads 4] [--kv-heads 1] [--head-dim 64] [--out out/]

Builds a randomly initialised ``NativeSparseAttention`` layer (fp32, CPU), runs it on random inputs,
and prints, per branch, how many keys a query reads (on average and at the last query) against full
causal attention's $t + 1$, the overall sparsity, the blocks a few queries selected (Eq. 11) and
the gate statistics (Eq. 5). It writes the token-level masks of one kv head group (compressed,
selected, window, their union, full causal) as PNG figures to ``--out``.

Keys read by query $t$ (spec section 8): $n_t = \lfloor (t + 1 - l)/d \rfloor + 1$ compressed tokens,
the keys $s \le t$ of its $n$ selected blocks, and $\min(w, t + 1)$ window keys.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib
import torch

from .config import NSAConfig
from .layer import NativeSparseAttention
from .masks import causal, window_token_mask
from .plotting import plot_gate_histograms, plot_mask_panels, plot_query_rows

BRANCH_NAMES = {"cmp": "compressed", "slc": "selected", "win": "window"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default = NSAConfig()
    p = argparse.ArgumentParser(prog="python -m reference.demo", description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096, help="sequence length T (default 4096)")
    p.add_argument("--heads", type=int, default=4, help="query heads HQ (default 4)")
    p.add_argument("--kv-heads", type=int, default=1, help="key/value heads H, a divisor of HQ (default 1)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim DK = DV (default 64)")
    p.add_argument("--block", type=int, default=default.compress_block, help="compression block l (default 32)")
    p.add_argument("--stride", type=int, default=default.compress_stride, help="compression stride d (default 16)")
    p.add_argument("--select-block", type=int, default=default.select_block, help="selection block l' (default 64)")
    p.add_argument("--num-selected", type=int, default=default.num_selected, help="selected blocks n (default 16)")
    p.add_argument("--window", type=int, default=default.window, help="sliding window w (default 512)")
    p.add_argument("--compression", choices=("mlp", "mean", "linear"), default="mlp", help="phi (default mlp)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, default=Path("out"), help="directory for the PNG figures (default out/)")
    return p.parse_args(argv)


def keys_read(block_idx: torch.Tensor, config: NSAConfig) -> dict[str, torch.Tensor]:
    """Keys each query reads per branch, block_idx [T, H, n] -> {branch: [T, H]} plus "full" [T, H]."""
    T, H, _ = block_idx.shape
    t = torch.arange(T)[:, None]  # [T, 1]
    l, d, ls = config.compress_block, config.compress_stride, config.select_block
    n_cmp = ((t + 1 - l).div(d, rounding_mode="floor") + 1).clamp_min(0)  # n_t compressed tokens (spec 3)
    in_block = (t[..., None] - block_idx * ls + 1).clamp(0, ls)  # keys s <= t of each selected block
    n_slc = torch.where(block_idx >= 0, in_block, 0).sum(-1)  # [T, H]
    n_win = (t + 1).clamp_max(config.window)  # min(w, t + 1)
    return {"cmp": n_cmp.expand(T, H), "slc": n_slc, "win": n_win.expand(T, H), "full": (t + 1).expand(T, H)}


def token_masks(block_idx: torch.Tensor, config: NSAConfig) -> dict[str, torch.Tensor]:
    """Token-level [T, T] masks of one kv head group (block_idx [T, n]): which raw tokens each branch covers."""
    T = block_idx.shape[0]
    t, s = torch.arange(T), torch.arange(T)
    l, d, ls = config.compress_block, config.compress_stride, config.select_block
    n_cmp = ((t + 1 - l).div(d, rounding_mode="floor") + 1).clamp_min(0)
    covered = torch.where(n_cmp > 0, (n_cmp - 1) * d + l, 0)  # overlapping blocks (d <= l) cover a prefix
    ns = config.num_select_blocks(T)
    chosen = torch.zeros(T, ns + 1, dtype=torch.bool)
    chosen.scatter_(1, torch.where(block_idx >= 0, block_idx, ns).long(), True)  # -1 -> spare column
    full = causal(t, s)
    masks = {
        "cmp": s[None, :] < covered[:, None],
        "slc": chosen[:, s // ls] & full,
        "win": window_token_mask(T, config),
    }
    masks["union"] = masks["cmp"] | masks["slc"] | masks["win"]
    masks["full"] = full
    return masks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    matplotlib.use("Agg")
    torch.manual_seed(args.seed)
    config = NSAConfig(
        compress_block=args.block,
        compress_stride=args.stride,
        select_block=args.select_block,
        num_selected=args.num_selected,
        window=args.window,
    )
    T, HQ, H, D = args.length, args.heads, args.kv_heads, args.head_dim
    hidden = HQ * D
    layer = NativeSparseAttention(hidden, HQ, H, D, None, config, compression=args.compression)
    x = torch.randn(1, T, hidden, generator=torch.Generator().manual_seed(args.seed))  # [1, T, hidden]

    start = time.perf_counter()
    with torch.inference_mode():
        y, aux = layer(x, return_aux=True)
    elapsed = time.perf_counter() - start

    print("== Native Sparse Attention demo ==")
    print(f"config: {config}")
    print(f"layer: hidden={hidden}, heads={HQ}, kv_heads={H}, head_dim={D}, compression={args.compression}")
    print(f"input x {list(x.shape)} -> output y {list(y.shape)} in {elapsed:.2f} s (reference, fp32, CPU)")

    reads = keys_read(aux.block_idx[0], config)  # {branch: [T, H]}
    full_mean, full_last = reads["full"].float().mean().item(), T
    print("\n== Keys read per query (averaged over queries and kv heads; full attention reads t + 1) ==")
    print(f"{'branch':<12}{'mean':>10}{'last query':>12}")
    for name in ("cmp", "slc", "win"):
        n = reads[name].float()
        print(f"{BRANCH_NAMES[name]:<12}{n.mean().item():>10.1f}{n[-1].mean().item():>12.1f}")
    total = torch.stack([reads[name].float() for name in ("cmp", "slc", "win")]).sum(0)  # [T, H]
    print(f"{'NSA total':<12}{total.mean().item():>10.1f}{total[-1].mean().item():>12.1f}")
    print(f"{'full':<12}{full_mean:>10.1f}{full_last:>12d}")

    print("\n== Sparsity ==")
    overall = 1 - total.sum().item() / reads["full"].float().sum().item()
    print(f"keys read / full attention: {1 - overall:.3f} overall, {total[-1].mean().item() / T:.3f} at the last query")
    print(f"sparsity (share of full attention's key reads skipped): {overall:.1%} overall")

    print("\n== Selected blocks (block j holds tokens [j l', (j+1) l'), ascending, -1 = none) ==")
    for t in sorted({T // 4, T // 2, T - 1}):
        for h in range(min(H, 4)):
            blocks = [j for j in aux.block_idx[0, t, h].tolist() if j >= 0]
            print(f"query t={t:>6}, kv head {h}: {blocks}")

    print("\n== Gates (sigmoid, per query head and token) ==")
    for c, name in enumerate(("cmp", "slc", "win")):
        g = aux.gates[..., c]
        print(f"{BRANCH_NAMES[name]:<12}mean {g.mean().item():.3f}  min {g.min().item():.3f}  max {g.max().item():.3f}")

    masks = token_masks(aux.block_idx[0, :, 0], config)  # kv head group 0
    zoom = min(T, 256)
    blocks_of_keys = torch.arange(T) // config.select_block
    last_selected = [torch.isin(blocks_of_keys, aux.block_idx[0, -1, h]) for h in range(H)]  # [T] each
    out = args.out
    figures = [
        plot_mask_panels(masks, out / "masks_full.png", title=f"NSA masks, kv head group 0, T={T}"),
        plot_mask_panels(
            {name: m[T - zoom :] for name, m in masks.items()},
            out / "masks_last_queries.png",
            title=f"the last {zoom} queries, every key",
            row_start=T - zoom,
        ),
        plot_mask_panels(
            {name: m[:zoom, :zoom] for name, m in masks.items()},
            out / "masks_zoom.png",
            title=f"zoom: the first {zoom} tokens, one pixel per token",
        ),
        plot_query_rows(
            [("compressed", "cmp", masks["cmp"][-1])]
            + [(f"selected, kv head {h}", "slc", last_selected[h]) for h in range(H)]
            + [("window", "win", masks["win"][-1]), ("full causal", "full", masks["full"][-1])],
            out / "last_query.png",
            title=f"tokens the last query (t={T - 1}) reads, per branch",
        ),
        plot_gate_histograms(aux.gates, out / "gates.png", title="gate values per branch (random init)"),
    ]
    print("\n== Figures ==")
    for path in figures:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
