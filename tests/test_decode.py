"""Decoding with NSACache (spec section 8): every decode step equals the parallel forward at that position."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import NativeSparseAttention, NSACache, NSAConfig

FEW = settings(max_examples=min(40, settings.default.max_examples))  # each example decodes up to 24 steps


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _layer(config: NSAConfig, seed: int = 0, HQ: int = 4, H: int = 2, **kw: object) -> NativeSparseAttention:
    torch.manual_seed(seed)
    return NativeSparseAttention(12, HQ, H, 6, 4, config, **kw).double()  # type: ignore[arg-type]


def _check_decode(layer: NativeSparseAttention, x: torch.Tensor, prompt: int) -> NSACache:
    """Prefill ``prompt`` tokens, decode the rest one at a time; compare with one parallel forward."""
    with torch.no_grad():
        y, aux = layer(x, return_aux=True)
        cache = NSACache()
        y_prompt = layer(x[:, :prompt], cache=cache)
        assert cache.length == prompt
        steps = [layer(x[:, t : t + 1], cache=cache, return_aux=True) for t in range(prompt, x.shape[1])]
    torch.testing.assert_close(y_prompt, y[:, :prompt], rtol=1e-9, atol=1e-12)
    for t, (y_t, aux_t) in enumerate(steps, start=prompt):
        assert torch.equal(aux_t.block_idx[:, 0], aux.block_idx[:, t]), f"selection differs at t={t}"
        torch.testing.assert_close(y_t[:, 0], y[:, t], rtol=1e-9, atol=1e-12, msg=f"output differs at t={t}")
        for name in ("gates", "o_cmp", "o_slc", "o_win"):
            torch.testing.assert_close(getattr(aux_t, name)[:, 0], getattr(aux, name)[:, t], rtol=1e-9, atol=1e-12)
    return cache


@st.composite
def configs(draw: st.DrawFn) -> NSAConfig:
    d = draw(st.integers(1, 3))
    l = d * draw(st.integers(1, 3))
    ls = l * draw(st.integers(1, 2))
    n_init, n_local = draw(st.integers(0, 1)), draw(st.integers(0, 2))
    n = n_init + n_local + draw(st.integers(0, 2))
    return NSAConfig(l, d, ls, max(n, 1), n_init, n_local, draw(st.integers(1, 8)))


@FEW
@given(
    config=configs(),
    T=st.integers(2, 24),
    prompt=st.integers(1, 23),
    B=st.integers(1, 2),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    compression=st.sampled_from(["mlp", "mean", "linear"]),
    shared_kv=st.booleans(),
    seed=st.integers(0, 999),
)
def test_decode_equals_parallel(
    config: NSAConfig,
    T: int,
    prompt: int,
    B: int,
    heads: tuple[int, int],
    compression: str,
    shared_kv: bool,
    seed: int,
) -> None:
    layer = _layer(config, seed, *heads, compression=compression, shared_kv=shared_kv)
    _check_decode(layer, _randn(B, T, 12, seed=seed), min(prompt, T - 1))


def test_cache_layout_step_by_step() -> None:
    """Blocks complete exactly when (t + 1 - l) % d == 0; the window and the tail stay bounded."""
    config = NSAConfig(compress_block=6, compress_stride=3, select_block=6, num_selected=3, window=5)
    layer = _layer(config)
    x = _randn(2, 30, 12)
    cache = NSACache()
    with torch.no_grad():
        layer(x[:, :2], cache=cache)  # a prompt shorter than l
        for t in range(2, 30):
            layer(x[:, t : t + 1], cache=cache)
            assert cache.length == t + 1
            assert cache.k_slc.shape == (2, t + 1, 2, 6) and cache.v_slc.shape == (2, t + 1, 2, 4)
            assert cache.k_win.shape[1] == min(t + 1, 5)  # the window wraps at w
            assert cache.k_tail.shape[1] == min(t + 1, 5)  # l - 1
            assert cache.k_cmp.shape[1] == cache.v_cmp.shape[1] == config.num_compressed(t + 1)
    _check_decode(layer, x, 2)


@pytest.mark.parametrize("prompt", [1, 5, 6, 7, 9, 12])
def test_prompt_lengths_around_block_boundaries(prompt: int) -> None:
    config = NSAConfig(compress_block=6, compress_stride=3, select_block=6, num_selected=2, num_local=1, window=4)
    _check_decode(_layer(config, prompt), _randn(1, 20, 12, seed=prompt), prompt)


def test_block_completing_at_the_step() -> None:
    config = NSAConfig(compress_block=4, compress_stride=2, select_block=4, num_selected=2, num_local=1, window=3)
    layer, x, cache = _layer(config), _randn(1, 12, 12), NSACache()
    completed = []
    with torch.no_grad():
        layer(x[:, :1], cache=cache)
        for t in range(1, 12):
            _, kv = layer.project(x[:, t : t + 1], offset=cache.length)
            completed.append(cache.append(kv, layer.compress_k, layer.compress_v))
    assert completed == [t + 1 >= 4 and (t + 1 - 4) % 2 == 0 for t in range(1, 12)]


def test_multi_token_calls_and_reset() -> None:
    config = NSAConfig(compress_block=4, compress_stride=2, select_block=8, num_selected=3, num_local=1, window=6)
    layer, x = _layer(config), _randn(2, 21, 12)
    with torch.no_grad():
        y = layer(x)
        cache = NSACache()
        chunks = [layer(x[:, :7], cache=cache), layer(x[:, 7:15], cache=cache), layer(x[:, 15:], cache=cache)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), y, rtol=1e-9, atol=1e-12)
        cache.reset()
        assert cache.is_empty and cache.k_slc is None
        torch.testing.assert_close(layer(x[:, :4], cache=cache), y[:, :4], rtol=1e-9, atol=1e-12)


def test_long_context_with_the_paper_block_sizes() -> None:
    """l=32, d=16, l'=64 with a small window: blocks complete, selection is sparse, the window wraps."""
    config = NSAConfig(num_selected=3, window=40)
    layer, x = _layer(config, HQ=2, H=1), _randn(1, 200, 12)
    cache = _check_decode(layer, x, 150)
    assert cache.k_cmp.shape[1] == config.num_compressed(200) and cache.k_win.shape[1] == 40


def test_cache_errors() -> None:
    config = NSAConfig(compress_block=4, compress_stride=2, select_block=8, num_selected=3, window=6)
    layer, x = _layer(config), _randn(1, 10, 12)
    cache = NSACache()
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, cache=cache, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with torch.no_grad():
        layer(x, cache=cache)
        other = _layer(NSAConfig(compress_block=4, compress_stride=2, select_block=8, num_selected=3, window=7))
        with pytest.raises(ValueError, match="cache was filled"):
            other(x[:, :1], cache=cache)
        with pytest.raises(ValueError, match="batch size"):
            layer(_randn(2, 1, 12), cache=cache)
        _, kv = layer.project(x)
        with pytest.raises(ValueError, match="empty cache"):
            cache.prefill(kv, kv.k_cmp, kv.v_cmp, config)
