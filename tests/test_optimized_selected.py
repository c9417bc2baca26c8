"""optimized.selected_attention against the reference on the same block indices: output, dq, dk, dv (spec 7)."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from hypothesis import example, given, settings
from kernel_problems import DEVICE
from sparse_problems import problem, sparse_problems

import optimized.selected
import reference
from optimized.nsa import combine_gates_fwd
from optimized.selected import (
    _kv_operands,
    _meta,
    _packed,
    _row_tiles,
    ascending_blocks,
    forced_forward,
    invert_blocks,
    selected_attention,
    selected_attention_bwd,
    selected_attention_fwd,
)
from reference.config import NSAConfig
from reference.testing import NSAProblem, assert_close_to_reference, check_against_reference

CFG = NSAConfig(8, 4, 8, 3, 1, 1, window=16)


@settings(max_examples=10)
@given(sparse_problems())
@example(problem(1, 1, 1, 16, 24, CFG, torch.float32))  # T = 1: one key
@example(problem(37, 2, 3, 48, 24, NSAConfig(4, 2, 8, 4, 1, 2), torch.float16))  # G = 3, last block partial
@example(problem(50, 1, 8, 64, 16, CFG, torch.float32, seqlens=(3, 30, 17)))  # packed: per-sequence block numbers
@pytest.mark.parametrize("forward", ["tiles", "blocks"])
def test_selected_matches_reference(forward: str, p: NSAProblem) -> None:
    """Both forwards at every group size: query tiles over the union of their blocks, and block-major (each block
    against the queries that selected it, then a merge), which the small groups run by default."""
    with forced_forward(forward):
        check_against_reference("selected_attention", selected_attention, p, device=DEVICE)


def _random_block_idx(B: int, T: int, H: int, S: int, block: int, seed: int) -> torch.Tensor:
    """Any order, -1 anywhere, no duplicates: the API takes any valid selection, not only sorted ones."""
    gen = torch.Generator().manual_seed(seed)
    NS = -(-T // block)
    keys = torch.rand(B, T, H, NS, generator=gen)
    later = torch.arange(NS)[None, :] > (torch.arange(T) // block)[:, None]  # [T, NS] blocks after t
    keys = torch.where(later[None, :, None, :], 2.0, keys)
    order = torch.argsort(keys, dim=-1)[..., :S]
    chosen = torch.gather(keys, -1, order) < 1.8  # drop a few candidates too
    idx = torch.nn.functional.pad(torch.where(chosen, order, -1), (0, max(0, S - NS)), value=-1)
    shuffle = torch.argsort(torch.rand(idx.shape, generator=gen), dim=-1)  # the -1 among the blocks
    return torch.gather(idx, -1, shuffle).to(torch.int32)


@pytest.mark.parametrize(("dtype", "G"), [(torch.float32, 2), (torch.float16, 2), (torch.float32, 16)])
def test_selected_any_index_order(dtype: torch.dtype, G: int) -> None:
    """The public function takes the blocks in any order (G = 16: a tile is one position, whose row the kernels
    walk as it is once ``ascending_blocks`` has put it in the selection's form)."""
    B, T, H, DK, DV = 2, 45, 2, 24, 32
    p = problem(T, H, G, DK, DV, CFG, dtype, batch=B, seed=3)
    idx = _random_block_idx(B, T, H, 4, CFG.select_block, seed=4).to(DEVICE)
    x64, xdt, xo = (p.tensors(DEVICE, dt, requires_grad=True) for dt in (torch.float64, None, None))
    do = torch.randn(B, T, H * G, DV, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    outs = []
    for fn, x in ((reference.selected_attention, x64), (reference.selected_attention, xdt), (selected_attention, xo)):
        o = fn(x.q, x.k_slc, x.v_slc, idx, CFG)
        outs.append((o, *torch.autograd.grad(o, (x.q, x.k_slc, x.v_slc), do.to(o.dtype))))
    for name, a, s, e in zip(("o", "dq", "dk", "dv"), *outs[::-1]):  # kernel, same dtype, float64
        assert_close_to_reference(a, e, s, name=name)


@pytest.mark.parametrize(("G", "seqlens"), [(16, None), (3, (5, 29, 11))])
def test_selected_larger_row_tiles_compute_the_same(G: int, seqlens: tuple[int, ...] | None) -> None:
    """More rows per program (neighbouring positions share each block's load) changes only which rows a
    program masks: o, lse and dq equal the default tiles'; dk / dv do not depend on the tiles."""
    T, H, D = 45, 2, 16
    p = problem(T, H, G, D, D, CFG, torch.float32, seqlens=seqlens)
    x = p.tensors(DEVICE)
    cu = None if seqlens is None else x.cu_seqlens
    B = x.q.shape[0]
    if cu is None:
        idx = _random_block_idx(B, T, H, CFG.num_selected, CFG.select_block, seed=1)
    else:
        parts = [_random_block_idx(1, n, H, CFG.num_selected, CFG.select_block, seed=n) for n in seqlens]
        idx = torch.cat(parts, dim=1)
    idx = ascending_blocks(idx).to(DEVICE)
    do = torch.randn((*x.q.shape[:3], D), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    args = (x.q, x.k_slc, x.v_slc)
    results = []
    for rows in (16, 32, 64):
        o, lse = selected_attention_fwd(*args, idx, CFG, D**-0.5, cu, rows=rows)
        dq, dk, dv = selected_attention_bwd(*args, o, lse, do, idx, CFG, D**-0.5, cu, rows=rows)
        results.append((o, lse, dq, dk, dv))
    for other in results[1:]:
        for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), results[0], other):
            assert not a.isnan().any(), name
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="rows must be a power of two"):
        selected_attention_fwd(*args, idx, CFG, D**-0.5, cu, rows=24)


def _tma_and_pointer_loads_agree(T: int, H: int, G: int, D: int, config: NSAConfig, dtype: torch.dtype) -> None:
    p = problem(T, H, G, D, D, config, dtype)
    x = p.tensors(DEVICE)
    idx = ascending_blocks(_random_block_idx(1, T, H, config.num_selected, config.select_block, seed=1)).to(DEVICE)
    do = torch.randn((*x.q.shape[:3], D), generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)

    def off_alignment(t: torch.Tensor) -> torch.Tensor:  # same values, data pointer one element off 16 bytes
        return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)

    results, paths = [], []
    for k, v in ((x.k_slc, x.v_slc), (off_alignment(x.k_slc), off_alignment(x.v_slc))):
        k2, v2 = _packed(k, v)
        paths.append(_kv_operands(k2, v2, _meta(x.q, k, v, config.select_block))[2])
        o, lse = selected_attention_fwd(x.q, k, v, idx, config, D**-0.5, None)
        dq, dk, dv = selected_attention_bwd(x.q, k, v, o, lse, do, idx, config, D**-0.5, None)
        results.append((o, lse, dq, dk, dv))
    assert paths == [True, False]
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *results):
        assert not a.isnan().any(), name
        atol = 1e-6 if dtype == torch.float32 else 1e-2  # dk / dv: fp32 atomics in another order
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-6, atol=atol, msg=name)


def test_selected_tma_and_pointer_loads_agree() -> None:
    """The dq kernel reads K/V through TMA descriptors when rows are 16-byte aligned, else through pointers: the
    same inputs stored one element off alignment take the pointer path and give the same results."""
    _tma_and_pointer_loads_agree(45, 2, 3, 16, CFG, torch.float32)


@pytest.mark.gpu
def test_selected_gpu_tma_and_pointer_loads_agree_at_d128() -> None:
    """The pointer path at the benchmark's D = 128 (what cards without TMA run, and an H100 for misaligned rows): on
    an H100 its dq once read shared memory out of bounds here (``tl.trans`` of the loaded K; performance log)."""
    _tma_and_pointer_loads_agree(3000, 2, 16, 128, NSAConfig(), torch.bfloat16)


@pytest.mark.parametrize("forward", ["tiles", "blocks"])
@pytest.mark.parametrize(
    ("T", "G", "D", "seqlens", "dtype"),
    [(45, 3, 20, None, torch.float32), (50, 4, 16, (3, 30, 17), torch.float16), (9, 16, 24, None, torch.float32)],
)
def test_selected_gated_forward_is_the_combine_of_its_output(
    T: int, G: int, D: int, seqlens: tuple[int, ...] | None, dtype: torch.dtype, forward: str
) -> None:
    """The forward with Eq. 5 fused in its epilogue (what the core runs): o_slc and lse as without it, and o the
    combine kernel's sum of the three branch outputs (its o_slc as stored, fp32 sums), up to the rounding of a
    multiply-add that one compiled kernel may fuse and the other not."""
    x = problem(T, 2, G, D, D, CFG, dtype, seqlens=seqlens).tensors(DEVICE)
    idx = ascending_blocks(_random_block_idx(1, T, 2, CFG.num_selected, CFG.select_block, seed=4)).to(DEVICE)
    cu = None if seqlens is None else torch.tensor([0, *itertools.accumulate(seqlens)], device=DEVICE)
    g = torch.Generator().manual_seed(5)
    gates = torch.rand((1, T, 2 * G, 3), generator=g).to(dtype).to(DEVICE)
    o_cmp, o_win = (torch.randn((1, T, 2 * G, D), generator=g).to(dtype).to(DEVICE) for _ in range(2))
    with forced_forward(forward):
        o, lse = selected_attention_fwd(x.q, x.k_slc, x.v_slc, idx, CFG, D**-0.5, cu)
        o_g, lse_g, y = selected_attention_fwd(
            x.q, x.k_slc, x.v_slc, idx, CFG, D**-0.5, cu, gated=(gates, o_cmp, o_win)
        )
    torch.testing.assert_close(o_g, o, rtol=0, atol=0)
    torch.testing.assert_close(lse_g, lse, rtol=0, atol=0)
    assert not y.isnan().any()
    torch.testing.assert_close(y, combine_gates_fwd(gates, o_cmp, o, o_win))  # the dtype's default tolerances


@pytest.mark.parametrize(("G", "rows"), [(16, 16), (16, 32), (3, 16), (4, 64), (32, 16)])
def test_row_tiles_union_is_the_blocks_of_the_tiles_positions(G: int, rows: int) -> None:
    """Each tile's union: exactly the blocks its positions selected, ascending, -1 padded (also BM = G, where a
    tile is one position and the union is its own row)."""
    lengths = [20, 7, 33]
    idx = torch.cat([_random_block_idx(1, n, 2, 3, 4, seed=n)[0] for n in lengths])  # [TT, H, n], any order
    idx = ascending_blocks(idx)  # as the selection writes it
    cu, tile_seq, tile_start, union, union_len, BM = _row_tiles(idx, G, lengths, CFG, rows)
    assert BM == rows and union.dtype == union_len.dtype == torch.int32
    for i in range(tile_seq.numel()):
        end = int(cu[tile_seq[i] + 1]) * G
        positions = range(int(tile_start[i]) // G, (min(int(tile_start[i]) + BM, end) - 1) // G + 1)
        for h in range(idx.shape[1]):
            want = sorted({int(b) for t in positions for b in idx[t, h] if b >= 0})
            n = int(union_len[i, h])
            assert union[i, h, :n].tolist() == want
            assert (union[i, h, n:] == -1).all()


@pytest.mark.parametrize(
    ("T", "G", "rows", "expected"), [(40, 4, 16, True), (20, 4, 16, False), (40, 8, 16, False), (40, 1, 32, False)]
)
def test_block_major_runs_for_small_groups_at_long_sequences(
    T: int, G: int, rows: int, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default dispatch: block-major for G <= BLOCK_MAJOR_MAX_GROUP from BLOCK_MAJOR_MIN_TOKENS tokens on (here
    32), at the default rows; the tiles otherwise."""
    sel = optimized.selected
    launched = []

    class Recorder:
        def __init__(self, kernel: object, name: str) -> None:
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid: object) -> object:
            launched.append(self.name)
            return self.kernel[grid]

    monkeypatch.setattr(sel, "BLOCK_MAJOR_MIN_TOKENS", 32)
    monkeypatch.setattr(sel, "selected_fwd_block_kernel", Recorder(sel.selected_fwd_block_kernel, "blocks"))
    monkeypatch.setattr(sel, "selected_fwd_kernel", Recorder(sel.selected_fwd_kernel, "tiles"))
    x = problem(T, 1, G, 16, 16, CFG, torch.float32).tensors(DEVICE)
    idx = ascending_blocks(_random_block_idx(1, T, 1, CFG.num_selected, CFG.select_block, seed=3)).to(DEVICE)
    selected_attention_fwd(x.q, x.k_slc, x.v_slc, idx, CFG, 16**-0.5, None, rows=rows)
    assert launched == (["blocks"] if expected else ["tiles"])


def test_forced_forward_takes_tiles_or_blocks_and_restores_the_dispatch() -> None:
    default = optimized.selected.BLOCK_MAJOR_MAX_GROUP, optimized.selected.BLOCK_MAJOR_MIN_TOKENS
    with pytest.raises(ValueError, match="method must be 'tiles' or 'blocks'"), forced_forward("rows"):
        pass
    for method in ("tiles", "blocks"):
        with forced_forward(method):
            assert (optimized.selected.BLOCK_MAJOR_MIN_TOKENS == 0) == (method == "blocks")
    assert (optimized.selected.BLOCK_MAJOR_MAX_GROUP, optimized.selected.BLOCK_MAJOR_MIN_TOKENS) == default


def test_invert_blocks_lists_every_selection_once() -> None:
    lengths = [20, 7, 33]
    idx = torch.cat([_random_block_idx(1, n, 2, 3, 4, seed=n)[0] for n in lengths])  # [TT, H, n]
    key, start, end, entry_of, block_start, block_end, NB = invert_blocks(idx.int(), lengths, 4, chunk=5)
    assert NB == sum(-(-n // 4) for n in lengths)
    assert int((end - start).clamp_min(0).max()) <= 5
    seen = []
    first = [0, 20, 27]
    seq_block0 = [0, 5, 7]
    for w in range(key.numel()):
        h, blk = divmod(int(key[w]), NB)
        for e in range(int(start[w]), int(end[w])):
            t, h_e = divmod(int(entry_of[e]) // 3, 2)  # the entry (t H + h) n + j
            s = max(i for i in range(3) if first[i] <= t)
            local = blk - seq_block0[s]
            assert h_e == h and int(idx.flatten()[int(entry_of[e])]) == local
            assert int(block_start[blk]) == first[s] + 4 * local
            assert int(block_end[blk]) == min(first[s] + 4 * local + 4, first[s] + lengths[s])
            seen.append((t, h, local))
    expected = sorted((t, h, int(j)) for t, h, k in (idx >= 0).nonzero().tolist() for j in [idx[t, h, k]])
    assert sorted(seen) == expected


def test_selected_rejects_bad_arguments_like_reference() -> None:
    q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 1, 16), torch.randn(1, 8, 1, 16)
    idx = torch.full((1, 8, 1, 2), -1, dtype=torch.int32)
    bad = idx.clone()
    bad[0, 0, 0, 0] = 1  # block 1 starts after t = 0
    for fn in (reference.selected_attention, selected_attention):
        with pytest.raises(ValueError, match="not causal"):
            fn(q, k, v, bad, CFG)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        selected_attention(q.double(), k.double(), v.double(), idx, CFG)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "p",
    [
        problem(4096, 1, 16, 192, 128, NSAConfig(), torch.bfloat16),
        problem(4096, 4, 1, 128, 128, NSAConfig(), torch.bfloat16),
        problem(2048, 2, 4, 128, 96, NSAConfig(), torch.float16, batch=2),
        problem(4096, 1, 16, 128, 128, NSAConfig(), torch.bfloat16, seqlens=(1000, 3000, 96)),
        problem(1024, 2, 3, 80, 48, NSAConfig(32, 16, 48, 5, 1, 2), torch.float32),
        problem(8192, 1, 16, 128, 128, NSAConfig(), torch.bfloat16),
        problem(2048, 2, 4, 60, 36, NSAConfig(), torch.bfloat16),
        # block-major at 16k: one kv head and D = 64 keep the float64 reference's saved gathers (T H n l' (DK + DV)
        # elements) at T8k's 17 GB; with H = 4 and D = 128 they would need 137 GB
        problem(16384, 1, 4, 64, 64, NSAConfig(), torch.bfloat16),
        problem(16384, 1, 1, 64, 64, NSAConfig(), torch.bfloat16, seqlens=(5000, 11000, 384)),
    ],
    ids=[
        "G16-dk192-bf16",
        "G1-bf16",
        "B2-G4-fp16",
        "varlen-bf16",
        "ls48-fp32",
        "T8k-bf16",
        "dk60-pointers-bf16",
        "G4-16k-block-major-bf16",
        "G1-16k-varlen-block-major-bf16",
    ],
)
def test_selected_gpu_large(p: NSAProblem) -> None:
    check_against_reference("selected_attention", selected_attention, p, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("G", [16, 4, 1])
def test_selected_gpu_timing_report(G: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a pass/fail bound: prints fwd/bwd times and the tensor-core waste of the row tiles (random selections)."""
    B, T, H, D = 1, 16384, 4, 128
    cfg = NSAConfig()
    p = problem(T, H, G, D, D, cfg, torch.bfloat16)
    x = p.tensors("cuda", requires_grad=True)
    idx = _random_block_idx(B, T, H, cfg.num_selected, cfg.select_block, seed=0).cuda()
    _, _, _, _, union_len, BM = _row_tiles(ascending_blocks(idx[0]), G, [T], cfg)
    waste = float(union_len.sum()) * BM / (float((idx >= 0).sum()) * G)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o = selected_attention(x.q, x.k_slc, x.v_slc, idx, cfg)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        o.backward(torch.ones_like(o))
        torch.cuda.synchronize()
        times.append((t1 - t0, time.perf_counter() - t1))
    fwd, bwd = times[-1]
    with capsys.disabled():
        print(
            f"\nselected_attention T={T} HQ={H * G} H={H} D={D}: fwd {1e3 * fwd:.2f} ms, bwd {1e3 * bwd:.2f} ms, ",
            end="",
        )
        print(f"computed / selected block-rows {waste:.2f}")
