"""Compile, for an H100 (sm_90), the Triton kernel launches of a CPU test run: no GPU needed.

GPU time is scarce and some errors only show when a kernel is compiled for a real target (a non-constexpr
global, a dtype the interpreter accepts and the backend rejects, a shape `tl.dot` refuses). The tests run
under the interpreter while ``tests/launch_recorder.py`` records each distinct launch (the kernel, its
tensors' dtypes, scalars, constexprs and options); this script then compiles each one with Triton's own
compiler and ptxas for sm_90, in a fresh process without the interpreter. The tile sizes are the
interpreter's (small), so it cannot catch register or shared-memory limits of the GPU configs
(``scripts/spills.py`` looks at those); it catches everything else a compile would. Prints one line per
launch and exits non-zero if any failed.

    python scripts/compile_check.py tests/test_optimized_selection.py   # run these tests, compile their launches
    python scripts/compile_check.py --compile launches.json [--one-per-kernel]   # compile a recorded run

``make test`` records its launches (``NSA_RECORD_LAUNCHES``) and compiles one per kernel and signature
(``--one-per-kernel``: the same kernel with other constexpr values is skipped, which keeps it to a minute).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"


def _kernel(module: str, name: str) -> Any:
    """The JITFunction ``module.name`` (unwrapping an autotuner)."""
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _kernel_key(launch: dict) -> tuple:
    """A kernel and its runtime signature, with the constexprs that pick a code path (dtype-like strings)."""
    paths = tuple(sorted((k, v) for k, v in launch["constexprs"].items() if isinstance(v, str | bool)))
    return launch["name"], tuple(sorted(launch["signature"].items())), paths


def compile_all(path: str, one_per_kernel: bool) -> int:
    """Compile every recorded launch (or one per kernel key) for sm_90; one line each."""
    os.environ["TRITON_INTERPRET"] = "0"  # before anything imports triton: real JITFunctions
    sys.path.insert(0, str(TESTS.parent))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    recorded = sorted(json.loads(Path(path).read_text()), key=lambda r: r["name"])
    if one_per_kernel:
        recorded = list({_kernel_key(r): r for r in recorded}.values())
    failures = 0
    print(f"{len(recorded)} kernel launches, compiled for sm_{target.arch}:")
    for r in recorded:
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        t0 = time.perf_counter()
        try:
            src = ASTSource(_kernel(r["module"], r["name"]), r["signature"], r["constexprs"])
            triton.compile(src, target=target, options=r["options"])
            status = f"ok {time.perf_counter() - t0:5.1f}s"
        except Exception as e:  # report every failure, go on
            failures += 1
            status = f"FAILED: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        print(f"  {r['name']:32s} {status}  [{consts}]")
        if r["baked"]:
            print(f"    note: {', '.join(r['baked'])} got a tl.constexpr for a plain parameter: one compile per value")
    print(f"{failures} failed")
    return 1 if failures else 0


def record_tests(test_args: list[str]) -> int:
    """Run the tests under the interpreter, recording launches, then compile them in a fresh process."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("HYPOTHESIS_PROFILE", "gpu-quick")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        os.environ["NSA_RECORD_LAUNCHES"] = f.name
    import pytest

    rc = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *test_args])
    if rc not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        print(f"the tests failed (exit {rc}); compiling what they launched anyway", file=sys.stderr)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    return subprocess.run([sys.executable, __file__, "--compile", f.name], env=env, check=False).returncode


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compile"]:
        return compile_all(argv[1], "--one-per-kernel" in argv[2:])
    return record_tests(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
