"""Token compression (spec section 3, Eq. 7): block formation, the phi modules, varlen packing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import NSAConfig, compress, make_compression, mean_pool
from reference.compression import LinearCompression, MeanCompression, MLPCompression

KINDS = ("mlp", "mean", "linear")
FEW = settings(max_examples=min(30, settings.default.max_examples))  # run once per phi kind


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@st.composite
def configs(draw: st.DrawFn) -> NSAConfig:
    d = draw(st.integers(1, 4))
    l = d * draw(st.integers(1, 3))
    ls = l * draw(st.integers(1, 2))
    return NSAConfig(compress_block=l, compress_stride=d, select_block=ls, num_selected=3, window=8)


def _naive(x: torch.Tensor, phi: torch.nn.Module, config: NSAConfig) -> torch.Tensor:
    """Block i = phi(x[:, i d : i d + l]) one block at a time."""
    l, d, T = config.compress_block, config.compress_stride, x.shape[1]
    blocks = [phi(x[:, i * d : i * d + l].transpose(1, 2)) for i in range(0, T) if i * d + l <= T]
    if not blocks:
        return x.new_zeros(x.shape[0], 0, x.shape[2], x.shape[3])
    return torch.stack(blocks, dim=1)


@given(config=configs(), T=st.integers(1, 40), B=st.integers(1, 2), H=st.integers(1, 3), seed=st.integers(0, 99))
def test_mean_pool_is_the_naive_average(config: NSAConfig, T: int, B: int, H: int, seed: int) -> None:
    x = _randn(B, T, H, 4, seed=seed)
    out = mean_pool(x, config)
    TC = 0 if T < config.compress_block else (T - config.compress_block) // config.compress_stride + 1
    assert out.shape == (B, TC, H, 4)
    l, d = config.compress_block, config.compress_stride
    expected = [x[:, i * d : i * d + l].mean(dim=1) for i in range(TC)]
    torch.testing.assert_close(out, torch.stack(expected, 1) if expected else out.new_zeros(B, 0, H, 4))


@pytest.mark.parametrize("kind", KINDS)
@FEW
@given(config=configs(), T=st.integers(1, 30), seed=st.integers(0, 99))
def test_every_phi_equals_blockwise_application(kind: str, config: NSAConfig, T: int, seed: int) -> None:
    torch.manual_seed(seed)
    phi = make_compression(kind, config.compress_block, config.compress_stride, 4).double()
    x = _randn(2, T, 3, 4, seed=seed)
    out = compress(x, phi, config)
    assert out.shape == (2, config.num_compressed(T), 3, 4)
    torch.testing.assert_close(out, _naive(x, phi, config))


@pytest.mark.parametrize("kind", KINDS)
@FEW
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_varlen_equals_separate(kind: str, lengths: list[int], seed: int) -> None:
    config = NSAConfig(compress_block=4, compress_stride=2, select_block=8, num_selected=3, window=8)
    torch.manual_seed(seed)
    phi = make_compression(kind, 4, 2, 6).double()
    x = _randn(1, sum(lengths), 2, 6, seed=seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = compress(x, phi, config, cu_seqlens=cu)
    separate = [compress(x[:, a:b], phi, config) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert packed.shape[1] == sum(config.num_compressed(n) for n in lengths)
    torch.testing.assert_close(packed, torch.cat(separate, dim=1))
    torch.testing.assert_close(
        mean_pool(x, config, cu), torch.cat([mean_pool(s, config) for s in x.split(lengths, 1)], 1)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_shorter_than_a_block_gives_no_blocks_and_zero_gradients(kind: str) -> None:
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=8)
    phi = make_compression(kind, 8, 4, 4).double()
    x = _randn(2, 7, 3, 4).requires_grad_()
    out = compress(x, phi, config)
    assert out.shape == (2, 0, 3, 4)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_module_details() -> None:
    mlp = make_compression("mlp", 8, 4, 16)
    assert isinstance(mlp, MLPCompression) and mlp.hidden == 64 and mlp.pos_emb.shape == (8, 16)
    assert isinstance(make_compression("mean", 8, 4, 16), MeanCompression)
    assert sum(p.numel() for p in make_compression("mean", 8, 4, 16).parameters()) == 0
    linear = make_compression("linear", 8, 4, 16).double()
    assert isinstance(linear, LinearCompression)
    blocks = _randn(3, 5, 8, 16)
    torch.testing.assert_close(linear(blocks), blocks.mean(dim=-2))  # initialised to the mean


def test_errors_name_the_argument() -> None:
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=8)
    with pytest.raises(ValueError, match="compression kind"):
        make_compression("max", 8, 4, 16)
    with pytest.raises(ValueError, match="stride"):
        make_compression("mlp", 8, 3, 16)
    with pytest.raises(ValueError, match="head_dim"):
        make_compression("linear", 8, 4, 0)
    with pytest.raises(ValueError, match="config has"):
        compress(_randn(1, 16, 1, 16), make_compression("mean", 4, 2, 16), config)
    with pytest.raises(ValueError, match=r"\[l, D\]"):
        compress(_randn(1, 16, 1, 8), make_compression("mean", 8, 4, 16), config)
    with pytest.raises(ValueError, match="rank 4"):
        mean_pool(_randn(16, 1, 8), config)
    with pytest.raises(TypeError, match="config"):
        mean_pool(_randn(1, 16, 1, 8), {"compress_block": 8})
