r"""Shared Triton building blocks: one online-softmax step, its backward, and small launch utilities.

Every attention kernel in ``optimized`` (compressed, sliding window, selected) is the same loop:
a tile of query rows ``b_q [BM, BK]`` walks over key tiles, and per tile

$$s = \mathrm{scale}\; q k^\top, \qquad m' = \max(m, \max_n s), \qquad
  l' = l\, e^{m - m'} + \sum_n e^{s - m'}, \qquad acc' = acc\, e^{m - m'} + e^{s - m'} v.$$

The branches differ only in *which* keys a tile visits and in the validity mask ``m_s [BM, BN]``
(causal, window, visible block, block membership), so the callers build the pointers and the mask and
the helpers here do the arithmetic. Exponentials use ``exp2`` with $\log_2 e$ folded into the scale
(``qk_scale = scale * LOG2E``): the running max ``b_m`` is in log2 units, the stored log-sum-exp is in
natural-log units (the public API's ``lse``). The forward scales the raw scores inside the exponent,
``exp2(s * qk_scale - m)``, one fused multiply-add per score, and its row max as ``max(s) * qk_scale``
(equal for ``scale > 0``), so no pass over the tile multiplies by the scale.

Rows that see no key keep ``b_m = -inf`` and ``b_l = 0``: :func:`attn_fwd_finish` then writes output 0 and
lse ``-inf``, and the backward helpers give them zero gradients (never NaN), as spec section 4 asks.

Conventions: K and V tiles are read *transposed*, as pointer blocks ``p_k [BK, BN]`` and ``p_v``
(``[BN, BV]`` in the forward, ``[BV, BN]`` in the backward), so any key layout works: contiguous rows,
a window, or the tokens of a gathered selection block (``o_n = block_start + tl.arange(0, BN)``).
Head dims are padded to powers of two (``BK``, ``BV`` >= 16) and masked on load.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Sequence

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# constexpr globals, so that @triton.jit functions may read them (plain globals fail to compile on the GPU)
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2


def is_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tma_descriptor(x: torch.Tensor, box: list[int]) -> TensorDescriptor | None:
    """``x`` [rows, heads, D] as a TMA tensor descriptor of ``box`` blocks, or None where TMA cannot read it: the
    card has TMA (sm_90 and newer; the interpreter emulates it), ``x`` is not empty, rows start 16-byte aligned
    (``D * itemsize`` a multiple of 16) and no box dimension exceeds 256. Reads past the tensor's edges give zeros."""
    if x.numel() == 0 or x.data_ptr() % 16 or x.stride(1) * x.element_size() % 16 or max(box) > 256:
        return None
    if not is_interpreting() and torch.cuda.get_device_capability(x.device)[0] < 9:
        return None
    return TensorDescriptor.from_tensor(x, box)


def check_int32_offsets(what: str, n: int) -> None:
    """The kernels address a sequence's rows (token x head) by int32 offsets from a 64-bit base, widening only
    for the head-dim multiply: ``n`` such rows must stay below 2**31."""
    if n >= 2**31:
        raise ValueError(f"{what} = {n}: the kernels address rows by int32 offsets, so it must be < 2**31")


def tune_bucket(n: int) -> int:
    """An autotune key's size bucket: ``b`` for ``2^(b-1) <= n < 2^b`` (0 for 0). Kernels take it as an argument
    they never read, so a config tuned at one size serves the sizes of its bucket and no others."""
    return int(n).bit_length()


def next_power_of_2(n: int, minimum: int = 16) -> int:
    """The padded tile size for a dimension of ``n`` (>= ``minimum``; ``tl.dot`` needs K >= 16)."""
    return max(minimum, triton.next_power_of_2(n))


def autotune_configs(
    space: dict[str, Iterable[int]],
    num_warps: Iterable[int] = (4, 8),
    num_stages: Iterable[int] = (2, 3),
    interpreter: dict[str, int] | None = None,
) -> list[triton.Config]:
    """The cartesian product of ``space`` (meta-parameter -> values) x ``num_warps`` x ``num_stages``.

    Under the interpreter (where ``@triton.autotune`` with several configs fails) it returns one config:
    ``interpreter`` if given, else the first value of every axis. With the environment variable
    ``NSA_AUTOTUNE=0`` (read at import; the GPU tests, which see many shapes) a GPU run also takes one
    config: the first value of every axis, 4 warps, 2 stages (list the safest value first, one that fits in
    shared memory for every head dim and dtype), so each kernel compiles once per shape.
    E.g. ``autotune_configs({"BM": (128, 64), "BN": (64,)}, interpreter={"BM": 32, "BN": 32})``.
    """
    if is_interpreting():
        first = {name: next(iter(values)) for name, values in space.items()}
        return [triton.Config(interpreter or first, num_warps=4, num_stages=1)]
    if os.environ.get("NSA_AUTOTUNE", "1") == "0":  # tests on the GPU: many shapes, no time to tune each
        first = {name: next(iter(values)) for name, values in space.items()}
        return [triton.Config(first, num_warps=4, num_stages=2)]
    names = list(space)
    return [
        triton.Config(dict(zip(names, values)), num_warps=w, num_stages=s)
        for values in itertools.product(*(space[name] for name in names))
        for w in num_warps
        for s in num_stages
    ]


class ExactFp32Config(triton.Config):
    """A config only for exact float32 dots (``DOT_PRECISION="ieee"``): see :func:`config_list`."""


EXACT_FP32_TILE = 32


def config_list(
    choices: Sequence[tuple[dict[str, int], int, int]], interpreter: dict[str, int] | None = None
) -> list[triton.Config]:
    """Explicit autotune choices ``(meta-parameters, num_warps, num_stages)``, the safest first.

    A short hand-picked list compiles much faster than a full product (each config is one compilation per
    shape). Under the interpreter: ``interpreter`` (or the first choice's meta-parameters), 4 warps, 1 stage;
    with ``NSA_AUTOTUNE=0``: the first choice alone. Each choice also gets an :class:`ExactFp32Config` twin
    with its ``BM``/``BN`` tiles cut to 32, and :func:`prune_by_precision` (the autotuner's
    ``early_config_prune``) gives float32 inputs only those: an exact float32 ``tl.dot`` is unrolled into FMAs,
    and compiling the interval forward kernel at D=128 for sm_90 takes 95 s with 64 x 64 tiles, 19 s with
    32 x 32 (bf16 at 64 x 64: 12 s). Twins are merged when equal.
    """
    if is_interpreting():
        return [triton.Config(interpreter or choices[0][0], num_warps=4, num_stages=1)]
    if os.environ.get("NSA_AUTOTUNE", "1") == "0":
        choices = choices[:1]
    configs = [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in choices]
    exact = {}
    for meta, _, s in choices:
        small = {k: min(v, EXACT_FP32_TILE) if k in ("BM", "BN") else v for k, v in meta.items()}
        exact.setdefault((*sorted(small.items()), s), ExactFp32Config(small, num_warps=4, num_stages=s))
    return configs + list(exact.values())


def prune_by_precision(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """``early_config_prune`` for :func:`config_list`: float32 ("ieee") launches get the small-tile twins only."""
    exact = kwargs.get("DOT_PRECISION", named_args.get("DOT_PRECISION")) == "ieee"
    return [c for c in configs if isinstance(c, ExactFp32Config) == exact]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 ("ieee") for float32 inputs, the default for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kernel_dtype(name: str, x: torch.Tensor) -> None:
    """The Triton kernels take float16, bfloat16 and float32 (float64 is the reference's job)."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: the optimized kernels take float16, bfloat16 or float32, got {x.dtype}")


def check_kernel_device(name: str, x: torch.Tensor) -> None:
    """The compiled kernels need CUDA tensors; CPU tensors only run under the interpreter."""
    if not x.is_cuda and not is_interpreting():
        raise ValueError(f"{name} is on {x.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


@triton.jit
def attn_fwd_step(
    b_q,
    p_k,
    p_v,
    m_k,
    m_v,
    m_s,
    qk_scale,
    b_m,
    b_l,
    b_acc,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step of a query-row tile over one key tile.

    b_q [BM, BK] query rows (input dtype); p_k [BK, BN] pointers to K^T, p_v [BN, BV] pointers to V;
    m_k / m_v load masks broadcastable to [BK, BN] / [BN, BV] (out-of-range keys and padded dims);
    m_s [BM, BN] bool: row attends key; qk_scale = scale * LOG2E.
    b_m [BM] running max (log2 units, start at -inf), b_l [BM] running sum (start 0),
    b_acc [BM, BV] fp32 (start 0). Returns the updated (b_m, b_l, b_acc).
    """
    b_k = tl.load(p_k, mask=m_k, other=0.0)  # [BK, BN]
    b_v = tl.load(p_v, mask=m_v, other=0.0)  # [BN, BV]
    b_s = tl.dot(b_q, b_k, input_precision=DOT_PRECISION)  # [BM, BN], scaled below
    b_s = tl.where(m_s, b_s, float("-inf"))
    return attn_fwd_update(b_s, b_v, b_m, b_l, b_acc, DOT_PRECISION, qk_scale)


@triton.jit
def attn_fwd_update(b_s, b_v, b_m, b_l, b_acc, DOT_PRECISION: tl.constexpr, qk_scale=1.0):
    """The online-softmax update of :func:`attn_fwd_step` from scores the caller has already computed.

    b_s [BM, BN] fp32 scores, -inf where the row does not attend the key, in log2 units once multiplied by
    ``qk_scale`` (> 0; 1.0: already scaled); the scale is applied inside the exponent's fused multiply-add,
    not as a pass over the tile. b_v [BN, BV] the loaded value tile. For kernels that also need the scores
    themselves (the decode step maps them to selection blocks in the same pass). Returns the updated
    (b_m, b_l, b_acc).
    """
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)  # [BM]: max(s) c = max(s c) for c > 0
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows with nothing seen yet
    b_alpha = tl.exp2(b_m - b_m_safe)  # [BM]
    b_p = tl.exp2(b_s * qk_scale - b_m_safe[:, None])  # [BM, BN], 0 where masked; one FFMA per score
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_m_new, b_l, b_acc


@triton.jit
def gated_sum(gates, o_r, m_r, b_cmp, b_slc, b_win):
    """Eq. 5 for rows o_r [BR] (mask m_r): g_cmp o_cmp + g_slc o_slc + g_win o_win in fp32 [BR, BV], gates [R, 3],
    the branch outputs b_* [BR, BV] in any float dtype."""
    b_g0 = tl.load(gates + o_r * 3, mask=m_r, other=0.0).to(tl.float32)  # [BR]
    b_g1 = tl.load(gates + o_r * 3 + 1, mask=m_r, other=0.0).to(tl.float32)
    b_g2 = tl.load(gates + o_r * 3 + 2, mask=m_r, other=0.0).to(tl.float32)
    b_o = b_g0[:, None] * b_cmp.to(tl.float32)
    b_o += b_g1[:, None] * b_slc.to(tl.float32)
    b_o += b_g2[:, None] * b_win.to(tl.float32)
    return b_o


@triton.jit
def overlap_strides(o_i, o_j, L: tl.constexpr, D: tl.constexpr, LS: tl.constexpr):
    """Eq. 9 (broadcasting, int32): the strides of compressed block ``o_i`` (tokens ``[i d, i d + l)``) that fall
    in selection block ``o_j`` (tokens ``[j l', (j + 1) l')``); ``l`` and ``l'`` are multiples of ``d``."""
    start = tl.maximum(o_i * D, o_j * LS)
    end = tl.minimum(o_i * D + L, (o_j + 1) * LS)
    return tl.maximum(end - start, 0) // D


@triton.jit
def attn_fwd_finish(b_m, b_l, b_acc):
    """Normalise: returns b_o [BM, BV] fp32 (0 for rows that saw no key) and b_lse [BM] (natural log, -inf there)."""
    m_seen = b_l > 0
    b_l_safe = tl.where(m_seen, b_l, 1.0)
    b_o = b_acc / b_l_safe[:, None]
    b_lse = tl.where(m_seen, (b_m + tl.log2(b_l_safe)) * LN2, float("-inf"))
    return b_o, b_lse


@triton.jit
def attn_bwd_probs(
    b_q,
    b_do,
    b_k,
    b_v,
    b_lse2,
    b_delta,
    m_s,
    qk_scale,
    DOT_PRECISION: tl.constexpr,
):
    """Recompute the probabilities and the score gradient of one (query rows, key tile) pair.

    b_q [BM, BK], b_do [BM, BV] (input dtype); b_k [BK, BN] = K^T, b_v [BV, BN] = V^T;
    b_lse2 [BM] = lse * LOG2E (fp32, -inf allowed: such rows must have m_s all False);
    b_delta [BM] = rowsum(o * do) - dlse (see :func:`attn_bwd_preprocess`); m_s [BM, BN] bool.
    Returns b_p [BM, BN] fp32 and b_ds [BM, BN] fp32 = p * (do v^T - delta), the gradient of the
    *unscaled* scores divided by ``scale``: callers multiply dq and dk by ``scale`` once at the end.
    """
    b_s = tl.dot(b_q, b_k, input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
    b_p = tl.where(m_s, tl.exp2(b_s - b_lse2[:, None]), 0.0)  # [BM, BN]
    b_dp = tl.dot(b_do, b_v, input_precision=DOT_PRECISION)  # [BM, BN]
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_p, b_ds


@triton.jit
def attn_bwd_dq_step(
    b_q,
    b_do,
    b_lse2,
    b_delta,
    p_k,
    p_v,
    m_k,
    m_v,
    m_s,
    qk_scale,
    b_dq,
    DOT_PRECISION: tl.constexpr,
):
    """dq accumulation over one key tile: ``b_dq [BM, BK] += ds @ k`` (fp32, multiply by scale at the end).

    b_q [BM, BK], b_do [BM, BV], b_lse2 [BM], b_delta [BM] as in :func:`attn_bwd_probs`;
    p_k [BK, BN] pointers to K^T, p_v [BV, BN] pointers to V^T, with load masks m_k / m_v; m_s [BM, BN].
    """
    b_k = tl.load(p_k, mask=m_k, other=0.0)  # [BK, BN]
    b_v = tl.load(p_v, mask=m_v, other=0.0)  # [BV, BN]
    _, b_ds = attn_bwd_probs(b_q, b_do, b_k, b_v, b_lse2, b_delta, m_s, qk_scale, DOT_PRECISION)
    b_dq += tl.dot(b_ds.to(b_k.dtype), tl.trans(b_k), input_precision=DOT_PRECISION)  # [BM, BK]
    return b_dq


@triton.jit
def attn_bwd_dkv_step(
    b_k,
    b_v,
    p_qt,
    p_do,
    p_lse,
    p_delta,
    m_qt,
    m_do,
    m_r,
    m_st,
    qk_scale,
    b_dk,
    b_dv,
    DOT_PRECISION: tl.constexpr,
):
    """dk/dv accumulation of one resident key tile over one tile of query rows, in the key-major layout.

    b_k [BN, BK], b_v [BN, BV] (loaded once by the caller); p_qt [BK, BM] pointers to Q^T, p_do [BM, BV]
    pointers, with load masks m_qt / m_do; p_lse / p_delta [BM] pointers to lse (natural log) and delta,
    m_r [BM] row mask; m_st [BN, BM] bool: key seen by row. b_dk [BN, BK] += ds^T q (multiply by scale at the
    end), b_dv [BN, BV] += p^T do, both fp32. Returns (b_dk, b_dv).

    Everything is computed transposed (s^T = k q^T, [BN, BM]) so that p^T and ds^T feed their dots straight
    from registers: the row-major form (s = q k^T, then ``tl.trans(p)``) gave run-to-run different dk on sm_90
    with Triton 3.6 (a few elements off by up to 13% of max|dk|; docs/kernels.md).
    """
    b_qt = tl.load(p_qt, mask=m_qt, other=0.0)  # [BK, BM]
    b_do = tl.load(p_do, mask=m_do, other=0.0)  # [BM, BV]
    b_lse2 = tl.load(p_lse, mask=m_r, other=0.0) * LOG2E  # [BM]
    b_delta = tl.load(p_delta, mask=m_r, other=0.0)  # [BM]
    b_st = tl.dot(b_k, b_qt, input_precision=DOT_PRECISION) * qk_scale  # [BN, BM]
    b_pt = tl.where(m_st, tl.exp2(b_st - b_lse2[None, :]), 0.0)  # [BN, BM]
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)  # [BN, BV]
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BN, BM]
    b_dst = b_pt * (b_dpt - b_delta[None, :])  # [BN, BM]
    b_dk += tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), input_precision=DOT_PRECISION)  # [BN, BK]
    return b_dk, b_dv


@triton.jit
def attn_bwd_preprocess_kernel(
    o,
    do,
    dlse,
    delta,
    R,
    DV: tl.constexpr,
    BR: tl.constexpr,
    BV: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """delta[r] = sum_d o[r, d] * do[r, d] - dlse[r] over R rows of a contiguous [R, DV] pair."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # [BR]
    o_v = tl.arange(0, BV)
    m_r = o_r < R
    m_rv = m_r[:, None] & (o_v[None, :] < DV)  # [BR, BV]
    p_offs = o_r[:, None] * DV + o_v[None, :]
    b_o = tl.load(o + p_offs, mask=m_rv, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_offs, mask=m_rv, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)  # [BR]
    if HAS_DLSE:
        b_delta -= tl.load(dlse + o_r, mask=m_r, other=0.0)
    tl.store(delta + o_r, b_delta, mask=m_r)


_METADATA: dict[tuple, tuple[torch.Tensor, ...]] = {}
_METADATA_ENTRIES = 64  # shapes kept at once; the cache starts over beyond that


def shape_metadata(build: Callable[[], tuple[torch.Tensor, ...]], key: tuple | None) -> tuple[torch.Tensor, ...]:
    """``build()``, kept per ``key``: index tensors that depend only on sizes (a dense batch's key bounds, the
    sequences' tiles) are built once per shape and device instead of in every call, which saves the host a
    few dozen small launches per call. ``key=None`` (e.g. bounds that read ``cu_seqlens``' values) builds
    every time, and so do calls while ``torch.compile`` traces or a CUDA graph captures (the tensors would
    belong to the graph). The kernels only read these tensors."""
    if key is None or torch.compiler.is_compiling() or capturing():
        return build()
    out = _METADATA.get(key)
    if out is None:
        if len(_METADATA) >= _METADATA_ENTRIES:
            _METADATA.clear()
        out = _METADATA[key] = build()
    return out


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph (False while dynamo traces, which
    cannot trace ``is_current_stream_capturing()``: it returns a bool)."""
    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return False
    return torch.cuda.is_current_stream_capturing()


def device_tensor(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A short host list as a tensor on ``device``, without a host sync.

    ``torch.tensor(values, device="cuda")`` copies and then waits for the stream: the host stalls until the GPU
    has run everything queued before it, so a call that builds its metadata that way can never run ahead of
    the device. A non-blocking copy from (pageable) host memory returns once CUDA has staged the bytes.

    While a CUDA graph captures, a copy from host memory would become a graph node that reads this call's
    temporary host buffer at every replay, long after it is freed (or torch refuses it), so the values are
    written on the device instead, one fill each (a handful: one per sequence).
    """
    if capturing():
        out = torch.empty(len(values), dtype=dtype, device=device)
        for i, value in enumerate(values):
            out[i].fill_(value)  # the value is a kernel argument (``out[i] = value`` would copy a CPU scalar tensor)
        return out
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def attn_bwd_delta(
    o: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None, o_dot_do: torch.Tensor | None
) -> torch.Tensor:
    """delta = rowsum(o * do) - dlse, from ``o_dot_do`` = rowsum(o * do) when a caller already has it (the fused
    combine's backward computes it in the pass that writes do), else by :func:`attn_bwd_preprocess`."""
    if o_dot_do is None:
        return attn_bwd_preprocess(o, do, dlse)
    return o_dot_do - dlse if dlse is not None else o_dot_do


@triton.jit
def store_dq(dq, dq_prev, p_dq, b_dq, m_dq, scale, HAS_DQ_PREV: tl.constexpr):
    """dq = scale * b_dq (+ dq_prev): a branch's dq, summed in fp32 with the dq of the branches before it."""
    b_dq = b_dq * scale
    if HAS_DQ_PREV:
        b_dq += tl.load(dq_prev + p_dq, mask=m_dq, other=0.0).to(tl.float32)
    tl.store(dq + p_dq, b_dq.to(dq.dtype.element_ty), mask=m_dq)


def attn_bwd_preprocess(o: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None = None) -> torch.Tensor:
    """delta = rowsum(o * do) - dlse, fp32 of shape o.shape[:-1] (e.g. [B, T, HQ]).

    The softmax backward needs it per query row: ds = p * (dp - delta). ``dlse`` (the gradient of a
    returned log-sum-exp, fp32 o.shape[:-1]) adds ``p * dlse`` to ds, hence the minus sign.
    """
    DV = o.shape[-1]
    o, do = o.contiguous(), do.contiguous()
    N = o.numel() // max(DV, 1)
    delta = torch.empty(o.shape[:-1], dtype=torch.float32, device=o.device)
    if N == 0:
        return delta
    BV = next_power_of_2(DV)
    BR = max(1, min(64, 4096 // BV)) if not is_interpreting() else 64
    dlse_arg = dlse.contiguous().float() if dlse is not None else delta
    attn_bwd_preprocess_kernel[(triton.cdiv(N, BR),)](
        o, do, dlse_arg, delta, N, DV=DV, BR=BR, BV=BV, HAS_DLSE=dlse is not None
    )
    return delta
