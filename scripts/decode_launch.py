"""Experiment: the decode step's time against its launch options, one knob at a time from the defaults.

Knobs: ``num_warps`` and ``num_stages`` of each of the four kernels (``optimized.decode.LAUNCH``), the
cache's sizes (``split_tiles`` and ``tile_blocks`` of the compressed pass, ``split_blocks`` of the sparse pass),
the combine's value columns per program (``--combine-columns``, ``COMBINE_COLUMNS``), the compressed partials
merged by the select kernel's spare programs (``--pre-merge-splits``, ``PRE_MERGE_SPLITS``; with
``--combine-columns`` also each pair of the two) and ``--transposed`` (the compressed pass from
``scripts/swapab.py``, its products transposed for wgmma). Every variant is checked against the eager step, as
``benchmarks.decode`` does, and timed as CUDA-graph replays. Prints µs per variant; writes ``decode_launch.json``
to ``--out``.

    python scripts/decode_launch.py --contexts 65536 --batches 1 32 --warps select=4,16 compressed=8 \\
        --stages compressed=3,4 --split-tiles 1 2 4 --split-blocks 1 2 4 --tile-blocks 32 --combine-columns 32 64 \\
        --pre-merge-splits 16
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks import decode
from benchmarks.run import CONFIGS, environment
from optimized import decode as kernels

Variant = tuple[str, dict[str, dict[str, int]], dict[str, int], dict[str, Any]]


def variants(args: argparse.Namespace) -> list[Variant]:
    """(label, LAUNCH overrides, cache splits, kernels or constants of optimized.decode replaced):
    the defaults, then each knob value on its own."""
    out: list[Variant] = [("default", {}, {}, {})]
    for option, specs in (("num_warps", args.warps), ("num_stages", args.stages)):
        for spec in specs:
            kernel, _, values = spec.partition("=")
            if kernel not in kernels.LAUNCH:
                flag = "--" + option.removeprefix("num_")
                raise SystemExit(f"{flag}: kernel must be one of {sorted(kernels.LAUNCH)}, got {kernel!r}")
            out += [(f"{kernel} {option}={v}", {kernel: {option: int(v)}}, {}, {}) for v in values.split(",")]
    out += [(f"split_tiles={n}", {}, {"split_tiles": n}, {}) for n in args.split_tiles]
    out += [(f"split_blocks={n}", {}, {"split_blocks": n}, {}) for n in args.split_blocks]
    out += [(f"tile_blocks={n}", {}, {"tile_blocks": n}, {}) for n in args.tile_blocks]
    out += [(f"combine_columns={n}", {}, {}, {"COMBINE_COLUMNS": n}) for n in args.combine_columns]
    out += [(f"pre_merge_splits={n}", {}, {}, {"PRE_MERGE_SPLITS": n}) for n in args.pre_merge_splits]
    out += [
        (f"pre_merge_splits={n} combine_columns={c}", {}, {}, {"PRE_MERGE_SPLITS": n, "COMBINE_COLUMNS": c})
        for n in args.pre_merge_splits
        for c in args.combine_columns
    ]
    if args.transposed:  # scripts/swapab.py: the compressed pass with its products transposed (wgmma)
        from scripts import swapab

        out += [("compressed transposed", {}, {}, {"decode_compressed_kernel": swapab.decode_compressed_t_kernel})]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[65536])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--config", default="default", choices=sorted(CONFIGS))
    p.add_argument("--warps", nargs="*", default=[], help="KERNEL=W1,W2 (kernels: compressed select sparse combine)")
    p.add_argument("--stages", nargs="*", default=[], help="KERNEL=S1,S2 (pipeline stages)")
    p.add_argument("--split-tiles", type=int, nargs="*", default=[])
    p.add_argument("--split-blocks", type=int, nargs="*", default=[])
    p.add_argument("--tile-blocks", type=int, nargs="*", default=[], help="selection blocks per compressed tile")
    p.add_argument("--combine-columns", type=int, nargs="*", default=[], help="value columns per combine program")
    p.add_argument(
        "--pre-merge-splits", type=int, nargs="*", default=[], help="compressed splits from which the select merges"
    )
    p.add_argument("--transposed", action="store_true", help="the compressed pass transposed (scripts/swapab.py)")
    p.add_argument("--budget-ms", type=float, default=100.0)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    records: list[dict[str, Any]] = []
    failed = 0
    for batch in args.batches:
        for context in args.contexts:
            problems = [decode.make_problem(cfg, batch, context, device, seed=1000 * batch)]
            expected = decode.eager_step(problems[0].to(torch.float32))()
            for label, launch, splits, replaced in variants(args):
                saved = {k: dict(v) for k, v in kernels.LAUNCH.items()}
                saved_kernels = {name: getattr(kernels, name) for name in replaced}
                for kernel, options in launch.items():
                    kernels.LAUNCH[kernel].update(options)
                for name, kernel in replaced.items():
                    setattr(kernels, name, kernel)
                try:
                    make = functools.partial(decode.optimized_step, **splits)
                    rec = decode.measure_step(make, problems, expected, args)
                finally:
                    kernels.LAUNCH.update(saved)
                    for name, kernel in saved_kernels.items():
                        setattr(kernels, name, kernel)
                failed += rec["status"] != "ok"
                records.append({"batch": batch, "context": context, "variant": label, **rec})
                us = f"{rec['us']:9.1f} us" if "us" in rec else rec["status"]
                print(f"B={batch:3d} context={context:7d} {label:28s} {us}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_launch.json").write_text(json.dumps({"env": environment(device), "records": records}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
