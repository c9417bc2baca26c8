"""Decode-step latency: one new query against a KV cache, NSA against full attention (spec section 8).

    python -m benchmarks.decode                 # context 8k ... 128k, batch 1, 8, 32
    python -m benchmarks.decode --quick         # context 8k, 32k, 128k, batch 1, 32
    python -m benchmarks.decode --nsa-factory mypkg.mod:make_step

A step is memory-bound: it reads every cached token it attends to once. The model is
``bytes = B * tokens * H * (DK + DV) * 2`` (+ q and o) with ``tokens = context`` for full attention and
``reference.decode_tokens_read`` for NSA; achieved bandwidth = bytes / time, against the card's copy
bandwidth (~3.0 TB/s on the H100).

Full attention (baselines) reads the selected branch's cache ``k_slc``/``v_slc`` (all tokens):
``sdpa`` packs each kv head's G query heads as G query rows (one read of K/V per kv head, no mask),
``sdpa_gqa`` is [B, HQ, 1, D] with ``enable_gqa=True``, ``flex`` is ``torch.compile(flex_attention)``
with ``enable_gqa=True`` (CUDA only). SDPA picks its backend itself.

NSA implementations plug in as *step factories*, ``"module:function"``: ``function(problem)`` gets a
``DecodeProblem`` (caches already holding the context, the query at position ``context - 1``) and
returns a zero-argument callable that computes o [B, 1, HQ, DV] without changing the caches. The default
list is ``benchmarks.decode:optimized_step`` (``optimized.decode.decode_attention`` on a filled
``DecodeCache``; recorded as "not available" when it does not import) and
``benchmarks.decode:eager_step`` (plain PyTorch, the naive baseline for NSA decoding). Every step is
checked against ``eager_step`` in fp32 before it is timed. Short calls are timed as CUDA-graph replays,
rotating over enough input sets to exceed twice the L2.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import reference as ref

from .flops import AttnShape, ceilings, decode_bytes
from .run import (
    CONFIGS,
    TOLERANCE,
    BenchConfig,
    compiled_flex,
    environment,
    first_line,
    poison_allocator,
    rel_err,
    write_json,
)
from .timing import Budget, rotation_sets, time_graph

DEFAULT_CONTEXTS = (8192, 16384, 32768, 65536, 131072)
DEFAULT_BATCHES = (1, 8, 32)
QUICK_CONTEXTS = (8192, 32768, 131072)
QUICK_BATCHES = (1, 32)
DEFAULT_FACTORIES = ("benchmarks.decode:optimized_step", "benchmarks.decode:eager_step")
BASELINES = ("sdpa", "sdpa_gqa", "flex")
Tensor = torch.Tensor


@dataclass
class DecodeProblem:
    """One decode step's inputs: the query of token ``context - 1`` and the caches that hold its context.

    q [B, 1, HQ, DK]; k_cmp/v_cmp [B, TC(context), H, D]; k_slc/v_slc [B, context, H, D] (every token,
    also the full-attention cache); k_win/v_win [B, min(w, context), H, D] (the last w tokens);
    gates [B, 1, HQ, 3].
    """

    config: BenchConfig
    context: int
    q: Tensor
    k_cmp: Tensor
    v_cmp: Tensor
    k_slc: Tensor
    v_slc: Tensor
    k_win: Tensor
    v_win: Tensor
    gates: Tensor

    def to(self, dtype: torch.dtype) -> DecodeProblem:
        """A copy with every tensor cast to ``dtype``."""
        tensors = {f.name: getattr(self, f.name).to(dtype) for f in fields(self) if f.name not in ("config", "context")}
        return DecodeProblem(self.config, self.context, **tensors)


StepFactory = Callable[[DecodeProblem], Callable[[], Tensor]]


def make_problem(cfg: BenchConfig, batch: int, context: int, device: torch.device, seed: int) -> DecodeProblem:
    """Random caches and query (gates = sigmoid(randn)) in the config's dtype."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hq, h, dk, dv, c = cfg.heads_q, cfg.heads_kv, cfg.dim_k, cfg.dim_v, cfg.nsa

    def rnd(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(cfg.torch_dtype)

    tc, w = c.num_compressed(context), min(c.window, context)
    return DecodeProblem(
        cfg,
        context,
        q=rnd(batch, 1, hq, dk),
        k_cmp=rnd(batch, tc, h, dk),
        v_cmp=rnd(batch, tc, h, dv),
        k_slc=rnd(batch, context, h, dk),
        v_slc=rnd(batch, context, h, dv),
        k_win=rnd(batch, w, h, dk),
        v_win=rnd(batch, w, h, dv),
        gates=torch.sigmoid(rnd(batch, 1, hq, 3).float()).to(cfg.torch_dtype),
    )


# ----------------------------------------------------------------------------- NSA: the eager step


def _attend(qg: Tensor, k: Tensor, v: Tensor, scale: float, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """qg [B, H, G, DK], k/v [B, H, S, D]: (o [B, H, G, DV] float32, p [B, H, G, S] float32)."""
    s = torch.einsum("bhgd,bhsd->bhgs", qg, k).float() * scale
    if valid is not None:
        s = s.masked_fill(~valid[:, :, None, :], -math.inf)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhgs,bhsd->bhgd", p.to(v.dtype), v).float(), p


def eager_step(p: DecodeProblem) -> Callable[[], Tensor]:
    """NSA decode in plain PyTorch (spec section 8): the three branches for the last query, gated.

    Compressed attention over all TC blocks (all have ended), selection scores mapped by overlap
    (Eq. 9) and summed over the group (Eq. 10), top-n with the forced blocks (ties to the lower index),
    attention over the selected keys ``<= context - 1`` and over the window cache. The compressed
    branch runs in float32 (its probabilities rank the blocks); the other two in the input dtype.
    """
    c, cfg = p.config.nsa, p.config
    B, H, G = p.q.shape[0], cfg.heads_kv, cfg.heads_q // cfg.heads_kv
    s, ls, dev = p.context, c.select_block, p.q.device
    scale = cfg.dim_k**-0.5
    tc, ns = c.num_compressed(s), c.num_select_blocks(s)
    cur, j = (s - 1) // ls, torch.arange(ns, device=dev)
    forced = (j < c.num_initial) | (j > cur - c.num_local)
    weights = ref.overlap_weights(tc, ns, c, dev)  # [TC, NS]
    n_sel = min(c.num_selected, ns)
    offsets = torch.arange(ls, device=dev)
    k_cmp, v_cmp = p.k_cmp.transpose(1, 2), p.v_cmp.transpose(1, 2)  # [B, H, TC, D]
    k_slc, v_slc = p.k_slc.transpose(1, 2), p.v_slc.transpose(1, 2)
    k_win, v_win = p.k_win.transpose(1, 2), p.v_win.transpose(1, 2)
    gates = p.gates.float().view(B, H, G, 3, 1)

    def step() -> Tensor:
        qg = p.q.view(B, H, G, cfg.dim_k)
        if tc:  # float32 scores: the selection must not hinge on bf16 rounding of the logits
            o_cmp, p_cmp = _attend(qg.float(), k_cmp.float(), v_cmp.float(), scale)
            score = (p_cmp @ weights).sum(dim=2)  # [B, H, NS]
        else:
            o_cmp = torch.zeros(B, H, G, cfg.dim_v, device=dev)
            score = torch.zeros(B, H, ns, device=dev)
        rank = torch.where(forced, math.inf, score)
        idx = torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :n_sel]  # [B, H, n]
        keys = (idx[..., None] * ls + offsets).flatten(-2)  # [B, H, n * l']
        valid = keys < s
        keys = keys.clamp_max(s - 1)[..., None]
        kg = torch.gather(k_slc, 2, keys.expand(-1, -1, -1, cfg.dim_k))
        vg = torch.gather(v_slc, 2, keys.expand(-1, -1, -1, cfg.dim_v))
        o_slc, _ = _attend(qg, kg, vg, scale, valid)
        o_win, _ = _attend(qg, k_win, v_win, scale)
        o = gates[..., 0, :] * o_cmp + gates[..., 1, :] * o_slc + gates[..., 2, :] * o_win
        return o.reshape(B, 1, cfg.heads_q, cfg.dim_v).to(p.q.dtype)

    return step


def optimized_step(p: DecodeProblem, **splits: int | None) -> Callable[[], Tensor]:
    """``optimized.decode``: a ``DecodeCache`` filled with the problem's caches, then ``decode_attention``.

    The window cache is a ring indexed by ``position % W``; the compressed cache's raw tail is not read
    by a step, so it stays empty. ``splits``: the cache's ``split_tiles`` / ``split_blocks`` / ``tile_blocks``
    (experiments).
    """
    from optimized.decode import decode_attention

    cache = filled_cache(p, **splits)
    return lambda: decode_attention(p.q, p.gates, cache)


def filled_cache(p: DecodeProblem, **splits: int | None) -> Any:
    """An ``optimized.decode.DecodeCache`` holding the problem's caches, every sequence at ``p.context`` tokens."""
    from optimized.decode import DecodeCache

    cfg, s = p.config, p.context
    cache = DecodeCache(
        p.q.shape[0], s, cfg.heads_kv, cfg.dim_k, cfg.dim_v, cfg.nsa, dtype=p.q.dtype, device=p.q.device, **splits
    )
    cache.k_slc.copy_(p.k_slc)
    cache.v_slc.copy_(p.v_slc)
    ring = torch.arange(s - p.k_win.shape[1], s, device=p.q.device) % cache.window_len
    cache.k_win[:, ring], cache.v_win[:, ring] = p.k_win, p.v_win
    tc = p.k_cmp.shape[1]
    cache.k_cmp[:, :tc], cache.v_cmp[:, :tc] = p.k_cmp, p.v_cmp
    cache.lengths.fill_(s)
    return cache


def load_factory(spec: str) -> StepFactory:
    """``"module:function"`` -> the step factory (ImportError / AttributeError when it does not exist)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------- full attention baselines


def baseline_step(name: str, p: DecodeProblem) -> Callable[[], Tensor]:
    """Full attention of the query over the whole cache (``k_slc``/``v_slc``), by baseline ``name``."""
    cfg = p.config
    B, H, G = p.q.shape[0], cfg.heads_kv, cfg.heads_q // cfg.heads_kv
    k, v = p.k_slc.transpose(1, 2), p.v_slc.transpose(1, 2)  # [B, H, S, D]
    out_shape = (B, 1, cfg.heads_q, cfg.dim_v)
    if name == "sdpa":
        qp = p.q.view(B, H, G, cfg.dim_k)
        return lambda: F.scaled_dot_product_attention(qp, k, v).reshape(out_shape)
    q = p.q.transpose(1, 2)  # [B, HQ, 1, DK]
    if name == "sdpa_gqa":
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)
    flex = compiled_flex()
    return lambda: flex(q, k, v, enable_gqa=True).transpose(1, 2)


def full_reference(p: DecodeProblem) -> Tensor:
    """Full attention for the last query in float32: o [B, 1, HQ, DV]."""
    cfg = p.config
    B, H, G = p.q.shape[0], cfg.heads_kv, cfg.heads_q // cfg.heads_kv
    qg = p.q.float().view(B, H, G, cfg.dim_k)
    o, _ = _attend(qg, p.k_slc.float().transpose(1, 2), p.v_slc.float().transpose(1, 2), cfg.dim_k**-0.5)
    return o.reshape(B, 1, cfg.heads_q, cfg.dim_v)


# ----------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", help=f"context lengths (default {DEFAULT_CONTEXTS})")
    p.add_argument("--batches", type=int, nargs="+", help=f"batch sizes (default {DEFAULT_BATCHES})")
    p.add_argument("--quick", action="store_true", help=f"contexts {QUICK_CONTEXTS}, batches {QUICK_BATCHES}")
    p.add_argument("--config", default="default", choices=sorted(CONFIGS))
    p.add_argument("--nsa-factory", nargs="*", default=list(DEFAULT_FACTORIES), help="module:function, none: []")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for decode.json")
    p.add_argument("--max-minutes", type=float, default=3.0, help="stop (and still write results) after this")
    p.add_argument("--budget-ms", type=float, default=100.0, help="time spent per measurement")
    p.add_argument("--min-reps", type=int, default=5, help="fewest timed calls (graph replays) per measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def measure_step(
    make: StepFactory, problems: list[DecodeProblem], expected: Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """Build one step per input set, check the first against ``expected``, then time them in rotation."""
    device = problems[0].q.device
    try:
        poison_allocator(device)
        steps = [make(p) for p in problems]
        err = rel_err(steps[0](), expected)
        if err >= TOLERANCE:
            return {"status": "check failed, not timed", "rel_err": err}
        timing, method = time_graph(steps, device, budget_ms=args.budget_ms, min_reps=args.min_reps)
    except ImportError as e:
        return {"status": f"not available: {e}"}
    except Exception as e:  # an implementation that fails here is recorded, the rest still runs
        return {"status": f"error: {first_line(e)}"}
    return {"status": "ok", "rel_err": err, "us": 1e3 * timing.median_ms, "method": method, "sets": len(problems)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check and time every (batch, context); write ``decode.json`` after each."""
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    budget = Budget(args.max_minutes)
    contexts = args.contexts or (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS)
    batches = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    env = environment(device)
    hbm_tbps = ceilings(env["card"])[1]
    factories: dict[str, StepFactory] = {}
    status: dict[str, str] = {}
    for spec in args.nsa_factory:
        try:
            factories[spec] = load_factory(spec)
            status[spec] = "available"
        except (ImportError, AttributeError) as e:
            status[spec] = f"not available: {type(e).__name__}: {e}"
    baselines = [] if args.skip_baselines else [b for b in BASELINES if b != "flex" or device.type == "cuda"]
    data: dict[str, Any] = {
        "env": env,
        "config": args.config,
        "hbm_tbps": hbm_tbps,
        "nsa": status,
        "model": "bytes = B * tokens * H * (DK + DV) * elem + q + o; tokens = context (full) or decode_tokens_read",
        "records": [],
        "stopped_early": False,
    }
    out = args.out / "decode.json"
    for batch in batches:
        shape = AttnShape(batch, cfg.heads_q, cfg.heads_kv, cfg.dim_k, cfg.dim_v, cfg.torch_dtype.itemsize)
        for context in contexts:
            if budget.expired():
                data["stopped_early"] = True
                break
            tokens = {"full": context, "nsa": ref.decode_tokens_read(context, cfg.nsa)}
            n_sets = rotation_sets(decode_bytes(context + tokens["nsa"], shape), device)
            problems = [make_problem(cfg, batch, context, device, seed=1000 * batch + i) for i in range(n_sets)]
            expected = {"full": full_reference(problems[0]), "nsa": eager_step(problems[0].to(torch.float32))()}
            makers: list[tuple[str, str, StepFactory]] = [
                (b, "full", functools.partial(baseline_step, b)) for b in baselines
            ]
            makers += [(spec, "nsa", f) for spec, f in factories.items()]
            for impl, kind, make in makers:
                rec: dict[str, Any] = {"batch": batch, "context": context, "impl": impl, "kind": kind}
                rec["tokens_read"] = tokens[kind]
                rec["bytes"] = decode_bytes(tokens[kind], shape)
                rec["floor_us"] = rec["bytes"] / (hbm_tbps * 1e12) * 1e6
                rec.update(measure_step(make, problems, expected[kind], args))
                if "us" in rec:
                    rec["gbps"] = rec["bytes"] / (rec["us"] * 1e-6) / 1e9
                data["records"].append(rec)
            del problems, expected
            if device.type == "cuda":
                torch.cuda.empty_cache()
            data["elapsed_s"] = budget.elapsed_s()
            write_json(out, data)
    data["elapsed_s"] = budget.elapsed_s()
    write_json(out, data)
    return data


def summary_table(data: dict[str, Any]) -> str:
    """Per (batch, context): microseconds per step of each implementation, NSA's speedup over the fastest
    baseline, the bytes model's speedup (tokens ratio), and NSA's achieved bandwidth."""
    recs = data["records"]
    impls = list(dict.fromkeys(r["impl"] for r in recs))
    short = {i: i.split(":")[-1].removesuffix("_step")[:12] for i in impls}
    lines = [f"card: {data['env']['card']}  config: {data['config']}  nsa: {data['nsa']}"]
    lines.append(
        "    B context " + " ".join(f"{short[i]:>12}" for i in impls) + "   best_x model_x  nsa_GB/s  (us/step)"
    )
    for key in dict.fromkeys((r["batch"], r["context"]) for r in recs):
        row = {r["impl"]: r for r in recs if (r["batch"], r["context"]) == key}
        cells = [f"{row[i]['us']:12.1f}" if "us" in row.get(i, {}) else f"{'-':>12}" for i in impls]
        full = [r["us"] for r in row.values() if r["kind"] == "full" and "us" in r]
        nsa = [r for r in row.values() if r["kind"] == "nsa" and "us" in r]
        best = min(nsa, key=lambda r: r["us"]) if nsa else None
        speed = f"{min(full) / best['us']:8.2f}" if full and best else f"{'-':>8}"
        model = key[1] / ref.decode_tokens_read(key[1], CONFIGS[data["config"]].nsa)
        gbps = f"{best['gbps']:9.0f}" if best else f"{'-':>9}"
        lines.append(f"{key[0]:>5} {key[1]:>7} " + " ".join(cells) + f" {speed} {model:7.2f} {gbps}")
    problems = dict.fromkeys((r["impl"], r["status"][:200]) for r in recs if r["status"] != "ok")
    lines += [f"  {short[impl]}: {status}" for impl, status in problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 1 when an NSA step failed its check or raised (a baseline's failure is printed only)."""
    args = parse_args(argv)
    data = run(args)
    print("wrote", args.out / "decode.json")
    print(summary_table(data))
    failed = [
        r
        for r in data["records"]
        if r["kind"] == "nsa" and r["status"] != "ok" and not r["status"].startswith("not available")
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
