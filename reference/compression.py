r"""Token compression: overlapping blocks of keys or values squeezed into one token each (paper Eq. 7).

$$\tilde K^{cmp}_t = f_K^{cmp}(k_{:t}) = \{\varphi(k_{id+1:id+l}) \mid 0 \le i \le \lfloor (t-l)/d \rfloor\}$$

With our 0-indexed tokens (spec section 3) compressed block $i$ summarises tokens $[i d, i d + l)$,
so a sequence of $T$ tokens has $T_C = \lfloor (T - l)/d \rfloor + 1$ complete blocks (0 when $T < l$);
incomplete blocks never exist. $\varphi$ maps a block $[l, D]$ to one token $[D]$ and is applied to
every kv head separately, with weights shared across heads. The layer owns two modules, $\varphi_K$
for keys and $\varphi_V$ for values. Three choices of $\varphi$:

* ``mlp`` (the paper's "learnable MLP with intra-block position encoding", the default):
  $\varphi(x) = W_2\, \mathrm{GELU}\big(W_1 \mathrm{vec}(x + E) + b_1\big) + b_2$ with a learned position
  embedding $E \in \mathbb{R}^{l \times D}$, $W_1 \in \mathbb{R}^{h \times l D}$, $W_2 \in \mathbb{R}^{D \times h}$.
  The paper leaves the hidden width $h$ open; ours defaults to $h = 4 D$ (a transformer FFN's ratio,
  applied to the output width: $h = l D$ would cost $l^2 D^2$ weights, 16M at $l = 32, D = 128$).
* ``mean``: $\varphi(x) = \frac{1}{l} \sum_{r < l} x_r$, parameter-free (what many open implementations use).
* ``linear``: $\varphi(x) = W \mathrm{vec}(x) + b$, one linear map, initialised to the mean so that it
  starts where ``mean`` is.

RoPE (``rope.py``) is applied to the raw keys *before* compression, so $\varphi_K$ sees rotated keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_config, check_cu_seqlens, check_tensor
from .config import NSAConfig
from .varlen import compressed_block_starts

COMPRESSION_KINDS = ("mlp", "mean", "linear")


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Compression(nn.Module):
    """Base class of the $\\varphi$ modules: ``forward(blocks [..., l, D]) -> [..., D]``."""

    def __init__(self, block: int, stride: int, head_dim: int) -> None:
        super().__init__()
        self.block = _check_positive("block", block)
        self.stride = _check_positive("stride", stride)
        self.head_dim = _check_positive("head_dim", head_dim)
        if block % stride != 0:
            raise ValueError(f"stride d={stride} must divide block l={block}")

    def check_blocks(self, blocks: torch.Tensor) -> None:
        if blocks.shape[-2:] != (self.block, self.head_dim):
            raise ValueError(
                f"blocks must end in [l, D] = [{self.block}, {self.head_dim}], got shape {tuple(blocks.shape)}"
            )

    def extra_repr(self) -> str:
        return f"block={self.block}, stride={self.stride}, head_dim={self.head_dim}"


class MLPCompression(Compression):
    """The paper's $\\varphi$: intra-block position embedding, flatten, MLP ``l*D -> hidden -> D``."""

    def __init__(self, block: int, stride: int, head_dim: int, hidden: int | None = None) -> None:
        super().__init__(block, stride, head_dim)
        self.hidden = 4 * head_dim if hidden is None else _check_positive("hidden", hidden)
        self.pos_emb = nn.Parameter(torch.randn(block, head_dim) * 0.02)  # E [l, D]
        self.fc1 = nn.Linear(block * head_dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, head_dim)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [..., l, D] -> [..., D]."""
        self.check_blocks(blocks)
        x = (blocks + self.pos_emb).flatten(-2)  # vec(x + E): [..., l * D]
        return self.fc2(nn.functional.gelu(self.fc1(x)))  # Eq. 7 phi: [..., D]


class MeanCompression(Compression):
    """Parameter-free $\\varphi$: the mean of the block's ``l`` tokens."""

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [..., l, D] -> [..., D]."""
        self.check_blocks(blocks)
        return blocks.mean(dim=-2)  # Eq. 7 phi = mean pooling


class LinearCompression(Compression):
    """One linear map of the flattened block, ``l*D -> D``, initialised to the mean."""

    def __init__(self, block: int, stride: int, head_dim: int) -> None:
        super().__init__(block, stride, head_dim)
        self.proj = nn.Linear(block * head_dim, head_dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(head_dim).repeat(1, block) / block)  # [D, l * D]: the mean
            self.proj.bias.zero_()

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [..., l, D] -> [..., D]."""
        self.check_blocks(blocks)
        return self.proj(blocks.flatten(-2))  # Eq. 7 phi = W vec(x) + b


def make_compression(kind: str, block: int, stride: int, head_dim: int) -> Compression:
    """The $\\varphi$ module named ``kind`` ("mlp", "mean" or "linear") for blocks ``[block, head_dim]``."""
    if kind == "mlp":
        return MLPCompression(block, stride, head_dim)
    if kind == "mean":
        return MeanCompression(block, stride, head_dim)
    if kind == "linear":
        return LinearCompression(block, stride, head_dim)
    raise ValueError(f"compression kind must be one of {COMPRESSION_KINDS}, got {kind!r}")


def compression_blocks(x: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """The complete blocks of one sequence: x [B, T, H, D] -> [B, TC, H, l, D]; block i is x[:, i*d : i*d+l]."""
    B, T, H, D = x.shape
    l, d = config.compress_block, config.compress_stride
    if T < l:  # no complete block (spec section 3)
        return x[:, :0, :, None, :].expand(B, 0, H, l, D)  # still part of x's graph: gradient 0, not None
    return x.unfold(1, l, d).transpose(-1, -2)  # [B, TC, H, D, l] -> [B, TC, H, l, D]


def compress(
    x: torch.Tensor, phi: nn.Module, config: NSAConfig, *, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Compressed keys or values (Eq. 7): x [B, T, H, D] -> [B, TC, H, D'] with TC = floor((T - l) / d) + 1.

    ``phi`` maps [..., l, D] to [..., D'] (a ``Compression`` module or any callable module). With
    ``cu_seqlens`` (B = 1) every sequence is compressed on its own and the results are packed in order: the
    blocks are gathered from their first tokens (``varlen.compressed_block_starts``, a data-dependent count).
    """
    config = check_config(config)
    check_tensor("x", x, 4, "[B, T, H, D]")
    if isinstance(phi, Compression) and (phi.block, phi.stride) != (config.compress_block, config.compress_stride):
        raise ValueError(
            f"phi was built for block={phi.block}, stride={phi.stride} but config has "
            f"compress_block={config.compress_block}, compress_stride={config.compress_stride}; they must match"
        )
    if cu_seqlens is None:
        return phi(compression_blocks(x, config))  # Eq. 7: [B, TC, H, D']
    check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
    starts = compressed_block_starts(x, cu_seqlens, config)  # [TC], TC = sum_i TC_i
    tokens = starts[:, None] + torch.arange(config.compress_block, device=x.device)  # [TC, l]
    return phi(x[:, tokens].transpose(2, 3))  # x[:, tokens]: [1, TC, l, H, D] -> phi of [1, TC, H, l, D]


def mean_pool(x: torch.Tensor, config: NSAConfig, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean-pooled compression (``phi = mean``): x [B, T, H, D] -> [B, TC, H, D]."""
    config = check_config(config)
    check_tensor("x", x, 4, "[B, T, H, D]")
    phi = MeanCompression(config.compress_block, config.compress_stride, x.shape[-1])
    return compress(x, phi, config, cu_seqlens=cu_seqlens)
