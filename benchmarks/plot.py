"""Plots from ``bench.json``: speedup over each baseline (the paper's Figure 6 layout) and a per-branch breakdown;
from ``decode.json``: decode step time and speedup against the context.

    python -m benchmarks.plot                                   # benchmarks/results/bench.json
    python -m benchmarks.plot --json /tmp/out/bench.json --out /tmp/out
    python -m benchmarks.plot --json a/bench.json b/bench.json --merged results/h200/bench_default.json
    python -m benchmarks.plot --decode results/decode.json results/experiments/decode_h100_64k.json

Writes ``speedup_<config>.png`` (forward and backward panels; bars per baseline, with the paper's
A100 numbers against FlashAttention-2 as markers) and ``breakdown_<config>.png`` (stacked time of the
compressed, selection, selected and window parts' shares, with the times in ms above the bars); with
``--decode``, ``decode_<config>.png`` from one or more ``decode.json`` files of the same card (records of a
later file replace those of an earlier one at the same batch and context), and per batch the fit of the NSA
step to a fixed latency plus its bytes at a marginal bandwidth (:func:`latency_model`, also in the legend).
Several ``--json`` files of one card are merged the same way (:func:`merge_runs`): each record keeps the
run it came from, and speedups only divide times of the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from .run import BASELINES, speedups

PAPER_SPEEDUP = {  # spec section 10: NSA over FlashAttention-2 (Triton, A100, GQA 4 x 16, DK 192, DV 128)
    "fwd": {8192: 2.1, 16384: 3.8, 32768: 6.3, 65536: 9.0},
    "bwd": {8192: 1.1, 16384: 2.0, 32768: 3.4, 65536: 6.0},
}
LABELS = {"flash": "vs FlashAttention-2 (SDPA)", "cudnn": "vs cuDNN (SDPA)", "flex": "vs FlexAttention"}
BRANCHES = ("compressed", "selection", "selected", "window")
COLORS = {"compressed": "tab:blue", "selection": "tab:orange", "selected": "tab:green", "window": "tab:red"}


def _k(seq_len: int) -> str:
    return f"{seq_len // 1024}k" if seq_len % 1024 == 0 else str(seq_len)


def plot_speedup(data: dict[str, Any], config: str, path: Path) -> bool:
    """Figure-6-style bars of baseline time / NSA time; False (and no file) when nothing to plot."""
    rows = speedups(data["records"], config)
    lengths = sorted({r["seq_len"] for r in rows if r["nsa_ms"]})
    if not lengths:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    width = 0.8 / len(BASELINES)
    for ax, pass_ in zip(axes, ("fwd", "bwd")):
        table = {r["seq_len"]: r for r in rows if r["pass"] == pass_}
        for i, b in enumerate(BASELINES):
            xs = [k + (i - (len(BASELINES) - 1) / 2) * width for k in range(len(lengths))]
            ys = [table.get(t, {}).get(f"{b}_speedup") or 0.0 for t in lengths]
            bars = ax.bar(xs, ys, width, label=LABELS[b])
            ax.bar_label(bars, labels=[f"{y:.1f}x" if y else "" for y in ys], fontsize=7)
        paper = PAPER_SPEEDUP[pass_]
        px = [k for k, t in enumerate(lengths) if t in paper]
        ax.plot(px, [paper[lengths[k]] for k in px], "k*", label="paper, vs FA2 (A100)")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(lengths)), [_k(t) for t in lengths])
        ax.set_xlabel("sequence length")
        ax.set_ylabel("speedup of NSA (x)")
        ax.set_title({"fwd": "forward", "bwd": "backward"}[pass_])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"NSA vs full attention: {config}, {data['env']['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_breakdown(data: dict[str, Any], config: str, path: Path) -> bool:
    """Each branch's share of the summed branch times (forward and backward panels); above each bar the
    sum of the branches and the core's measured time, in ms."""
    recs = [r for r in data["records"] if r["config"] == config and r["impl"] == "nsa"]
    ms = {(r["seq_len"], r["part"], r["pass"]): r["ms"] for r in recs}
    lengths = sorted({r["seq_len"] for r in recs if r["part"] in BRANCHES})
    if not lengths:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, pass_ in zip(axes, ("fwd", "bwd")):
        times = {part: [ms.get((t, part, pass_), 0.0) for t in lengths] for part in BRANCHES}
        totals = [sum(times[p][k] for p in BRANCHES) for k in range(len(lengths))]
        bottom = [0.0] * len(lengths)
        for part in BRANCHES:
            share = [100 * y / tot if tot else 0.0 for y, tot in zip(times[part], totals)]
            ax.bar(range(len(lengths)), share, 0.6, bottom=bottom, label=part, color=COLORS[part])
            bottom = [b + y for b, y in zip(bottom, share)]
        for k, t in enumerate(lengths):
            core = ms.get((t, "core", pass_))
            text = f"{totals[k]:.3g}" + (f"\ncore {core:.3g}" if core else "")
            ax.text(k, 101, text, ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, 118)
        ax.set_xticks(range(len(lengths)), [_k(t) for t in lengths])
        ax.set_xlabel("sequence length")
        ax.set_ylabel("share of the branch times (%)")
        ax.set_title({"fwd": "forward (ms above bars)", "bwd": "backward (ms above bars)"}[pass_])
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"NSA time per branch: {config}, {data['env']['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def decode_rows(datas: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, float]]:
    """Per (batch, context): the NSA step's and the fastest full-attention step's microseconds, and the
    tokens-read ratio (full / NSA), from the records of every file (a later file wins)."""
    rows: dict[tuple[int, int], dict[str, float]] = {}
    for data in datas:
        by_key: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for r in data["records"]:
            by_key.setdefault((r["batch"], r["context"]), []).append(r)
        for key, recs in by_key.items():
            full = [r for r in recs if r["kind"] == "full" and "us" in r]
            nsa = [r for r in recs if r["kind"] == "nsa" and "us" in r]
            if full and nsa:
                best = min(nsa, key=lambda r: r["us"])
                rows[key] = {"nsa_us": best["us"], "full_us": min(r["us"] for r in full),
                             "tokens_ratio": key[1] / best["tokens_read"], "nsa_bytes": best["bytes"]}  # fmt: skip
    return rows


def latency_model(rows: dict[tuple[int, int], dict[str, float]]) -> dict[int, dict[str, float]]:
    """Per batch with at least 3 contexts: the least-squares fit us = fixed_us + bytes / tbps of the NSA step
    (``decode_rows``), i.e. a fixed latency (launches, dependent round trips, the serial select) plus the bytes
    the step must read at a marginal bandwidth; max_resid_us says how well the line fits."""
    out = {}
    for batch in sorted({b for b, _ in rows}):
        pts = [(rows[key]["nsa_bytes"], rows[key]["nsa_us"]) for key in sorted(rows) if key[0] == batch]
        if len(pts) < 3:
            continue
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)  # us per byte
        fixed = my - slope * mx
        out[batch] = {
            "fixed_us": fixed,
            "tbps": 1e-6 / slope if slope > 0 else float("inf"),  # bytes per us -> TB/s
            "max_resid_us": max(abs(fixed + slope * x - y) for x, y in pts),
        }
    return out


def plot_decode(datas: list[dict[str, Any]], path: Path) -> bool:
    """Left: microseconds per step against the context, NSA and the fastest full attention, per batch.
    Right: the speedup, with the tokens-read ratio (the paper's Table 4 model) as the dotted line."""
    rows = decode_rows(datas)
    if not rows:
        return False
    cards = sorted({d["env"]["card"] for d in datas})
    fits = latency_model(rows)
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    for i, batch in enumerate(sorted({b for b, _ in rows})):
        ctx = sorted(c for b, c in rows if b == batch)
        color = f"C{i}"
        fit = fits.get(batch)
        model = f" ({fit['fixed_us']:.1f} µs + bytes / {fit['tbps']:.2f} TB/s)" if fit else ""
        ax_t.plot(ctx, [rows[batch, c]["nsa_us"] for c in ctx], "o-", color=color, label=f"NSA, batch {batch}{model}")
        ax_t.plot(ctx, [rows[batch, c]["full_us"] for c in ctx], "s--", color=color, label=f"full, batch {batch}")
        speed = [rows[batch, c]["full_us"] / rows[batch, c]["nsa_us"] for c in ctx]
        ax_s.plot(ctx, speed, "o-", color=color, label=f"batch {batch}")
        for c, y in zip(ctx, speed):
            ax_s.annotate(f"{y:.1f}x", (c, y), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
    ctx = sorted({c for _, c in rows})
    model = {c: next(r["tokens_ratio"] for (_, cc), r in rows.items() if cc == c) for c in ctx}
    ax_s.plot(ctx, [model[c] for c in ctx], "k:", label="tokens read, full / NSA")
    ax_s.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in (ax_t, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ctx, [_k(c) for c in ctx])
        ax.set_xlabel("context (tokens)")
        ax.legend(fontsize=7)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("µs per step (CUDA-graph replay)")
    ax_t.set_title("step time")
    ax_s.set_ylabel("speedup of NSA over full attention (x)")
    ax_s.set_title("speedup")
    fig.suptitle(f"NSA decode step: {datas[-1]['config']}, {', '.join(cards)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


RECORD_KEY = ("config", "seq_len", "impl", "part", "pass")


def merge_runs(datas: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``bench.json`` from several runs on one card: a later run's record replaces an earlier one's at the same
    (config, length, impl, part, pass); ``runs`` lists the runs (commit, time, arguments; an input that is
    itself a merge brings its own) and each record gets ``run``, its run's index there. A speedup must divide
    times of one run (timings of two calls are not comparable, device METHOD.md), so a length keeps the records
    of the last run that timed its core there."""
    cards = {d["env"]["card"] for d in datas}
    if len(cards) != 1:
        raise ValueError(f"--json: the runs must come from one card, got {sorted(cards)}")
    merged = {k: v for k, v in datas[-1].items() if k != "records"}
    merged["configs"] = list({c["name"]: c for d in datas for c in d["configs"]}.values())
    for key in ("checks", "bytes"):
        merged[key] = {k: v for d in datas for k, v in d.get(key, {}).items()}
    merged["runs"], first_run = [], []  # an input that is itself a merge brings its runs along
    for d in datas:
        first_run.append(len(merged["runs"]))
        own = {k: d["env"].get(k) for k in ("git_commit", "timestamp_utc")} | {"argv": d.get("argv")}
        merged["runs"] += d.get("runs", [own])
    merged["stopped_early"] = any(d.get("stopped_early") for d in datas)
    owner: dict[tuple[str, int], int] = {}  # (config, length) -> the last input that timed the core there
    for i, d in enumerate(datas):
        for r in d["records"]:
            if r["impl"] == "nsa" and r["part"] == "core":
                owner[r["config"], r["seq_len"]] = i
    records: dict[tuple, dict[str, Any]] = {}
    for i, d in enumerate(datas):
        for r in d["records"]:
            if owner.get((r["config"], r["seq_len"]), i) == i:
                records[tuple(r[k] for k in RECORD_KEY)] = r | {"run": first_run[i] + r.get("run", 0)}
    merged["records"] = list(records.values())
    return merged


def make_plots(data: dict[str, Any], out: Path) -> list[Path]:
    """Every plot for every config in ``data``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for cfg in data["configs"]:
        name = cfg["name"]
        for stem, fn in (("speedup", plot_speedup), ("breakdown", plot_breakdown)):
            path = out / f"{stem}_{name}.png"
            if fn(data, name, path):
                written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, nargs="+", default=[Path("benchmarks/results/bench.json")])
    p.add_argument("--merged", type=Path, help="with several --json: write their merge (merge_runs) here")
    p.add_argument("--decode", type=Path, nargs="+", help="decode.json files: plot these instead of --json")
    p.add_argument("--out", type=Path, help="directory for the PNGs (default: the (first) JSON's directory)")
    args = p.parse_args(argv)
    plt.switch_backend("Agg")  # files only (here, not at import: a notebook imports these functions)
    if args.decode:
        datas = [json.loads(f.read_text()) for f in args.decode]
        path = (args.out or args.decode[0].parent) / f"decode_{datas[-1]['config']}.png"
        if plot_decode(datas, path):
            print("wrote", path)
        for batch, fit in latency_model(decode_rows(datas)).items():
            print(f"batch {batch:3d}: NSA step = {fit['fixed_us']:.1f} us + bytes / {fit['tbps']:.2f} TB/s"
                  f" (largest residual {fit['max_resid_us']:.1f} us)")  # fmt: skip
        return 0
    datas = [json.loads(f.read_text()) for f in args.json]
    data = datas[0] if len(datas) == 1 else merge_runs(datas)
    if args.merged:
        args.merged.parent.mkdir(parents=True, exist_ok=True)
        args.merged.write_text(json.dumps(data, indent=1))
        print("wrote", args.merged)
    for path in make_plots(data, args.out or (args.merged or args.json[0]).parent):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
