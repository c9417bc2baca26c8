"""``make bench``: NSA (three branches, selection, gates; projections excluded) against full causal attention.

    python -m benchmarks.run                       # default config, T = 8k ... 128k, all baselines
    python -m benchmarks.run --quick               # T = 8k, 32k, fewer repetitions
    python -m benchmarks.run --configs default g1 g4 paper_dims meanpool64 --max-minutes 6

What is timed (CUDA events, one warm-up call, median of >= 3 calls; no input rotation: at T >= 8k every
part is compute-bound and its inputs are tens of MB to GB, so what the L2 keeps between calls hardly matters):

* ``fwd``: the forward pass with autograd recording (a training forward).
* ``bwd``: the backward pass alone, ``torch.autograd.grad`` on a retained graph (falls back to
  "fwd+bwd minus fwd" if an implementation cannot replay its backward; the record says which).
* NSA parts: ``core`` (``nsa_attention``), ``compressed``, ``selection`` (``select_blocks``, no backward),
  ``selected`` (as the core runs it: without the public function's value checks of the indices, host syncs),
  ``window``; ``core_nowin`` (compressed + selection + selected, two gates) for configs
  that ask for it.
* Baselines, full causal attention on the same q and the selected branch's k/v: SDPA's FlashAttention-2
  backend, SDPA's cuDNN backend, and ``torch.compile(flex_attention)`` with a causal block mask. GQA goes
  through ``enable_gqa=True``; where a backend refuses it, k/v are expanded with ``repeat_interleave``
  *outside* the timed region (the baseline's best case), and the record says so.

Before timing, every implementation is checked against the fp32 reference at ``--check-len`` tokens
(relative error < 2e-2); a config whose NSA check fails is not timed, and a baseline that fails is dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import importlib
import json
import math
import operator
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

import reference as ref
from reference._checks import check_scale
from reference.masks import forced_blocks, select_candidates

from .flops import AttnShape, backward_flops, branch_bytes, branch_flops, ceilings
from .timing import Budget, Timing, synchronize, time_calls

TOLERANCE = 2e-2
DEFAULT_LENGTHS = (8192, 16384, 32768, 65536, 131072)
QUICK_LENGTHS = (8192, 32768)
PARTS = ("core", "compressed", "selection", "selected", "window")
BASELINES = ("flash", "cudnn", "flex")
FWD_METHOD = {"selection": "forward (no grad)", "*": "forward (autograd recording)"}
Tensor = torch.Tensor


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark shape: batch, heads, head dims, dtype and the NSA hyper-parameters."""

    name: str
    batch: int = 1
    heads_q: int = 64
    heads_kv: int = 4
    dim_k: int = 128
    dim_v: int = 128
    dtype: str = "bfloat16"
    nsa: ref.NSAConfig = field(default_factory=ref.NSAConfig)
    no_window_variant: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def shape(self) -> AttnShape:
        return AttnShape(self.batch, self.heads_q, self.heads_kv, self.dim_k, self.dim_v, self.torch_dtype.itemsize)


CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in (
        BenchConfig("default"),
        BenchConfig("paper_dims", dim_k=192),
        BenchConfig("g1", heads_q=4),
        BenchConfig("g4", heads_q=16),
        BenchConfig("g16"),
        BenchConfig("meanpool64", nsa=ref.NSAConfig(64, 64, 64, 16, 1, 2, 512), no_window_variant=True),
        # CPU smoke tests only (tests/test_benchmarks.py)
        BenchConfig(
            "tiny",
            heads_q=4,
            heads_kv=2,
            dim_k=16,
            dim_v=16,
            dtype="float32",
            nsa=ref.NSAConfig(16, 8, 16, 4, 1, 2, 32),
        ),
    )
}

INPUT_NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")


# ----------------------------------------------------------------------------- inputs and the parts


def make_inputs(
    cfg: BenchConfig, seq_len: int, device: torch.device, seed: int, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Random leaf tensors (requires_grad) in ``nsa_attention``'s argument order; gates = sigmoid(randn)."""
    dtype = dtype or cfg.torch_dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    b, hq, h, dk, dv = cfg.batch, cfg.heads_q, cfg.heads_kv, cfg.dim_k, cfg.dim_v
    tc = cfg.nsa.num_compressed(seq_len)
    shapes = {
        "q": (b, seq_len, hq, dk),
        "k_cmp": (b, tc, h, dk),
        "v_cmp": (b, tc, h, dv),
        "k_slc": (b, seq_len, h, dk),
        "v_slc": (b, seq_len, h, dv),
        "k_win": (b, seq_len, h, dk),
        "v_win": (b, seq_len, h, dv),
        "gates": (b, seq_len, hq, 3),
    }
    x = {name: torch.randn(s, generator=gen, device=device, dtype=torch.float32) for name, s in shapes.items()}
    x["gates"] = torch.sigmoid(x["gates"])
    return {name: t.to(dtype).requires_grad_() for name, t in x.items()}


@dataclass
class Part:
    """A timed callable and the leaves its backward differentiates (empty: forward only)."""

    fwd: Callable[[], Tensor]
    grad_inputs: tuple[Tensor, ...]


def selected_as_in_core(m: ModuleType) -> Callable[[Tensor, Tensor, Tensor, Tensor, ref.NSAConfig], Tensor]:
    """The selected branch of ``m`` as its core runs it: ``(q, k, v, block_idx, config) -> o`` without the public
    function's checks of block_idx's values (three host syncs and a sort; on an H100 at 8k they made the part
    alone 1 ms slower than the whole core, which never checks the indices it computed)."""
    branch = importlib.import_module(f"{m.__name__}.selected")

    def selected(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, c: ref.NSAConfig) -> Tensor:
        scale = check_scale(None, q.shape[-1])  # the default, as nsa_attention's
        if hasattr(branch, "SelectedAttention"):  # optimized: the autograd Function below the public function
            return branch.SelectedAttention.apply(q, k, v, block_idx, None, c.select_block, scale)
        return branch.selected_core(q, k, v, block_idx, c, scale)

    return selected


def nsa_parts(m: ModuleType, x: dict[str, Tensor], cfg: BenchConfig, names: tuple[str, ...]) -> dict[str, Part]:
    """The NSA parts named in ``names`` for implementation ``m`` (selection gets the lse it needs, precomputed;
    the selected branch runs as in the core, ``selected_as_in_core``)."""
    c = cfg.nsa
    selected = selected_as_in_core(m)
    q, kc, vc, ks, vs, kw, vw, g = (x[n] for n in INPUT_NAMES)
    with torch.no_grad():
        lse = m.compressed_attention(q, kc, vc, c)[1]
        block_idx = m.select_blocks(q, kc, lse, c)

    def selection() -> Tensor:
        with torch.no_grad():
            return m.select_blocks(q, kc, lse, c)

    def no_window() -> Tensor:
        o_cmp, lse_ = m.compressed_attention(q, kc, vc, c)
        idx = m.select_blocks(q.detach(), kc.detach(), lse_.detach(), c)
        o_slc = selected(q, ks, vs, idx, c)
        gf = g.float()
        return (gf[..., 0:1] * o_cmp.float() + gf[..., 1:2] * o_slc.float()).to(q.dtype)

    parts = {
        "core": Part(lambda: m.nsa_attention(q, kc, vc, ks, vs, kw, vw, g, c), (q, kc, vc, ks, vs, kw, vw, g)),
        "compressed": Part(lambda: m.compressed_attention(q, kc, vc, c)[0], (q, kc, vc)),
        "selection": Part(selection, ()),
        "selected": Part(lambda: selected(q, ks, vs, block_idx, c), (q, ks, vs)),
        "window": Part(lambda: m.sliding_window_attention(q, kw, vw, c), (q, kw, vw)),
        "core_nowin": Part(no_window, (q, kc, vc, ks, vs, g)),
    }
    return {name: parts[name] for name in names}


@dataclass(frozen=True)
class BaselineMode:
    """How a baseline gets GQA and unequal head dims: native ``enable_gqa`` or expanded k/v; V padded to DK."""

    repeat_kv: bool
    pad_v: bool

    def label(self) -> str:
        gqa = "repeat_interleave k/v (untimed)" if self.repeat_kv else "enable_gqa=True"
        return gqa + (", v zero-padded to DK" if self.pad_v else "")


def baseline_modes(cfg: BenchConfig) -> list[BaselineMode]:
    """Modes to try in order: native first, then the work-arounds this config may need."""
    pads = (False, True) if cfg.dim_k != cfg.dim_v else (False,)
    return [BaselineMode(rep, pad) for pad in pads for rep in (False, True)]


@functools.cache
def compiled_flex() -> Callable[..., Tensor]:
    """``torch.compile(flex_attention)``, with room for one compilation per shape."""
    from torch.nn.attention.flex_attention import flex_attention

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 128)
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def causal_block_mask(seq_len: int, device: str) -> Any:
    """FlexAttention's causal BlockMask (built compiled, so 128k tokens do not materialise a T x T mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq_len, seq_len, device=device, _compile=True)


def baseline_part(name: str, x: dict[str, Tensor], cfg: BenchConfig, mode: BaselineMode) -> Part:
    """Full causal attention over q, k_slc, v_slc in [B, H, T, D] views, by baseline ``name``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x[n].transpose(1, 2) for n in ("q", "k_slc", "v_slc"))
    leaves: list[Tensor] = [x["q"]]
    if mode.repeat_kv or mode.pad_v:
        group = cfg.heads_q // cfg.heads_kv if mode.repeat_kv else 1
        k = k.detach().repeat_interleave(group, dim=1).requires_grad_()
        v = v.detach().repeat_interleave(group, dim=1)
        v = (F.pad(v, (0, cfg.dim_k - cfg.dim_v)) if mode.pad_v else v).requires_grad_()
        leaves += [k, v]
    else:
        leaves += [x["k_slc"], x["v_slc"]]
    gqa = not mode.repeat_kv
    dv = cfg.dim_v

    if name == "flex":
        flex, mask = compiled_flex(), causal_block_mask(q.shape[2], str(q.device))
        return Part(lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa)[..., :dv], tuple(leaves))
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def sdpa() -> Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)[..., :dv]

    return Part(sdpa, tuple(leaves))


# ----------------------------------------------------------------------------- correctness checks


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def poison_allocator(device: torch.device, gib: float = 2.0) -> None:
    """Leave NaN in the CUDA caching allocator's free blocks, so that an output a kernel forgets to
    write (``torch.empty``) is NaN and fails the check instead of holding stale, plausible numbers."""
    if device.type == "cuda":
        torch.full((int(gib * 2**30) // 4,), math.nan, device=device)


@torch.no_grad()
def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64 (inf when a has NaN or inf)."""
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def selection_gap(block_idx: Tensor, scores: Tensor, config: ref.NSAConfig) -> tuple[bool, float]:
    """Is ``block_idx`` a valid top-n under the reference ``scores`` [B, T, H, NS]?

    Returns (structure ok: ascending, -1 padded, no duplicates, candidates only, forced blocks present,
    min(n, candidates) blocks) and the worst score gap (best unchosen minus worst chosen free block,
    relative to the row's best score; 0 for an exact top-n).
    """
    T, NS = scores.shape[1], scores.shape[-1]
    t, j = torch.arange(T, device=scores.device), torch.arange(NS, device=scores.device)
    cand = select_candidates(t // config.select_block, j)[None, :, None, :]
    forced = forced_blocks(t, j, config)[None, :, None, :]
    idx = block_idx.long()
    valid = idx >= 0
    onehot = torch.zeros((*idx.shape[:3], NS + 1), device=idx.device).scatter_add_(
        -1, torch.where(valid, idx, NS).clamp_max(NS), torch.ones_like(idx, dtype=torch.float32)
    )[..., :NS]
    chosen = onehot > 0
    ascending = (idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]
    count = valid.sum(-1) == cand.sum(-1).clamp_max(config.num_selected)
    structure = bool(
        (onehot <= 1).all()
        and (valid[..., 1:] <= valid[..., :-1]).all()
        and ascending.all()
        and (chosen <= cand).all()
        and (forced <= chosen).all()
        and count.all()
    )
    free = cand & ~forced
    worst_chosen = torch.where(chosen & free, scores, math.inf).amin(-1)
    best_unchosen = torch.where(free & ~chosen, scores, -math.inf).amax(-1)
    gap = (best_unchosen - worst_chosen).clamp_min(0) / scores.amax(-1).clamp_min(1e-30)
    return structure, float(gap.nan_to_num(0.0).max()) if gap.numel() else 0.0


def check_nsa(
    m: ModuleType, cfg: BenchConfig, seq_len: int, device: torch.device, with_bwd: bool, tol: float = TOLERANCE
) -> dict[str, Any]:
    """Every NSA part of ``m`` against the fp32 reference at ``seq_len`` tokens.

    The reference's selected branch reads ``m``'s own block indices (a near-tie may flip a selection
    between bf16 and fp32); the indices themselves are checked as a top-n of the reference scores.
    """
    c = cfg.nsa
    poison_allocator(device)
    x = make_inputs(cfg, seq_len, device, seed=1234)
    x32 = {n: t.detach().float().requires_grad_() for n, t in x.items()}
    q, kc, vc, ks, vs, kw, vw, g = (x[n] for n in INPUT_NAMES)
    q32, kc32, vc32, ks32, vs32, kw32, vw32, g32 = (x32[n] for n in INPUT_NAMES)
    res: dict[str, Any] = {"seq_len": seq_len}
    o_cmp, lse = m.compressed_attention(q, kc, vc, c)
    r_cmp, r_lse = ref.compressed_attention(q32, kc32, vc32, c)
    res["compressed"] = rel_err(o_cmp, r_cmp)
    finite = torch.isfinite(r_lse)
    same_inf = bool((torch.isfinite(lse) == finite).all())
    res["lse"] = rel_err(lse[finite], r_lse[finite]) if same_inf else math.inf
    idx = m.select_blocks(q.detach(), kc.detach(), lse.detach(), c)
    scores = ref.selection_scores(q32.detach(), kc32.detach(), r_lse.detach(), c)
    structure, gap = selection_gap(idx, scores, c)
    res["selection_structure_ok"] = structure
    res["selection_gap"] = gap
    res["selection_exact_rows"] = float(
        (idx == ref.select_blocks(q32.detach(), kc32.detach(), r_lse.detach(), c)).all(-1).float().mean()
    )
    o_slc = m.selected_attention(q, ks, vs, idx, c)
    r_slc = ref.selected_attention(q32, ks32, vs32, idx, c)
    res["selected"] = rel_err(o_slc, r_slc)
    o_win = m.sliding_window_attention(q, kw, vw, c)
    r_win = ref.sliding_window_attention(q32, kw32, vw32, c)
    res["window"] = rel_err(o_win, r_win)
    o = m.nsa_attention(q, kc, vc, ks, vs, kw, vw, g, c)
    r = ref.combine_gates(g32, r_cmp, r_slc, r_win)
    res["core"] = rel_err(o, r)
    if with_bwd:
        grad = torch.randn_like(r)
        grads = torch.autograd.grad(o, [x[n] for n in INPUT_NAMES], grad.to(o.dtype))
        r_grads = torch.autograd.grad(r, [x32[n] for n in INPUT_NAMES], grad)
        for name, a, b in zip(INPUT_NAMES, grads, r_grads):
            res[f"grad_{name}"] = rel_err(a, b)
    errors = [v for k, v in res.items() if k in (*PARTS, "lse") or k.startswith("grad_")]
    res["passed"] = structure and gap <= tol and all(e < tol for e in errors)
    return res


def check_baseline(
    name: str, cfg: BenchConfig, seq_len: int, device: torch.device, tol: float = TOLERANCE
) -> tuple[BaselineMode | None, dict[str, Any]]:
    """The first mode in which baseline ``name`` runs and matches fp32 causal attention; None if none does."""
    x = make_inputs(cfg, seq_len, device, seed=99)
    q, k, v = (x[n].detach().float().transpose(1, 2) for n in ("q", "k_slc", "v_slc"))
    group = cfg.heads_q // cfg.heads_kv
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True
    )
    tried: dict[str, Any] = {}
    for mode in baseline_modes(cfg):
        try:
            err = rel_err(baseline_part(name, x, cfg, mode).fwd(), expected)
        except Exception as e:  # a backend that refuses these inputs raises many error types
            tried[mode.label()] = first_line(e)
            continue
        tried[mode.label()] = err
        if err < tol:
            return mode, {"mode": mode.label(), "rel_err": err, "tried": tried}
    return None, {"mode": None, "tried": tried}


# ----------------------------------------------------------------------------- measurement


def memory_mark(device: torch.device) -> int:
    """Start a peak-memory window: reset the peak and return what is allocated now (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_since(device: torch.device, mark: int) -> float | None:
    """GiB allocated at the peak since ``memory_mark`` beyond what was allocated then (None on the CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - mark) / 2**30


def measure(part: Part, device: torch.device, budget_ms: float, with_bwd: bool, min_reps: int = 3) -> dict[str, Any]:
    """fwd (and bwd) timings of one part, the bwd method, and the peak memory of a forward (with its
    graph) plus one backward: a training step's working memory for this part."""
    timer = functools.partial(time_calls, device=device, budget_ms=budget_ms, min_reps=min_reps)
    mark = memory_mark(device)
    out: dict[str, Any] = {"fwd": timer([part.fwd])}
    if with_bwd and part.grad_inputs:
        held = [part.fwd()]  # the graph that the backward replays
        grad = torch.randn_like(held[0])
        try:
            out["bwd"] = timer([lambda: torch.autograd.grad(held[0], part.grad_inputs, grad, retain_graph=True)])
            out["bwd_method"] = "backward alone (retained graph)"
        except RuntimeError:
            both = timer([lambda: torch.autograd.grad(part.fwd(), part.grad_inputs, grad)])
            fwd = out["fwd"]
            out["bwd"] = Timing(both.median_ms - fwd.median_ms, both.min_ms - fwd.min_ms, both.reps)
            out["bwd_method"] = "fwd+bwd minus fwd"
        held.clear()
    out["peak_gib"] = peak_since(device, mark)
    return out


def records_for(
    config: str,
    seq_len: int,
    impl: str,
    part: str,
    result: dict[str, Any],
    flops: dict[str, int],
    peak_tflops: float,
    note: str = "",
) -> list[dict[str, Any]]:
    """Flat JSON records (one per pass) with achieved TFLOP/s against the FLOPs the pattern needs."""
    key = "full" if impl in BASELINES else part
    if part == "core_nowin":
        key, fwd_flops = "core", flops["compressed"] + flops["selection"] + flops["selected"]
    else:
        fwd_flops = flops[key]
    recs = []
    for pass_ in ("fwd", "bwd"):
        if pass_ not in result:
            continue
        t: Timing = result[pass_]
        n = fwd_flops if pass_ == "fwd" else backward_flops(key, fwd_flops, flops)
        tflops = n / (t.median_ms * 1e-3) / 1e12 if t.median_ms > 0 else None
        recs.append(
            {
                "config": config,
                "seq_len": seq_len,
                "impl": impl,
                "part": part,
                "pass": pass_,
                "ms": t.median_ms,
                "min_ms": t.min_ms,
                "reps": t.reps,
                "host_ms": t.host_ms,
                "flops": n,
                "tflops": tflops,
                "pct_peak": None if tflops is None else 100 * tflops / peak_tflops,
                "method": result.get("bwd_method", "") if pass_ == "bwd" else FWD_METHOD.get(part, FWD_METHOD["*"]),
                "peak_gib": result["peak_gib"],
                "note": note,
            }
        )
    return recs


# ----------------------------------------------------------------------------- metadata and output


def environment(device: torch.device) -> dict[str, Any]:
    """Card, driver, CUDA, torch, triton, Python and git versions, the kernels' source hash, a UTC timestamp.

    ``source_sha1`` hashes ``optimized/*.py`` and ``reference/*.py``: it names the code that ran even where
    the working tree differs from ``git_commit`` (the GPU machine gets a copy of an uncommitted tree).
    """
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha1()
    for path in sorted([*root.glob("optimized/*.py"), *root.glob("reference/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    env: dict[str, Any] = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_sha1": digest.hexdigest()[:12],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    try:
        env["triton"] = importlib.import_module("triton").__version__
    except ImportError:
        env["triton"] = None
    for key, cmd in (
        ("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        ("git_commit", ["git", "rev-parse", "--short", "HEAD"]),
    ):
        try:
            env[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env[key] = None
    return env


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a partial file never replaces a complete one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def speedups(records: list[dict[str, Any]], config: str) -> list[dict[str, Any]]:
    """Per length and pass: NSA core time and each baseline's time over it."""
    by_key = {(r["seq_len"], r["impl"], r["part"], r["pass"]): r["ms"] for r in records if r["config"] == config}
    rows = []
    for seq_len in sorted({k[0] for k in by_key}):
        for pass_ in ("fwd", "bwd"):
            nsa = by_key.get((seq_len, "nsa", "core", pass_))
            row: dict[str, Any] = {"seq_len": seq_len, "pass": pass_, "nsa_ms": nsa}
            for b in BASELINES:
                base = by_key.get((seq_len, b, "full", pass_))
                row[f"{b}_ms"] = base
                row[f"{b}_speedup"] = base / nsa if base and nsa else None
            rows.append(row)
    return rows


def _fmt(v: float | None, width: int = 8, digits: int = 2) -> str:
    return f"{v:{width}.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def summary_table(data: dict[str, Any]) -> str:
    """The short table printed last: per config, times (ms) and speedups, then per-part TFLOP/s."""
    lines = [f"card: {data['env']['card']}  impl: {data['impl']}  stopped_early: {data['stopped_early']}"]
    recs = data["records"]
    for config in data["configs"]:
        name = config["name"]
        check = data["checks"].get(name, {}).get("nsa", {})
        lines.append(f"== {name}: NSA check {'passed' if check.get('passed') else 'FAILED/absent'}")
        head = "      T pass  nsa_ms " + " ".join(f"{b + '_ms':>9} {'x':>6}" for b in BASELINES)
        lines.append(head)
        for row in speedups(recs, name):
            cells = " ".join(f"{_fmt(row[f'{b}_ms'], 9)} {_fmt(row[f'{b}_speedup'], 6)}" for b in BASELINES)
            lines.append(f"{row['seq_len']:>7} {row['pass']:>4} {_fmt(row['nsa_ms'])} {cells}")
        mine = [
            r for r in recs if r["config"] == name and r["part"] in ("core", "full") and r.get("peak_gib") is not None
        ]
        if mine:
            longest = max(r["seq_len"] for r in mine)
            peaks = {r["impl"]: r["peak_gib"] for r in mine if r["seq_len"] == longest}
            lines.append(
                f"peak GiB (fwd+bwd working memory) at T={longest}: "
                + "  ".join(f"{k} {v:.2f}" for k, v in peaks.items())
            )
        parts = [p for p in (*PARTS, "core_nowin") if any(r["part"] == p and r["config"] == name for r in recs)]
        if parts:
            lines.append("      T pass " + " ".join(f"{p:>17}" for p in parts) + "   (ms / TFLOP/s)")
            by_key = {
                (r["seq_len"], r["part"], r["pass"]): r for r in recs if r["config"] == name and r["impl"] == "nsa"
            }
            for seq_len in sorted({k[0] for k in by_key}):
                for pass_ in ("fwd", "bwd"):
                    cells = []
                    for p in parts:
                        r = by_key.get((seq_len, p, pass_))
                        cells.append(f"{_fmt(r['ms'])} /{_fmt(r['tflops'], 6, 0)}" if r else f"{'-':>17}")
                    lines.append(f"{seq_len:>7} {pass_:>4} " + " ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", help=f"sequence lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--configs", nargs="+", default=["default"], choices=sorted(CONFIGS), help="config names")
    p.add_argument("--quick", action="store_true", help=f"T = {QUICK_LENGTHS}, 100 ms per measurement")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for bench.json")
    p.add_argument("--impl", default="optimized", choices=["optimized", "reference"], help="NSA implementation")
    p.add_argument("--skip-baselines", action="store_true", help="time NSA only")
    p.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=BASELINES)
    p.add_argument("--baseline-max-len", type=int, default=131072, help="longest T for the baselines")
    p.add_argument("--branches", nargs="+", default=list(PARTS), choices=PARTS, help="NSA parts to time")
    p.add_argument("--fwd-only", action="store_true", help="skip backward timings and gradient checks")
    p.add_argument("--max-minutes", type=float, default=6.0, help="stop (and still write results) after this")
    p.add_argument("--budget-ms", type=float, help="time spent per measurement (default 300, quick 100)")
    p.add_argument("--min-reps", type=int, default=3, help="fewest timed calls per measurement")
    p.add_argument("--check-len", type=int, default=2048, help="T of the correctness check before timing")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="relative error allowed by the checks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


@contextlib.contextmanager
def _freed(device: torch.device) -> Iterator[None]:
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check, then time every config and length; write ``bench.json`` after each length."""
    device = torch.device(args.device)
    budget = Budget(args.max_minutes)
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    budget_ms = args.budget_ms or (100.0 if args.quick else 300.0)
    with_bwd = not args.fwd_only
    env = environment(device)
    peak_tflops, _ = ceilings(env["card"])
    data: dict[str, Any] = {
        "env": env,
        "impl": args.impl,
        "argv": sys.argv[1:],
        "ceilings": {"bf16_tflops": peak_tflops, "hbm_tbps": ceilings(env["card"])[1]},
        "conventions": {
            "flops": "2*B*HQ*(DK+DV) per (query, key) pair the sparse pattern needs; selection = q.k recompute only",
            "bwd_flops": "2.5 x fwd",
            "fwd": "forward with autograd recording, median of CUDA-event-timed calls issued back to back after a "
            "warm-up call; host_ms: the host's launch time per call",
            "bwd": "backward alone on a retained graph unless a record's method says otherwise",
            "baselines": "full causal attention on q, k_slc, v_slc; GQA per checks[config][baseline].mode",
        },
        "configs": [],
        "checks": {},
        "bytes": {},
        "records": [],
        "errors": [],
        "stopped_early": False,
    }
    out = args.out / "bench.json"
    try:
        impl: ModuleType | None = importlib.import_module(args.impl)
    except Exception as e:  # a half-written package fails in many ways; the baselines are still worth timing
        impl = None
        data["errors"].append(f"import {args.impl}: {first_line(e)}")
    baselines = [] if args.skip_baselines or device.type != "cuda" else list(args.baselines)
    for name in args.configs:
        cfg = CONFIGS[name]
        data["configs"].append({**asdict(cfg), "nsa": asdict(cfg.nsa)})
        checks: dict[str, Any] = {}
        data["checks"][name] = checks
        nsa_ok = False
        if impl is not None:
            with _freed(device):
                try:
                    checks["nsa"] = check_nsa(impl, cfg, args.check_len, device, with_bwd, args.tolerance)
                    nsa_ok = checks["nsa"]["passed"]
                except Exception as e:  # report, do not time
                    checks["nsa"] = {"passed": False, "error": first_line(e)}
            if not nsa_ok:
                data["errors"].append(f"{name}: NSA check failed, not timed: {checks['nsa']}")
        modes: dict[str, BaselineMode] = {}
        for b in baselines:
            with _freed(device):
                mode, checks[b] = check_baseline(b, cfg, args.check_len, device, args.tolerance)
            if mode is not None:
                modes[b] = mode
        parts = list(args.branches) + (["core_nowin"] if cfg.no_window_variant else [])
        for seq_len in lengths:
            if budget.expired():
                data["stopped_early"] = True
                break
            flops = branch_flops(seq_len, cfg.shape(), cfg.nsa)
            data["bytes"][f"{name}/{seq_len}"] = branch_bytes(seq_len, cfg.shape(), cfg.nsa)
            with _freed(device):
                x = make_inputs(cfg, seq_len, device, seed=seq_len)
                jobs: list[tuple[str, str, Callable[[], Part], str]] = []
                built: dict[str, Part] = {}
                if nsa_ok and impl is not None:
                    try:  # the parts share one lse and one block_idx, computed here
                        built = nsa_parts(impl, x, cfg, tuple(parts))
                        jobs += [("nsa", p, functools.partial(operator.getitem, built, p), "") for p in parts]
                    except Exception as e:  # a kernel that fails at this size: record it, time the baselines
                        data["errors"].append(f"{name}/{seq_len}/nsa: {first_line(e)}")
                if seq_len <= args.baseline_max_len:
                    jobs += [
                        (b, "full", functools.partial(baseline_part, b, x, cfg, mode), mode.label())
                        for b, mode in modes.items()
                    ]
                for impl_name, part_name, build, note in jobs:
                    if budget.expired():
                        data["stopped_early"] = True
                        break
                    try:
                        result = measure(build(), device, budget_ms, with_bwd, args.min_reps)
                    except Exception as e:  # OOM, a kernel that fails at this size: record it, time the rest
                        data["errors"].append(f"{name}/{seq_len}/{impl_name}/{part_name}: {first_line(e)}")
                        continue
                    data["records"] += records_for(
                        name, seq_len, impl_name, part_name, result, flops, peak_tflops, note
                    )
                del x, jobs, built  # before the next length's inputs are allocated
            data["elapsed_s"] = budget.elapsed_s()
            data["autotune"] = autotune_choices()
            write_json(out, data)
    data["elapsed_s"] = budget.elapsed_s()
    data["autotune"] = autotune_choices()
    write_json(out, data)
    return data


def autotune_choices() -> dict[str, dict[str, str]]:
    """The config each autotuned kernel of ``optimized`` picked so far, per tuning key (its key arguments and
    dtypes): which tile sizes win on the card, next to the times they gave."""
    import triton

    choices: dict[str, dict[str, str]] = {}
    for mod_name in sorted(m for m in sys.modules if m == "optimized" or m.startswith("optimized.")):
        for name, obj in vars(sys.modules[mod_name]).items():
            if isinstance(obj, triton.runtime.Autotuner) and obj.cache:
                choices[f"{mod_name}.{name}"] = {repr(key): str(cfg) for key, cfg in obj.cache.items()}
    return choices


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 1 when an NSA check failed or the implementation did not import."""
    args = parse_args(argv)
    data = run(args)
    for err in data["errors"]:
        print("error:", err, file=sys.stderr)
    from .plot import make_plots  # matplotlib only once the timings are safely on disk

    for path in [args.out / "bench.json", *make_plots(data, args.out)]:
        print("wrote", path)
    print(summary_table(data))
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
