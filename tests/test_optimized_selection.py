"""optimized.select_blocks against the reference (spec sections 5-6): same blocks except within rounding of a tie."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_problems import DEVICE
from sparse_problems import problem, sparse_problems

import reference
from benchmarks.run import CONFIGS
from optimized._common import next_power_of_2
from optimized.selection import select_blocks, select_blocks_fwd, select_tiles
from reference.config import NSAConfig
from reference.testing import NSAProblem, check_against_reference

CFG = NSAConfig(8, 4, 8, 3, 1, 1, window=16)
MANY_BLOCKS = NSAConfig(4, 2, 4, 6, 1, 2)  # 20 selection blocks at T = 80: three chunks of 8, spills between them


@settings(max_examples=12)
@given(sparse_problems(max_seq_len=96))
@example(problem(1, 1, 1, 16, 24, CFG, torch.float32))  # T = 1 < l: no compressed block, only forced blocks
@example(problem(80, 1, 2, 16, 32, MANY_BLOCKS, torch.float32))  # scores carried across chunks of 8 blocks
@example(problem(70, 2, 3, 48, 24, NSAConfig(), torch.float16))  # paper config: fewer candidates than n
@example(problem(61, 1, 5, 24, 16, MANY_BLOCKS, torch.float32, seqlens=(9, 40, 12)))  # per-sequence numbering
@example(problem(45, 1, 16, 16, 16, MANY_BLOCKS, torch.float32))  # G = 16: a tile is 2 positions x 16 heads
@example(problem(21, 1, 33, 16, 16, CFG, torch.float32))  # G = 33 padded to 64 rows: one position per tile
@example(problem(150, 1, 16, 16, 16, NSAConfig(16, 4, 16, 4, 1, 1), torch.float32))  # stencil, 1-3 strides spill
def test_selection_matches_reference(p: NSAProblem) -> None:
    check_against_reference("select_blocks", select_blocks, p, device=DEVICE)


MULTI_TILE = problem(300, 1, 1, 16, 16, NSAConfig(2, 1, 16, 4, 1, 1), torch.float32)  # l'/d = 16

# l'/d = 3: a chunk of 4 blocks is 12 compressed blocks in a tile of 16, so each tile passes its chunk's end;
# with 16 rows per program, late tiles see the early chunks whole (where a kernel may skip the visibility mask)
WHOLE_TILES = problem(96, 1, 1, 16, 16, NSAConfig(4, 4, 12, 4, 1, 1), torch.float32)
# G = 16 (8 positions per program, chunks of 16 blocks, a top 16) over 65 selection blocks: every chunk's sorted
# top meets a full list, and n = 16 fills the list, so the merge keeps no empty slot
MANY_CHUNKS = problem(260, 1, 16, 16, 16, NSAConfig(4, 2, 4, 16, 1, 2), torch.float32)
# n = 5: a list of NP = 8 whose 3 lowest slots are never stored
ODD_N = problem(200, 2, 4, 16, 16, NSAConfig(8, 4, 8, 5, 1, 1), torch.float32)


@settings(max_examples=8)
@given(sparse_problems(max_seq_len=96), st.sampled_from([None, 1, 2, 4]), st.sampled_from([None, 16, 32]))
@example(MULTI_TILE, 1, None)  # chunks of NP = 4 blocks
@example(MULTI_TILE, 4, None)  # chunks of 16 blocks = 256 compressed blocks: two tiles of 128 per chunk
@example(MULTI_TILE, 2, 16)  # 16 rows per program
@example(WHOLE_TILES, None, 16)  # tiles every row sees whole, and tiles that pass their chunk
@example(MANY_CHUNKS, None, None)
@example(MANY_CHUNKS, 2, None)  # chunks of 32 blocks: their top 16 meets the list
@example(ODD_N, 2, None)
def test_selection_any_tiling(p: NSAProblem, chunks: int | None, rows: int | None) -> None:
    """Any chunk (``chunks`` times the list's length ``NP``) and row limit (``select_tiles``' overrides) gives the
    reference's blocks."""
    bs = chunks and chunks * next_power_of_2(p.config.num_selected, 2)

    def select(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, config: NSAConfig, **kw) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        return select_blocks_fwd(q, k_cmp, lse, config, scale, kw.get("cu_seqlens"), bs, rows)

    check_against_reference("select_blocks", select, p, device=DEVICE)


def test_select_tiles_rejects_a_chunk_below_the_list() -> None:
    """A chunk must hold at least the list's NP blocks (its sorted top NP meets the list) and be a power of two."""
    assert select_tiles(16, 128, 16, 4, 32)["BS"] == 32
    for bs in (8, 24):
        with pytest.raises(ValueError, match="bs must be a power of two >= 16"):
            select_tiles(16, 128, 16, 4, bs)


def test_benchmark_configs_map_by_stencil() -> None:
    """Every GPU benchmark config's selection takes the stencil map (a chunk is one tile of exactly R compressed
    blocks per selection block): the layout and the costs the kernel's docstring counts. (``tiny``, the CPU smoke
    config, has chunks of 8 compressed blocks under the 16 of a tile.)"""
    for name, cfg in CONFIGS.items():
        if name == "tiny":
            continue
        nsa = cfg.nsa
        R = nsa.select_block // nsa.compress_stride
        tiles = select_tiles(cfg.heads_q // cfg.heads_kv, cfg.dim_k, nsa.num_selected, R)
        assert tiles["BC"] == tiles["BS"] * R, (name, tiles)


def test_multi_tile_example_has_two_tiles_per_chunk() -> None:
    """The pinned case of test_selection_any_tiling covers the map of a chunk spread over compressed tiles."""
    tiles = select_tiles(1, 16, 4, 16, 16)  # MULTI_TILE with chunks of 16 blocks
    assert tiles["BC"] < tiles["BS"] * 16


def test_exact_ties_go_to_the_lower_block() -> None:
    """Blocks that no visible compressed block overlaps score exactly 0: the lowest-indexed ones must win."""
    cfg = NSAConfig(16, 16, 16, 4, 1, 0)  # l = l' = d: block j's only compressed block ends at 16 j + 15
    T, H, G, D = 80, 1, 2, 16
    q = torch.zeros(1, T, H * G, D)  # every visible block gets the same score too: all ties
    k_cmp = torch.randn(1, cfg.num_compressed(T), H, D, generator=torch.Generator().manual_seed(0))
    _, lse = reference.compressed_attention(q, k_cmp, k_cmp, cfg)
    expected = reference.select_blocks(q, k_cmp, lse, cfg)
    assert torch.equal(select_blocks(q.to(DEVICE), k_cmp.to(DEVICE), lse.to(DEVICE), cfg).cpu(), expected)


def test_selection_rejects_bad_arguments_like_reference() -> None:
    q, k_cmp = torch.randn(1, 40, 2, 16), torch.randn(1, 3, 1, 16)
    for fn in (reference.select_blocks, select_blocks):
        with pytest.raises(ValueError, match="lse must be a tensor"):
            fn(q, k_cmp, torch.zeros(1, 40, 3), CFG)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        select_blocks(q.double(), k_cmp[:, :1].double(), torch.zeros(1, 40, 2), NSAConfig(32, 16))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "p",
    [
        problem(8192, 1, 16, 192, 128, NSAConfig(), torch.bfloat16),
        problem(4096, 4, 1, 128, 128, NSAConfig(), torch.bfloat16),
        problem(4096, 1, 16, 128, 128, NSAConfig(), torch.bfloat16, seqlens=(1000, 3000, 96)),
        problem(2048, 2, 3, 80, 48, NSAConfig(32, 16, 48, 5, 1, 2), torch.float32),
        problem(2048, 2, 4, 64, 64, NSAConfig(16, 8, 32, 9, 0, 1), torch.float16, batch=2),
    ],
    ids=["T8k-G16-dk192-bf16", "G1-bf16", "varlen-bf16", "ls48-fp32", "B2-fp16"],
)
def test_selection_gpu_large(p: NSAProblem) -> None:
    check_against_reference("select_blocks", select_blocks, p, device="cuda")
