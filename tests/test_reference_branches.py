"""Each reference branch and the full core against the independent naive loops of ``tests/naive.py``, in fp64.

Forward outputs and the gradients of q, every k and v and the gates; shapes from T = 1 (shorter than any
block) up, GQA groups 1..8, DK != DV, odd head dims, random valid configs and the paper's default blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import example, given
from naive import compressed, nsa, select, selected, selection_scores, window

import reference as R
from reference.testing import NSAProblem, assert_valid_selection, nsa_problems

F64 = torch.float64
PROBLEMS = nsa_problems(dtypes=(F64,), max_seq_len=28, varlen=False)  # HARD holds the longer cases


def cfg(l: int, d: int, ls: int, n: int, w: int, n_init: int = 1, n_local: int = 2) -> R.NSAConfig:
    return R.NSAConfig(l, d, ls, n, n_init, n_local, w)


def problem(T: int, config: R.NSAConfig, H: int = 1, G: int = 2, DK: int = 3, DV: int = 5, B: int = 1) -> NSAProblem:
    return NSAProblem(B, T, H, G, DK, DV, config, F64, seed=T)


HARD = [
    problem(1, cfg(4, 2, 8, 3, 4)),  # T = 1: no compressed block, one selection candidate
    problem(3, cfg(4, 2, 8, 3, 2), H=8, G=1, DK=1),  # T < l, window < T
    problem(4, cfg(4, 2, 8, 3, 9), H=1, G=8, DV=1),  # T == l: exactly one compressed block
    problem(9, cfg(4, 2, 8, 3, 3)),  # T == l' + 1: a second selection block of one token
    problem(13, cfg(6, 3, 9, 4, 5, 0, 0), B=2),  # T not a multiple of any block, no forced blocks
    problem(23, cfg(2, 2, 2, 3, 4, 1, 1), H=2, G=3),  # l = l' = d, more candidates than slots
    problem(200, cfg(32, 16, 64, 3, 40, 1, 1), H=1, G=1, DK=4, DV=3),  # the paper's block sizes, 4 blocks
]


def examples(test: Callable[[NSAProblem], None]) -> Callable[[NSAProblem], None]:
    """Pin the HARD problems as hypothesis examples."""
    for p in HARD:
        test = example(p)(test)
    return test


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Gradients of ``sum(out * r)`` for a fixed random ``r`` (zeros for unused inputs)."""
    if not out.requires_grad:  # nothing visible anywhere (e.g. T < l): constant output
        return [torch.zeros_like(x) for x in inputs]
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    gs = torch.autograd.grad(out, inputs, r, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor], names: list[str]) -> None:
    for a, e, name in zip(actual, expected, names):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")


@examples
@given(PROBLEMS)
def test_compressed_attention_matches_naive(p: NSAProblem) -> None:
    x = p.tensors(requires_grad=True)
    o, lse = R.compressed_attention(x.q, x.k_cmp, x.v_cmp, p.config)
    o_n, lse_n = compressed(x.q, x.k_cmp, x.v_cmp, p.config)
    assert o.dtype == F64 and lse.shape == (p.batch, p.seq_len, p.q_heads)
    assert_same([o, lse], [o_n, lse_n], ["o", "lse"])
    unseen = torch.arange(p.seq_len) < p.config.compress_block - 1  # queries before the first block ends
    assert bool((o[:, unseen] == 0).all()) and bool((lse[:, unseen] == -math.inf).all())
    inputs = [x.q, x.k_cmp, x.v_cmp]
    assert_same(grads(o, inputs, p.seed), grads(o_n, inputs, p.seed), ["dq", "dk_cmp", "dv_cmp"])


@examples
@given(PROBLEMS)
def test_selection_scores_and_blocks_match_naive(p: NSAProblem) -> None:
    x = p.tensors()
    _, lse = R.compressed_attention(x.q, x.k_cmp, x.v_cmp, p.config)
    scores = R.selection_scores(x.q, x.k_cmp, lse, p.config)
    scores_n = selection_scores(x.q, x.k_cmp, p.config)
    assert_same([scores], [scores_n], ["selection scores"])
    block_idx = R.select_blocks(x.q, x.k_cmp, lse, p.config)
    assert block_idx.dtype == torch.int32
    assert_valid_selection(block_idx, scores_n, select(scores_n, p.config), 1e-12, p.config)


@examples
@given(PROBLEMS)
def test_selected_attention_matches_naive(p: NSAProblem) -> None:
    x = p.tensors(requires_grad=True)
    _, lse = R.compressed_attention(x.q, x.k_cmp, x.v_cmp, p.config)
    block_idx = R.select_blocks(x.q, x.k_cmp, lse, p.config)
    block_idx = block_idx.flip(-1)  # any order, -1 anywhere: the function must not care
    o = R.selected_attention(x.q, x.k_slc, x.v_slc, block_idx, p.config)
    o_n = selected(x.q, x.k_slc, x.v_slc, block_idx, p.config)
    assert_same([o], [o_n], ["o"])
    inputs = [x.q, x.k_slc, x.v_slc]
    assert_same(grads(o, inputs, p.seed), grads(o_n, inputs, p.seed), ["dq", "dk_slc", "dv_slc"])


@examples
@given(PROBLEMS)
def test_sliding_window_matches_naive(p: NSAProblem) -> None:
    x = p.tensors(requires_grad=True)
    o = R.sliding_window_attention(x.q, x.k_win, x.v_win, p.config)
    o_n = window(x.q, x.k_win, x.v_win, p.config)
    assert_same([o], [o_n], ["o"])
    inputs = [x.q, x.k_win, x.v_win]
    assert_same(grads(o, inputs, p.seed), grads(o_n, inputs, p.seed), ["dq", "dk_win", "dv_win"])


@examples
@given(PROBLEMS)
def test_nsa_core_matches_naive(p: NSAProblem) -> None:
    x = p.tensors(requires_grad=True)
    inputs = [x.q, x.k_cmp, x.v_cmp, x.k_slc, x.v_slc, x.k_win, x.v_win, x.gates]
    out = R.nsa_attention(*inputs, p.config, return_aux=True)
    o_n, block_idx_n = nsa(*inputs, p.config)
    assert torch.equal(out.block_idx, block_idx_n)
    assert_same([out.o], [o_n], ["o"])
    names = ["dq", "dk_cmp", "dv_cmp", "dk_slc", "dv_slc", "dk_win", "dv_win", "dgates"]
    assert_same(grads(out.o, inputs, p.seed), grads(o_n, inputs, p.seed), names)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_explicit_scale(scale: float) -> None:
    """``scale=`` replaces 1/sqrt(DK) in every branch."""
    p = HARD[4]
    x = p.tensors()
    inputs = [x.q, x.k_cmp, x.v_cmp, x.k_slc, x.v_slc, x.k_win, x.v_win, x.gates]
    o = R.nsa_attention(*inputs, p.config, scale=scale)
    assert_same([o], [nsa(*inputs, p.config, scale=scale)[0]], ["o"])
    assert not torch.allclose(o, R.nsa_attention(*inputs, p.config))
