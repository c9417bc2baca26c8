"""Every Triton kernel takes the model's shape constants (head counts, head dims, block sizes) as ``tl.constexpr``.

Passed as runtime ints the GPU compiles a division by a register for ``// G`` and an int64 multiply per element for
each stride: the interval kernels ran 22-43% more instructions per loop iteration that way until the twenty-third
session (performance log; ``scripts/spills.py`` compiles what the launcher compiles). The interpreter cannot see
the difference, so this test reads the signatures.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable

import optimized

SHAPES = {"H", "G", "HQ", "DK", "DV", "D", "L", "LS", "N"}  # per model: one compilation each


def _kernels() -> dict[str, Callable]:
    """The Python functions of the launched kernels (``*_kernel``) of every module of ``optimized``, unwrapped from
    their autotuners and from ``triton.jit`` (compiled or interpreted)."""
    found = {}
    for info in pkgutil.iter_modules(optimized.__path__):
        module = importlib.import_module(f"optimized.{info.name}")
        for name, obj in vars(module).items():
            if not name.endswith("_kernel"):
                continue
            while hasattr(obj, "fn"):
                obj = obj.fn
            if inspect.isfunction(obj):
                found[f"{info.name}.{name}"] = obj
    return found


def _is_constexpr(annotation: object) -> bool:
    return "constexpr" in str(annotation)  # "tl.constexpr" (postponed annotations) or the class itself


def test_shape_parameters_are_constexpr() -> None:
    kernels = _kernels()
    assert {"_interval.interval_fwd_kernel", "selection.select_blocks_kernel", "decode.decode_select_kernel"} <= set(
        kernels
    )
    runtime = [
        f"{name}({p.name})"
        for name, fn in kernels.items()
        for p in inspect.signature(fn).parameters.values()
        if p.name in SHAPES and not _is_constexpr(p.annotation)
    ]
    assert not runtime, f"shape constants passed as runtime ints: {', '.join(runtime)}"
