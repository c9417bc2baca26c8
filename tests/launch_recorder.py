"""Record every Triton kernel launch made under the interpreter, so that it can be compiled for a real GPU.

``install()`` wraps the interpreter's launch; each distinct launch (kernel, parameter types, constexprs,
options) is kept as a JSON-ready dict and ``dump(path)`` writes them. ``scripts/compile_check.py`` compiles
them for an H100 (sm_90) with Triton's own compiler, no GPU needed. ``tests/conftest.py`` installs it when
``NSA_RECORD_LAUNCHES`` names a file (``make test`` does), so CI compiles what its tests launched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import triton
from triton.runtime import interpreter
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}  # fmt: skip

launches: dict[str, dict[str, Any]] = {}


def _type(value: object) -> str:
    """The Triton signature type of a runtime argument."""
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, TensorDescriptor):  # a host-side TMA descriptor: its dtype and box
        return f"tensordesc<{DTYPES[value.base.dtype]}[{', '.join(map(str, value.block_shape))}]>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {value!r}")


def record(fn: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    """Remember the launch of the Python function ``fn`` with these arguments: the library's kernels only (the
    experiments' kernels in ``scripts/`` are not importable by module name; their tests compile them)."""
    if not fn.__module__.startswith("optimized."):
        return
    jit = JITFunction(fn)
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
    launch = {"module": fn.__module__, "name": fn.__qualname__, "signature": signature,
              "constexprs": constexprs, "options": options, "baked": baked}  # fmt: skip
    launches.setdefault(json.dumps(launch, sort_keys=True), launch)


def install() -> None:
    """Record every interpreted launch from now on (idempotent)."""
    run = interpreter.InterpretedFunction.run
    if getattr(run, "_records", False):
        return

    def recording_run(self: interpreter.InterpretedFunction, *args: object, grid: object, warmup: bool, **kw: object):
        record(self.fn, args, kw)
        return run(self, *args, grid=grid, warmup=warmup, **kw)

    recording_run._records = True  # type: ignore[attr-defined]
    interpreter.InterpretedFunction.run = recording_run


def dump(path: str | Path) -> None:
    """Write the recorded launches as a JSON list."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(list(launches.values())))
