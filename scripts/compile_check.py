"""Compile, for an H100 (sm_90), every Triton kernel that a CPU test run launches: no GPU needed.

GPU time is scarce and some errors only show when a kernel is compiled for a real target (a non-constexpr
global, a dtype the interpreter accepts and the backend rejects, a shape `tl.dot` refuses). This runs the
given tests under the interpreter, records each distinct kernel launch (the function, its tensors' dtypes,
its scalars and its constexprs), then compiles each one with Triton's own compiler and ptxas for sm_90.
The tile sizes are the interpreter's (small), so it cannot catch register or shared-memory limits of the
GPU configs; it catches everything else a compile would. Prints one line per kernel and exits non-zero if
any failed.

    .venv/bin/python scripts/compile_check.py tests/test_optimized_selection.py tests/test_optimized_decode.py
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

COMPILE = sys.argv[1:2] == ["--compile"]  # phase 2, in a fresh process without the interpreter
os.environ["TRITON_INTERPRET"] = "0" if COMPILE else "1"
os.environ.setdefault("HYPOTHESIS_PROFILE", "gpu-quick")

import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}  # fmt: skip

launches: dict[str, dict[str, Any]] = {}


def _type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported argument {value!r}")


def _record(self: interpreter.InterpretedFunction, *args: object, **kwargs: object) -> None:
    """Remember the launch of ``self.fn`` with these arguments: signature, constexprs, options."""
    jit = JITFunction(self.fn)
    values = dict(zip(jit.arg_names, args)) | {k: v for k, v in kwargs.items() if k in jit.arg_names}
    options = {k: v for k, v in kwargs.items() if k in OPTIONS and v is not None}
    signature, constexprs, baked = {}, {}, []
    for param in jit.params:
        value = values.get(param.name, param.default)
        if param.is_constexpr or value is None or isinstance(value, triton.language.constexpr):
            # as the GPU launcher does: a constexpr passed to a plain parameter is compiled in (one kernel per value)
            signature[param.name], constexprs[param.name] = "constexpr", getattr(value, "value", value)
            if not param.is_constexpr and value is not None:
                baked.append(param.name)
        else:
            signature[param.name] = _type(value)
    launch = {"module": self.fn.__module__, "name": self.fn.__qualname__, "signature": signature,
              "constexprs": constexprs, "options": options, "baked": baked}  # fmt: skip
    launches.setdefault(json.dumps(launch, sort_keys=True), launch)


_run = interpreter.InterpretedFunction.run


def _recording_run(self: interpreter.InterpretedFunction, *args: object, grid: object, warmup: bool, **kwargs: object):
    _record(self, *args, **kwargs)
    return _run(self, *args, grid=grid, warmup=warmup, **kwargs)


def _kernel(module: str, name: str) -> JITFunction:
    """The JITFunction ``module.name`` (unwrapping an autotuner)."""
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def compile_all(path: str) -> int:
    """Phase 2: compile every recorded launch for sm_90; one line each."""
    recorded = json.loads(open(path).read())
    failures = 0
    print(f"{len(recorded)} distinct kernel launches, compiled for {TARGET.backend} sm_{TARGET.arch}:")
    for r in sorted(recorded, key=lambda r: r["name"]):
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        t0 = time.perf_counter()
        try:
            src = ASTSource(_kernel(r["module"], r["name"]), r["signature"], r["constexprs"])
            triton.compile(src, target=TARGET, options=r["options"])
            status = f"ok {time.perf_counter() - t0:5.1f}s"
        except Exception as e:  # report every failure, go on
            failures += 1
            status = f"FAILED: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        print(f"  {r['name']:32s} {status}  [{consts}]")
        if r["baked"]:
            print(f"    note: {', '.join(r['baked'])} got a tl.constexpr for a plain parameter: one compile per value")
    print(f"{failures} failed")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    if COMPILE:
        return compile_all(argv[1])
    interpreter.InterpretedFunction.run = _recording_run
    rc = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *argv])
    if rc not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        print(f"the tests failed (exit {rc}); compiling what they launched anyway", file=sys.stderr)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(list(launches.values()), f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, __file__, "--compile", f.name], env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
