r"""Block selection: which $n$ blocks of $l'$ tokens each query group reads in full (paper Eq. 8-12).

**Scores from the compressed attention (Eq. 8).** No extra scorer: the selection scores are the
compressed branch's attention probabilities, rebuilt from its log-sum-exp,

$$p^{cmp}_{t,h,i} = \exp\big(\tfrac{q_{t,h}^\top \tilde k_i}{\sqrt{d_k}} - \mathrm{lse}_{t,h}\big)
  \quad\text{for visible } i \text{ (else 0).}$$

**Mapping to selection blocks (Eq. 9).** Compressed block $i$ covers $[i d, i d + l)$, selection block
$j$ covers $[j l', (j+1) l')$; a compressed block lends its score to each selection block in proportion
to their overlap, measured in strides:

$$p^{slc}_{t,h,j} = \sum_i \frac{\big|[i d, i d + l) \cap [j l', (j+1) l')\big|}{d}\; p^{cmp}_{t,h,i}.$$

With $l = 32, d = 16, l' = 64$ this sums $i = 4j - 1, \dots, 4j + 3$ with weights 1, 2, 2, 2, 1.
The paper writes the index as $\frac{l'}{d} j - m - n$, which under its 1-indexed blocks is shifted
by one block; the overlap form is what the geometry means (spec section 5).

**Shared by the GQA group (Eq. 10).** $p^{slc'}_{t,g,j} = \sum_{h \in g} p^{slc}_{t,h,j}$.

**Top-n (Eq. 11-12).** Candidates are the blocks that start at or before $t$ ($j \le \lfloor t / l' \rfloor$).
The first ``num_initial`` blocks and the ``num_local`` blocks ending at the current one are always
selected and count inside $n$; the other slots go to the highest scores, ties to the lower index.
The result is ascending and padded with -1 (spec section 6). Selection is discrete: no gradient.
"""

from __future__ import annotations

import torch

from ._checks import check_compressed_length, check_config, check_cu_seqlens, check_qkv, check_scale
from .config import NSAConfig
from .masks import compressed_visible, forced_blocks, select_candidates
from .softmax import accumulate_dtype, query_chunk
from .varlen import map_sequences


def overlap_weights(num_cmp: int, num_sel: int, config: NSAConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """[TC, NS] float32: how many strides of compressed block ``i`` fall into selection block ``j`` (Eq. 9)."""
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_sel, device=device)[None, :]
    start = torch.maximum(i * config.compress_stride, j * config.select_block)
    end = torch.minimum(i * config.compress_stride + config.compress_block, (j + 1) * config.select_block)
    return (end - start).clamp_min(0).float() / config.compress_stride


def _check_selection_inputs(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    config: object,
    scale: float | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[NSAConfig, float]:
    config = check_config(config)
    B, T, HQ, _, DK, _ = check_qkv(q, k_cmp, k_cmp, "k_cmp", "k_cmp")
    if not isinstance(lse, torch.Tensor) or lse.dim() != 3 or tuple(lse.shape) != (B, T, HQ):
        shape = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be a tensor [B, T, HQ] = {(B, T, HQ)}, got {shape}")
    if not lse.is_floating_point():
        raise TypeError(f"lse must be floating point (float32 from compressed_attention), got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}; they must match")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    check_compressed_length(k_cmp, T, config, cu_seqlens)
    return config, check_scale(scale, DK)


def selection_scores(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group importance of each selection block (Eq. 8-10).

    q [B, T, HQ, DK], k_cmp [B, TC, H, DK], lse [B, T, HQ] from ``compressed_attention``.
    Returns [B, T, H, NS] float32 (float64 for float64 inputs) with NS = ceil(T / l') (with ``cu_seqlens``:
    the longest sequence's NS; blocks past a sequence's end score 0, as do blocks after ``t``).
    """
    config, scale = _check_selection_inputs(q, k_cmp, lse, config, scale, cu_seqlens)
    if cu_seqlens is None:
        return _selection_scores(q, k_cmp, lse, config, scale)
    width = max(config.num_select_blocks(t1 - t0) for t0, t1 in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))

    def one(q_: torch.Tensor, lse_: torch.Tensor, k_: torch.Tensor) -> torch.Tensor:
        scores = _selection_scores(q_, k_, lse_, config, scale)
        return torch.nn.functional.pad(scores, (0, width - scores.shape[-1]))

    return map_sequences(one, cu_seqlens, config, [q, lse], [k_cmp])  # type: ignore[return-value]


def _selection_scores(
    q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, config: NSAConfig, scale: float
) -> torch.Tensor:
    B, T, HQ, DK = q.shape
    TC, H = k_cmp.shape[1], k_cmp.shape[2]
    NS = config.num_select_blocks(T)
    qg = q.detach().view(B, T, H, HQ // H, DK)  # [B, T, H, G, DK]
    acc = accumulate_dtype(q.dtype)
    lse = lse.detach().to(acc).view(B, T, H, HQ // H)
    weights = overlap_weights(TC, NS, config, q.device).to(acc)  # [TC, NS] (Eq. 9)
    t_all = torch.arange(T, device=q.device)
    i = torch.arange(TC, device=q.device)
    parts = []
    chunk = query_chunk(B * HQ * max(TC, NS) * 4 * 3)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = torch.einsum("bthgd,bshd->bthgs", qg[:, t0:t1], k_cmp.detach()).to(acc) * scale  # [B, Tc, H, G, TC]
        visible = compressed_visible(t_all[t0:t1], i, config)[None, :, None, None, :]
        p_cmp = torch.where(visible, torch.exp(s - lse[:, t0:t1, :, :, None]), 0.0)  # Eq. 8
        p_slc = p_cmp @ weights  # [B, Tc, H, G, NS] (Eq. 9)
        parts.append(p_slc.sum(dim=3))  # [B, Tc, H, NS]: sum over the group's heads (Eq. 10)
    return torch.cat(parts, dim=1)


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``num_selected`` blocks each query and kv head reads (Eq. 11-12, spec section 6).

    Returns block_idx [B, T, H, num_selected] int32: ascending, forced blocks included, -1 padded.
    With ``cu_seqlens`` the indices count blocks from each sequence's own first token.
    """
    config, scale = _check_selection_inputs(q, k_cmp, lse, config, scale, cu_seqlens)
    if cu_seqlens is None:
        return _select_blocks(q, k_cmp, lse, config, scale)
    return map_sequences(  # type: ignore[return-value]
        lambda q_, lse_, k_: _select_blocks(q_, k_, lse_, config, scale), cu_seqlens, config, [q, lse], [k_cmp]
    )


@torch.no_grad()
def _select_blocks(
    q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, config: NSAConfig, scale: float
) -> torch.Tensor:
    scores = _selection_scores(q, k_cmp, lse, config, scale)  # [B, T, H, NS]
    return top_n_blocks(scores, torch.arange(q.shape[1], device=q.device), config)


def top_n_blocks(scores: torch.Tensor, t: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Eq. 11 with the forced blocks: scores [..., T, H, NS] of the queries at positions t [T] -> [..., T, H, n].

    int32, ascending, -1 padded; ties go to the lower block index (spec section 6).
    """
    n, NS = config.num_selected, scores.shape[-1]
    j = torch.arange(NS, device=scores.device)
    candidate = select_candidates(t // config.select_block, j)[:, None, :]  # [T, 1, NS]: j <= t // l'
    forced = forced_blocks(t, j, config)[:, None, :]  # [T, 1, NS]: initial and local blocks
    rank = torch.where(forced, float("inf"), scores)
    rank = torch.where(candidate, rank, float("-inf"))
    if NS < n:  # fewer blocks than slots: pad so that the top-n below is defined
        rank = torch.nn.functional.pad(rank, (0, n - NS), value=float("-inf"))
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :n]  # ties: lower index first
    taken = torch.gather(rank, -1, order) > float("-inf")
    idx = torch.where(taken, order, NS + n)  # non-candidates sort to the end ...
    idx = torch.sort(idx, dim=-1).values
    return torch.where(idx < NS + n, idx, -1).to(torch.int32)  # ... and become -1
