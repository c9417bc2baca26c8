"""Check your own NSA kernels against this reference: hypothesis strategies and a tolerance-aware assertion.

Usage (any function of spec section 11, forward and gradients, on your device)::

    import torch
    from hypothesis import given
    from reference.testing import check_against_reference, nsa_problems

    @given(nsa_problems(dtypes=(torch.bfloat16, torch.float16)))
    def test_my_window(problem):
        check_against_reference("sliding_window_attention", my_window_kernel, problem, device="cuda")

**The tolerance rule.** A kernel in dtype ``X`` passes when its largest error against the float64
reference is at most ``ratio`` (2) times the largest error of the reference itself run in ``X``, plus a
small floor (a few ``X`` epsilons). NaN never passes; ``-inf`` (the log-sum-exp of a query that sees no
compressed block) must be matched exactly. Both runs see the same inputs (rounded to ``X`` first), so the
rule measures arithmetic only.

**Selection is discrete.** Two correct implementations may pick different blocks where two scores tie
within rounding. ``select_blocks`` therefore passes when it equals the float64 selection except on rows
whose decision is within tolerance, where it only has to be a valid top-n; ``nsa_attention`` is compared
on the rows whose selection is unambiguous (the others get a zero output gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from hypothesis import strategies as st

from .compressed import compressed_attention
from .config import NSAConfig
from .masks import forced_blocks, select_candidates
from .nsa import nsa_attention
from .selected import selected_attention
from .selection import select_blocks, selection_scores
from .window import sliding_window_attention

__all__ = [
    "FLOOR_EPS",
    "FLOOR_EPS_ACC",
    "FUNCTIONS",
    "NSAProblem",
    "NSATensors",
    "assert_close_to_reference",
    "assert_valid_selection",
    "check_against_reference",
    "nsa_configs",
    "nsa_problems",
    "tolerance",
]

FLOOR_EPS = 8.0  # the floor, in epsilons of the dtype times the reference's magnitude ...
FLOOR_EPS_ACC = 32.0  # ... but at least this many float32 epsilons (the accumulation dtype) below float64


@dataclass(frozen=True)
class NSATensors:
    """The inputs of ``nsa_attention`` (and of each branch), in the order of its signature."""

    q: torch.Tensor  # [B, T, HQ, DK]
    k_cmp: torch.Tensor  # [B, TC, H, DK]
    v_cmp: torch.Tensor  # [B, TC, H, DV]
    k_slc: torch.Tensor  # [B, T, H, DK]
    v_slc: torch.Tensor  # [B, T, H, DV]
    k_win: torch.Tensor  # [B, T, H, DK]
    v_win: torch.Tensor  # [B, T, H, DV]
    gates: torch.Tensor  # [B, T, HQ, 3] in (0, 1)
    cu_seqlens: torch.Tensor | None  # int32 [N + 1] for a packed batch (B = 1), else None


@dataclass(frozen=True)
class NSAProblem:
    """One NSA call: shapes, GQA grouping, config, dtype, seed and an optional packed (varlen) split."""

    batch: int
    seq_len: int  # T (the packed length when ``seqlens`` is set)
    kv_heads: int  # H
    group: int  # G = HQ / H
    head_dim_qk: int  # DK
    head_dim_v: int  # DV
    config: NSAConfig
    dtype: torch.dtype = torch.float32
    seed: int = 0
    seqlens: tuple[int, ...] | None = None  # packed sequence lengths (batch 1, summing to seq_len)

    def __post_init__(self) -> None:
        if self.seqlens is not None and (self.batch != 1 or sum(self.seqlens) != self.seq_len):
            raise ValueError(f"seqlens {self.seqlens} must sum to seq_len={self.seq_len} with batch=1")

    @property
    def q_heads(self) -> int:
        """HQ = H * G."""
        return self.kv_heads * self.group

    @property
    def num_compressed(self) -> int:
        """Rows of k_cmp / v_cmp: TC, or the sum of each packed sequence's TC."""
        lengths = self.seqlens if self.seqlens is not None else (self.seq_len,)
        return sum(self.config.num_compressed(n) for n in lengths)

    def cu_seqlens(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """int32 [N + 1] prefix sums of ``seqlens``, or None for a dense batch."""
        if self.seqlens is None:
            return None
        return torch.tensor([0, *torch.tensor(self.seqlens).cumsum(0).tolist()], dtype=torch.int32, device=device)

    def tensors(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, requires_grad: bool = False
    ) -> NSATensors:
        """Random inputs from ``seed``, rounded to the problem's dtype, then cast to ``dtype`` (default: the same).

        ``tensors(dtype=torch.float64)`` is therefore exactly the problem's inputs in float64.
        """
        gen = torch.Generator().manual_seed(self.seed)
        B, T, TC, H, HQ = self.batch, self.seq_len, self.num_compressed, self.kv_heads, self.q_heads
        DK, DV = self.head_dim_qk, self.head_dim_v
        shapes = [(B, T, HQ, DK), (B, TC, H, DK), (B, TC, H, DV), (B, T, H, DK), (B, T, H, DV), (B, T, H, DK)]
        shapes += [(B, T, H, DV), (B, T, HQ, 3)]
        values = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
        values[-1] = torch.sigmoid(values[-1])  # gates in (0, 1)
        out = [
            x.to(self.dtype).to(device=device, dtype=dtype or self.dtype).requires_grad_(requires_grad) for x in values
        ]
        return NSATensors(*out, cu_seqlens=self.cu_seqlens(device))


@st.composite
def nsa_configs(draw: st.DrawFn, max_block: int = 16, max_window: int = 48) -> NSAConfig:
    """Valid configs with small blocks: d | l, d | l', l <= l', forced <= n, any window."""
    d = draw(st.sampled_from([1, 2, 4]))
    l = d * draw(st.integers(1, max(1, max_block // d // 2)))
    ls = d * draw(st.integers(l // d, max(l // d, max_block // d)))
    n_init, n_local = draw(st.integers(0, 1)), draw(st.integers(0, 2))
    n = draw(st.integers(max(1, n_init + n_local), n_init + n_local + 3))
    w = draw(st.integers(1, max_window))
    return NSAConfig(l, d, ls, n, n_init, n_local, w)


@st.composite
def nsa_problems(
    draw: st.DrawFn,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    max_seq_len: int = 48,
    max_batch: int = 2,
    max_heads: int = 8,
    max_head_dim: int = 12,
    varlen: bool = True,
    configs: st.SearchStrategy[NSAConfig] | None = None,
) -> NSAProblem:
    """Valid NSA problems: T from 1 (shorter than a block) up, H and G with H * G <= max_heads, DK != DV.

    ``varlen=True`` packs some problems (B = 1, ``seqlens`` set). Pass ``configs`` to draw other block sizes.
    """
    config = draw(configs if configs is not None else nsa_configs(max_window=max_seq_len + 2))
    T = draw(st.integers(1, max_seq_len))
    seqlens = None
    if varlen and T > 1 and draw(st.booleans()):
        cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=3)))
        seqlens = tuple(b - a for a, b in zip([0, *cuts], [*cuts, T]))
    H = draw(st.integers(1, max_heads))
    return NSAProblem(
        batch=1 if seqlens is not None else draw(st.integers(1, max_batch)),
        seq_len=T,
        kv_heads=H,
        group=draw(st.integers(1, max_heads // H)),
        head_dim_qk=draw(st.integers(1, max_head_dim)),
        head_dim_v=draw(st.integers(1, max_head_dim)),
        config=config,
        dtype=draw(st.sampled_from(list(dtypes))),
        seed=draw(st.integers(0, 2**32 - 1)),
        seqlens=seqlens,
    )


def _finite_max(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.abs().max()) if x.numel() else 0.0


def tolerance(
    expected_fp64: torch.Tensor,
    expected_same_dtype: torch.Tensor,
    dtype: torch.dtype,
    *,
    ratio: float = 2.0,
    floor: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[float, float, float]:
    """The allowed max abs error: ``ratio * (reference's own error in dtype) + floor``.

    Returns (bound, reference error, floor). The default floor is ``max(FLOOR_EPS * eps(dtype),
    FLOOR_EPS_ACC * eps(float32)) * max(1, max|ref|)`` (just the first term for float64): every implementation
    accumulates in float32, and a gradient that cancels to exactly 0 in the reference (a query reading a single
    key has dq = 0) comes out at a few float32 ulps of its terms in a kernel that sums in another order.
    Only finite entries (where ``mask`` is True, if given) count.
    """
    e, r = expected_fp64.detach().cpu().double(), expected_same_dtype.detach().cpu().double()
    keep = torch.isfinite(e) & torch.isfinite(r)
    if mask is not None:
        keep &= mask.cpu().expand_as(keep)
    ref_err = _finite_max((r - e)[keep]) if keep.any() else 0.0
    if floor is None:
        eps = FLOOR_EPS * torch.finfo(dtype).eps
        if dtype != torch.float64:
            eps = max(eps, FLOOR_EPS_ACC * torch.finfo(torch.float32).eps)
        floor = eps * max(1.0, _finite_max(e[keep]))
    return ratio * ref_err + floor, ref_err, floor


def assert_close_to_reference(
    actual: torch.Tensor,
    expected_fp64: torch.Tensor,
    expected_same_dtype: torch.Tensor,
    *,
    name: str = "output",
    dtype: torch.dtype | None = None,
    ratio: float = 2.0,
    floor: float | None = None,
    mask: torch.Tensor | None = None,
) -> None:
    """Raise AssertionError (with the worst element, its index and the bound) unless ``actual`` obeys the rule.

    ``expected_fp64``: the reference in float64 on the same (rounded) inputs; ``expected_same_dtype``: the
    reference run in the kernel's dtype (default ``dtype``: ``expected_same_dtype.dtype``). ``mask``
    (broadcastable bool) restricts the comparison. NaN in ``actual`` never passes; infinities must match.
    """
    dtype = dtype or expected_same_dtype.dtype
    if tuple(actual.shape) != tuple(expected_fp64.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected_fp64.shape)}")
    a, e = actual.detach().cpu().double(), expected_fp64.detach().cpu().double()
    keep = torch.ones_like(e, dtype=torch.bool) if mask is None else mask.cpu().expand_as(e)
    bad = keep & torch.isnan(a)
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{name}: NaN at index {index} ({int(bad.sum())} NaN of {a.numel()} elements)")
    inf = keep & (torch.isinf(e) | torch.isinf(a))
    mismatch = inf & (a != e)
    if mismatch.any():
        index = tuple(mismatch.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: at index {index} got {a[index].item():.8g} but the float64 reference is {e[index].item():.8g} "
            f"(infinities must match exactly; {int(mismatch.sum())} such elements)"
        )
    bound, ref_err, floor = tolerance(e, expected_same_dtype, dtype, ratio=ratio, floor=floor, mask=keep)
    err = torch.where(keep & ~inf, (a - e).abs(), 0.0)
    if err.numel() == 0 or float(err.max()) <= bound:
        return
    index = tuple(torch.unravel_index(err.argmax(), err.shape))
    index = tuple(int(i) for i in index)
    worst, expected, ref = a[index].item(), e[index].item(), float(expected_same_dtype.detach()[index])
    rel = abs(worst - expected) / max(abs(expected), torch.finfo(torch.float64).tiny)
    raise AssertionError(
        f"{name}: differs from the float64 reference beyond the tolerance\n"
        f"  worst element at index {index}: actual {worst:.8g}, float64 reference {expected:.8g}, "
        f"reference in {dtype} {ref:.8g}\n"
        f"  abs error {abs(worst - expected):.3e} (relative {rel:.3e}) > allowed {bound:.3e} "
        f"= {ratio:g} x {ref_err:.3e} (the reference's own {dtype} error) + floor {floor:.3e}\n"
        f"  {int((err > bound).sum())} of {int(keep.sum())} compared elements exceed the bound"
    )


def _local_positions(T: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Each token's position inside its own (packed) sequence."""
    t = torch.arange(T)
    if cu_seqlens is None:
        return t
    starts = cu_seqlens.cpu().long()
    return t - starts[torch.searchsorted(starts, t, right=True) - 1]


def _selection_masks(
    scores: torch.Tensor, block_idx: torch.Tensor, config: NSAConfig, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidate, forced, chosen) bool masks [B, T, H, NS] of a selection."""
    B, T, H, NS = scores.shape
    t = _local_positions(T, cu_seqlens)
    j = torch.arange(NS)
    candidate = select_candidates(t // config.select_block, j)[None, :, None, :].expand(B, T, H, NS)
    forced = forced_blocks(t, j, config)[None, :, None, :].expand(B, T, H, NS)
    idx = block_idx.cpu().long()
    chosen = torch.zeros(B, T, H, NS + 1, dtype=torch.bool).scatter_(-1, torch.where(idx >= 0, idx, NS), True)
    return candidate, forced, chosen[..., :NS]


def _decision_gap(
    scores: torch.Tensor, candidate: torch.Tensor, forced: torch.Tensor, chosen: torch.Tensor
) -> torch.Tensor:
    """Lowest score chosen freely minus highest score left out, per row (+inf when either set is empty)."""
    lowest = torch.where(chosen & ~forced, scores, math.inf).amin(-1)
    highest = torch.where(candidate & ~chosen, scores, -math.inf).amax(-1)
    return lowest - highest


def assert_valid_selection(
    block_idx: torch.Tensor,
    scores_fp64: torch.Tensor,
    expected_fp64: torch.Tensor,
    score_tol: float,
    config: NSAConfig,
    cu_seqlens: torch.Tensor | None = None,
    name: str = "select_blocks",
) -> torch.Tensor:
    """Check a selection against the float64 one; rows whose decision is within ``score_tol`` may differ.

    There the selection only has to be a valid top-n: forced blocks in, only candidates, ascending, -1 padded,
    ``min(n, candidates)`` blocks and no free choice worse than a block left out by more than ``score_tol``.
    Returns the bool [B, T, H] mask of those ambiguous rows.
    """
    if tuple(block_idx.shape) != tuple(expected_fp64.shape):
        raise AssertionError(f"{name}: shape {tuple(block_idx.shape)}, expected {tuple(expected_fp64.shape)}")
    idx, ref, scores = block_idx.cpu().long(), expected_fp64.cpu().long(), scores_fp64.cpu().double()
    candidate, forced, ref_chosen = _selection_masks(scores, ref, config, cu_seqlens)
    ambiguous = _decision_gap(scores, candidate, forced, ref_chosen) <= score_tol
    differ = (idx != ref).any(-1)
    rows = differ & ~ambiguous
    if rows.any():
        at = tuple(rows.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: row (b, t, h) = {at} selects {idx[at].tolist()} but the float64 reference selects "
            f"{ref[at].tolist()} and its decision is not a near tie (scores {scores[at].tolist()}, tolerance "
            f"{score_tol:.3e}); {int(rows.sum())} such rows"
        )
    NS = scores.shape[-1]
    valid_values = ((idx >= -1) & (idx < NS)).all(-1)
    padded = torch.where(idx >= 0, idx, NS + 1 + torch.arange(idx.shape[-1]))  # -1 only at the end
    ascending = (padded[..., 1:] > padded[..., :-1]).all(-1)
    _, _, chosen = _selection_masks(scores, idx.clamp(-1, NS - 1), config, cu_seqlens)
    count_ok = (idx >= 0).sum(-1) == torch.clamp(candidate.sum(-1), max=config.num_selected)
    structure = valid_values & ascending & count_ok & ~(forced & ~chosen).any(-1) & ~(chosen & ~candidate).any(-1)
    gap_ok = _decision_gap(scores, candidate, forced, chosen) >= -score_tol
    rows = differ & ~(structure & gap_ok)
    if rows.any():
        at = tuple(rows.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: row (b, t, h) = {at} selects {idx[at].tolist()}, not a valid top-{config.num_selected} "
            f"(ascending, -1 padded, forced and candidate blocks only) under the float64 scores "
            f"{scores[at].tolist()}; the reference selects {ref[at].tolist()}"
        )
    return ambiguous


FUNCTIONS = ("compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention", "nsa_attention")
_GRAD_INPUTS = {
    "compressed_attention": ("q", "k_cmp", "v_cmp"),
    "selected_attention": ("q", "k_slc", "v_slc"),
    "sliding_window_attention": ("q", "k_win", "v_win"),
    "nsa_attention": ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"),
}


def _args(fn_name: str, x: NSATensors, lse: torch.Tensor | None, block_idx: torch.Tensor | None) -> tuple:
    if fn_name == "compressed_attention":
        return x.q, x.k_cmp, x.v_cmp
    if fn_name == "select_blocks":
        return x.q, x.k_cmp, lse
    if fn_name == "selected_attention":
        return x.q, x.k_slc, x.v_slc, block_idx
    if fn_name == "sliding_window_attention":
        return x.q, x.k_win, x.v_win
    return tuple(getattr(x, f.name) for f in fields(NSATensors) if f.name != "cu_seqlens")


_REFERENCE: dict[str, Callable] = {
    "compressed_attention": compressed_attention,
    "select_blocks": select_blocks,
    "selected_attention": selected_attention,
    "sliding_window_attention": sliding_window_attention,
    "nsa_attention": nsa_attention,
}


def _run(
    fn: Callable, fn_name: str, args: tuple, config: NSAConfig, cu: torch.Tensor | None, grad_out: torch.Tensor | None
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """The outputs (o, or o and lse) and, if ``grad_out`` is given, the input gradients under it (through o)."""
    out = fn(*args, config, cu_seqlens=cu) if cu is not None else fn(*args, config)
    outs = tuple(out) if fn_name == "compressed_attention" else (out,)
    if grad_out is None:
        return outs, {}
    names = _GRAD_INPUTS[fn_name]
    inputs = args[: len(names)]
    grads = torch.autograd.grad(outs[0], inputs, grad_out.to(outs[0].dtype), allow_unused=True)
    return outs, {name: torch.zeros_like(x) if g is None else g for name, g, x in zip(names, grads, inputs)}


def check_against_reference(
    fn_name: str,
    impl_fn: Callable,
    problem: NSAProblem,
    *,
    device: torch.device | str = "cpu",
    reference_device: torch.device | str | None = None,
    grads: bool = True,
    ratio: float = 2.0,
    floor: float | None = None,
) -> None:
    """Run ``impl_fn`` (your version of the spec-11 function ``fn_name``) and the reference; assert the rule.

    The reference runs in float64 and in the problem's dtype on the same rounded inputs. Checks the output
    (``compressed_attention``: o and lse) and, with ``grads``, the gradients of q and of every k, v (and the
    gates) under a random output gradient. ``select_blocks`` gets the reference's lse and is checked with
    ``assert_valid_selection``; ``selected_attention`` gets the float64 reference selection. ``impl_fn``
    runs on ``device``, the reference on ``reference_device`` (default: the same), e.g. on the CPU while
    compute-sanitizer watches the GPU.
    """
    if fn_name not in FUNCTIONS:
        raise ValueError(f"fn_name must be one of {FUNCTIONS}, got {fn_name!r}")
    config = problem.config
    want_grad = grads and fn_name != "select_blocks"
    ref_device = device if reference_device is None else reference_device
    x64 = problem.tensors(ref_device, torch.float64, requires_grad=want_grad)
    xdt = problem.tensors(ref_device, requires_grad=want_grad)
    ximpl = problem.tensors(device, requires_grad=want_grad)
    cu = x64.cu_seqlens
    kw = {} if cu is None else {"cu_seqlens": cu}
    kw_impl = {} if cu is None else {"cu_seqlens": ximpl.cu_seqlens}
    with torch.no_grad():
        _, lse64 = compressed_attention(x64.q, x64.k_cmp, x64.v_cmp, config, **kw)
        _, lse_dt = compressed_attention(xdt.q, xdt.k_cmp, xdt.v_cmp, config, **kw)
        idx64 = select_blocks(x64.q, x64.k_cmp, lse64, config, **kw)
        scores64 = selection_scores(x64.q, x64.k_cmp, lse64, config, **kw)
        scores_dt = selection_scores(xdt.q, xdt.k_cmp, lse_dt, config, **kw)
    score_tol = tolerance(scores64, scores_dt, problem.dtype, ratio=ratio, floor=floor)[0]
    if fn_name == "select_blocks":
        actual = impl_fn(*_args(fn_name, ximpl, lse_dt.detach().to(device), None), config, **kw_impl)
        assert_valid_selection(actual, scores64, idx64, score_tol, config, cu, name=fn_name)
        return

    mask = None
    if fn_name == "nsa_attention":  # rows whose block choice is a near tie are not compared (module docstring)
        scores = scores64.cpu().double()
        ambiguous = _decision_gap(scores, *_selection_masks(scores, idx64, config, cu)) <= score_tol
        mask = ~ambiguous.repeat_interleave(problem.group, dim=2)[..., None]
    grad_out = None
    if want_grad:
        gen = torch.Generator().manual_seed(problem.seed + 1)
        shape = (problem.batch, problem.seq_len, problem.q_heads, problem.head_dim_v)
        grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
        grad_out = (grad_out if mask is None else grad_out * mask).to(problem.dtype)

    runs = []
    for fn, x, dev in (
        (_REFERENCE[fn_name], x64, ref_device),
        (_REFERENCE[fn_name], xdt, ref_device),
        (impl_fn, ximpl, device),
    ):
        g = None if grad_out is None else grad_out.to(dev)
        runs.append(_run(fn, fn_name, _args(fn_name, x, None, idx64.to(dev)), config, x.cu_seqlens, g))
    (o64, g64), (odt, gdt), (oimpl, gimpl) = runs
    rule = {"dtype": problem.dtype, "ratio": ratio, "floor": floor}
    for what, actual, expected, same in zip(("output", "lse"), oimpl, o64, odt):
        assert_close_to_reference(actual, expected, same, name=f"{fn_name} {what}", mask=mask, **rule)
    for name in g64:
        assert_close_to_reference(gimpl[name], g64[name], gdt[name], name=f"{fn_name} gradient of {name}", **rule)
