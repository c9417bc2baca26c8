"""Experiment: the selected branch's forward and backward against the rows per program (``rows``, BM).

With G = 16 the default tile (16 rows) is one position: every program loads its own ``n`` blocks. Larger
tiles let 2 or 4 neighbouring positions share one load of each block in their union (fewer loads per
position, more masked tensor-core rows). The selections are real: the optimized selection on the
benchmark's random inputs. Each variant is checked against the default tiles (same o and dq up to the
dot's rounding). Prints ms, the blocks loaded per position (union / positions per tile) and the computed
block-rows per selected block-row; writes ``selected_tiles.json`` to ``--out``. ``--block-major`` adds
the block-major forward at the default rows (``rows`` printed as 0; its backward is the default's, not timed
again). Each call reruns on one input set (at 8k its K/V stay in the L2): compare the variants with each other,
not with ``bench.json``.

    python scripts/selected_tiles.py --lengths 8192 65536 --configs default g4 paper_dims --rows 32 64
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks import experiment
from benchmarks.run import CONFIGS
from benchmarks.timing import time_calls
from optimized.selected import TILE_ROWS, _packed, _row_tiles, selected_attention_bwd, selected_attention_fwd


def main(argv: list[str] | None = None) -> int:
    p = experiment.parser(__doc__, [8192, 65536], ["default", "g4"])
    p.add_argument("--rows", type=int, nargs="*", default=[32, 64], help="rows per program besides the default")
    p.add_argument("--block-major", action="store_true", help="also the block-major forward (each block's queries)")
    args = p.parse_args(argv)
    device, env = experiment.start(args)
    records, failed = [], 0
    for name in args.configs:
        cfg = CONFIGS[name]
        nsa, hq, h, dv = cfg.nsa, cfg.heads_q, cfg.heads_kv, cfg.dim_v
        for seq_len in args.lengths:
            x = experiment.selected_inputs(cfg, seq_len, device)
            q, k, v, idx, scale = x["q"], x["k"], x["v"], x["block_idx"], x["scale"]
            do = torch.randn(*q.shape[:3], dv, device=device, dtype=q.dtype)
            selected = float((idx >= 0).sum()) * (hq // h)  # selected block-rows
            want = None
            variants = [(rows, False) for rows in [TILE_ROWS, *args.rows]] + [(0, True)] * args.block_major
            for rows, major in variants:
                tiles = rows or TILE_ROWS
                fwd = functools.partial(
                    selected_attention_fwd, q, k, v, idx, nsa, scale, None, rows=tiles, block_major=major
                )
                o, lse = fwd()
                bwd = functools.partial(selected_attention_bwd, q, k, v, o, lse, do, idx, nsa, scale, None, rows=tiles)
                dq = bwd()[0]
                if want is None:
                    want = (o.float(), dq.float())
                err = max(float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip((o, dq), want))
                failed += err > 2e-2
                _, _, _, _, union_len, BM = _row_tiles(_packed(idx.to(torch.int32))[0], hq // h, [seq_len], nsa, tiles)
                rec = {
                    "config": name, "seq_len": seq_len, "rows": rows,
                    "fwd_ms": time_calls([fwd], device).median_ms,
                    "bwd_ms": None if major else time_calls([bwd], device).median_ms,
                    "blocks_loaded_per_position": float(union_len.sum()) / (h * seq_len),  # per kv head
                    "computed_per_selected_block_rows": float(union_len.sum()) * BM / selected,
                    "rel_err_vs_default": err,
                }  # fmt: skip
                records.append(rec)
                print(
                    f"{name:11s} T={seq_len:6d} rows={rows:3d} fwd {rec['fwd_ms']:8.3f} ms"
                    f"  bwd {rec['bwd_ms'] or 0:8.3f} ms"
                    f"  loads/position {rec['blocks_loaded_per_position']:5.2f}"
                    f"  computed/selected {rec['computed_per_selected_block_rows']:4.2f}  err {err:.1e}"
                )
    experiment.write(args, "selected_tiles", env, records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
