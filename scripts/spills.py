"""Registers, spills and shared memory of every GPU autotune config of the main kernels, on the CPU (no GPU).

Compiles each config for an H100 (sm_90) with Triton's compiler at the benchmark's shape (bf16, D = 128,
G = 16, spec defaults) and asks ptxas (``-v``) what it allocated. A config that spills to local memory or
sits at the 255-register cap is a lead for the next GPU profile, not a verdict: the timings decide.

    .venv/bin/python scripts/spills.py                # every kernel in KERNELS
    .venv/bin/python scripts/spills.py interval_fwd   # one
    .venv/bin/python scripts/spills.py --sass selection_g16   # and the SASS: instructions by opcode, barriers

``--sass`` disassembles each config (nvdisasm) and counts its instructions: a static measure, useful to
compare two versions of a kernel that is bound by instruction issue (the selection: docs/performance.md),
not a timing. It also gives the hot path (the code before the first unpredicated ``EXIT``; after it, the
compiler's fallback for divergent shuffles) and the body of each of its loops, so that a change can be
judged per loop iteration (e.g. per chunk of the selection). ``--sass-dir DIR`` also writes the ``.sass`` files.
``--lines N`` attributes each loop body's instructions to the source lines they came from (the cubin's line
table; Triton's library functions such as ``tl.sum`` are named by their own file), the N largest per loop.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # the real autotune configs, not the interpreter's
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import swapab  # scripts/: the experiment's transposed decode pass
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from optimized import _interval, decode, selected, selection

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
NVDISASM = os.path.join(os.path.dirname(PTXAS), "nvdisasm")
FP32 = ("lse", "delta", "scale", "qk_scale")
BF16 = ("q", "k", "v", "o", "do", "dq", "dq_prev", "dk", "dv", "k_cmp")
DIMS = dict(H=4, G=16, DK=128, DV=128, BK=128, BV=128, DOT_PRECISION="tf32")
SPARSE = dict(N=16, LS=64, BN=64, NP=16, U=32)
KERNELS = {
    "interval_fwd": (_interval.interval_fwd_kernel, DIMS, {}),
    "interval_dq": (_interval.interval_bwd_dq_kernel, {**DIMS, "HAS_DQ_PREV": True}, {}),
    "interval_dkv": (_interval.interval_bwd_dkv_kernel, {**DIMS, "ATOMIC": True}, {"dk": "*fp32", "dv": "*fp32"}),
    # the selected forward and dq at their row tile (16 rows: one position at G = 16) and at the larger tiles that
    # scripts/selected_tiles.py times (2 and 4 positions); the dq (transposed products: wgmma) reads K/V through TMA
    # descriptors as at D = 128, "_pointers": its path for rows that are not 16-byte aligned
    **{
        f"selected_fwd{'' if bm == 16 else f'_bm{bm}'}{'_gated' if gated else ''}": (
            selected.selected_fwd_kernel,
            {**DIMS, **SPARSE, "BM": bm, "GATED": gated},
            {name: "*bf16" for name in ("gates", "o_cmp", "o_win", "o_gated")},
        )
        for bm, gated in ((16, False), (32, False), (64, False), (16, True))  # gated: the core's, Eq. 5 fused
    },
    **{
        f"selected_dq{'' if bm == 16 else f'_bm{bm}'}{'' if tma else '_pointers'}": (
            selected.selected_bwd_dq_kernel,
            {**DIMS, **SPARSE, "BM": bm, "TMA": tma, "HAS_DQ_PREV": True},
            {name: "tensordesc<bf16[64, 1, 128]>" for name in ("k", "v") if tma},
        )
        for bm, tma in ((16, True), (32, True), (64, True), (16, False))
    },
    # the selected dK/dV: one program per (kv head, block, chunk of the queries that selected it)
    "selected_dkv": (
        selected.selected_bwd_dkv_kernel,
        {**DIMS, "N": 16, "LS": 64, "BN": 64},
        {"dk": "*fp32", "dv": "*fp32", "NB": "i32", "TUNE_T": "i32"},
    ),
    # the block-major selected forward (small groups, long sequences) at G = 4 and 1, its merge (gated: the core's)
    **{
        f"selected_fwd_block_g{g}": (
            selected.selected_fwd_block_kernel,
            {**DIMS, "G": g, "N": 16, "LS": 64, "BN": 64},
            {"o_part": "*bf16", "lse_part": "*fp32", "NB": "i32", "TUNE_T": "i32"},
        )
        for g in (4, 1)
    },
    **{
        f"selected_fwd_merge{'_gated' if gated else ''}": (
            selected.selected_fwd_merge_kernel,
            dict(H=4, G=4, N=16, NP=16, DV=128, BV=128, GATED=gated),
            {name: "*bf16" for name in ("o_part", "o", "gates", "o_cmp", "o_win", "o_gated")}
            | {"lse_part": "*fp32", "lse": "*fp32", "TT": "i32", "TUNE_T": "i32"},
        )
        for gated in (False, True)
    },
    **{
        f"selection_g{g}": (
            selection.select_blocks_kernel,
            dict(G=g, DK=128, L=32, D=16, LS=64, N=16, N_INIT=1, N_LOCAL=2, DOT_PRECISION="tf32")
            | selection.select_tiles(g, 128, 16, 4),
            {},
        )
        for g in (16, 4, 1)
    },
    # the decode step's select kernel at 64k (1024 candidate blocks), one program per sequence and kv head
    **{
        f"decode_select{'_pre_merge' if pre else ''}": (
            decode.decode_select_kernel,
            dict(H=4, G=16, LS=64, N_SEL=16, N_INIT=1, N_LOCAL=2, NC=64, BG=16, BGC=16, BP=64, BJ=16, NSP=1024)
            | dict(BSEL=16, BV=128, PRE_MERGE=pre),
            {name: "*fp32" for name in ("cmp_m", "cmp_l", "sel", "sel_ref", "cmp_acc", "cmp_o")},
            decode.LAUNCH["select"],
        )
        for pre in (False, True)  # PRE_MERGE: its spare programs merge the compressed partials (batch 1)
    },
    # the decode step's compressed pass (its time at batch 32: docs/performance.md)
    **{
        f"decode_compressed{'' if bj == 16 else f'_tiles{bj}'}": (
            decode.decode_compressed_kernel,
            {**DIMS, "L": 32, "D": 16, "LS": 64, "NC": 3, "BG": 16, "BJ": bj, "BH": 16},
            {name: "*fp32" for name in ("cmp_m", "cmp_l", "cmp_acc", "sel", "sel_ref")} | {"v_cmp": "*bf16"},
            decode.LAUNCH["compressed"],
        )
        for bj in (16, 32)  # the cache's tile_blocks: 16 (default) and the larger tile decode_launch.py times
    },
    # the decode step's combine at batch 1 and 64k (64 compressed splits, 16 + 8 sparse), per column slice
    **{
        f"decode_combine{'' if bvc == 128 else f'_cols{bvc}'}{'_pre_merge' if pre else ''}": (
            decode.decode_combine_kernel,
            dict(HQ=64, DV=128, NC=64, NSS=16, NSPLIT=24, BPC=32, BPS=16, BPW=8, BV=128, BVC=bvc, PRE_MERGE=pre),
            {name: "*fp32" for name in ("cmp_m", "cmp_l", "cmp_acc", "cmp_o", "part_m", "part_l", "part_acc")},
            decode.LAUNCH["combine"],
        )
        # decode.COMBINE_COLUMNS (decode_launch.py --combine-columns times the slices); PRE_MERGE: o_cmp read merged
        for bvc, pre in ((128, False), (64, False), (32, False), (128, True), (64, True))
    },
    # the same pass transposed for wgmma (scripts/swapab.py, decode_launch.py --transposed)
    "decode_compressed_swapab": (
        swapab.decode_compressed_t_kernel,
        {**DIMS, "L": 32, "D": 16, "LS": 64, "NC": 3, "BG": 16, "BJ": 16, "BH": 16},
        {name: "*fp32" for name in ("cmp_m", "cmp_l", "cmp_acc", "sel", "sel_ref")} | {"v_cmp": "*bf16"},
        decode.LAUNCH["compressed"],
    ),
}


def _signature(fn: JITFunction, values: dict, overrides: dict[str, str]) -> dict[str, str]:
    """Parameter types by name: the kernel's ``tl.constexpr`` parameters (and runtime ints given as 1, which the
    launcher specializes to constants) "constexpr"; activations bf16, lse/delta/scales fp32, strides and sizes i32
    (those given a value in ``values`` stay runtime ints, as the GPU compiles them), else int32 data."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr or (values.get(p.name) == 1 and isinstance(values[p.name], int)):
            sig[p.name] = "constexpr"
        elif p.name in overrides:
            sig[p.name] = overrides[p.name]
        elif p.name in FP32:
            sig[p.name] = "fp32" if "scale" in p.name else "*fp32"
        elif p.name in BF16:
            sig[p.name] = "*bf16"
        elif p.name[0].isupper() or p.name.startswith("s_"):
            sig[p.name] = "i32"
        else:
            sig[p.name] = "*i32"
    return sig


def disassemble(cubin: bytes, save_as: str | None = None, lines: bool = False) -> str:
    """The SASS of a compiled kernel (nvdisasm of the cubin), also written to ``save_as`` if given; ``lines``:
    with the source line of each instruction (``//## File "...", line N`` comments)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    cmd = [NVDISASM, "-c", "-g", f.name] if lines else [NVDISASM, "-c", f.name]
    sass = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    if save_as:
        with open(save_as, "w") as f:
            f.write(sass)
    return sass


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sass_counts(sass: str) -> collections.Counter:
    """Instructions by opcode (predicates and modifiers dropped)."""
    return collections.Counter(_OPCODE.findall(sass))


_SOURCE = re.compile(r'//## File "([^"]+)", line (\d+)')


def _hot_path(sass: str) -> tuple[dict[str, int], list[tuple[str, str, tuple[str, int] | None]]]:
    """Labels and instructions (opcode, text, source line if the SASS has them) of the hot path: the code before
    the first unpredicated EXIT (the cold code after it handles divergent shuffles)."""
    labels, code, source = {}, [], None
    for line in sass.splitlines():
        where = _SOURCE.search(line)
        label = re.match(r"\s*(\.L_x_\d+):", line)
        op = _OPCODE.search(line)
        if where:
            source = (where.group(1), int(where.group(2)))
        elif label:
            labels[label.group(1)] = len(code)
        elif op:
            code.append((op.group(1), line, source))
            if op.group(1) == "EXIT" and "@" not in line:
                break
    return labels, code


def _loop_bodies(sass: str) -> tuple[int, list[tuple[int, list]]]:
    """The hot path's length and its loops, each a backward branch: (first instruction, body instructions)."""
    labels, code = _hot_path(sass)
    loops = []
    for end, (op, line, _) in enumerate(code):
        target = re.search(r"`\((\.L_x_\d+)\)", line) if op == "BRA" else None
        if target and labels.get(target.group(1), end + 1) <= end:
            loops.append((labels[target.group(1)], code[labels[target.group(1)] : end + 1]))
    return len(code), sorted(loops, key=lambda loop: loop[0])


def hot_loops(sass: str) -> tuple[int, list[tuple[int, int, int, int]]]:
    """The hot path's length and its loops: (first instruction, body size, barriers, shuffles)."""
    hot, loops = _loop_bodies(sass)
    ops = [(start, [op for op, _, _ in body]) for start, body in loops]
    return hot, [(start, len(body), body.count("BAR"), body.count("SHFL")) for start, body in ops]


def loop_lines(sass: str, top: int) -> str:
    """Per loop of the hot path, its instructions by source line (SASS from ``disassemble(..., lines=True)``)."""
    sources: dict[str, list[str]] = {}

    def text(where: tuple[str, int] | None) -> str:
        if where is None:
            return "(no line)"
        path, n = where
        if path not in sources:
            sources[path] = open(path).read().splitlines() if os.path.exists(path) else []
        code = sources[path][n - 1].strip() if n <= len(sources[path]) else ""
        return f"{os.path.basename(path)}:{n} {code[:100]}"

    out = []
    for start, body in _loop_bodies(sass)[1]:
        out.append(f"    loop @{start}: {len(body)} instructions")
        counts = collections.Counter(where for _, _, where in body)
        out += [f"      {n:5d}  {text(where)}" for where, n in counts.most_common(top)]
    return "\n".join(out)


def report(name: str, sass: bool = False, sass_dir: str | None = None, lines: int = 0) -> None:
    kernel, constexprs, overrides, *launch = KERNELS[name]
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    configs = getattr(kernel, "configs", None) or [triton.Config({}, **launch[0])]  # not autotuned: its launch
    for cfg in configs:
        values = {**constexprs, **cfg.kwargs}
        sig = _signature(fn, values, overrides)
        const = {k: v for k, v in values.items() if sig.get(k) == "constexpr"}
        # as the GPU launcher specializes them at the benchmark's shapes: pointers 16-byte aligned, sizes and
        # strides multiples of 16 unless given a value that is not (without these hints loads are not vectorized
        # and the counts mislead); a runtime int is never a constant here, whatever its value (G = 16 as a
        # runtime int divides by a register, as on the GPU)
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, p in enumerate(fn.params)
            if sig[p.name] not in ("constexpr", "fp32") and values.get(p.name, 16) % 16 == 0
        }
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        label = (
            f"{name:13s} {' '.join(f'{k}={v}' for k, v in cfg.kwargs.items()):14s} w={cfg.num_warps} s={cfg.num_stages}"
        )
        try:
            compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=TARGET, options=options)
        except Exception as e:  # report and go on
            print(f"{label}  FAILED: {str(e).strip().splitlines()[-1][:150]}")
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
        os.unlink(f.name)
        regs = next(
            (line.split("Used ")[1].split(" registers")[0] for line in out.stderr.splitlines() if "Used" in line), "?"
        )
        spill = next(
            (
                line.split(",")[1].split(" bytes")[0].strip()
                for line in out.stderr.splitlines()
                if "spill stores" in line
            ),
            "?",
        )
        print(f"{label}  regs {regs:>3s}  spill stores {spill:>5s} B  smem {compiled.metadata.shared // 1024:3d} KiB")
        if sass or sass_dir or lines:
            path = os.path.join(sass_dir, f"{name}_w{cfg.num_warps}_s{cfg.num_stages}.sass") if sass_dir else None
            code = disassemble(compiled.asm["cubin"], path, lines=lines > 0)
            ops = sass_counts(code)
            top = " ".join(f"{op}:{n}" for op, n in ops.most_common(12))
            mma = f"HMMA {ops['HMMA']}, HGMMA {ops['HGMMA']}, UTMALDG {ops['UTMALDG']}"
            print(f"    sass: {sum(ops.values())} instructions, {ops['BAR']} barriers, {mma}; {top}")
            hot, loops = hot_loops(code)
            nest = ", ".join(f"@{start}: {n} ({bars} BAR, {shfl} SHFL)" for start, n, bars, shfl in loops)
            print(f"    hot path: {hot} instructions; loops (first instruction: body): {nest or 'none'}")
            if lines:
                print(loop_lines(code, lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernels", nargs="*", help=f"default: all of {', '.join(KERNELS)}")
    p.add_argument("--sass", action="store_true", help="also count the SASS instructions by opcode")
    p.add_argument("--sass-dir", help="also write each config's SASS there")
    p.add_argument("--lines", type=int, default=0, metavar="N", help="each loop's N busiest source lines")
    args = p.parse_args(argv)
    for name in args.kernels:
        if name not in KERNELS:
            p.error(f"kernel must be one of {', '.join(KERNELS)}, got {name!r}")
    if args.sass_dir:
        os.makedirs(args.sass_dir, exist_ok=True)
    for name in args.kernels or list(KERNELS):
        report(name, args.sass, args.sass_dir, args.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
