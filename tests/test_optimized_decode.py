"""The Triton decode path: every step equals the parallel forward at that position (spec section 8)."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference
from optimized import decode
from optimized.decode import DecodeCache, decode_attention
from reference.compression import mean_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(lengths, H, G, DK, DV, dtype, seed):
    """Raw per-branch K/V, queries and gates for B right-padded sequences of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {
        "q": rnd(B, T, H * G, DK),
        **{f"k_{b}": rnd(B, T, H, DK) for b in ("cmp", "slc", "win")},
        **{f"v_{b}": rnd(B, T, H, DV) for b in ("cmp", "slc", "win")},
        "gates": torch.rand(B, T, H * G, 3, generator=gen, dtype=torch.float64),
    }
    return {name: t.to(dtype).to(torch.float64) for name, t in x.items()}  # values exactly representable


def _expected(x, b, T, config):
    """The parallel forward (reference, float64) of sequence b's first T tokens."""
    s = {name: t[b : b + 1, :T] for name, t in x.items()}
    k_cmp, v_cmp = mean_pool(s["k_cmp"], config), mean_pool(s["v_cmp"], config)
    return reference.nsa_attention(
        s["q"], k_cmp, v_cmp, s["k_slc"], s["v_slc"], s["k_win"], s["v_win"], s["gates"], config, return_aux=True
    )


def _expected_scores(x, b, T, config, lse):
    """The reference's selection scores (Eq. 8-10, float64) [T, H, NS] of sequence b's first T tokens."""
    q, k = x["q"][b : b + 1, :T], mean_pool(x["k_cmp"][b : b + 1, :T], config)
    return reference.selection_scores(q, k, lse, config)[0]


def _workspace_scores(ws, H):
    """The selection scores (Eq. 8-10, float64) [B, H, NT * 16] from what the compressed pass left in the
    workspace ws (the select kernel keeps its sum in registers): p_j = sum_g 2^(r_gu - lse_g) u_gj."""
    m, l = ws["cmp_m"].double().cpu(), ws["cmp_l"].double().cpu()  # [B, HQ, NC] log2 units
    m_max = m.amax(-1, keepdim=True)
    m_max = torch.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = (l * torch.exp2(m - m_max)).sum(-1, keepdim=True)
    lse = torch.where(l_sum > 0, m_max + torch.log2(l_sum.clamp_min(1e-300)), 0.0)  # no key: 0, as the kernel
    u, r = ws["sel"].double().cpu(), ws["sel_ref"].double().cpu()  # [B, HQ, NT * 16], [B, HQ, NT]
    p = torch.exp2(r.repeat_interleave(u.shape[-1] // r.shape[-1], -1) - lse) * u
    return p.view(p.shape[0], H, -1, p.shape[-1]).sum(2)


def _run_decode(x, prompts, steps, config, dtype, max_len, splits=(None, None, 16)):
    """Decode ``steps`` tokens after the prompts: per step o [B, HQ, DV], block_idx [B, H, n] and the
    selection scores [B, H, NT * tile_blocks] rebuilt from the cache's workspace (Eq. 10)."""
    B, _, H, DK = x["k_slc"].shape
    split_tiles, split_blocks, tile_blocks = splits
    cache = DecodeCache(
        B, max_len, H, DK, x["v_slc"].shape[-1], config, dtype=dtype, device=DEVICE,
        split_tiles=split_tiles, split_blocks=split_blocks, tile_blocks=tile_blocks,
    )  # fmt: skip

    def dev(t):
        return t.to(DEVICE, dtype)

    for buf in cache.workspace(x["q"].shape[2]).values():  # entries a step does not write may hold anything
        buf.fill_(float("nan"))
    names = ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win")
    cache.prefill(*(dev(x[n]) for n in names), lengths=prompts)
    outputs, indices, scores = [], [], []
    pos = torch.tensor(prompts)
    for _ in range(steps):
        new = {n: dev(x[n][torch.arange(B), pos][:, None]) for n in (*names, "q", "gates")}  # [B, 1, ...]
        cache.append(*(new[n] for n in names))
        o, idx = decode_attention(new["q"], new["gates"], cache, return_block_idx=True)
        outputs.append(o[:, 0].double().cpu())
        indices.append(idx.cpu())
        scores.append(_workspace_scores(cache.workspace(x["q"].shape[2]), H))
        pos += 1
    return outputs, indices, scores


@settings(max_examples=5)
@given(
    prompts=st.lists(st.integers(1, 70), min_size=1, max_size=2),
    steps=st.integers(1, 4),
    G=st.sampled_from([1, 2, 3, 4]),
    dims=st.sampled_from([(16, 16), (32, 16), (24, 40)]),
    config=st.sampled_from(
        [
            reference.NSAConfig(8, 4, 16, 4, 1, 2, 24),
            reference.NSAConfig(16, 8, 16, 3, 1, 1, 16),
            reference.NSAConfig(4, 4, 8, 6, 2, 1, 40),
        ]
    ),
    splits=st.sampled_from([(None, None, 16), (1, 1, 16), (1, 3, 16), (None, None, 32), (1, 2, 32)]),
    seed=st.integers(0, 2**16),
)
@example(
    prompts=[7, 8, 9], steps=3, G=2, dims=(16, 16), config=reference.NSAConfig(8, 4, 16, 4, 1, 2, 24),
    splits=(None, None, 16), seed=0,
)  # fmt: skip
@example(  # 3 tiles of 256 tokens, one per split; a halo of l/d - 1 = 3 keys; the short sequence's last split is empty
    prompts=[580, 200], steps=2, G=3, dims=(16, 16), config=reference.NSAConfig(16, 4, 16, 4, 1, 1, 24),
    splits=(1, 3, 16), seed=1,
)  # fmt: skip
@example(  # the same with tiles of 32 selection blocks: 2 tiles of 512 tokens
    prompts=[580, 200], steps=2, G=3, dims=(16, 16), config=reference.NSAConfig(16, 4, 16, 4, 1, 1, 24),
    splits=(1, 3, 32), seed=1,
)  # fmt: skip
def test_decode_equals_parallel_forward(prompts, steps, G, dims, config, splits, seed):
    """Ragged batch: each step's output and selection equal the parallel forward's row at that position.

    ``splits`` = (split_tiles, split_blocks, tile_blocks): the cache's defaults, or forced small so that the
    compressed pass (tiles of 16 or 32 selection blocks) and the sparse pass (selected blocks, window) run in
    several splits.
    """
    _check_decode(prompts, steps, G, dims, config, splits, seed)


def test_decode_select_sums_heads_in_groups(monkeypatch):
    """Long score rows make the select kernel sum the heads a few at a time: forced to one at a time here."""
    monkeypatch.setattr(decode, "SELECT_ENTRIES", 16)
    _check_decode([90, 200], 2, 3, (16, 16), reference.NSAConfig(8, 4, 16, 4, 1, 2, 24), (None, None, 16), 2)


@pytest.mark.parametrize("columns, pre_merge_splits", [(16, None), (128, 1), (16, 1)])
def test_decode_combine_variants(monkeypatch, columns, pre_merge_splits):
    """The combine split over the value columns (``COMBINE_COLUMNS`` below BV: DV = 40 in slices of 16, the last
    partly past DV), and the compressed partials merged by the select kernel's spare programs (``PRE_MERGE_SPLITS``
    forced down to the 3 splits of this cache; the short sequence's last split is empty)."""
    monkeypatch.setattr(decode, "COMBINE_COLUMNS", columns)
    monkeypatch.setattr(decode, "PRE_MERGE_SPLITS", pre_merge_splits)
    _check_decode([580, 200], 2, 3, (24, 40), reference.NSAConfig(16, 4, 16, 4, 1, 1, 24), (1, 3, 16), 3)


def _check_decode(prompts, steps, G, dims, config, splits, seed):
    H, (DK, DV), dtype = 2, dims, torch.float32
    lengths = [p + steps for p in prompts]
    x = _problem(lengths, H, G, DK, DV, dtype, seed)
    outputs, indices, scores = _run_decode(x, prompts, steps, config, dtype, max(lengths), splits)
    for b, (p, n) in enumerate(zip(prompts, lengths)):
        ref = _expected(x, b, n, config)
        ref_scores = _expected_scores(x, b, n, config, ref.lse_cmp)  # [T, H, NS]
        for step in range(steps):
            t = p + step
            torch.testing.assert_close(outputs[step][b], ref.o[0, t], atol=2e-4, rtol=2e-4)
            assert torch.equal(indices[step][b].long(), ref.block_idx[0, t].long())
            ns = t // config.select_block + 1  # the candidates; the rest of the row is scratch
            torch.testing.assert_close(scores[step][b, :, :ns], ref_scores[t, :, :ns], atol=1e-6, rtol=1e-5)


def test_split_sizes_fill_the_gpu():
    """Default splits fill the GPU (132 SMs assumed off it) and are fixed per cache (no data-dependent grid)."""
    config = reference.NSAConfig()  # 64k context: 1024 selection blocks, 64 tiles of 16
    one = DecodeCache(1, 65536, 4, 128, config=config, device="meta")
    assert (one.num_tiles, one.split_tiles, one.num_cmp_splits) == (64, 1, 64)  # 4 * 64 programs of 64 keys
    assert (one.split_blocks, one.num_sparse_splits) == (1, 16 + 8)  # 4 * 24 programs
    many = DecodeCache(32, 65536, 4, 128, config=config, device="meta")
    assert (many.split_tiles, many.num_cmp_splits) == (22, 3)  # 128 * 3 programs of 1408 keys: one wave
    assert (many.split_blocks, many.num_sparse_splits) == (8, 2 + 1)  # 128 * 3 programs
    # the pre-merge (and its merged row in the workspace) only where the compressed splits are many
    assert (one.pre_merge, "cmp_o" in one.workspace(64)) == (True, True)
    assert (many.pre_merge, "cmp_o" in many.workspace(64)) == (False, False)
    with pytest.raises(ValueError, match="split_tiles"):
        DecodeCache(1, 64, 1, 16, config=config, device="meta", split_tiles=0)
    wide = DecodeCache(1, 65536, 4, 128, config=config, device="meta", tile_blocks=32)
    assert (wide.num_tiles, wide.split_tiles, wide.num_cmp_splits) == (32, 1, 32)
    for bad in (8, 24):
        with pytest.raises(ValueError, match="tile_blocks must be a power of two >= 16"):
            DecodeCache(1, 64, 1, 16, config=config, device="meta", tile_blocks=bad)


def test_cache_overflow_raises():
    config = reference.NSAConfig(8, 4, 16, 4, 1, 2, 24)
    cache = DecodeCache(1, 4, 1, 16, config=config, dtype=torch.float32, device=DEVICE)
    kv = torch.zeros(1, 4, 1, 16, device=DEVICE)
    cache.prefill(kv, kv, kv, kv, kv, kv, lengths=[4])
    one = kv[:, :1]
    with pytest.raises(ValueError, match="max_len=4"):
        cache.append(one, one, one, one, one, one)


def test_decode_rejects_bad_input():
    config = reference.NSAConfig(8, 4, 16, 4, 1, 2, 24)
    cache = DecodeCache(2, 32, 2, 16, config=config, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="q must be"):
        decode_attention(torch.zeros(2, 2, 4, 16, device=DEVICE), torch.zeros(2, 2, 4, 3, device=DEVICE), cache)
    with pytest.raises(ValueError, match="gates"):
        decode_attention(torch.zeros(2, 1, 4, 16, device=DEVICE), torch.zeros(2, 1, 4, 2, device=DEVICE), cache)
    with pytest.raises(ValueError, match="lengths"):
        cache.prefill(*(torch.zeros(2, 8, 2, 16, device=DEVICE),) * 6, lengths=[3])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_gpu_large(dtype):
    """Paper defaults, ragged prompts of a few thousand tokens, G=16, D=128.

    float32: the selection equals the parallel forward's and the output is within 1e-4. bfloat16: rounding
    may flip near-tied selections, so at least 90% of the selections must agree and the rows that agree
    must be within bf16 rounding of the float64 forward.
    """
    config = reference.NSAConfig()
    prompts, steps, H, G = [1500, 2100, 2600], 24, 2, 16
    lengths = [p + steps for p in prompts]
    x = _problem(lengths, H, G, 128, 128, dtype, seed=1)
    outputs, indices, _ = _run_decode(x, prompts, steps, config, dtype, max(lengths))
    agree, total = 0, 0
    for b, (p, n) in enumerate(zip(prompts, lengths)):
        ref = _expected(x, b, n, config)
        got_o = torch.stack([o[b] for o in outputs])  # [steps, HQ, DV]
        got_i = torch.stack([i[b] for i in indices]).long()  # [steps, H, n]
        same = (got_i == ref.block_idx[0, p : p + steps].long()).all(-1)  # [steps, H]
        agree, total = agree + int(same.sum()), total + same.numel()
        rows = same.repeat_interleave(G, dim=1)  # [steps, HQ]
        err = (got_o - ref.o[0, p : p + steps]).abs().amax(-1)[rows]
        assert err.max().item() < (1e-4 if dtype == torch.float32 else 2e-2), err.max().item()
    assert agree == total if dtype == torch.float32 else agree >= 0.9 * total, (agree, total)


@pytest.mark.gpu
def test_decode_step_captures_in_cuda_graph():
    """A step (append + attention) has no host synchronisation: it captures and replays in a CUDA graph."""
    config = reference.NSAConfig()
    B, H, G, D, prompt = 4, 2, 8, 64, 700
    x = _problem([prompt + 3] * B, H, G, D, D, torch.bfloat16, seed=3)
    names = ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win")

    def dev(t):
        return t.to("cuda", torch.bfloat16)

    def make():
        return DecodeCache(B, prompt + 8, H, D, D, config, dtype=torch.bfloat16, device="cuda")

    eager, graphed = make(), make()
    for cache in (eager, graphed):
        cache.prefill(*(dev(x[n]) for n in names), lengths=[prompt] * B)
    static = {n: dev(x[n][:, prompt : prompt + 1]) for n in (*names, "q", "gates")}
    # warm up (compiles the kernels) on a side stream, then capture one step on the graphed cache
    warm = make()
    warm.prefill(*(dev(x[n]) for n in names), lengths=[prompt] * B)
    warm.append(*(static[n] for n in names))
    decode_attention(static["q"], static["gates"], warm)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.append(*(static[n] for n in names))
        o_graph = decode_attention(static["q"], static["gates"], graphed)
    for step in range(3):
        for n in (*names, "q", "gates"):
            static[n].copy_(dev(x[n][:, prompt + step : prompt + step + 1]))
        graph.replay()
        eager.append(*(static[n] for n in names))
        o_eager = decode_attention(static["q"], static["gates"], eager)
        torch.testing.assert_close(o_graph, o_eager, atol=0, rtol=0)
