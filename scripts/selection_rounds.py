"""Experiment (CPU, numpy): how many insertion rounds the fused selection's chunks need on random scores.

Replays the kernel's top-n update (``optimized/selection.py``) for tiles of ``BT`` consecutive positions of a
sequence of ``T`` tokens: per chunk of ``BS`` selection blocks, ``n_up`` is the most chunk keys of a row above
its list's worst (the rounds the chunk takes; more than ``ROUNDS`` and it is merged by ranks instead). Scores are
i.i.d. uniform (the benchmark's random inputs make them near i.i.d.), the forced blocks (the first ``n_init``,
the last ``n_local``) infinite. Prints the histogram of ``n_up`` and, for a round and a merge costing ``--round``
and ``--merge`` instructions per thread (SASS, ``scripts/spills.py``), the cost per chunk of each ``ROUNDS``.

    python scripts/selection_rounds.py --bt 8 --bs 16 --round 93 --merge 370     # default (G = 16), broadcast map
    python scripts/selection_rounds.py --bt 16 --bs 8 --round 137 --merge 810    # g4, broadcast map
    python scripts/selection_rounds.py --bt 8 --bs 16 --round 65 --merge 4000    # default, stencil map (w=4)

(The costs of the first two are the broadcast map's, `num_warps=8`; with the stencil map, the benchmark configs'
since the twentieth session, a round costs 65 and a merge about 4000 at `num_warps=4`: rounds only.)
"""

from __future__ import annotations

import argparse

import numpy as np


def chunk_rounds(T: int, bt: int, bs: int, n: int, ls: int, n_init: int, n_local: int, tiles: int, seed: int):
    """n_up of every chunk of ``tiles`` random tiles: int array."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(tiles):
        t = rng.integers(0, T - bt) + np.arange(bt)  # [BT] positions
        cur = t // ls
        n_blk = cur.max() + 1
        scores = rng.random((bt, n_blk))
        j = np.arange(n_blk)[None, :]
        forced = (j < n_init) | ((j > cur[:, None] - n_local) & (j <= cur[:, None]))
        scores = np.where(forced, np.inf, np.where(j <= cur[:, None], scores, -1.0))
        top = np.full((bt, n), -1.0)  # the list: only its worst matters for n_up
        for j0 in range(0, n_blk, bs):
            chunk = scores[:, j0 : j0 + bs]
            out.append(int((chunk > top.min(1, keepdims=True)).sum(1).max()))
            top = np.sort(np.concatenate([top, chunk], 1), 1)[:, -n:]
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--bt", type=int, default=8, help="positions per program")
    p.add_argument("--bs", type=int, default=16, help="selection blocks per chunk")
    p.add_argument("--n", type=int, default=16, help="selected blocks (the list's size, NP)")
    p.add_argument("--select-block", type=int, default=64)
    p.add_argument("--tiles", type=int, default=300)
    p.add_argument("--round", type=float, default=93.0, help="instructions per thread of one round")
    p.add_argument("--merge", type=float, default=370.0, help="instructions per thread of one merge by ranks")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n_up = chunk_rounds(args.seq_len, args.bt, args.bs, args.n, args.select_block, 1, 2, args.tiles, args.seed)
    print(f"{n_up.size} chunks; n_up histogram {np.bincount(n_up).tolist()}; mean {n_up.mean():.2f}")
    for rounds in range(args.bs + 1):
        cost = np.where(n_up <= rounds, args.round * n_up, args.merge).mean()
        print(f"ROUNDS={rounds:3d}: {cost:7.1f} instructions per chunk for the top-n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
