"""What the kernel experiments in ``scripts/`` share: their flags, the header line, the benchmark's inputs
for the selected branch, and the JSON they write (``selected_tiles.py``, ``selection_tiles.py``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import optimized
from optimized.selection import select_blocks_fwd

from .run import CONFIGS, BenchConfig, environment, make_inputs


def parser(doc: str, lengths: list[int], configs: list[str]) -> argparse.ArgumentParser:
    """--lengths, --configs (benchmark config names), --out and --device, with these defaults."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=lengths)
    p.add_argument("--configs", nargs="+", default=configs, choices=sorted(CONFIGS))
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def start(args: argparse.Namespace) -> tuple[torch.device, dict[str, Any]]:
    """The device and the environment record; prints which tree's kernels run, on which card."""
    device = torch.device(args.device)
    env = environment(device)
    print(f"optimized from {Path(optimized.__file__).parent}, source_sha1 {env['source_sha1']}, {env['card']}")
    return device, env


@torch.no_grad()
def selected_inputs(cfg: BenchConfig, seq_len: int, device: torch.device) -> dict[str, Any]:
    """The benchmark's inputs at ``seq_len`` and their real selection: q, k, v (the selected branch's),
    block_idx (the optimized compressed attention and selection) and scale."""
    x = {n: t.detach() for n, t in make_inputs(cfg, seq_len, device, seed=seq_len).items()}
    scale = cfg.dim_k**-0.5
    _, lse_cmp = optimized.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], cfg.nsa)
    idx = select_blocks_fwd(x["q"], x["k_cmp"], lse_cmp, cfg.nsa, scale, None)
    return {"q": x["q"], "k": x["k_slc"], "v": x["v_slc"], "block_idx": idx, "scale": scale}


def write(args: argparse.Namespace, name: str, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """``{env, records}`` as ``name``.json in ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"env": env, "records": records}))
