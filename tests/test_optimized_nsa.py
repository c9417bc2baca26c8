"""optimized.nsa_attention against the reference: output and the gradients of q, every branch's k and v, gates."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from kernel_problems import DEVICE
from sparse_problems import problem, sparse_problems

import optimized
import reference
from optimized.nsa import combine_gates
from optimized.selected import forced_forward
from reference.config import NSAConfig
from reference.testing import NSAProblem, assert_close_to_reference, check_against_reference

CFG = NSAConfig(8, 4, 16, 3, 1, 1, window=12)


@settings(max_examples=8)
@given(sparse_problems(max_seq_len=64))
@example(problem(1, 1, 1, 16, 24, CFG, torch.float32))  # T = 1: no compressed block (lse = -inf)
@example(problem(45, 2, 3, 48, 24, NSAConfig(4, 2, 8, 4, 1, 2, window=9), torch.float16))
@example(problem(50, 1, 4, 32, 16, CFG, torch.float32, seqlens=(3, 30, 17)))  # packed
def test_nsa_matches_reference(p: NSAProblem) -> None:
    check_against_reference("nsa_attention", optimized.nsa_attention, p, device=DEVICE)


@pytest.mark.parametrize(
    "p",
    [
        problem(45, 2, 3, 48, 24, NSAConfig(4, 2, 8, 4, 1, 2, window=9), torch.float16),
        problem(50, 1, 4, 32, 16, CFG, torch.float32, seqlens=(3, 30, 17)),
        problem(33, 2, 1, 24, 40, CFG, torch.float32),
    ],
    ids=["G3-fp16", "G4-packed-fp32", "G1-fp32"],
)
def test_nsa_with_the_block_major_forward_matches_reference(p: NSAProblem) -> None:
    """The core with the selected forward block-major and Eq. 5 in its merge (the default of small groups at long
    sequences), forward and every gradient."""
    with forced_forward("blocks"):
        check_against_reference("nsa_attention", optimized.nsa_attention, p, device=DEVICE)


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_through_the_aux_outputs(packed: bool) -> None:
    """A loss that also reads the branch outputs and the lse (``return_aux``): the fused backward adds their
    gradients to the combine's, and every input gradient equals the reference's (float64)."""
    p = problem(37, 2, 2, 16, 24, CFG, torch.float32, seed=3, seqlens=(11, 26) if packed else None)
    grads = []
    for fn, dtype in ((reference.nsa_attention, torch.float64), (optimized.nsa_attention, torch.float32)):
        gen = torch.Generator().manual_seed(4)  # the same loss weights for both runs
        x = p.tensors(DEVICE, requires_grad=True)
        args = [t.detach().to(dtype).requires_grad_() for t in (x.q, x.k_cmp, x.v_cmp, x.k_slc, x.v_slc)]
        args += [t.detach().to(dtype).requires_grad_() for t in (x.k_win, x.v_win, x.gates)]
        out = fn(*args, CFG, cu_seqlens=x.cu_seqlens, return_aux=True)
        lse = torch.where(torch.isfinite(out.lse_cmp), out.lse_cmp, 0.0)
        terms = (out.o, out.o_cmp, out.o_slc, out.o_win, lse)
        ws = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype) for t in terms]
        loss = sum((w * t).sum() for w, t in zip(ws, terms))
        grads.append(torch.autograd.grad(loss, args))
    for name, want, got in zip(("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"), *grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("packed", [False, True])
def test_gate_folding_gives_the_branch_gradients_of_the_gated_do(dtype: torch.dtype, packed: bool) -> None:
    """Gate folding (optimized/nsa.py): every branch backward run on the core's do, lse - ln g_c and rowsum(o_c * do)
    gives the dq, dk, dv of its own gradient do_c = g_c do (as ``combine_gates_bwd`` writes it), zero gates
    included, and the same dgates."""
    from optimized.compressed import DKV_SPLIT_ROWS, compressed_interval_bounds
    from optimized.selection import select_core
    from optimized.window import window_bounds

    x = problem(45, 2, 3, 48, 24, CFG, dtype, seed=6, seqlens=(17, 28) if packed else None).tensors(DEVICE)
    nsa, cu, scale, T = torch.ops.nsa, x.cu_seqlens, 48**-0.5, x.q.shape[1]
    gates = torch.where(
        torch.rand(x.gates.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE) < 0.2, 0.0, x.gates
    )
    b_cmp = compressed_interval_bounds(T, x.k_cmp.shape[1], CFG, cu, x.q.device)
    b_win = window_bounds(T, CFG.window, cu, x.q.device)
    o_cmp, lse_cmp = nsa.interval_attention_fwd(x.q, x.k_cmp, x.v_cmp, b_cmp[0], b_cmp[1], scale)
    idx = select_core(x.q, x.k_cmp, lse_cmp, CFG, scale, cu)
    o_slc, lse_slc = nsa.selected_attention_fwd(x.q, x.k_slc, x.v_slc, idx, cu, CFG.select_block, scale)
    o_win, lse_win = nsa.interval_attention_fwd(x.q, x.k_win, x.v_win, b_win[0], b_win[1], scale)
    do = torch.randn(o_cmp.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)

    dgates, *stored_do, r_cmp, r_slc, r_win = nsa.combine_gates_bwd(gates, o_cmp, o_slc, o_win, do)
    fdgates, *folded = nsa.combine_gates_bwd_folded(gates, o_cmp, o_slc, o_win, do, lse_cmp, lse_slc, lse_win)
    torch.testing.assert_close(fdgates, dgates, rtol=0, atol=0)

    def run(c: int, do_c: torch.Tensor, lse: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if c == 0:
            args = (x.k_cmp, x.v_cmp, o_cmp, lse, do_c, None, *b_cmp, scale, DKV_SPLIT_ROWS, r)
            return nsa.interval_attention_bwd(x.q, *args)
        if c == 1:
            args = (x.k_slc, x.v_slc, o_slc, lse, do_c, idx, cu, CFG.select_block, scale, r)
            return nsa.selected_attention_bwd(x.q, *args)
        return nsa.interval_attention_bwd(x.q, x.k_win, x.v_win, o_win, lse, do_c, None, *b_win, scale, 0, r)

    tol = 1e-5 if dtype == torch.float32 else 4e-3  # relative to the largest element: do_c's rounding
    r_fold, lse_fold = folded[:3], folded[3:]
    branches = zip(("cmp", "slc", "win"), (lse_cmp, lse_slc, lse_win), (r_cmp, r_slc, r_win))
    for c, (branch, lse, r) in enumerate(branches):
        want = run(c, stored_do[c], lse, r)
        got = run(c, do, lse_fold[c], r_fold[c])
        for name, a, b in zip(("dq", "dk", "dv"), want, got):
            assert not b.isnan().any(), f"{branch} {name}"
            bound = tol * a.float().abs().max().item()
            torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=bound, msg=f"{branch} {name}")


def test_metadata_under_graph_capture_is_written_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a CUDA graph captures (simulated here), ``device_tensor`` writes the values on the device instead of
    copying a host buffer that the graph would re-read at every replay, and ``shape_metadata`` builds afresh
    instead of handing the graph cached tensors; the values are the same."""
    from optimized import _common

    device = torch.device(DEVICE)
    values = [0, 300, 345, 1 << 40]
    eager = _common.device_tensor(values, torch.int64, device)
    copies = []
    monkeypatch.setattr(_common, "capturing", lambda: True)
    monkeypatch.setattr(torch.Tensor, "to", lambda *a, **k: copies.append(a) or pytest.fail("a host copy"))
    captured = _common.device_tensor(values, torch.int64, device)
    assert captured.device == device and not copies
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    built = []

    def build() -> tuple[torch.Tensor, ...]:
        built.append(1)
        return (captured,)

    _common.shape_metadata(build, ("capture test",))
    _common.shape_metadata(build, ("capture test",))
    assert len(built) == 2 and ("capture test",) not in _common._METADATA


@pytest.mark.gpu
@pytest.mark.parametrize("forward", ["tiles", "blocks"])
def test_nsa_training_step_replays_from_a_cuda_graph(forward: str) -> None:
    """A dense batch's forward and backward capture in a CUDA graph (after a warm-up that compiles and
    autotunes) and replay on new inputs as the eager calls compute them: no host sync, no host buffer read at
    replay, the selection recomputed on the device. Both selected forwards (``forced_forward``)."""
    cfg, names = NSAConfig(), ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates")

    def inputs(seed: int) -> list[torch.Tensor]:
        x = problem(700, 2, 4, 64, 64, cfg, torch.bfloat16, batch=2, seed=seed).tensors("cuda")
        return [getattr(x, n) for n in names]

    static = [t.detach().clone().requires_grad_() for t in inputs(0)]
    grad = torch.randn(static[0].shape, device="cuda", dtype=torch.bfloat16)

    def step() -> tuple[torch.Tensor, ...]:
        o = optimized.nsa_attention(*static, cfg)
        return (o, *torch.autograd.grad(o, static, grad))

    with forced_forward(forward):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = step()
        for seed in (1, 2):
            with torch.no_grad():
                for t, new in zip(static, inputs(seed)):
                    t.copy_(new)
            graph.replay()
            for name, got, want in zip(("o", *names), replayed, step()):
                assert not got.isnan().any(), name
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2, msg=name)


def test_shape_metadata_is_built_once_per_shape() -> None:
    """A dense batch's key bounds and tiles are built once per shape and reused (the same tensors, equal to a
    fresh build from ``cu_seqlens = [0, T]``, which is never cached); the cache starts over when full."""
    from optimized import _common
    from optimized._sparse import sequence_tiles
    from optimized.compressed import compressed_interval_bounds
    from optimized.window import window_bounds

    cfg, device = NSAConfig(), torch.device(DEVICE)
    whole = torch.tensor([0, 300], dtype=torch.int32, device=device)
    for build in (
        lambda cu: window_bounds(300, 64, cu, device),
        lambda cu: compressed_interval_bounds(300, cfg.num_compressed(300), cfg, cu, device),
    ):
        first, again, fresh = build(None), build(None), build(whole)
        assert all(a is b for a, b in zip(first, again))
        assert not any(a is b for a, b in zip(first, fresh))
        for a, b in zip(first, fresh):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    tiles = sequence_tiles([300, 45], cfg, 16, 16, device)
    assert all(a is b for a, b in zip(tiles, sequence_tiles([300, 45], cfg, 16, 16, device)))
    assert tiles[2].numel() != sequence_tiles([300], cfg, 16, 16, device)[2].numel()
    for T in range(2 * _common._METADATA_ENTRIES):
        window_bounds(T + 1, 64, None, device)
    assert len(_common._METADATA) <= _common._METADATA_ENTRIES


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_combine_gates_matches_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (2, 7, 3, 40)
    x64 = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    x64 = [torch.rand(*shape[:3], 3, generator=gen, dtype=torch.float64), *x64]
    do = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    runs = []
    for fn, cast in (
        (reference.combine_gates, torch.float64),
        (reference.combine_gates, dtype),
        (combine_gates, dtype),
    ):
        xs = [x.to(dtype).to(device=DEVICE, dtype=cast).requires_grad_() for x in x64]
        o = fn(*xs)
        runs.append((o, *torch.autograd.grad(o, xs, do.to(device=DEVICE, dtype=o.dtype))))
    for name, a, e, s in zip(("o", "dgates", "do_cmp", "do_slc", "do_win"), *runs[::-1]):
        assert_close_to_reference(a, e, s, name=name)


def _compiled_matches_eager(backend: str, device: str) -> None:
    p = problem(40, 2, 2, 16, 32, CFG, torch.float32, seed=1)
    fn = torch.compile(optimized.nsa_attention, backend=backend, fullgraph=True)
    results = []
    for f in (optimized.nsa_attention, fn):
        x = p.tensors(device, requires_grad=True)
        args = (x.q, x.k_cmp, x.v_cmp, x.k_slc, x.v_slc, x.k_win, x.v_win, x.gates)
        o = f(*args, CFG)
        results.append((o, *torch.autograd.grad(o.square().sum(), args)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nsa_compiles_fullgraph() -> None:
    """torch.compile(fullgraph=True) traces the whole core (custom ops, no graph break); aot_eager on the CPU."""
    torch._dynamo.reset()
    _compiled_matches_eager("aot_eager", DEVICE)


def test_nsa_rejects_bad_arguments_like_reference() -> None:
    p = problem(20, 1, 2, 16, 16, CFG, torch.float32)
    x = p.tensors()
    args = [x.q, x.k_cmp, x.v_cmp, x.k_slc, x.v_slc, x.k_win, x.v_win, x.gates[..., :2]]
    for fn in (reference.nsa_attention, optimized.nsa_attention):
        with pytest.raises(ValueError, match="gates must have shape"):
            fn(*args, CFG)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        optimized.nsa_attention(*[a.double() for a in args[:-1]], x.gates.double(), CFG)


@pytest.mark.gpu
def test_nsa_compiles_with_inductor() -> None:
    torch._dynamo.reset()
    _compiled_matches_eager("inductor", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "p",
    [
        problem(4096, 1, 16, 192, 128, NSAConfig(), torch.bfloat16),
        problem(4096, 4, 1, 128, 128, NSAConfig(), torch.bfloat16),
        problem(2048, 2, 4, 128, 96, NSAConfig(), torch.float16, batch=2),
        problem(4096, 1, 16, 128, 128, NSAConfig(), torch.bfloat16, seqlens=(1000, 3000, 96)),
        problem(8192, 1, 16, 128, 128, NSAConfig(), torch.bfloat16),
        problem(16384, 1, 4, 64, 64, NSAConfig(), torch.bfloat16),  # block-major; the reference's memory as T8k's
    ],
    ids=["G16-dk192-bf16", "G1-bf16", "B2-G4-fp16", "varlen-bf16", "T8k-bf16", "G4-16k-block-major-bf16"],
)
def test_nsa_gpu_large(p: NSAProblem) -> None:
    check_against_reference("nsa_attention", optimized.nsa_attention, p, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("forward", ["tiles", "blocks"])
def test_nsa_never_waits_for_the_gpu(forward: str) -> None:
    """A dense batch's forward and backward issue no host sync (after the first call, which compiles and
    autotunes), so the host runs ahead of the device as a training loop needs; torch's sync debug mode raises
    on any synchronising call (a blocking copy such as ``torch.tensor(list, device="cuda")``, ``.item()``).
    Both selected forwards (``forced_forward``)."""
    p = problem(1000, 2, 8, 64, 64, NSAConfig(), torch.bfloat16)
    x = p.tensors("cuda", requires_grad=True)
    args = (x.q, x.k_cmp, x.v_cmp, x.k_slc, x.v_slc, x.k_win, x.v_win, x.gates)

    def step() -> None:
        o = optimized.nsa_attention(*args, NSAConfig())
        torch.autograd.grad(o, args, torch.ones_like(o))

    with forced_forward(forward):
        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
