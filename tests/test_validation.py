"""Every public reference function rejects bad input with a ValueError/TypeError that names the argument."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import reference as R
from reference.testing import NSAProblem

CONFIG = R.NSAConfig(compress_block=4, compress_stride=2, select_block=4, num_selected=3, window=4)
PROBLEM = NSAProblem(batch=1, seq_len=10, kv_heads=2, group=2, head_dim_qk=3, head_dim_v=5, config=CONFIG)

# positional tensor arguments of each function, named as in its signature (spec section 11)
SIGNATURES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "compressed_attention": (R.compressed_attention, ("q", "k_cmp", "v_cmp")),
    "selection_scores": (R.selection_scores, ("q", "k_cmp", "lse")),
    "select_blocks": (R.select_blocks, ("q", "k_cmp", "lse")),
    "selected_attention": (R.selected_attention, ("q", "k", "v", "block_idx")),
    "sliding_window_attention": (R.sliding_window_attention, ("q", "k", "v")),
    "nsa_attention": (R.nsa_attention, ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")),
}
FUNCTIONS = list(SIGNATURES)
FLOAT_ARGS = [(fn, name) for fn, (_, names) in SIGNATURES.items() for name in names if name not in ("lse", "block_idx")]
KV_ARGS = [(fn, name) for fn, name in FLOAT_ARGS if name != "q"]


def valid_inputs(problem: NSAProblem = PROBLEM) -> dict[str, torch.Tensor]:
    """Every argument any function needs, consistent with each other."""
    x = problem.tensors()
    inputs = {name: getattr(x, name) for name in ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")}
    inputs["k"], inputs["v"] = x.k_slc, x.v_slc
    _, inputs["lse"] = R.compressed_attention(x.q, x.k_cmp, x.v_cmp, problem.config, cu_seqlens=x.cu_seqlens)
    inputs["block_idx"] = R.select_blocks(x.q, x.k_cmp, inputs["lse"], problem.config, cu_seqlens=x.cu_seqlens)
    return inputs


def call(fn: str, config: object = CONFIG, inputs: dict | None = None, **kwargs: object) -> object:
    """Call ``fn`` on valid inputs, with some of them replaced by ``kwargs`` (tensor names or keywords)."""
    func, names = SIGNATURES[fn]
    args = {**(inputs if inputs is not None else valid_inputs()), **kwargs}
    keywords = {k: v for k, v in kwargs.items() if k in ("scale", "cu_seqlens")}
    return func(*(args[name] for name in names), config, **keywords)


def raises(exc: type[Exception], *patterns: str) -> pytest.RaisesContext:
    """``pytest.raises`` matching every pattern (the argument's name and its rule) in any order."""
    return pytest.raises(exc, match="".join(f"(?=[\\s\\S]*{p})" for p in patterns))


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_valid_inputs_pass(fn: str) -> None:
    """The baseline every other test perturbs is accepted, so each failure below is caused by its one change."""
    call(fn)


@pytest.mark.parametrize(("fn", "name"), FLOAT_ARGS)
def test_wrong_rank(fn: str, name: str) -> None:
    with raises(ValueError, name, "rank 4"):
        call(fn, **{name: valid_inputs()[name][0]})


@pytest.mark.parametrize(("fn", "name"), FLOAT_ARGS)
def test_not_a_float_tensor(fn: str, name: str) -> None:
    with raises(TypeError, name, "torch.Tensor"):
        call(fn, **{name: valid_inputs()[name].tolist()})
    with raises(TypeError, name, "float16, bfloat16, float32 or float64"):
        call(fn, **{name: valid_inputs()[name].int()})


@pytest.mark.parametrize(("fn", "name"), KV_ARGS)
def test_mismatched_dtype(fn: str, name: str) -> None:
    with raises(TypeError, name, "dtype", "must match"):
        call(fn, **{name: valid_inputs()[name].double()})


@pytest.mark.parametrize(("fn", "name"), [*KV_ARGS, ("select_blocks", "lse"), ("selected_attention", "block_idx")])
def test_mismatched_device(fn: str, name: str) -> None:
    """A tensor on another device ('meta' stands in for a GPU) is rejected before any arithmetic."""
    with raises(ValueError, name, "is on meta", "must match"):
        call(fn, **{name: valid_inputs()[name].to("meta")})


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_query_heads_not_a_multiple_of_kv_heads(fn: str) -> None:
    inputs = valid_inputs()
    q = inputs["q"][:, :, :3]  # HQ = 3, H = 2
    with raises(ValueError, "HQ=3", "H=2", r"HQ % H == 0"):
        call(fn, inputs=inputs, q=q, gates=inputs["gates"][:, :, :3], lse=inputs["lse"][:, :, :3])


@pytest.mark.parametrize(("fn", "name"), [(fn, name) for fn, name in KV_ARGS if name.startswith("k")])
def test_key_head_dim_differs_from_query(fn: str, name: str) -> None:
    with raises(ValueError, rf"{name}\.shape\[3\]", "DK"):
        call(fn, **{name: valid_inputs()[name][..., :2]})


@pytest.mark.parametrize(("fn", "name"), [(fn, name) for fn, name in KV_ARGS if name.startswith("v")])
def test_value_shape_disagrees(fn: str, name: str) -> None:
    """v must match its k in length and heads; in the core every branch must have the same DV."""
    v = valid_inputs()[name]
    with raises(ValueError, name, "must match"):
        call(fn, **{name: v[:, :-1]})
    if fn == "nsa_attention" and name != "v_slc":
        with raises(ValueError, rf"{name}\.shape\[3\]", "DV"):
            call(fn, **{name: v[..., :-1]})


@pytest.mark.parametrize(("fn", "name"), [(fn, name) for fn, name in KV_ARGS if name != "gates"])
def test_batch_disagrees(fn: str, name: str) -> None:
    x = valid_inputs()[name]
    with raises(ValueError, rf"{name}\.shape\[0\]", "batch"):
        call(fn, **{name: torch.cat([x, x])})


@pytest.mark.parametrize(
    ("fn", "name"), [("compressed_attention", "k_cmp"), ("select_blocks", "k_cmp"), ("selection_scores", "k_cmp")]
)
def test_wrong_number_of_compressed_blocks(fn: str, name: str) -> None:
    inputs = valid_inputs()
    with raises(ValueError, rf"{name}\.shape\[1\]", "TC"):
        call(fn, inputs=inputs, k_cmp=inputs["k_cmp"][:, 1:], v_cmp=inputs["v_cmp"][:, 1:])


@pytest.mark.parametrize(
    ("fn", "name"),
    [
        ("selected_attention", "k"),
        ("sliding_window_attention", "k"),
        ("nsa_attention", "k_slc"),
        ("nsa_attention", "k_win"),
    ],
)
def test_key_length_differs_from_query(fn: str, name: str) -> None:
    inputs = valid_inputs()
    v_name = name.replace("k", "v", 1)
    with raises(ValueError, rf"{name}\.shape\[1\]", "T, as q"):
        call(fn, inputs=inputs, **{name: inputs[name][:, 1:], v_name: inputs[v_name][:, 1:]})


def test_kv_heads_disagree_between_branches() -> None:
    inputs = valid_inputs()
    with raises(ValueError, "k_cmp", "kv heads", "k_slc"):
        call("nsa_attention", inputs=inputs, k_cmp=inputs["k_cmp"][:, :, :1], v_cmp=inputs["v_cmp"][:, :, :1])


def test_gates_shape() -> None:
    gates = valid_inputs()["gates"]
    for bad in (gates[..., :2], torch.cat([gates, gates]), gates[:, 1:]):
        with raises(ValueError, "gates", r"\[B, T, HQ, 3\]"):
            call("nsa_attention", gates=bad)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_empty_sequence(fn: str) -> None:
    inputs = {name: x[:, :0] for name, x in valid_inputs().items()}
    with raises(ValueError, "q", "T >= 1"):
        call(fn, inputs=inputs)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_config_type(fn: str) -> None:
    with raises(TypeError, "config", "NSAConfig"):
        call(fn, config={"compress_block": 4})


@pytest.mark.parametrize(
    ("changes", "patterns"),
    [
        ({"compress_block": 6, "compress_stride": 4}, ["compress_stride", "divide compress_block"]),
        ({"select_block": 6, "compress_stride": 4, "compress_block": 4}, ["compress_stride", "divide select_block"]),
        ({"compress_block": 8, "compress_stride": 4, "select_block": 4}, ["compress_block", "<= select_block"]),
        ({"num_selected": 2}, ["num_selected", "forced"]),
        ({"num_selected": 0, "num_initial": 0, "num_local": 0}, ["num_selected", "positive"]),
        ({"window": 0}, ["window", "positive"]),
        ({"window": -3}, ["window", "positive"]),
        ({"compress_stride": 0}, ["compress_stride", "positive"]),
        ({"select_block": 2.0}, ["select_block", "positive int"]),
        ({"window": True}, ["window", "positive int"]),
        ({"num_local": -1}, ["num_local", "non-negative"]),
    ],
)
def test_config_rules(changes: dict, patterns: list[str]) -> None:
    with raises(ValueError, *patterns):
        R.NSAConfig(**changes)


@pytest.mark.parametrize("scale", [0, -1.0, "0.5", True])
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_bad_scale(fn: str, scale: object) -> None:
    with raises(ValueError, "scale", "positive"):
        call(fn, scale=scale)


@pytest.mark.parametrize("fn", ["select_blocks", "selection_scores"])
def test_bad_lse(fn: str) -> None:
    lse = valid_inputs()["lse"]
    with raises(ValueError, "lse", r"\[B, T, HQ\]"):
        call(fn, lse=lse[..., :1])
    with raises(ValueError, "lse", r"\[B, T, HQ\]"):
        call(fn, lse=lse.tolist())
    with raises(TypeError, "lse", "floating point"):
        call(fn, lse=lse.int())


def test_block_idx_type_and_shape() -> None:
    idx = valid_inputs()["block_idx"]
    with raises(TypeError, "block_idx", "torch.Tensor"):
        call("selected_attention", block_idx=idx.tolist())
    with raises(TypeError, "block_idx", "int32 or int64"):
        call("selected_attention", block_idx=idx.float())
    with raises(ValueError, "block_idx", "shape"):
        call("selected_attention", block_idx=idx[:, :, :1])
    with raises(ValueError, "block_idx", "shape"):
        call("selected_attention", block_idx=idx[..., :0])


@pytest.mark.parametrize(
    ("row", "patterns"),
    [
        ([0, 1, -2], [">= 0 or -1"]),  # out of range below
        ([0, 1, 3], ["not causal"]),  # block 3 starts at token 12 > t = 9
        ([0, 1, 100], ["not causal"]),  # out of range above: past the sequence
        ([1, 0, 1], ["repeated"]),
    ],
)
def test_block_idx_values(row: list[int], patterns: list[str]) -> None:
    idx = valid_inputs()["block_idx"].clone()
    idx[0, 9, 1] = torch.tensor(row)
    with raises(ValueError, "block_idx", *patterns):
        call("selected_attention", block_idx=idx)


def test_block_idx_accepts_any_order_and_padding() -> None:
    """-1 anywhere and any order are fine (the check is about meaning, not layout); -1 may repeat."""
    idx = valid_inputs()["block_idx"].clone()
    idx[0, 9, 1] = torch.tensor([-1, 2, -1])
    call("selected_attention", block_idx=idx)


@pytest.mark.parametrize(
    ("cu_seqlens", "exc", "patterns"),
    [
        (torch.tensor([0, 4, 10], dtype=torch.int64), TypeError, ["cu_seqlens", "int32"]),
        ([0, 4, 10], TypeError, ["cu_seqlens", "torch.Tensor"]),
        (torch.tensor([[0, 4, 10]], dtype=torch.int32), ValueError, ["cu_seqlens", "1-D"]),
        (torch.tensor([0], dtype=torch.int32), ValueError, ["cu_seqlens", "at least 2"]),
        (torch.tensor([1, 4, 10], dtype=torch.int32), ValueError, ["cu_seqlens", "start at 0"]),
        (torch.tensor([0, 4, 4, 10], dtype=torch.int32), ValueError, ["cu_seqlens", "strictly increasing"]),
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), ValueError, ["cu_seqlens", "strictly increasing"]),
        (torch.tensor([0, 4, 9], dtype=torch.int32), ValueError, ["cu_seqlens", "end at", "T=10"]),
        (torch.tensor([0, 4, 11], dtype=torch.int32), ValueError, ["cu_seqlens", "end at", "T=10"]),
    ],
)
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_bad_cu_seqlens(fn: str, cu_seqlens: object, exc: type[Exception], patterns: list[str]) -> None:
    with raises(exc, *patterns):
        call(fn, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_cu_seqlens_needs_batch_one(fn: str) -> None:
    inputs = valid_inputs(NSAProblem(2, 10, 2, 2, 3, 5, CONFIG))
    with raises(ValueError, "cu_seqlens", "B=2"):
        call(fn, inputs=inputs, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))


@pytest.mark.parametrize("fn", ["compressed_attention", "select_blocks", "selection_scores", "nsa_attention"])
def test_cu_seqlens_sets_the_number_of_compressed_blocks(fn: str) -> None:
    """Packed: k_cmp holds each sequence's own TC (here 1 + 2 = 3), not the dense TC of the whole row (4)."""
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with raises(ValueError, r"k_cmp\.shape\[1\]", "sum over sequences"):
        call(fn, cu_seqlens=cu)
    packed = valid_inputs(NSAProblem(1, 10, 2, 2, 3, 5, CONFIG, seqlens=(4, 6)))
    assert packed["k_cmp"].shape[1] == 3
    call(fn, inputs=packed, cu_seqlens=cu)


@pytest.mark.parametrize("context_len", [0, -5, 1.5, True, "8192"])
def test_decode_tokens_read_context(context_len: object) -> None:
    with raises(ValueError, "context_len", "positive int"):
        R.decode_tokens_read(context_len, CONFIG)


def test_decode_tokens_read_config() -> None:
    with raises(TypeError, "config", "NSAConfig"):
        R.decode_tokens_read(8192, None)
