"""Experiment: the fused selection's time against its tiles: the chunk ``BS`` (selection blocks per top-n
update, a power of two at least the list's length) and the most query rows per program.

Each variant is compared with the default launch: another tiling sums the scores in another order, so rows
whose choice is a near tie may differ; more than 1% differing (position, kv head) rows fails the run.
Prints ms per config, length and variant; writes ``selection_tiles.json`` to ``--out``.

    python scripts/selection_tiles.py --lengths 65536 --configs default meanpool64 g4 --chunks 32 --rows 64
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import optimized
from benchmarks import experiment
from benchmarks.run import CONFIGS
from benchmarks.timing import time_calls
from optimized.selection import select_blocks_fwd, select_tiles


def main(argv: list[str] | None = None) -> int:
    p = experiment.parser(__doc__, [65536], ["default", "meanpool64", "g4"])
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="BS values besides the default")
    p.add_argument("--rows", type=int, nargs="*", default=[], help="query-row limits besides the default")
    args = p.parse_args(argv)
    device, env = experiment.start(args)
    records, failed = [], 0
    for name in args.configs:
        cfg = CONFIGS[name]
        nsa, hq, h, dk = cfg.nsa, cfg.heads_q, cfg.heads_kv, cfg.dim_k
        for seq_len in args.lengths:
            gen = torch.Generator(device=device).manual_seed(seq_len)
            q = torch.randn(1, seq_len, hq, dk, device=device, generator=gen, dtype=cfg.torch_dtype)
            k = torch.randn(1, seq_len, h, dk, device=device, generator=gen, dtype=cfg.torch_dtype)
            k_cmp = optimized.mean_pool(k, nsa)
            _, lse = optimized.compressed_attention(q, k_cmp, optimized.mean_pool(k, nsa), nsa)
            scale = dk**-0.5
            want = select_blocks_fwd(q, k_cmp, lse, nsa, scale, None)
            for bs, rows in itertools.product([None, *args.chunks], [None, *args.rows]):
                r = nsa.select_block // nsa.compress_stride
                tiles = select_tiles(hq // h, dk, nsa.num_selected, r, bs, rows)
                call = functools.partial(select_blocks_fwd, q, k_cmp, lse, nsa, scale, None, bs, rows)
                differ = float((call() != want).any(-1).float().mean())
                failed += differ > 0.01
                ms = time_calls([call], device).median_ms
                records.append({"config": name, "seq_len": seq_len, "bs": bs, "rows": rows, **tiles, "ms": ms,
                                "rows_differing": differ})  # fmt: skip
                line = f"{name:11s} T={seq_len:6d} bs={bs!s:4s} rows={rows!s:4s} {tiles} {ms:8.3f} ms"
                print(f"{line}  differ={differ:.2%}")
    experiment.write(args, "selection_tiles", env, records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
