"""The NativeSparseAttention layer on the Triton backend equals the reference backend, parameters' gradients too."""

import copy

import pytest
import torch

from reference import NativeSparseAttention, NSAConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=3, window=12)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "compression", "shared_kv"), [(4, 2, "mlp", False), (2, 2, "mean", True)]
)
def test_triton_layer_equals_reference_layer(heads: int, kv_heads: int, compression: str, shared_kv: bool) -> None:
    torch.manual_seed(0)
    ref = NativeSparseAttention(32, heads, kv_heads, 16, 24, CONFIG, compression=compression, shared_kv=shared_kv).to(
        DEVICE
    )
    tri = copy.deepcopy(ref)
    tri.backend = "triton"
    x = torch.randn(2, 45, 32, device=DEVICE)  # T = 45: not a multiple of any block
    dy = torch.randn(2, 45, 32, device=DEVICE)
    ys = []
    for layer in (ref, tri):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        ys.append((y, xi.grad))
    torch.testing.assert_close(ys[1][0], ys[0][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ys[1][1], ys[0][1], atol=2e-5, rtol=1e-4)
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
        assert p_tri.grad is not None and torch.isfinite(p_tri.grad).all(), name
        torch.testing.assert_close(p_tri.grad, p_ref.grad, atol=5e-5, rtol=1e-4, msg=f"gradient of {name}")
