r"""The NSA attention layer: projections, gates, compression, RoPE around the core (paper Eq. 5, 7).

For an input $x_t \in \mathbb{R}^{d_{model}}$ the layer computes, per query head $h$:

$$q_t = W_Q x_t, \qquad k^c_t = W^c_K x_t,\; v^c_t = W^c_V x_t \quad (c \in \{cmp, slc, win\}),$$

$$\tilde K^{cmp} = \varphi_K(k^{cmp}),\; \tilde V^{cmp} = \varphi_V(v^{cmp}) \quad \text{(Eq. 7, ``compression.py``)},
\qquad g_t = \sigma\big(\mathrm{MLP}(x_t)\big) \in (0, 1)^{H_Q \times 3},$$

$$o^*_t = \sum_c g^c_t\, \mathrm{Attn}(q_t, \tilde K^c_t, \tilde V^c_t) \quad \text{(Eq. 5, ``nsa.py``)},
\qquad y_t = W_O\, o^*_t.$$

Each branch has its own key and value projections (the paper's guard against shortcut learning
between branches); ``shared_kv=True`` uses one $W_K, W_V$ for all three, as many open implementations
do. RoPE (``rope.py``) rotates $q$ and every branch's raw keys, the compression branch's before
$\varphi_K$. The gate is one linear layer and a sigmoid (``gate_hidden=None``) or a two-layer MLP
with a SiLU of width ``gate_hidden``.

Decoding (``cache.py``, spec section 8): with ``cache=NSACache()`` the first call runs the parallel
forward on the prompt and fills the cache; every later call decodes its tokens one at a time, each
step reading only the cache and giving the parallel forward's output at that position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ._checks import check_cu_seqlens
from .cache import BranchKV, NSACache, decode_attention
from .compression import COMPRESSION_KINDS, compress, make_compression
from .config import NSAConfig
from .nsa import NSAOutput, nsa_attention
from .rope import apply_rope

BRANCHES = ("cmp", "slc", "win")
BACKENDS = ("reference", "triton")


class NSALayerAux(NamedTuple):
    """What the layer computed besides its output, for notebooks (``return_aux=True``)."""

    gates: torch.Tensor  # [B, T, HQ, 3] in (0, 1), order (cmp, slc, win)
    o_cmp: torch.Tensor  # [B, T, HQ, DV] each branch before gating
    o_slc: torch.Tensor  # [B, T, HQ, DV]
    o_win: torch.Tensor  # [B, T, HQ, DV]
    lse_cmp: torch.Tensor  # [B, T, HQ] float32 (float64 for float64 inputs)
    block_idx: torch.Tensor  # [B, T, H, n] int32, the selected blocks


class _Out(NamedTuple):
    gates: torch.Tensor  # [B, T, HQ, 3]
    o: torch.Tensor  # [B, T, HQ, DV]
    nsa: NSAOutput | None  # every branch, when asked for


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class NativeSparseAttention(nn.Module):
    """Native Sparse Attention layer: x [B, T, hidden_size] -> y [B, T, hidden_size].

    ``num_heads`` query heads of ``head_dim``, ``num_kv_heads`` key/value heads (``num_heads`` must be a
    multiple), value head dim ``v_head_dim`` (default ``head_dim``). ``compression`` is "mlp", "mean"
    or "linear"; ``backend`` "reference" (this package) or "triton" (``optimized.nsa_attention``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        config: NSAConfig = NSAConfig(),  # noqa: B008 (frozen dataclass)
        *,
        compression: str = "mlp",
        shared_kv: bool = False,
        rope: bool = True,
        rope_base: float = 10000.0,
        gate_hidden: int | None = None,
        backend: str = "reference",
    ) -> None:
        super().__init__()
        self.hidden_size = _positive("hidden_size", hidden_size)
        self.num_heads = _positive("num_heads", num_heads)
        self.num_kv_heads = _positive("num_kv_heads", num_kv_heads)
        self.head_dim = _positive("head_dim", head_dim)
        self.v_head_dim = head_dim if v_head_dim is None else _positive("v_head_dim", v_head_dim)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not isinstance(config, NSAConfig):
            raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
        if compression not in COMPRESSION_KINDS:
            raise ValueError(f"compression must be one of {COMPRESSION_KINDS}, got {compression!r}")
        for name, flag in (("shared_kv", shared_kv), ("rope", rope)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if rope and head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even when rope=True, got {head_dim}")
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or rope_base <= 1:
            raise ValueError(f"rope_base must be a number > 1, got {rope_base!r}")
        if gate_hidden is not None:
            _positive("gate_hidden", gate_hidden)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config, self.shared_kv, self.rope, self.rope_base, self.backend = (
            config,
            shared_kv,
            rope,
            float(rope_base),
            backend,
        )
        HQ, H, DK, DV = num_heads, num_kv_heads, head_dim, self.v_head_dim
        self.q_proj = nn.Linear(hidden_size, HQ * DK, bias=False)
        kv_names = ("shared",) if shared_kv else BRANCHES
        self.k_proj = nn.ModuleDict({c: nn.Linear(hidden_size, H * DK, bias=False) for c in kv_names})
        self.v_proj = nn.ModuleDict({c: nn.Linear(hidden_size, H * DV, bias=False) for c in kv_names})
        self.compress_k = make_compression(compression, config.compress_block, config.compress_stride, DK)
        self.compress_v = make_compression(compression, config.compress_block, config.compress_stride, DV)
        if gate_hidden is None:
            self.gate: nn.Module = nn.Linear(hidden_size, HQ * 3)
        else:
            self.gate = nn.Sequential(nn.Linear(hidden_size, gate_hidden), nn.SiLU(), nn.Linear(gate_hidden, HQ * 3))
        self.o_proj = nn.Linear(HQ * DV, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"v_head_dim={self.v_head_dim}, shared_kv={self.shared_kv}, rope={self.rope}, backend={self.backend!r}, "
            f"config={self.config}"
        )

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 5's gates: x [B, T, hidden] -> sigmoid(MLP(x)) [B, T, HQ, 3], order (cmp, slc, win)."""
        return torch.sigmoid(self.gate(x)).unflatten(-1, (self.num_heads, 3))

    def project(
        self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, offset: int = 0
    ) -> tuple[torch.Tensor, BranchKV]:
        """Queries [B, T, HQ, DK] and the branches' raw keys/values [B, T, H, D], rotated at ``offset + t``."""
        H = self.num_kv_heads
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))  # [B, T, HQ, DK]
        kv = {}
        for c in BRANCHES:
            p = "shared" if self.shared_kv else c
            k = self.k_proj[p](x).unflatten(-1, (H, self.head_dim))  # [B, T, H, DK]
            v = self.v_proj[p](x).unflatten(-1, (H, self.v_head_dim))  # [B, T, H, DV]
            kv[c] = (k, v)
        if self.rope:
            rot = functools.partial(apply_rope, base=self.rope_base, cu_seqlens=cu_seqlens, offset=offset)
            q = rot(q)
            kv = {c: (rot(k), v) for c, (k, v) in kv.items()}  # the cmp keys too, before phi_K
        return q, BranchKV(*kv["cmp"], *kv["slc"], *kv["win"])

    def _core(self) -> Callable[..., Any]:
        if self.backend == "reference":
            return nsa_attention
        try:  # an import statement, not importlib: torch.compile traces it (reference never imports optimized at load)
            from optimized import nsa_attention as optimized_nsa_attention
        except ImportError as err:
            raise RuntimeError(
                "backend='triton' needs the optimized package's nsa_attention (import optimized failed or it "
                f"lacks nsa_attention): {err}; use backend='reference'"
            ) from err
        return optimized_nsa_attention

    def forward(
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache: NSACache | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, NSALayerAux]:
        """x [B, T, hidden_size] -> y [B, T, hidden_size] (and ``NSALayerAux`` when ``return_aux``).

        ``cu_seqlens`` packs sequences (B = 1). ``cache``: an empty ``NSACache`` is filled from this
        prompt; a filled one decodes x's tokens one step at a time (always with the reference math).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor [B, T, hidden_size={self.hidden_size}], got {shape}")
        if x.shape[1] == 0:
            raise ValueError("x must hold at least one token (T >= 1)")
        if cache is not None and not isinstance(cache, NSACache):
            raise TypeError(f"cache must be an NSACache or None, got {type(cache).__name__}")
        if cache is not None and cu_seqlens is not None:
            raise ValueError("cache and cu_seqlens cannot be combined: decode one sequence batch (B rows) at a time")
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
        if cache is not None and not cache.is_empty:
            if cache.config != self.config:
                raise ValueError(f"cache was filled with {cache.config}, this layer has {self.config}")
            out = self._decode(x, cache)
        else:
            out = self._parallel(x, cu_seqlens, cache, return_aux)
        B, T = x.shape[:2]
        y = self.o_proj(out.o.reshape(B, T, self.num_heads * self.v_head_dim))  # [B, T, hidden]
        if return_aux and out.nsa is not None:
            return y, NSALayerAux(out.gates, *out.nsa[1:])
        return y

    def _parallel(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, cache: NSACache | None, return_aux: bool
    ) -> _Out:
        q, kv = self.project(x, cu_seqlens=cu_seqlens)
        k_cmp = compress(kv.k_cmp, self.compress_k, self.config, cu_seqlens=cu_seqlens)  # Eq. 7: [B, TC, H, DK]
        v_cmp = compress(kv.v_cmp, self.compress_v, self.config, cu_seqlens=cu_seqlens)  # [B, TC, H, DV]
        gates = self.gates(x)  # [B, T, HQ, 3]
        core = self._core()
        args = (q, k_cmp, v_cmp, kv.k_slc, kv.v_slc, kv.k_win, kv.v_win, gates, self.config)
        if cache is not None:
            cache.prefill(kv, k_cmp, v_cmp, self.config)
        if return_aux:
            nsa = NSAOutput(*core(*args, cu_seqlens=cu_seqlens, return_aux=True))  # Eq. 5, every branch
            return _Out(gates, nsa.o, nsa)
        return _Out(gates, core(*args, cu_seqlens=cu_seqlens), None)  # Eq. 5

    def _decode(self, x: torch.Tensor, cache: NSACache) -> _Out:
        steps = []
        for s in range(x.shape[1]):
            x_t = x[:, s : s + 1]  # [B, 1, hidden]
            q, kv = self.project(x_t, offset=cache.length)
            cache.append(kv, self.compress_k, self.compress_v)
            gates = self.gates(x_t)
            nsa = decode_attention(q, gates, cache)
            steps.append(_Out(gates, nsa.o, nsa))
        nsa = NSAOutput(*(torch.cat(parts, dim=1) for parts in zip(*(step.nsa for step in steps))))
        return _Out(torch.cat([step.gates for step in steps], dim=1), nsa.o, nsa)
