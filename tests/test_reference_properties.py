"""Properties of the reference that the spec states outright (sections 3-8), checked on random problems.

Causality of the whole core (selection included), the limits where a branch becomes full causal
attention, the structure of the block indices, the overlap weights, packed batches, finite gradients,
the precision of the lower-dtype runs and the paper's Table 4.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from naive import mean_compress

import reference as R
from reference.testing import NSAProblem, NSATensors, nsa_problems

F64 = torch.float64
PROBLEMS = nsa_problems(dtypes=(F64,), max_seq_len=32, varlen=False)
BRANCH_INPUTS = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")


def core_inputs(x: NSATensors) -> list[torch.Tensor]:
    return [getattr(x, name) for name in BRANCH_INPUTS]


def full_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full causal attention from torch's own SDPA (an oracle independent of ours), [B, T, H, D] layout."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return o.transpose(1, 2)


def with_config(p: NSAProblem, **changes: int) -> NSAProblem:
    return dataclasses.replace(p, config=dataclasses.replace(p.config, **changes))


def extend(x: NSATensors, p: NSAProblem, keep: int, new_len: int, seed: int) -> NSATensors:
    """The first ``keep`` tokens of ``x`` (and the compressed blocks they complete), then fresh random tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in BRANCH_INPUTS:
        old = getattr(x, name).detach()
        compressed = name in ("k_cmp", "v_cmp")
        kept = p.config.num_compressed(keep) if compressed else keep
        total = p.config.num_compressed(new_len) if compressed else new_len
        fresh = torch.randn((old.shape[0], total - kept, *old.shape[2:]), generator=gen, dtype=old.dtype)
        fresh = torch.sigmoid(fresh) if name == "gates" else fresh
        out[name] = torch.cat([old[:, :kept], fresh], dim=1).requires_grad_()
    return NSATensors(**out, cu_seqlens=None)


@example(p=NSAProblem(1, 70, 1, 2, 3, 2, R.NSAConfig(8, 4, 16, 3, 1, 1, 8), F64, 0), keep=66, extra=-4)
@given(p=PROBLEMS, keep=st.integers(1, 40), extra=st.integers(-10, 10))
def test_causality_of_the_whole_core(p: NSAProblem, keep: int, extra: int) -> None:
    """Replacing every token after ``keep`` (and changing T) leaves outputs and gradients before ``keep`` alone.

    The example is the bug of spec section 9: a query in the last, incomplete selection block (tokens 64..69)
    must keep its forced current block whatever the sequence length.
    """
    keep = min(keep, p.seq_len)
    new_len = max(keep, p.seq_len + extra)
    x = p.tensors(requires_grad=True)
    y = extend(x, p, keep, new_len, p.seed + 1)
    r = torch.randn(
        (p.batch, keep, p.q_heads, p.head_dim_v), generator=torch.Generator().manual_seed(p.seed), dtype=F64
    )
    out_x = R.nsa_attention(*core_inputs(x), p.config, return_aux=True)
    out_y = R.nsa_attention(*core_inputs(y), p.config, return_aux=True)
    assert torch.equal(out_x.block_idx[:, :keep], out_y.block_idx[:, :keep])
    torch.testing.assert_close(out_x.o[:, :keep], out_y.o[:, :keep], rtol=1e-12, atol=1e-12)
    gx = torch.autograd.grad(out_x.o[:, :keep], core_inputs(x), r, allow_unused=True)
    gy = torch.autograd.grad(out_y.o[:, :keep], core_inputs(y), r, allow_unused=True)
    for name, dx, dy in zip(BRANCH_INPUTS, gx, gy):
        n = p.config.num_compressed(keep) if name in ("k_cmp", "v_cmp") else keep
        dx = torch.zeros_like(getattr(x, name)) if dx is None else dx
        dy = torch.zeros_like(getattr(y, name)) if dy is None else dy
        torch.testing.assert_close(dx[:, :n], dy[:, :n], rtol=1e-12, atol=1e-12, msg=name)
        assert bool((dx[:, n:] == 0).all()) and bool((dy[:, n:] == 0).all()), f"{name}: gradient after {keep}"


@given(PROBLEMS, st.integers(0, 5))
def test_window_covering_the_sequence_is_full_causal_attention(p: NSAProblem, extra: int) -> None:
    x = p.tensors()
    config = dataclasses.replace(p.config, window=p.seq_len + extra)
    o = R.sliding_window_attention(x.q, x.k_win, x.v_win, config)
    torch.testing.assert_close(o, full_causal(x.q, x.k_win, x.v_win), rtol=1e-10, atol=1e-12)


@given(PROBLEMS)
def test_selecting_every_candidate_is_full_causal_attention(p: NSAProblem) -> None:
    n = max(p.config.num_forced, p.config.num_select_blocks(p.seq_len))
    config = dataclasses.replace(p.config, num_selected=n)
    x = p.tensors()
    _, lse = R.compressed_attention(x.q, x.k_cmp, x.v_cmp, config)
    block_idx = R.select_blocks(x.q, x.k_cmp, lse, config)
    t = torch.arange(p.seq_len)
    expected = torch.arange(n)[None, :].expand(p.seq_len, n)
    expected = torch.where(expected <= (t // config.select_block)[:, None], expected, -1)
    assert torch.equal(block_idx, expected[None, :, None, :].expand_as(block_idx).int())
    o = R.selected_attention(x.q, x.k_slc, x.v_slc, block_idx, config)
    torch.testing.assert_close(o, full_causal(x.q, x.k_slc, x.v_slc), rtol=1e-10, atol=1e-12)


@given(PROBLEMS)
def test_compressed_branch_with_unit_blocks_and_mean_is_full_causal_attention(p: NSAProblem) -> None:
    """l = d = 1 with mean pooling: every token is its own block, k_cmp = k, so the branch is causal attention."""
    p = with_config(p, compress_block=1, compress_stride=1)
    x = p.tensors()
    k_cmp, v_cmp = mean_compress(x.k_slc, p.config), mean_compress(x.v_slc, p.config)
    assert torch.equal(k_cmp, x.k_slc) and torch.equal(v_cmp, x.v_slc)
    o, lse = R.compressed_attention(x.q, k_cmp, v_cmp, p.config)
    torch.testing.assert_close(o, full_causal(x.q, x.k_slc, x.v_slc), rtol=1e-10, atol=1e-12)
    G = p.group
    scores = torch.einsum("bthd,bshd->bhts", x.q, x.k_slc.repeat_interleave(G, dim=2)) * p.head_dim_qk**-0.5
    causal = torch.ones(p.seq_len, p.seq_len, dtype=torch.bool).tril()
    expected_lse = scores.masked_fill(~causal, -torch.inf).logsumexp(-1).transpose(1, 2)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-12)


@given(nsa_problems(dtypes=(F64,), max_seq_len=32, varlen=True))
def test_block_indices_structure(p: NSAProblem) -> None:
    """Forced blocks in; only candidates; ascending; -1 padded; min(n, candidates) blocks; int32; group-shared."""
    x = p.tensors()
    cu = x.cu_seqlens
    _, lse = R.compressed_attention(x.q, x.k_cmp, x.v_cmp, p.config, cu_seqlens=cu)
    idx = R.select_blocks(x.q, x.k_cmp, lse, p.config, cu_seqlens=cu)
    assert idx.dtype == torch.int32 and idx.shape == (p.batch, p.seq_len, p.kv_heads, p.config.num_selected)
    bounds = [(0, p.seq_len)] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    for t0, t1 in bounds:
        for t in range(t1 - t0):  # t counts from the sequence's own first token
            current = t // p.config.select_block
            forced = {j for j in range(p.config.num_initial) if j <= current}
            forced |= {j for j in range(current - p.config.num_local + 1, current + 1) if j >= 0}
            count = min(p.config.num_selected, current + 1)
            for row in idx[:, t0 + t].reshape(-1, p.config.num_selected).tolist():
                chosen = row[:count]
                assert chosen == sorted(set(chosen)) and 0 <= chosen[0] and chosen[-1] <= current, row
                assert row[count:] == [-1] * (len(row) - count), row
                assert forced <= set(chosen), (row, forced)
    # one selection per kv head: permuting the query heads inside each group changes nothing
    perm = torch.arange(p.q_heads).view(p.kv_heads, p.group).flip(-1).flatten()
    _, lse_p = R.compressed_attention(x.q[:, :, perm], x.k_cmp, x.v_cmp, p.config, cu_seqlens=cu)
    assert torch.equal(R.select_blocks(x.q[:, :, perm], x.k_cmp, lse_p, p.config, cu_seqlens=cu), idx)


def test_overlap_weights_default_sizes() -> None:
    """l=32, d=16, l'=64: selection block j sums compressed blocks 4j-1 .. 4j+3 with weights 1, 2, 2, 2, 1."""
    w = R.overlap_weights(20, 6, R.NSAConfig())
    assert w.shape == (20, 6)
    for j in range(1, 5):
        expected = torch.zeros(20)
        expected[4 * j - 1 : 4 * j + 4] = torch.tensor([1.0, 2, 2, 2, 1])
        assert torch.equal(w[:, j], expected), (j, w[:, j])
    assert torch.equal(w[:4, 0], torch.tensor([2.0, 2, 2, 1])) and bool((w[4:, 0] == 0).all())
    assert bool((w[:19].sum(dim=1) == 2).all())  # each block's l/d strides land somewhere (block 19 ends past j=5)


@given(PROBLEMS)
def test_selection_scores_equal_group_summed_p_cmp_when_blocks_coincide(p: NSAProblem) -> None:
    """l = l' = d: compressed and selection blocks are the same blocks, so p_slc = p_cmp (summed over the group)."""
    b = p.config.compress_stride
    p = with_config(p, compress_block=b, select_block=b)
    x = p.tensors()
    _, lse = R.compressed_attention(x.q, x.k_cmp, x.v_cmp, p.config)
    scores = R.selection_scores(x.q, x.k_cmp, lse, p.config)
    s = torch.einsum("bthd,bshd->bths", x.q, x.k_cmp.repeat_interleave(p.group, dim=2)) * p.head_dim_qk**-0.5
    t, i = torch.arange(p.seq_len), torch.arange(x.k_cmp.shape[1])
    visible = (i[None, :] + 1) * b - 1 <= t[:, None]
    p_cmp = torch.softmax(s.masked_fill(~visible[None, :, None, :], -torch.inf), dim=-1).nan_to_num(0.0)
    group_sum = p_cmp.view(p.batch, p.seq_len, p.kv_heads, p.group, -1).sum(dim=3)
    TC = x.k_cmp.shape[1]
    torch.testing.assert_close(scores[..., :TC], group_sum, rtol=1e-10, atol=1e-12)
    assert bool((scores[..., TC:] == 0).all())  # the last, incomplete block has no compressed summary yet


def every_function(x: NSATensors, config: R.NSAConfig, cu: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The output of each public function (of the compressed attention: o and lse side by side)."""
    kw = {"cu_seqlens": cu} if cu is not None else {}
    o_cmp, lse = R.compressed_attention(x.q, x.k_cmp, x.v_cmp, config, **kw)
    idx = R.select_blocks(x.q, x.k_cmp, lse, config, **kw)
    return {
        "compressed_attention": torch.cat([o_cmp, lse[..., None]], dim=-1),
        "selection_scores": R.selection_scores(x.q, x.k_cmp, lse, config, **kw),
        "select_blocks": idx,
        "selected_attention": R.selected_attention(x.q, x.k_slc, x.v_slc, idx, config, **kw),
        "sliding_window_attention": R.sliding_window_attention(x.q, x.k_win, x.v_win, config, **kw),
        "nsa_attention": R.nsa_attention(*core_inputs(x), config, **kw),
    }


@given(p=nsa_problems(dtypes=(F64,), max_seq_len=32, varlen=True).filter(lambda p: p.seqlens is not None))
def test_packed_batch_equals_separate_calls(p: NSAProblem) -> None:
    """Every function: a packed batch (cu_seqlens) gives exactly what separate calls per sequence give."""
    x = p.tensors()
    cu = x.cu_seqlens
    packed = every_function(x, p.config, cu)
    c = 0
    for t0, t1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
        nc = p.config.num_compressed(t1 - t0)
        parts = {
            name: getattr(x, name)[:, c : c + nc] if "cmp" in name else getattr(x, name)[:, t0:t1]
            for name in BRANCH_INPUTS
        }
        alone = every_function(NSATensors(**parts, cu_seqlens=None), p.config, None)
        for fn, out in alone.items():
            width = out.shape[-1]  # selection_scores: packed is as wide as the longest sequence, zeros beyond
            torch.testing.assert_close(packed[fn][:, t0:t1, ..., :width], out, rtol=0, atol=0, msg=fn)
            assert bool((packed[fn][:, t0:t1, ..., width:] == 0).all()), fn
        c += nc
    assert c == x.k_cmp.shape[1]


@given(PROBLEMS, st.sampled_from([torch.float32, F64]))
def test_gradients_finite_everywhere(p: NSAProblem, dtype: torch.dtype) -> None:
    """Even for queries that see no compressed block (o_cmp = 0, lse = -inf), where dq of the branch is 0."""
    p = dataclasses.replace(p, dtype=dtype)
    x = p.tensors(requires_grad=True)
    out = R.nsa_attention(*core_inputs(x), p.config, return_aux=True)
    gs = torch.autograd.grad(out.o.sum() + out.lse_cmp.exp().sum(), core_inputs(x), allow_unused=True)
    for name, g in zip(BRANCH_INPUTS, gs):
        assert g is None or bool(torch.isfinite(g).all()), name
    unseen = torch.arange(p.seq_len) < p.config.compress_block - 1
    o_cmp, lse = R.compressed_attention(x.q, x.k_cmp, x.v_cmp, p.config)
    assert bool((lse[:, unseen] == -torch.inf).all()) and bool((o_cmp[:, unseen] == 0).all())
    (dq,) = torch.autograd.grad(o_cmp.sum() + lse.exp().sum(), [x.q])
    assert bool((dq[:, unseen] == 0).all()) and bool(torch.isfinite(dq).all())


@given(PROBLEMS, st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_lower_precision_runs_stay_close_to_fp64(p: NSAProblem, dtype: torch.dtype) -> None:
    """Each branch in fp32 / bf16 / fp16 (fp32 accumulation) stays within a few epsilons of the fp64 run.

    Same rounded inputs and the same (fp64) block selection, so only the arithmetic differs.
    """
    p = dataclasses.replace(p, dtype=dtype)
    x, x64 = p.tensors(), p.tensors(dtype=F64)
    _, lse64 = R.compressed_attention(x64.q, x64.k_cmp, x64.v_cmp, p.config)
    idx = R.select_blocks(x64.q, x64.k_cmp, lse64, p.config)
    for branch in ("compressed", "selected", "window"):
        o, o64 = (branch_output(branch, y, idx, p.config) for y in (x, x64))
        assert o.dtype == dtype
        bound = EPS_FACTOR * torch.finfo(dtype).eps * max(1.0, float(o64.abs().max()))
        assert float((o.double() - o64).abs().max()) <= bound, branch


EPS_FACTOR = 8.0


def branch_output(branch: str, x: NSATensors, block_idx: torch.Tensor, config: R.NSAConfig) -> torch.Tensor:
    if branch == "compressed":
        return R.compressed_attention(x.q, x.k_cmp, x.v_cmp, config)[0]
    if branch == "selected":
        return R.selected_attention(x.q, x.k_slc, x.v_slc, block_idx, config)
    return R.sliding_window_attention(x.q, x.k_win, x.v_win, config)


TABLE_4 = [(8192, 2048), (16384, 2560), (32768, 3584), (65536, 5632)]


@pytest.mark.parametrize(("context", "nsa_tokens"), TABLE_4)
def test_decode_tokens_read_reproduces_table_4(context: int, nsa_tokens: int) -> None:
    """Spec section 8: the paper's expected tokens per decode step, within 1 token."""
    assert abs(R.decode_tokens_read(context, R.NSAConfig()) - nsa_tokens) <= 1


def test_decode_tokens_read_short_contexts() -> None:
    """Below a block everything is read once per branch: 0 compressed + s selected + s window tokens."""
    config = R.NSAConfig()
    assert R.decode_tokens_read(1, config) == 2
    assert R.decode_tokens_read(32, config) == 1 + 32 + 32
    assert R.decode_tokens_read(600, config) == 36 + 600 + 512
