"""The NativeSparseAttention layer and RoPE: shapes, options, gradients, causality, varlen, validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import NativeSparseAttention, NSAConfig, apply_rope

FEW = settings(max_examples=min(30, settings.default.max_examples))  # whole-layer examples are the slow ones
CONFIG = NSAConfig(
    compress_block=4, compress_stride=2, select_block=8, num_selected=3, num_initial=1, num_local=1, window=6
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _layer(seed: int = 0, **kw: object) -> NativeSparseAttention:
    torch.manual_seed(seed)
    args = {"hidden_size": 16, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "config": CONFIG} | kw
    return NativeSparseAttention(**args).double()  # type: ignore[arg-type]


@pytest.mark.parametrize(("HQ", "H", "DK", "DV"), [(4, 2, 8, None), (2, 2, 6, 4), (3, 1, 4, 10)])
@pytest.mark.parametrize("compression", ["mlp", "mean", "linear"])
def test_shapes_and_aux(HQ: int, H: int, DK: int, DV: int | None, compression: str) -> None:
    layer = _layer(hidden_size=12, num_heads=HQ, num_kv_heads=H, head_dim=DK, v_head_dim=DV, compression=compression)
    x = _randn(2, 19, 12)
    y, aux = layer(x, return_aux=True)
    dv = DK if DV is None else DV
    assert y.shape == x.shape and y.dtype == x.dtype
    assert aux.gates.shape == (2, 19, HQ, 3) and bool(((aux.gates > 0) & (aux.gates < 1)).all())
    assert aux.o_cmp.shape == aux.o_slc.shape == aux.o_win.shape == (2, 19, HQ, dv)
    assert aux.block_idx.shape == (2, 19, H, CONFIG.num_selected) and aux.block_idx.dtype == torch.int32
    torch.testing.assert_close(layer(x), y)


def test_shared_kv_uses_one_projection() -> None:
    separate, shared = _layer(), _layer(shared_kv=True)
    assert set(separate.k_proj) == {"cmp", "slc", "win"} and set(shared.k_proj) == {"shared"}
    n_sep = sum(p.numel() for p in separate.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_sep - n_shared == 2 * 16 * 2 * 8 * 2  # two fewer K and V projections
    _, kv = shared.project(_randn(1, 10, 16))
    assert torch.equal(kv.k_cmp, kv.k_slc) and torch.equal(kv.k_cmp, kv.k_win)
    assert shared(_randn(1, 10, 16)).shape == (1, 10, 16)


@pytest.mark.parametrize("kw", [{}, {"shared_kv": True, "gate_hidden": 5}, {"compression": "linear", "rope": False}])
def test_gradients_reach_every_parameter(kw: dict) -> None:
    layer = _layer(**kw)
    x = _randn(2, 20, 16).requires_grad_()
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert p.grad.abs().sum() > 0, name
    assert bool(torch.isfinite(x.grad).all())


@FEW
@given(T=st.integers(2, 30), cut=st.integers(0, 29), seed=st.integers(0, 99), shared=st.booleans())
def test_causal_future_tokens_change_nothing_before(T: int, cut: int, seed: int, shared: bool) -> None:
    cut = cut % (T - 1)  # tokens 0..cut unchanged; the rest changed or cut off
    layer = _layer(seed, shared_kv=shared)
    x = _randn(1, T, 16, seed=seed)
    x2 = x.clone()
    x2[:, cut + 1 :] = _randn(1, T - cut - 1, 16, seed=seed + 1)
    with torch.no_grad():
        y, y2, y_short = layer(x), layer(x2), layer(x[:, : cut + 1])
    torch.testing.assert_close(y2[:, : cut + 1], y[:, : cut + 1])
    torch.testing.assert_close(y_short, y[:, : cut + 1])


@FEW
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3), seed=st.integers(0, 99))
def test_varlen_equals_separate(lengths: list[int], seed: int) -> None:
    layer = _layer(seed)
    x = _randn(1, sum(lengths), 16, seed=seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = layer(x, cu_seqlens=cu)
        separate = torch.cat([layer(part) for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, separate)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"num_heads": 3, "num_kv_heads": 2}, ValueError, "num_heads"),
        ({"num_kv_heads": 0}, ValueError, "num_kv_heads"),
        ({"hidden_size": -1}, ValueError, "hidden_size"),
        ({"head_dim": 7}, ValueError, "head_dim"),
        ({"v_head_dim": 0}, ValueError, "v_head_dim"),
        ({"config": {"window": 4}}, TypeError, "config"),
        ({"compression": "max"}, ValueError, "compression"),
        ({"rope_base": 1.0}, ValueError, "rope_base"),
        ({"gate_hidden": 0}, ValueError, "gate_hidden"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"shared_kv": 1}, TypeError, "shared_kv"),
    ],
)
def test_bad_constructor_arguments(kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _layer(**kw)


def test_bad_forward_arguments() -> None:
    layer = _layer()
    with pytest.raises(ValueError, match="hidden_size"):
        layer(_randn(1, 5, 8))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(_randn(2, 5, 16), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(TypeError, match="cache"):
        layer(_randn(1, 5, 16), cache={})


def test_odd_head_dim_without_rope() -> None:
    layer = _layer(head_dim=5, rope=False)
    assert layer(_randn(1, 9, 16)).shape == (1, 9, 16)


@given(p=st.integers(0, 50), s=st.integers(0, 50), shift=st.integers(0, 50), seed=st.integers(0, 99))
def test_rope_scores_depend_on_relative_position(p: int, s: int, shift: int, seed: int) -> None:
    q, k = _randn(1, 1, 2, 8, seed=seed), _randn(1, 1, 2, 8, seed=seed + 1)
    a = (apply_rope(q, offset=p) * apply_rope(k, offset=s)).sum(-1)
    b = (apply_rope(q, offset=p + shift) * apply_rope(k, offset=s + shift)).sum(-1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(apply_rope(q, offset=p).norm(dim=-1), q.norm(dim=-1))  # a rotation


def test_rope_offset_and_varlen_positions() -> None:
    x = _randn(1, 12, 2, 6)
    full = apply_rope(x)
    torch.testing.assert_close(apply_rope(x[:, 5:], offset=5), full[:, 5:])
    torch.testing.assert_close(apply_rope(x[:, :1]), x[:, :1])  # position 0: identity
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    torch.testing.assert_close(apply_rope(x, cu_seqlens=cu), torch.cat([apply_rope(x[:, :5]), apply_rope(x[:, 5:])], 1))
    with pytest.raises(ValueError, match="even"):
        apply_rope(_randn(1, 3, 1, 5))
    with pytest.raises(ValueError, match="offset"):
        apply_rope(x, offset=-1)


def test_triton_backend_is_resolved_lazily() -> None:
    layer = _layer(backend="triton")  # constructing never imports `optimized`
    assert layer.backend == "triton"
