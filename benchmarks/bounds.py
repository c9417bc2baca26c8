r"""Floors for the NSA forward: what the card can do for each part, measured, not quoted.

The 64k forward target (24 ms, 9x FlashAttention-2) is a claim about the whole core. This script measures
the three rates that bound each part on the card at hand, and the floor they give:

* ``mma``: dense bf16 matmul rate (an 8192^3 ``torch.mm``), the ceiling of every FLOP-bound part;
* ``copy``: device-to-device copy bandwidth (1 GiB read + 1 GiB written), the HBM ceiling;
* ``gather``: the rate at which the SMs can *read* the selected branch's K/V blocks in the order a per-query
  kernel needs them (spec section 10: every query position t and kv head h reads its n blocks of l' tokens,
  all G query heads at once). ``gather_kernel`` loads exactly those bytes, with the real block indices of
  ``optimized.select_blocks`` on random inputs, and only sums them: no softmax, no matmul. Neighbouring
  positions share few blocks on random data (only the forced initial and local ones), so most of these
  bytes come through the L2, and the kernel's time is the floor of any selected-attention forward that
  gathers per position.

Floor of the forward = gather (selected) + FLOPs / mma for compressed, selection (q.k recompute) and window.
It assumes perfect overlap inside a part and none between parts (they are separate passes).

* ``chain``: the latency of dependent launches, what bounds a decode step at batch 1 (``optimized.decode``
  runs its passes as dependent kernels, each reading what the one before wrote). ``link_kernel`` does one
  load and one store per program; a step of ``links`` such launches (``CHAIN_PROGRAMS`` programs each, the
  batch-1 grid of the compressed pass) is timed as CUDA-graph replays, with and without programmatic
  dependent launch. The slope over ``links`` is the cost of one more dependent launch.

    python -m benchmarks.bounds --lengths 16384 65536 --out benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from benchmarks.flops import branch_flops
from benchmarks.run import CONFIGS, environment, write_json
from benchmarks.timing import time_calls, time_graph

CHAIN_LINKS = (1, 2, 3, 4, 6)  # dependent launches per timed step
CHAIN_PROGRAMS = 256  # programs per launch: the decode compressed pass's grid at batch 1 (4 kv heads x 64 splits)


@triton.jit
def gather_kernel(k, v, block_idx, out, T, H: tl.constexpr, N: tl.constexpr, LS: tl.constexpr, D: tl.constexpr):
    """Sum of the selected K and V blocks of position t, kv head h (grid: T x H): the selected branch's reads."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_n, o_d = tl.arange(0, LS), tl.arange(0, D)
    b_acc = tl.zeros([LS, D], tl.float32)  # [LS, D]
    for i in range(N):
        i_blk = tl.load(block_idx + (i_t * H + i_h) * N + i)
        o_s = i_blk * LS + o_n  # [LS] tokens of the block
        m_s = (i_blk >= 0) & (o_s <= i_t)
        o_kv = (o_s.to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]  # [LS, D]
        b_acc += tl.load(k + o_kv, mask=m_s[:, None], other=0.0).to(tl.float32)
        b_acc += tl.load(v + o_kv, mask=m_s[:, None], other=0.0).to(tl.float32)
    tl.store(out + i_t * H + i_h, tl.sum(b_acc))


@triton.jit
def link_kernel(x, y, PDL: tl.constexpr):
    """One link of a chain of dependent launches: y[i] = x[i] + 1, one element per program (grid: N)."""
    if PDL:  # launched early: wait for the previous link, then let the next one launch
        gdc_wait()
        gdc_launch_dependents()
    i = tl.program_id(0)
    tl.store(y + i, tl.load(x + i) + 1.0)


def launch_chain(
    device: torch.device, links: int, programs: int = CHAIN_PROGRAMS, pdl: bool = False
) -> tuple[float, torch.Tensor]:
    """Time of one step of ``links`` dependent launches of ``link_kernel`` (µs, CUDA-graph replays).

    Returns the step's median time and the last link's output [programs]: ``links`` times the steps run.
    """
    bufs = torch.zeros(links + 1, programs, device=device)

    def step() -> None:
        bufs[0].copy_(bufs[-1])  # the next step depends on this one, as decode steps do
        for i in range(links):
            extra = {"launch_pdl": True} if pdl else {}
            link_kernel[(programs,)](bufs[i], bufs[i + 1], PDL=pdl, **extra)

    timing, _ = time_graph([step], device, budget_ms=100)
    return 1e3 * timing.median_ms, bufs[-1]


def chain(device: torch.device) -> dict[str, Any]:
    """``launch_chain`` for each of ``CHAIN_LINKS``, without and with PDL, and the per-link slope (µs)."""
    from optimized._common import is_interpreting

    out: dict[str, Any] = {"programs": CHAIN_PROGRAMS, "links": list(CHAIN_LINKS)}
    modes = (("us", False),) if is_interpreting() else (("us", False), ("us_pdl", True))  # no PDL in the interpreter
    for name, pdl in modes:
        us = [launch_chain(device, n, pdl=pdl)[0] for n in CHAIN_LINKS]
        out[name] = us
        out[f"{name}_per_link"] = (us[-1] - us[0]) / (CHAIN_LINKS[-1] - CHAIN_LINKS[0])
    return out


def selected_bytes(block_idx: torch.Tensor, seq_len: int, block: int, bytes_per_token: int) -> int:
    """Bytes the selected branch reads per forward: tokens s <= t of each selected block, K and V."""
    t = torch.arange(seq_len, device=block_idx.device)[:, None, None]  # [T, 1, 1]
    start = block_idx.long() * block
    tokens = torch.where(block_idx >= 0, (t - start + 1).clamp(0, block), 0)
    return int(tokens.sum()) * bytes_per_token


def measure(seq_len: int, config_name: str, device: torch.device) -> dict[str, Any]:
    """The gather's time and bytes and the parts' FLOPs of the ``config_name`` forward at ``seq_len`` (B = 1).

    ``inputs`` holds k, v, block_idx and the gather's sums, for the tests.
    """
    import optimized

    cfg = CONFIGS[config_name]
    nsa, hq, h, d = cfg.nsa, cfg.heads_q, cfg.heads_kv, cfg.dim_k
    if cfg.batch != 1 or cfg.dim_v != d:
        raise ValueError(f"bounds: config {config_name!r} needs batch 1 and dim_k == dim_v")
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, seq_len, hq, d, device=device, generator=gen, dtype=cfg.torch_dtype)
    k = torch.randn(1, seq_len, h, d, device=device, generator=gen, dtype=cfg.torch_dtype)
    v = torch.randn_like(k)
    k_cmp, v_cmp = optimized.mean_pool(k, nsa), optimized.mean_pool(v, nsa)
    _, lse = optimized.compressed_attention(q, k_cmp, v_cmp, nsa)
    block_idx = optimized.select_blocks(q, k_cmp, lse, nsa).contiguous()  # [1, T, H, n]
    out = torch.empty(seq_len, h, device=device, dtype=torch.float32)

    def gather() -> None:
        gather_kernel[(seq_len, h)](k, v, block_idx, out, seq_len, H=h, N=nsa.num_selected, LS=nsa.select_block, D=d)

    gather_ms = time_calls([gather], device, budget_ms=500).median_ms
    nbytes = selected_bytes(block_idx[0], seq_len, nsa.select_block, 2 * d * k.element_size())
    flops = branch_flops(seq_len, cfg.shape(), nsa)
    return {"config": config_name, "seq_len": seq_len, "gather_ms": gather_ms, "gather_bytes": nbytes,
            "gather_tbps": nbytes / gather_ms / 1e9, "flops": flops,
            "inputs": {"k": k, "v": v, "block_idx": block_idx, "gather_sum": out}}  # fmt: skip


def rates(device: torch.device, n: int = 8192) -> dict[str, float]:
    """Dense bf16 matmul TFLOP/s (n^3) and copy TB/s (1 GiB each way)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm = time_calls([lambda: a @ a], device, budget_ms=500).median_ms
    x = torch.empty(2**29, device=device, dtype=torch.float16)
    y = torch.empty_like(x)
    cp = time_calls([lambda: y.copy_(x)], device, budget_ms=500).median_ms
    return {"mma_tflops": 2 * n**3 / mm / 1e9, "copy_tbps": 2 * x.nbytes / cp / 1e9}


FLOOR_PARTS = ("compressed", "selection", "window", "selected", "core")


def floors(record: dict[str, Any], mma_tflops: float) -> dict[str, float]:
    """Per-part floors in ms: the selected branch's gather, the FLOP-bound parts at the mma rate."""
    ms = {part: record["flops"][part] / mma_tflops / 1e9 for part in ("compressed", "selection", "window")}
    return {**ms, "selected": record["gather_ms"], "core": sum(ms.values()) + record["gather_ms"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--configs", nargs="+", default=["default"], choices=sorted(CONFIGS))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    data: dict[str, Any] = {"environment": environment(device), **rates(device), "chain": chain(device), "records": []}
    for name in args.configs:
        for seq_len in args.lengths:
            record = measure(seq_len, name, device)
            del record["inputs"]
            record["floor_ms"] = floors(record, data["mma_tflops"])
            data["records"].append(record)
            torch.cuda.empty_cache()
    write_json(args.out / "bounds.json", data)
    env = data["environment"]
    print(f"card: {env['card']}  mma {data['mma_tflops']:.0f} TFLOP/s  copy {data['copy_tbps']:.2f} TB/s")
    c = data["chain"]
    for name, label in (("us", "launches"), ("us_pdl", "launches, PDL")):
        if name not in c:
            continue
        steps = " ".join(f"{n}:{us:.1f}" for n, us in zip(c["links"], c[name], strict=True))
        print(f"dependent {label} (links:us per step) {steps}; {c[f'{name}_per_link']:.2f} us per link")
    print(f"{'config':12s} {'T':>6s} {'gather GB':>9s} {'TB/s':>5s}  floor ms:", *FLOOR_PARTS)
    for r in data["records"]:
        floor = " ".join(f"{r['floor_ms'][part]:{len(part)}.2f}" for part in FLOOR_PARTS)
        print(f"{r['config']:12s} {r['seq_len']:6d} {r['gather_bytes'] / 1e9:9.1f} {r['gather_tbps']:5.2f}  {floor}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
