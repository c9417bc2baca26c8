"""CPU smoke tests of the GPU experiment scripts (scripts/), run through the interpreter at small shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from kernel_problems import DEVICE

import optimized

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_times_script(tmp_path: Path) -> None:
    """kernel_times.py profiles CPU ops on the CPU: the table has the NSA custom ops."""
    kernel_times = load_script("kernel_times")
    argv = ["--core", "tiny", "24", "--warmup", "0", "--iters", "1", "--out", str(tmp_path), "--device", str(DEVICE)]
    assert kernel_times.main([*argv, "--host-profile"]) == 0
    table = json.loads((tmp_path / "kernel_times.json").read_text())["tables"]["core tiny T=24"]
    names = {row["name"] for row in table}
    assert {"nsa::interval_attention_fwd", "nsa::select_blocks", "nsa::selected_attention_bwd"} <= names
    assert "(selected_attention_bwd)" in (tmp_path / "host_profile.txt").read_text()  # the backward is profiled
    forward = [*argv, "--forward-only", "--selected-forward", "blocks", "--host-profile"]
    assert kernel_times.main(forward) == 0
    table = json.loads((tmp_path / "kernel_times.json").read_text())["tables"]
    names = {row["name"] for row in table["forward tiny T=24 selected-forward=blocks"]}
    assert "nsa::selected_attention_gated_fwd" in names and "nsa::selected_attention_bwd" not in names
    profile = (tmp_path / "host_profile.txt").read_text()
    assert "(selected_fwd_block_kernel)" in profile and "(selected_fwd_kernel)" not in profile  # forced forward
    with pytest.raises(SystemExit):
        kernel_times.main(["--core", "no_such_config", "24"])


def test_check_configs_passes_and_catches(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """check_configs.py passes the real kernels; a wrong and a non-repeatable mean_pool each fail it."""
    check_configs = load_script("check_configs")
    device = str(DEVICE)
    assert check_configs.check_kernel("interval_dkv", ["g16"], device) == 0
    kv_operands = check_configs.selected._kv_operands
    assert check_configs.check_kernel("selected_dq_pointers", ["g16"], device) == 0  # rows aligned: TMA otherwise
    assert check_configs.selected._kv_operands is kv_operands
    assert check_configs.check_kernel("mean_pool_fwd", ["g16"], device) == 0
    real = optimized.mean_pool
    monkeypatch.setattr(optimized, "mean_pool", lambda x, config: real(x, config) * 1.01)
    assert check_configs.check_kernel("mean_pool_fwd", ["g16"], device) == 1
    assert "FAILED: mean_pool: differs from the float64 reference" in capsys.readouterr().out
    calls = iter(range(100))

    def one_ulp_off_every_other_call(x: torch.Tensor, config: object) -> torch.Tensor:
        y = real(x, config)
        if next(calls) % 2:  # within any tolerance, but not bitwise equal to the previous call's
            y = y + (torch.nextafter(y.detach(), torch.full_like(y, float("inf"))) - y.detach())
        return y

    monkeypatch.setattr(optimized, "mean_pool", one_ulp_off_every_other_call)
    assert check_configs.check_kernel("mean_pool_fwd", ["g16"], device) == 1
    assert "mean_pool differs between runs" in capsys.readouterr().out


def test_spills_reports_registers_and_sass(tmp_path: Path) -> None:
    """spills.py compiles a kernel for sm_90 on the CPU, reports ptxas' registers and counts its SASS, on its hot
    path and per loop, with each loop's busiest source lines (in its own process: this one runs the kernels in the
    interpreter, where they cannot be compiled)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = [sys.executable, str(SCRIPTS / "spills.py")]
    argv = [*run, "decode_select", "decode_compressed", "--sass-dir", str(tmp_path), "--lines", "3"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "decode_select" in done.stdout and "regs" in done.stdout and "spill stores" in done.stdout
    counts = [int(n) for n in re.findall(r"sass: (\d+) instructions", done.stdout)]
    hot = [int(n) for n in re.findall(r"hot path: (\d+) instructions", done.stdout)]
    assert len(counts) == len(hot) == 2 and all(100 < h <= n for h, n in zip(hot, counts))
    loops = re.findall(r"@(\d+): (\d+) \((\d+) BAR", done.stdout.split("decode_compressed")[-1])
    assert loops and all(0 < int(body) < hot[-1] for _, body, _ in loops)  # the pass's loop over its tiles
    assert any(path.read_text().count("BAR.SYNC") for path in tmp_path.glob("decode_select_*.sass"))
    # each loop's body, attributed to source lines: at most 3 lines each, their counts within the body's size
    attributed = re.findall(r"loop @\d+: (\d+) instructions\n((?:      .*\n?)+)", done.stdout)
    assert attributed
    for body, lines in attributed:
        counts = [int(n) for n in re.findall(r"^\s+(\d+)  ", lines, flags=re.M)]
        assert 0 < len(counts) <= 3 and sum(counts) <= int(body)
    assert re.search(r"^\s+\d+  decode\.py:\d+ \S", done.stdout, flags=re.M)  # the kernel's own code, by line
    bad = subprocess.run([*run, "no_such_kernel"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "kernel must be one of" in bad.stderr


def test_selected_dq_compiles_to_wgmma_and_tma() -> None:
    """The point of the transposed selected dq (S^T = K Q^T, dQ^T = K^T dS^T): at 16 rows per program its matmuls on
    sm_90 are wgmma (HGMMA, no HMMA: the untransposed 16-row tile has M = 16, below wgmma's 64) and, with
    descriptors, its K/V tiles are bulk tensor copies (UTMALDG)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = [sys.executable, str(SCRIPTS / "spills.py"), "selected_dq", "--sass"]
    done = subprocess.run(run, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.findall(r"HMMA (\d+), HGMMA (\d+), UTMALDG (\d+)", done.stdout)
    assert found and all(hmma == "0" and int(hgmma) > 0 and int(tma) > 0 for hmma, hgmma, tma in found)


def test_decode_launch_variants() -> None:
    """decode_launch.py turns its knobs into one variant each: launch options per kernel, then cache splits."""
    decode_launch = load_script("decode_launch")
    args = decode_launch.argparse.Namespace(
        warps=["select=4,16"],
        stages=["compressed=3"],
        split_tiles=[2],
        split_blocks=[],
        tile_blocks=[32],
        combine_columns=[64],
        pre_merge_splits=[16],
        transposed=True,
    )
    *knobs, (label, launch, splits, replaced) = decode_launch.variants(args)
    assert knobs == [
        ("default", {}, {}, {}),
        ("select num_warps=4", {"select": {"num_warps": 4}}, {}, {}),
        ("select num_warps=16", {"select": {"num_warps": 16}}, {}, {}),
        ("compressed num_stages=3", {"compressed": {"num_stages": 3}}, {}, {}),
        ("split_tiles=2", {}, {"split_tiles": 2}, {}),
        ("tile_blocks=32", {}, {"tile_blocks": 32}, {}),
        ("combine_columns=64", {}, {}, {"COMBINE_COLUMNS": 64}),
        ("pre_merge_splits=16", {}, {}, {"PRE_MERGE_SPLITS": 16}),
        ("pre_merge_splits=16 combine_columns=64", {}, {}, {"PRE_MERGE_SPLITS": 16, "COMBINE_COLUMNS": 64}),
    ]
    assert (label, launch, splits) == ("compressed transposed", {}, {})
    assert [(name, kernel.fn.__name__) for name, kernel in replaced.items()] == [
        ("decode_compressed_kernel", "decode_compressed_t_kernel")
    ]
    args.stages = ["no_such_kernel=3"]
    with pytest.raises(SystemExit, match="--stages: kernel must be one of"):
        decode_launch.variants(args)


def test_run_bench_runs_its_own_tree(tmp_path: Path) -> None:
    """run_bench.py is benchmarks.run, importable from any working directory (as ab_base/scripts/run_bench.py)."""
    args = ["--impl", "reference", "--configs", "tiny", "--lengths", "48", "--check-len", "48", "--min-reps", "1"]
    args += ["--branches", "core", "--device", "cpu", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "run_bench.py"), *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert {(r["part"], r["pass"]) for r in records} == {("core", "fwd"), ("core", "bwd")}


def test_selection_tiles_script(tmp_path: Path) -> None:
    """selection_tiles.py: another chunk of selection blocks, or fewer rows per program, picks the same blocks."""
    selection_tiles = load_script("selection_tiles")
    argv = ["--configs", "tiny", "--lengths", "40", "--chunks", "16", "--rows", "16"]
    assert selection_tiles.main([*argv, "--out", str(tmp_path), "--device", str(DEVICE)]) == 0
    records = json.loads((tmp_path / "selection_tiles.json").read_text())["records"]
    assert [(r["bs"], r["rows"]) for r in records] == [(None, None), (None, 16), (16, None), (16, 16)]
    assert all(r["rows_differing"] == 0 for r in records)


def test_selected_tiles_script(tmp_path: Path) -> None:
    """selected_tiles.py: larger row tiles and the block-major forward (rows 0) compute the same, and larger tiles
    load fewer blocks per position."""
    selected_tiles = load_script("selected_tiles")
    argv = ["--configs", "tiny", "--lengths", "40", "--rows", "32", "--block-major", "--out", str(tmp_path)]
    assert selected_tiles.main([*argv, "--device", str(DEVICE)]) == 0
    records = {r["rows"]: r for r in json.loads((tmp_path / "selected_tiles.json").read_text())["records"]}
    assert set(records) == {0, 16, 32}
    assert records[0]["rel_err_vs_default"] < 1e-2 and records[0]["bwd_ms"] is None
    assert records[32]["rel_err_vs_default"] < 1e-2
    assert records[32]["blocks_loaded_per_position"] < records[16]["blocks_loaded_per_position"]
    assert records[32]["computed_per_selected_block_rows"] >= 1.0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_transposed_decode_compressed_pass_writes_what_production_writes(dtype: str) -> None:
    """swapab.py's decode_compressed_t_kernel, swapped into the step, writes the same partial softmax states and
    selection sums (halo included) as production's kernel: G = 16, odd head dims, ragged lengths, workspaces
    NaN-filled before each step so that an entry written by only one kernel fails."""
    import optimized.decode as kernels
    from benchmarks import decode, run
    from reference.config import NSAConfig

    swapab = load_script("swapab")
    cfg = run.BenchConfig(
        "t", heads_q=32, heads_kv=2, dim_k=24, dim_v=20, dtype=dtype, nsa=NSAConfig(32, 16, 64, 4, 1, 1, 64)
    )
    p = decode.make_problem(cfg, 3, 2500, DEVICE, seed=5)  # 3 tiles of 16 selection blocks: halos
    cache = decode.filled_cache(p)
    cache.lengths.copy_(torch.tensor([2500, 1431, 97], device=DEVICE, dtype=cache.lengths.dtype))
    names = ("cmp_m", "cmp_l", "cmp_acc", "sel", "sel_ref")
    written = []
    for kernel in (kernels.decode_compressed_kernel, swapab.decode_compressed_t_kernel):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(kernels, "decode_compressed_kernel", kernel)
            for buffer in cache.workspace(cfg.heads_q).values():
                buffer.fill_(float("nan"))
            o = kernels.decode_attention(p.q, p.gates, cache)
        assert torch.isfinite(o).all()
        written.append({n: cache.workspace(cfg.heads_q)[n].clone() for n in names})
    for n in names:
        torch.testing.assert_close(written[1][n], written[0][n], rtol=1e-3, atol=1e-3, equal_nan=True, msg=n)


def test_decode_launch_runs_its_variants(tmp_path: Path) -> None:
    """decode_launch.py --transposed, --combine-columns, --pre-merge-splits: each variant's step equals the eager
    step (the script checks every variant before timing it and fails the run otherwise), and the module's
    constants are restored after each."""
    import optimized.decode as kernels

    decode_launch = load_script("decode_launch")
    argv = ["--config", "tiny", "--contexts", "100", "--batches", "3", "--transposed", "--min-reps", "1"]
    argv += ["--combine-columns", "16", "--pre-merge-splits", "1"]
    before = (kernels.COMBINE_COLUMNS, kernels.PRE_MERGE_SPLITS)
    assert decode_launch.main([*argv, "--budget-ms", "1", "--out", str(tmp_path), "--device", str(DEVICE)]) == 0
    assert (kernels.COMBINE_COLUMNS, kernels.PRE_MERGE_SPLITS) == before
    records = json.loads((tmp_path / "decode_launch.json").read_text())["records"]
    assert [(r["variant"], r["status"]) for r in records] == [
        ("default", "ok"),
        ("combine_columns=16", "ok"),
        ("pre_merge_splits=1", "ok"),
        ("pre_merge_splits=1 combine_columns=16", "ok"),
        ("compressed transposed", "ok"),
    ]


def test_launch_recorder_records_tma_descriptors_and_only_library_kernels() -> None:
    """compile_check.py compiles what the tests launched: a host TMA descriptor is typed by its dtype and box, and
    kernels outside ``optimized`` (the experiments in scripts/, not importable by module name) are left out."""
    import launch_recorder
    from triton.tools.tensor_descriptor import TensorDescriptor

    x = torch.zeros(8, 2, 16, dtype=torch.float16)
    assert launch_recorder._type(TensorDescriptor.from_tensor(x, [4, 1, 16])) == "tensordesc<fp16[4, 1, 16]>"
    before = len(launch_recorder.launches)
    swapab = load_script("swapab")
    launch_recorder.record(swapab.decode_compressed_t_kernel.fn, (), {})
    assert len(launch_recorder.launches) == before


CANDIDATES = sorted((SCRIPTS.parent / "benchmarks" / "candidates").glob("*.patch"))


@pytest.mark.parametrize("patch", CANDIDATES, ids=[p.stem for p in CANDIDATES])
def test_candidate_patch_applies_to_the_tree(patch: Path) -> None:
    """A kernel candidate waiting for its GPU A/B (benchmarks/README.md) still applies: a change that conflicts
    with it must refresh the patch or drop the candidate."""
    root = SCRIPTS.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "apply", "--check", str(patch)], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
