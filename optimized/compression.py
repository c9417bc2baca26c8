r"""Token compression (paper Eq. 7) in Triton: the parameter-free mean pooling $\varphi = \mathrm{mean}$.

Block $i$ of a sequence summarises tokens $[i d, i d + l)$ (spec section 3), so

$$\tilde k_i = \frac{1}{l} \sum_{j < l} k_{i d + j}, \qquad
  \frac{\partial L}{\partial k_t} = \frac{1}{l} \sum_{i:\ i d \le t < i d + l} \frac{\partial L}{\partial \tilde k_i},$$

the backward being a gather over the at most $l / d$ blocks that cover token $t$ (no atomics).

Only the mean is a kernel. The paper's default $\varphi$ (an MLP on the flattened block plus an
intra-block position embedding) and the ``linear`` map stay PyTorch matmuls in the layer: once the
overlapping blocks are laid out as ``[TC, l * D]`` (``unfold``, a strided view), $\varphi$ is a dense
GEMM with a large reduction dimension, which cuBLAS already runs at tensor-core speed; a hand-written
kernel would only re-implement it.

With ``cu_seqlens`` the number of blocks, TC = the sum of each sequence's $\lfloor (T_i - l) / d \rfloor + 1$,
depends on the values of ``cu_seqlens``. The block starts come from ``reference.varlen.compressed_block_starts``,
a custom op whose fake implementation returns an unbacked size: under ``torch.compile(fullgraph=True)`` the
output is ``[1, u0, H, D]`` (``u0`` known only when the graph runs) and the graph does not break.
``mean_pool(k)`` and ``mean_pool(v)`` give two such sizes, ``u0`` and ``u1``; ``check_qkv`` compares them when
the graph runs (a device-side assert, no guard), so both can feed ``compressed_attention`` in the same graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reference._checks import check_config, check_cu_seqlens, check_tensor
from reference.config import NSAConfig
from reference.varlen import compressed_block_starts, compressed_counts

from ._common import autotune_configs, check_kernel_device, check_kernel_dtype, next_power_of_2
from ._interval import as_bounds, token_sequences


@triton.autotune(configs=autotune_configs({"BC": (32, 16, 64)}, num_stages=(2,)), key=["BD"])
@triton.jit
def mean_pool_fwd_kernel(
    x,
    y,
    blk_start,
    T,
    TC,
    l,
    H: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BC: tl.constexpr,
):
    """y[b, i, h] = mean of x[b, blk_start[i] + j, h] over j < l, for BC blocks i."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    o_i = i_c * BC + tl.arange(0, BC)  # [BC]
    o_d = tl.arange(0, BD)
    m_i = o_i < TC
    m_id = m_i[:, None] & (o_d[None, :] < D)  # [BC, BD]
    b_start = tl.load(blk_start + o_i, mask=m_i, other=0)  # [BC] first token of each block
    b_acc = tl.zeros([BC, BD], dtype=tl.float32)
    for j in range(0, l):
        o_x = ((i_b * T + b_start + j) * H + i_h) * D  # [BC] int64
        b_acc += tl.load(x + o_x[:, None] + o_d[None, :], mask=m_id, other=0.0).to(tl.float32)
    o_y = ((i_b * TC + o_i) * H + i_h) * D  # [BC] int64
    tl.store(y + o_y[:, None] + o_d[None, :], (b_acc / l).to(y.dtype.element_ty), mask=m_id)


@triton.autotune(configs=autotune_configs({"BT": (32, 16, 64)}, num_stages=(2,)), key=["BD", "NB"])
@triton.jit
def mean_pool_bwd_kernel(
    dy,
    dx,
    tok_lo,
    tok_hi,
    T,
    TC,
    l,
    H: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    NB: tl.constexpr,
    BT: tl.constexpr,
):
    """dx[b, t, h] = sum of dy[b, i, h] / l over the blocks tok_lo[t] <= i < tok_hi[t] (at most NB = l / d)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)  # [BT]
    o_d = tl.arange(0, BD)
    m_t = o_t < T
    m_d = o_d < D
    b_lo = tl.load(tok_lo + o_t, mask=m_t, other=0)  # [BT]
    b_hi = tl.load(tok_hi + o_t, mask=m_t, other=0)
    b_acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in range(NB):
        o_i = b_lo + j  # [BT] block index
        m_i = o_i < b_hi
        o_dy = ((i_b * TC + o_i) * H + i_h) * D  # [BT] int64
        b_acc += tl.load(dy + o_dy[:, None] + o_d[None, :], mask=m_i[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    o_dx = ((i_b * T + o_t) * H + i_h) * D
    tl.store(dx + o_dx[:, None] + o_d[None, :], (b_acc / l).to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@torch.library.custom_op("nsa::mean_pool_fwd", mutates_args=())
def mean_pool_fwd(x: torch.Tensor, blk_start: torch.Tensor, l: int) -> torch.Tensor:
    """x [B, T, H, D], blk_start int32 [TC] (first token of each block) -> y [B, TC, H, D]."""
    x = x.contiguous()
    B, T, H, D = x.shape
    TC = blk_start.shape[0]
    y = torch.empty(B, TC, H, D, dtype=x.dtype, device=x.device)
    if TC > 0:
        grid = lambda meta: (triton.cdiv(TC, meta["BC"]), B * H)
        mean_pool_fwd_kernel[grid](x, y, blk_start, T, TC, l, H=H, D=D, BD=next_power_of_2(D, 1))
    return y


@mean_pool_fwd.register_fake
def _(x: torch.Tensor, blk_start: torch.Tensor, l: int) -> torch.Tensor:
    B, _, H, D = x.shape
    return x.new_empty(B, blk_start.shape[0], H, D)


@torch.library.custom_op("nsa::mean_pool_bwd", mutates_args=())
def mean_pool_bwd(dy: torch.Tensor, tok_lo: torch.Tensor, tok_hi: torch.Tensor, l: int, d: int) -> torch.Tensor:
    """dy [B, TC, H, D], tok_lo/tok_hi int32 [T] (the blocks covering token t) -> dx [B, T, H, D]."""
    dy = dy.contiguous()
    B, TC, H, D = dy.shape
    T = tok_lo.shape[0]
    dx = torch.empty(B, T, H, D, dtype=dy.dtype, device=dy.device)
    grid = lambda meta: (triton.cdiv(T, meta["BT"]), B * H)
    mean_pool_bwd_kernel[grid](dy, dx, tok_lo, tok_hi, T, TC, l, H=H, D=D, BD=next_power_of_2(D, 1), NB=l // d)
    return dx


@mean_pool_bwd.register_fake
def _(dy: torch.Tensor, tok_lo: torch.Tensor, tok_hi: torch.Tensor, l: int, d: int) -> torch.Tensor:
    B, _, H, D = dy.shape
    return dy.new_empty(B, tok_lo.shape[0], H, D)


class MeanPool(torch.autograd.Function):
    """Differentiable mean pooling over the custom ops."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        geometry: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        l: int,
        d: int,
    ) -> torch.Tensor:
        blk_start, tok_lo, tok_hi = geometry
        ctx.save_for_backward(tok_lo, tok_hi)
        ctx.l, ctx.d = l, d
        return torch.ops.nsa.mean_pool_fwd(x, blk_start, l)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tok_lo, tok_hi = ctx.saved_tensors
        return torch.ops.nsa.mean_pool_bwd(dy, tok_lo, tok_hi, ctx.l, ctx.d), None, None, None


def compressed_offsets(cu: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """int64 [N + 1]: where each sequence's compressed blocks start in the packed ``k_cmp`` (the TC prefix sums)."""
    blocks = compressed_counts(cu, config.compress_block, config.compress_stride)  # [N] T_C per sequence
    return torch.nn.functional.pad(torch.cumsum(blocks, 0), (1, 0))


def pool_geometry(x: torch.Tensor, config: NSAConfig, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """int32 (blk_start [TC], tok_lo [T], tok_hi [T]): each block's first token, the blocks covering each token."""
    l, d = config.compress_block, config.compress_stride
    T, device = x.shape[1], x.device
    cu, t, seq = token_sequences(T, cu_seqlens, device)
    c_cu = compressed_offsets(cu, config)
    if cu_seqlens is None:
        blk_start = torch.arange(config.num_compressed(T), device=device) * d
    else:
        blk_start = compressed_block_starts(x, cu_seqlens, config)  # TC data-dependent: a custom op
    u = t - cu[seq]  # position inside the sequence
    first = -torch.div(l - 1 - u, d, rounding_mode="floor")  # ceil((u - l + 1) / d): the first block covering u
    tok_lo = c_cu[seq] + torch.clamp(first, min=0)
    tok_hi = torch.maximum(
        c_cu[seq] + torch.minimum(torch.div(u, d, rounding_mode="floor") + 1, c_cu[seq + 1] - c_cu[seq]), tok_lo
    )
    return as_bounds(blk_start, tok_lo, tok_hi)


def mean_pool(x: torch.Tensor, config: NSAConfig, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean-pooled compression (``phi = mean``): x [B, T, H, D] -> [B, TC, H, D] (``reference.compression.mean_pool``).

    With ``cu_seqlens`` (B = 1) every sequence is pooled on its own and the blocks are packed in order.
    """
    config = check_config(config)
    check_tensor("x", x, 4, "[B, T, H, D]")
    check_kernel_dtype("x", x)
    check_kernel_device("x", x)
    B, T = x.shape[:2]
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    geometry = pool_geometry(x, config, cu_seqlens)
    return MeanPool.apply(x, geometry, config.compress_block, config.compress_stride)
