"""CPU smoke tests of the benchmarks: the FLOP counts against brute-force mask counts, the selection
check, the harnesses (with the reference as the implementation, host-clock timing) and the plots."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from kernel_problems import DEVICE

import reference as ref
from benchmarks import decode, flops, plot, run
from benchmarks.timing import Budget, rotation_sets, time_calls, time_graph
from reference.masks import causal, compressed_visible, selected_token_mask, window_token_mask

SMALL_CONFIGS = [
    ref.NSAConfig(16, 8, 16, 4, 1, 2, 32),
    ref.NSAConfig(8, 4, 16, 3, 0, 1, 10),
    ref.NSAConfig(16, 16, 16, 5, 2, 2, 7),
]
LENGTHS = [1, 7, 16, 33, 80, 150]
CPU = torch.device("cpu")


def _selection(T: int, config: ref.NSAConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference block indices, selection scores and inputs (HQ=4, H=2, D=16) at T tokens."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, 4, 16, generator=g)
    k_cmp = torch.randn(1, config.num_compressed(T), 2, 16, generator=g)
    _, lse = ref.compressed_attention(q, k_cmp, torch.randn(k_cmp.shape, generator=g), config)
    return ref.select_blocks(q, k_cmp, lse, config), ref.selection_scores(q, k_cmp, lse, config), lse


@pytest.mark.parametrize("config", SMALL_CONFIGS)
@pytest.mark.parametrize("T", LENGTHS)
def test_pair_counts_match_the_masks(config: ref.NSAConfig, T: int) -> None:
    t = torch.arange(T)
    assert flops.causal_pairs(T) == int(causal(t, t).sum())
    assert flops.window_pairs(T, config) == int(window_token_mask(T, config).sum())
    i = torch.arange(config.num_compressed(T))
    assert flops.compressed_pairs(T, config) == int(compressed_visible(t, i, config).sum())
    block_idx, _, _ = _selection(T, config, seed=T)
    for h in range(block_idx.shape[2]):
        assert flops.selected_pairs(T, config) == int(selected_token_mask(block_idx[0, :, h], config).sum())


def test_selected_pairs_needs_a_local_block() -> None:
    with pytest.raises(ValueError, match="num_local"):
        flops.selected_pairs(100, ref.NSAConfig(num_local=0))


def test_flops_at_paper_scale() -> None:
    shape, config, T = flops.AttnShape(1, 64, 4, 128, 128), ref.NSAConfig(), 8192
    f = flops.branch_flops(T, shape, config)
    assert f["full"] == 4 * 64 * T * (T + 1) // 2 * 128
    assert f["window"] == 4 * 64 * 128 * (512 * 513 // 2 + (T - 512) * 512)
    assert f["selection"] * 2 == f["compressed"]
    assert f["core"] == f["compressed"] + f["selection"] + f["selected"] + f["window"]
    assert flops.backward_flops("core", f["core"], f) == round(2.5 * (f["core"] - f["selection"]))
    assert flops.backward_flops("selection", f["selection"], f) == 0
    b = flops.branch_bytes(T, shape, config)
    assert b["full"] == 2 * T * (64 * 128 * 2 + 4 * 256)
    assert flops.ceilings("NVIDIA H200") == flops.CEILINGS["H200"]
    assert flops.ceilings("unknown card") == flops.CEILINGS["H100"]
    # decode: the paper's Table 4 ratio at 64k (11.6x) comes back through the bytes model
    full = flops.decode_bytes(65536, shape)
    nsa = flops.decode_bytes(ref.decode_tokens_read(65536, config), shape)
    assert full / nsa == pytest.approx(65536 / 5632, rel=1e-2)


def test_selection_gap_catches_wrong_selections() -> None:
    config, T = SMALL_CONFIGS[0], 150
    block_idx, scores, _ = _selection(T, config, seed=0)
    assert run.selection_gap(block_idx, scores, config) == (True, 0.0)
    # the last query has 10 candidates and 4 slots: swap its best free block for its worst unchosen one
    t = T - 1
    free = [j for j in range(t // 16 + 1) if j not in (0, t // 16, t // 16 - 1)]
    row = scores[0, t, 0]
    chosen = [j for j in block_idx[0, t, 0].tolist() if j in free]
    worst_unchosen = min((j for j in free if j not in chosen), key=lambda j: row[j])
    wrong = block_idx.clone()
    wrong[0, t, 0] = torch.tensor(sorted([*(j for j in block_idx[0, t, 0].tolist() if j != chosen[0]), worst_unchosen]))
    ok, gap = run.selection_gap(wrong, scores, config)
    assert ok and gap > 0
    missing_forced = block_idx.clone()
    missing_forced[0, t, 0] = torch.tensor([chosen[0], t // 16 - 1, t // 16, -1])  # block 0 dropped
    assert not run.selection_gap(missing_forced, scores, config)[0]


def test_timing_on_the_cpu() -> None:
    calls = []
    timing = time_calls([lambda: calls.append(1)], CPU, budget_ms=0.0, min_reps=4)
    assert timing.reps == 4 and len(calls) == 5 and timing.median_ms >= 0
    assert rotation_sets(10, CPU) == 1
    assert not Budget(None).expired() and Budget(-1).expired()


def _bench(tmp_path: Path, *extra: str) -> dict:
    args = ["--impl", "reference", "--configs", "tiny", "--lengths", "48", "--check-len", "48", "--min-reps", "1"]
    args += ["--device", "cpu"]  # CPU smoke test also on the GPU machine
    run.main([*args, "--out", str(tmp_path), *extra])
    return json.loads((tmp_path / "bench.json").read_text())


def test_harness_with_the_reference(tmp_path: Path) -> None:
    data = _bench(tmp_path, "--branches", "core", "selection")
    assert data["checks"]["tiny"]["nsa"]["passed"]
    assert data["errors"] == [] and not data["stopped_early"]
    got = {(r["part"], r["pass"]) for r in data["records"]}
    assert got == {("core", "fwd"), ("core", "bwd"), ("selection", "fwd")}
    core_bwd = next(r for r in data["records"] if (r["part"], r["pass"]) == ("core", "bwd"))
    assert core_bwd["method"] == "backward alone (retained graph)" and core_bwd["ms"] > 0
    f = flops.branch_flops(48, run.CONFIGS["tiny"].shape(), run.CONFIGS["tiny"].nsa)
    assert core_bwd["flops"] == flops.backward_flops("core", f["core"], f)
    assert (tmp_path / "breakdown_tiny.png").exists()


@pytest.mark.parametrize("impl", ["reference", "optimized"])
def test_selected_part_is_the_public_function_without_its_index_checks(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timed selected part computes what ``selected_attention`` does, but never checks block_idx's values
    (host syncs that the core does not run): with the check made to fail, the part still runs."""
    m = importlib.import_module(impl)
    cfg = run.CONFIGS["tiny"]
    x = run.make_inputs(cfg, 40, DEVICE, seed=3)
    q, kc, ks, vs = (x[n].detach() for n in ("q", "k_cmp", "k_slc", "v_slc"))
    _, lse = m.compressed_attention(q, kc, x["v_cmp"].detach(), cfg.nsa)
    idx = m.select_blocks(q, kc, lse, cfg.nsa)
    want = m.selected_attention(q, ks, vs, idx, cfg.nsa)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the timed part checked block_idx")

    monkeypatch.setattr(importlib.import_module(f"{impl}.selected"), "check_block_idx", refuse)
    parts = run.nsa_parts(m, x, cfg, ("selected", "core_nowin"))
    torch.testing.assert_close(parts["selected"].fwd(), want, rtol=0, atol=0)
    assert torch.isfinite(parts["core_nowin"].fwd()).all()
    with pytest.raises(AssertionError, match="checked block_idx"):
        m.selected_attention(q, ks, vs, idx, cfg.nsa)


def test_harness_stops_when_out_of_time(tmp_path: Path) -> None:
    data = _bench(tmp_path, "--max-minutes", "0", "--fwd-only")
    assert data["stopped_early"] and data["records"] == []
    assert "grad_q" not in data["checks"]["tiny"]["nsa"]


def _synthetic() -> dict:
    records = []
    for T in (8192, 16384):
        for pass_ in ("fwd", "bwd"):
            for part in ("core", "compressed", "selected", "window"):
                records.append(
                    {
                        "config": "default",
                        "seq_len": T,
                        "impl": "nsa",
                        "part": part,
                        "pass": pass_,
                        "ms": 1.0,
                        "tflops": 1.0,
                        "peak_gib": 1.5,
                    }
                )
            for i, b in enumerate(run.BASELINES):
                records.append(
                    {"config": "default", "seq_len": T, "impl": b, "part": "full", "pass": pass_, "ms": 2.0 + i}
                )
    return {
        "env": {"card": "NVIDIA H100 80GB HBM3"},
        "impl": "optimized",
        "stopped_early": False,
        "configs": [{"name": "default"}],
        "checks": {"default": {"nsa": {"passed": True}}},
        "records": records,
    }


def test_plots_and_table_from_synthetic_json(tmp_path: Path) -> None:
    data = _synthetic()
    (tmp_path / "bench.json").write_text(json.dumps(data))
    assert plot.main(["--json", str(tmp_path / "bench.json")]) == 0
    assert (tmp_path / "speedup_default.png").stat().st_size > 1000
    assert (tmp_path / "breakdown_default.png").stat().st_size > 1000
    rows = run.speedups(data["records"], "default")
    assert rows[0]["flash_speedup"] == 2.0 and rows[0]["flex_speedup"] == 4.0
    table = run.summary_table(data)
    assert "4.00" in table and "nsa 1.50" in table


def test_merged_runs_keep_each_length_from_one_run(tmp_path: Path) -> None:
    old, new = _synthetic(), _synthetic()
    old["env"]["git_commit"], new["env"]["git_commit"] = "a", "b"
    T = old["records"][0]["seq_len"]
    # the new run timed only the core at T, and slower baselines: T comes from it alone
    new["records"] = [r | {"ms": 2 * r["ms"]} for r in new["records"] if r["seq_len"] == T]
    new["records"] = [r for r in new["records"] if r["impl"] != "nsa" or r["part"] == "core"]
    for i, d in enumerate((old, new)):
        (tmp_path / f"{i}.json").write_text(json.dumps(d))
    out = tmp_path / "merged" / "bench.json"
    assert plot.main(["--json", str(tmp_path / "0.json"), str(tmp_path / "1.json"), "--merged", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [r["git_commit"] for r in merged["runs"]] == ["a", "b"]
    at_t = [r for r in merged["records"] if r["seq_len"] == T]
    assert at_t and all(r["run"] == 1 for r in at_t)
    assert len(at_t) == len(new["records"])  # the old run's branch records at T are dropped with its core
    assert any(r["run"] == 0 for r in merged["records"])
    assert (out.parent / "speedup_default.png").exists()
    newest = _synthetic()  # a merge merged again keeps its runs and which run each record came from
    newest["env"]["git_commit"] = "c"
    newest["records"] = [r for r in newest["records"] if r["seq_len"] != T]
    again = plot.merge_runs([merged, newest])
    assert [r["git_commit"] for r in again["runs"]] == ["a", "b", "c"]
    assert {r["run"] for r in again["records"] if r["seq_len"] == T} == {1}
    assert {r["run"] for r in again["records"] if r["seq_len"] != T} == {2}
    new["env"]["card"] = "NVIDIA H200"
    with pytest.raises(ValueError, match="one card"):
        plot.merge_runs([old, new])


@pytest.mark.parametrize("context", [5, 40, 131])
@pytest.mark.parametrize("config", SMALL_CONFIGS[:2])
def test_eager_decode_step_matches_the_prefill(context: int, config: ref.NSAConfig) -> None:
    cfg = run.BenchConfig("t", heads_q=4, heads_kv=2, dim_k=16, dim_v=8, dtype="float32", nsa=config)
    x = {n: t.detach() for n, t in run.make_inputs(cfg, context, CPU, seed=context).items()}
    w = min(config.window, context)
    problem = decode.DecodeProblem(
        cfg, context, x["q"][:, -1:], x["k_cmp"], x["v_cmp"], x["k_slc"], x["v_slc"],
        x["k_win"][:, -w:], x["v_win"][:, -w:], x["gates"][:, -1:],
    )  # fmt: skip
    expected = ref.nsa_attention(*(x[n] for n in run.INPUT_NAMES), config)[:, -1:]
    torch.testing.assert_close(decode.eager_step(problem)(), expected, rtol=1e-5, atol=1e-5)


def test_decode_harness(tmp_path: Path) -> None:
    argv = ["--config", "tiny", "--contexts", "64", "--batches", "2", "--min-reps", "1", "--out", str(tmp_path)]
    argv += ["--device", "cpu"]
    factories = ["benchmarks.decode:eager_step", "no_such_module:step"]
    assert decode.main([*argv, "--nsa-factory", *factories]) == 0
    data = json.loads((tmp_path / "decode.json").read_text())
    assert data["nsa"]["no_such_module:step"].startswith("not available")
    recs = {r["impl"]: r for r in data["records"]}
    assert set(recs) == {"sdpa", "sdpa_gqa", "benchmarks.decode:eager_step"}
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-5 for r in recs.values())
    assert recs["benchmarks.decode:eager_step"]["tokens_read"] == ref.decode_tokens_read(64, run.CONFIGS["tiny"].nsa)
    row = plot.decode_rows([data])[2, 64]
    assert row["nsa_us"] == recs["benchmarks.decode:eager_step"]["us"]
    assert row["full_us"] == min(recs["sdpa"]["us"], recs["sdpa_gqa"]["us"])
    assert plot.main(["--decode", str(tmp_path / "decode.json")]) == 0
    assert (tmp_path / "decode_tiny.png").stat().st_size > 1000


@pytest.mark.gpu
def test_baseline_check_and_graph_timing_on_the_gpu() -> None:
    device = torch.device("cuda")
    cfg = run.BenchConfig("small", heads_q=8, heads_kv=2, dim_k=64, dim_v=64)
    mode, info = run.check_baseline("flash", cfg, 256, device)
    assert mode is not None, info
    x = torch.randn(1 << 20, device=device)
    timing, method = time_graph([lambda: x.mul(2.0).sum()], device, budget_ms=10.0)
    assert method == "cuda_graph" and timing.median_ms > 0


@pytest.mark.gpu
def test_back_to_back_timing_measures_the_device_not_the_queue() -> None:
    """Calls issued back to back: each time is its own device time (not its wait in the queue), the host's
    launch time per call is reported beside it and is far below a long kernel's."""
    device = torch.device("cuda")
    x = torch.randn(1 << 24, device=device)
    one = time_calls([lambda: x.mul(2.0)], device, budget_ms=20.0, min_reps=8)
    ten = time_calls([lambda: [x.mul(2.0) for _ in range(10)]], device, budget_ms=20.0, min_reps=8)
    assert one.reps >= 8 and one.host_ms is not None
    assert 5 * one.median_ms < ten.median_ms < 20 * one.median_ms  # queued calls do not add up
    assert ten.host_ms < ten.median_ms


def test_bounds_gather_reads_the_selected_tokens() -> None:
    """The gather kernel sums exactly the K/V tokens s <= t of each selected block, and its byte count agrees."""
    from benchmarks import bounds

    r = bounds.measure(45, "tiny", torch.device(DEVICE))
    k, v, idx, got = (r["inputs"][n] for n in ("k", "v", "block_idx", "gather_sum"))
    ls = run.CONFIGS["tiny"].nsa.select_block
    want = torch.zeros_like(got, dtype=torch.float64)
    tokens = 0
    for t in range(45):
        for h in range(k.shape[2]):
            for j in idx[0, t, h].tolist():
                if j >= 0:
                    s = slice(j * ls, min(j * ls + ls, t + 1))
                    want[t, h] += (k[0, s, h].double() + v[0, s, h].double()).sum()
                    tokens += s.stop - s.start
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert r["gather_bytes"] == tokens * 2 * k.shape[-1] * k.element_size()
    assert set(bounds.floors(r, 100.0)) == {"compressed", "selection", "window", "selected", "core"}


def test_bounds_launch_chain_runs_each_link_once_per_step() -> None:
    """The chain's links depend on each other: after the timed steps every element counts links * steps."""
    from benchmarks import bounds

    links = 3
    us, last = bounds.launch_chain(torch.device(DEVICE), links, programs=5)
    steps = int(last[0].item()) // links
    assert us > 0 and last.shape == (5,)
    assert steps >= 2 and torch.equal(last, torch.full_like(last, links * steps))
    r = bounds.chain(torch.device(DEVICE))
    assert len(r["us"]) == len(r["links"]) and r["us_per_link"] == r["us_per_link"]  # not NaN
    if DEVICE == "cuda":
        assert len(r["us_pdl"]) == len(r["links"]) and r["us_per_link"] > 0


def test_autotune_choices_name_each_tuned_kernel() -> None:
    """What the autotuner picked, per kernel and key, as the benchmark JSON records it."""
    from optimized import selection

    kernel = selection.select_blocks_kernel
    key = ("a key",)
    kernel.cache[key] = kernel.configs[0]
    try:
        choices = run.autotune_choices()
    finally:
        del kernel.cache[key]
    assert choices["optimized.selection.select_blocks_kernel"] == {repr(key): str(kernel.configs[0])}
    assert "optimized.selection.select_blocks_kernel" not in run.autotune_choices()


def test_decode_latency_model_recovers_a_line() -> None:
    """latency_model fits us = fixed + bytes / bandwidth per batch, and skips a batch with fewer than 3 contexts."""
    rows = {(1, c): {"nsa_us": 14.0 + c * 2e6 / 1.8e6, "nsa_bytes": c * 2e6} for c in (1, 2, 4, 8)}
    rows[1, 2]["nsa_us"] += 0.3  # one point off the line
    rows |= {(32, c): {"nsa_us": 10.0, "nsa_bytes": 1.0} for c in (1, 2)}
    fits = plot.latency_model(rows)
    assert set(fits) == {1}
    assert fits[1]["fixed_us"] == pytest.approx(14.0, abs=0.5)
    assert fits[1]["tbps"] == pytest.approx(1.8, rel=0.05)
    assert 0.1 < fits[1]["max_resid_us"] < 0.3
