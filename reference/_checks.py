"""Argument validation shared by every public function: clear errors that name the argument and the rule.

Checks of tensor *values* (``cu_seqlens``, ``block_idx``, the packed ``TC``) need the values on the host, which a
``torch.compile`` graph cannot read. They raise the errors below in eager mode (one host sync each); while
compiling they become device-side asserts in the graph (:func:`require`), checked when it runs, with no sync.
"""

from __future__ import annotations

import itertools

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .config import NSAConfig
from .varlen import compressed_bounds, compressed_counts

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_config(config: object) -> NSAConfig:
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    return config


def check_tensor(name: str, x: object, ndim: int, layout: str) -> torch.Tensor:
    """A floating tensor of rank ``ndim``; ``layout`` (e.g. "[B, T, HQ, DK]") goes into the message."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have rank {ndim} {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``x`` must share dtype and device with ``ref``."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must match")


def check_dim(name: str, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if x.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] ({what}) must be {expected}, got {x.shape[dim]}")


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_name: str = "k", v_name: str = "v"
) -> tuple[int, int, int, int, int, int]:
    """q [B, T, HQ, DK], k [B, S, H, DK], v [B, S, H, DV] with HQ % H == 0. Returns (B, T, HQ, H, DK, DV)."""
    check_tensor("q", q, 4, "[B, T, HQ, DK]")
    check_tensor(k_name, k, 4, "[B, S, H, DK]")
    check_tensor(v_name, v, 4, "[B, S, H, DV]")
    check_same(k_name, k, "q", q)
    check_same(v_name, v, "q", q)
    B, T, HQ, DK = q.shape
    H = k.shape[2]
    check_dim(k_name, k, 0, B, "batch")
    check_dim(v_name, v, 0, B, "batch")
    check_dim(k_name, k, 3, DK, "head dim DK, as q")
    s_differs = v.shape[1] != k.shape[1]
    if torch.compiler.is_compiling() and not statically_known_true(v.shape[1] == k.shape[1]):
        # S symbolic (a packed mean_pool's TC): a guard would break the graph, so an assert when the graph runs
        require(torch.tensor(v.shape[1] - k.shape[1]) == 0, ValueError, f"{v_name} must match {k_name} in S")
        s_differs = statically_known_true(s_differs)
    if s_differs or v.shape[2] != H:
        raise ValueError(f"{v_name} [B, S, H, DV] must match {k_name} in S and H: {tuple(v.shape)} vs {tuple(k.shape)}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"query heads HQ={HQ} must be a multiple of kv heads H={H} (HQ % H == 0)")
    if T == 0:
        raise ValueError("q must hold at least one token (T >= 1)")
    return B, T, HQ, H, DK, v.shape[3]


def check_cu_seqlens(cu_seqlens: object, batch: int, total: int) -> torch.Tensor:
    """cu_seqlens: int32 [N + 1], 0 first, strictly increasing, ending at the packed length; B must be 1."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (packed sequences), got B={batch}")
    if torch.compiler.is_compiling():  # no host values in a graph: device-side asserts
        require(cu_seqlens[0] == 0, ValueError, "cu_seqlens must start at 0")
        require(cu_seqlens[1:] > cu_seqlens[:-1], ValueError, "cu_seqlens must be strictly increasing")
        require(cu_seqlens[-1] == total, ValueError, f"cu_seqlens must end at the packed length T={total}")
        return cu_seqlens
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"cu_seqlens must end at the packed length T={total}, got {values[-1]}")
    return cu_seqlens


def require(cond: torch.Tensor, exc: type[Exception], message: str) -> None:
    """A check of tensor values: raise ``exc(message)`` unless every element of the bool tensor ``cond`` is true.

    Eager: one host sync. While ``torch.compile`` traces (no host values in a graph): ``torch._assert_async``,
    a device-side assert checked when the graph runs (a RuntimeError with ``message`` on the CPU, a
    device-side assert on a GPU).
    """
    if torch.compiler.is_compiling():
        torch._assert_async(cond.all(), message)
    elif not bool(cond.all()):
        raise exc(message)


def check_compressed_length(k_cmp: torch.Tensor, T: int, config: NSAConfig, cu_seqlens: torch.Tensor | None) -> None:
    """k_cmp.shape[1] must be TC = floor((T - l) / d) + 1 (0 when T < l), summed over the packed sequences.

    Call after :func:`check_cu_seqlens`.
    """
    if cu_seqlens is None:
        check_dim("k_cmp", k_cmp, 1, config.num_compressed(T), "TC = floor((T - l) / d) + 1, or 0 when T < l")
        return
    what = "TC, the sum over sequences of floor((T_i - l) / d) + 1"
    if torch.compiler.is_compiling():
        total = compressed_counts(cu_seqlens, config.compress_block, config.compress_stride).sum()
        require(total == k_cmp.shape[1], ValueError, f"k_cmp.shape[1] ({what}) must match cu_seqlens")
        return
    check_dim("k_cmp", k_cmp, 1, compressed_bounds(cu_seqlens, config)[-1][1], what)


def check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    return float(scale)


def check_nsa_inputs(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    k_slc: torch.Tensor,
    v_slc: torch.Tensor,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    gates: torch.Tensor,
    config: NSAConfig,
    cu_seqlens: torch.Tensor | None,
) -> None:
    """The core's inputs (spec section 11): every branch's K/V against q, the gates [B, T, HQ, 3], cu_seqlens."""
    B, T, HQ, _, _, DV = check_qkv(q, k_slc, v_slc, "k_slc", "v_slc")
    check_qkv(q, k_win, v_win, "k_win", "v_win")
    check_dim("k_slc", k_slc, 1, T, "T, as q")
    check_dim("k_win", k_win, 1, T, "T, as q")
    check_tensor("k_cmp", k_cmp, 4, "[B, TC, H, DK]")
    for name, x in (("k_cmp", k_cmp), ("k_win", k_win)):
        if x.shape[2] != k_slc.shape[2]:
            raise ValueError(f"{name} has {x.shape[2]} kv heads but k_slc has {k_slc.shape[2]}; they must match")
    for name, x in (("v_cmp", v_cmp), ("v_win", v_win)):
        check_tensor(name, x, 4, "[B, S, H, DV]")
        check_dim(name, x, 3, DV, "DV, as v_slc")
    check_tensor("gates", gates, 4, "[B, T, HQ, 3]")
    if tuple(gates.shape) != (B, T, HQ, 3):
        raise ValueError(f"gates must have shape [B, T, HQ, 3] = {[B, T, HQ, 3]}, got {list(gates.shape)}")
    check_same("gates", gates, "q", q)
    check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    check_compressed_length(k_cmp, T, config, cu_seqlens)
