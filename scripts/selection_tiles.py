"""Experiment: the fused selection's time against its chunk size ``BS`` (selection blocks per top-n merge).

Every variant must return the default launch's indices exactly (same kernel, only the chunking differs:
the merge keeps the top n of everything seen so far, so the result cannot depend on it). Prints ms per
config, length and ``BS``; writes ``selection_tiles.json`` to ``--out``.

    python scripts/selection_tiles.py --lengths 65536 --configs default meanpool64 g4 --out /tmp/out
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import optimized
from benchmarks.run import CONFIGS, environment
from benchmarks.timing import time_calls
from optimized.selection import select_blocks_fwd, select_tiles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[65536])
    p.add_argument("--configs", nargs="+", default=["default", "meanpool64", "g4"], choices=sorted(CONFIGS))
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print(f"optimized from {Path(optimized.__file__).parent}, source_sha1 {env['source_sha1']}, {env['card']}")
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
            for bs in [None, *args.chunks]:
                tiles = select_tiles(hq // h, dk, nsa.num_selected, nsa.select_block // nsa.compress_stride, bs)
                got = select_blocks_fwd(q, k_cmp, lse, nsa, scale, None, bs)
                same = bool(torch.equal(got, want))
                failed += not same
                call = functools.partial(select_blocks_fwd, q, k_cmp, lse, nsa, scale, None, bs)
                ms = time_calls([call], device).median_ms
                records.append({"config": name, "seq_len": seq_len, "bs": bs, **tiles, "ms": ms, "same": same})
                print(f"{name:11s} T={seq_len:6d} bs={bs!s:4s} {tiles}  {ms:8.3f} ms  same={same}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection_tiles.json").write_text(json.dumps({"env": env, "records": records}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
