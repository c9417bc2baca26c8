"""``reference.testing``: the problems it draws, its tolerance rule and that it catches wrong kernels, readably."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference as R
from reference.testing import (
    FLOOR_EPS,
    FLOOR_EPS_ACC,
    FUNCTIONS,
    NSAProblem,
    assert_close_to_reference,
    check_against_reference,
    nsa_problems,
    tolerance,
)

CONFIG = R.NSAConfig(compress_block=4, compress_stride=2, select_block=4, num_selected=3, window=5)
PROBLEM = NSAProblem(batch=2, seq_len=23, kv_heads=2, group=2, head_dim_qk=5, head_dim_v=3, config=CONFIG, seed=7)
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def test_problem_tensors() -> None:
    p = dataclasses.replace(PROBLEM, dtype=torch.bfloat16)
    x = p.tensors()
    assert x.q.shape == (2, 23, 4, 5) and x.gates.shape == (2, 23, 4, 3)
    assert x.k_cmp.shape == (2, CONFIG.num_compressed(23), 2, 5) and x.v_win.shape == (2, 23, 2, 3)
    assert x.q.dtype == torch.bfloat16 and x.cu_seqlens is None
    assert bool(((x.gates > 0) & (x.gates < 1)).all())
    x64 = p.tensors(dtype=torch.float64, requires_grad=True)
    assert torch.equal(x64.q.detach(), x.q.double()) and x64.q.requires_grad  # the same rounded values
    assert torch.equal(p.tensors().k_slc, x.k_slc)  # deterministic
    assert not torch.equal(dataclasses.replace(p, seed=8).tensors().k_slc, x.k_slc)


def test_packed_problem() -> None:
    p = NSAProblem(1, 15, 1, 3, 2, 2, CONFIG, seqlens=(3, 4, 8))
    x = p.tensors()
    assert x.cu_seqlens.tolist() == [0, 3, 7, 15] and x.cu_seqlens.dtype == torch.int32
    assert x.k_cmp.shape[1] == 0 + 1 + 3 == p.num_compressed
    with pytest.raises(ValueError, match="seqlens"):
        NSAProblem(1, 15, 1, 3, 2, 2, CONFIG, seqlens=(3, 4))
    with pytest.raises(ValueError, match="seqlens"):
        NSAProblem(2, 15, 1, 3, 2, 2, CONFIG, seqlens=(7, 8))


@given(nsa_problems(dtypes=LOW_PRECISION, max_seq_len=24))
def test_drawn_problems_are_valid(p: NSAProblem) -> None:
    x = p.tensors()
    assert 1 <= p.q_heads <= 8 and p.q_heads % p.kv_heads == 0 and p.dtype in LOW_PRECISION
    o = R.nsa_attention(
        x.q, x.k_cmp, x.v_cmp, x.k_slc, x.v_slc, x.k_win, x.v_win, x.gates, p.config, cu_seqlens=x.cu_seqlens
    )
    assert o.shape == (p.batch, p.seq_len, p.q_heads, p.head_dim_v) and o.dtype == p.dtype


@given(nsa_problems(dtypes=LOW_PRECISION, max_seq_len=16, max_heads=4), st.sampled_from(FUNCTIONS))
def test_reference_passes_its_own_check(p: NSAProblem, fn: str) -> None:
    check_against_reference(fn, getattr(R, fn), p)


def test_tolerance_rule() -> None:
    e = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    r = (e + torch.tensor([1e-3, 0, -4e-3])).float()
    bound, ref_err, floor = tolerance(e, r, torch.float32)
    assert ref_err == pytest.approx(4e-3, rel=1e-4)
    assert floor == pytest.approx(FLOOR_EPS_ACC * torch.finfo(torch.float32).eps * 2.0)  # float32 accumulation
    assert tolerance(e, r.half(), torch.float16)[2] == pytest.approx(FLOOR_EPS * torch.finfo(torch.float16).eps * 2.0)
    assert bound == pytest.approx(2 * ref_err + floor)
    assert tolerance(e, r, torch.float32, ratio=3.0, floor=0.0)[0] == pytest.approx(3 * ref_err)
    assert tolerance(e, r, torch.float32, mask=torch.tensor([True, True, False]))[1] == pytest.approx(1e-3, rel=1e-4)


def test_assert_close_report() -> None:
    e = torch.linspace(-1, 1, 24, dtype=torch.float64).view(2, 3, 4)
    same = e.float() + 1e-4  # the reference's own error: 1e-4
    assert_close_to_reference(same, e, same)  # the reference itself passes
    assert_close_to_reference(e.float() - 1.9e-4, e, same)  # within 2x
    bad = same.clone()
    bad[1, 2, 3] += 0.1
    with pytest.raises(AssertionError) as info:
        assert_close_to_reference(bad, e, same, name="my_kernel output")
    message = str(info.value)
    assert "my_kernel output" in message and "worst element at index (1, 2, 3)" in message
    assert f"float64 reference {e[1, 2, 3].item():.8g}" in message and "relative" in message and "allowed" in message
    assert "1 of 24 compared elements exceed the bound" in message
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 2, 3] = False
    assert_close_to_reference(bad, e, same, mask=mask)  # masked out
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference(bad[0], e, same)


def test_assert_close_nan_and_infinities() -> None:
    e = torch.tensor([0.0, -math.inf, 1.0], dtype=torch.float64)
    same = e.float()
    nan = torch.tensor([0.0, -math.inf, math.nan])
    with pytest.raises(AssertionError, match=r"NaN at index \(2,\)"):
        assert_close_to_reference(nan, e, nan)  # even where the reference in the same dtype is NaN
    with pytest.raises(AssertionError, match=r"index \(1,\) got -1e\+30 .* -inf .* must match exactly"):
        assert_close_to_reference(torch.tensor([0.0, -1e30, 1.0]), e, same)
    with pytest.raises(AssertionError, match=r"index \(0,\) got inf"):
        assert_close_to_reference(torch.tensor([math.inf, -math.inf, 1.0]), e, same)
    assert_close_to_reference(same, e, same)


def off_by_one_window(q, k, v, config, **kw):
    """The classic mistake of spec section 7: w + 1 keys."""
    return R.sliding_window_attention(q, k, v, dataclasses.replace(config, window=config.window + 1), **kw)


def test_catches_window_off_by_one() -> None:
    with pytest.raises(AssertionError) as info:
        check_against_reference("sliding_window_attention", off_by_one_window, PROBLEM)
    message = str(info.value)
    assert message.startswith("sliding_window_attention output: differs from the float64 reference")
    assert "worst element at index (" in message and "allowed" in message


def test_catches_a_kernel_less_accurate_than_its_dtype_allows() -> None:
    """An fp32 'kernel' that secretly computes in bf16 is off by far more than 2x the fp32 reference's error."""

    def bf16_inside(q, k, v, config, **kw):
        return R.sliding_window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), config, **kw).float()

    with pytest.raises(AssertionError, match=r"the reference's own torch\.float32 error"):
        check_against_reference("sliding_window_attention", bf16_inside, PROBLEM)


def test_catches_lse_without_minus_inf() -> None:
    def finite_lse(q, k_cmp, v_cmp, config, **kw):
        o, lse = R.compressed_attention(q, k_cmp, v_cmp, config, **kw)
        return o, lse.clamp_min(0.0)

    with pytest.raises(
        AssertionError, match=r"compressed_attention lse: at index \(0, 0, 0\) got 0 but the float64 reference is -inf"
    ):
        check_against_reference("compressed_attention", finite_lse, PROBLEM)


def test_catches_unforced_selection() -> None:
    """Forgetting the initial and local blocks (spec section 6) is not a near tie."""

    def no_forced(q, k_cmp, lse, config, **kw):
        return R.select_blocks(q, k_cmp, lse, dataclasses.replace(config, num_initial=0, num_local=0), **kw)

    with pytest.raises(AssertionError, match=r"select_blocks: row \(b, t, h\) = .* not a near tie"):
        check_against_reference("select_blocks", no_forced, PROBLEM)


def test_catches_missing_gradient() -> None:
    def no_key_grad(q, k, v, block_idx, config, **kw):
        return R.selected_attention(q, k.detach(), v, block_idx, config, **kw)

    check_against_reference("selected_attention", no_key_grad, PROBLEM, grads=False)  # the forward is right
    with pytest.raises(AssertionError, match="selected_attention gradient of k_slc: differs"):
        check_against_reference("selected_attention", no_key_grad, PROBLEM)


def test_catches_swapped_gates() -> None:
    def swapped(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, config, **kw):
        return R.nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates.flip(-1), config, **kw)

    with pytest.raises(AssertionError, match="nsa_attention output: differs"):
        check_against_reference("nsa_attention", swapped, PROBLEM)


def test_unknown_function() -> None:
    with pytest.raises(ValueError, match="fn_name must be one of"):
        check_against_reference("flash_attention", R.sliding_window_attention, PROBLEM)
