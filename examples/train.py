"""Train the tiny recall model with NSA, window-only or full attention, and record held-out accuracy.

    python -m examples.train --attention nsa --steps 1500 --out examples/checkpoints

writes ``<out>/<attention>.pt`` (state dict), ``<out>/<attention>.json`` (model and task configs) and
merges this run's numbers into ``<out>/results.json`` (one entry per attention variant).
See ``examples/README.md`` for the measured runs and the GPU command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from examples.tiny_lm import (
    ATTENTIONS,
    TaskConfig,
    TinyLM,
    TinyLMConfig,
    evaluate,
    make_batch,
    recall_loss,
    save_checkpoint,
)
from reference import NSAConfig


class Progress:
    """A one-line text progress bar (no tqdm needed): redrawn in place on a terminal, printed as lines elsewhere."""

    def __init__(self, total: int, width: int = 24) -> None:
        self.total, self.width, self.start = total, width, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, text: str, newline: bool = False) -> None:
        """Show ``step`` of ``total`` with ``text``; ``newline`` keeps the line (always the case off a terminal)."""
        elapsed = time.perf_counter() - self.start
        rate = step / max(elapsed, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        filled = round(self.width * step / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {step}/{self.total} {text} | {rate:.1f} it/s, {elapsed:.0f}s elapsed, eta {eta:.0f}s"
        if self.tty:
            print("\r" + line, end="\n" if newline else "", file=sys.stderr, flush=True)
        elif newline:
            print(line, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (sizes default to the CPU setting in examples/README.md)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", choices=ATTENTIONS, default="nsa")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=("reference", "triton"), default="reference", help="NSA implementation")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="initialisation and training data")
    p.add_argument("--eval-seed", type=int, default=12345, help="the fixed held-out sequences")
    p.add_argument("--eval-sequences", type=int, default=1024)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--target-accuracy", type=float, default=None, help="stop once held-out accuracy reaches this")
    p.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    # task
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--min-gap", type=int, default=None, help="default: layers * window (out of every window's reach)")
    p.add_argument("--num-pairs", type=int, default=1)
    p.add_argument("--num-filler", type=int, default=32)
    p.add_argument("--num-keys", type=int, default=16)
    p.add_argument("--num-values", type=int, default=16)
    # model
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--compress-block", type=int, default=8, help="l")
    p.add_argument("--compress-stride", type=int, default=4, help="d")
    p.add_argument("--select-block", type=int, default=16, help="l'")
    p.add_argument("--num-selected", type=int, default=4, help="n, forced blocks included")
    p.add_argument("--window", type=int, default=32, help="w")
    # output
    p.add_argument("--out", type=Path, default=Path("out/tiny_lm"))
    p.add_argument("--half", action="store_true", help="save the state dict in fp16")
    return p.parse_args(argv)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of ``peak``."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def merge_results(path: Path, key: str, entry: dict) -> None:
    """Put ``entry`` under ``key`` in the JSON file at ``path`` (created if missing), written atomically."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = entry
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate on held-out data, save the checkpoint and the results; returns this run's entry."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    nsa = NSAConfig(
        compress_block=args.compress_block,
        compress_stride=args.compress_stride,
        select_block=args.select_block,
        num_selected=args.num_selected,
        window=args.window,
    )
    task = TaskConfig(
        seq_len=args.seq_len,
        min_gap=args.min_gap if args.min_gap is not None else args.layers * args.window,
        num_pairs=args.num_pairs,
        num_filler=args.num_filler,
        num_keys=args.num_keys,
        num_values=args.num_values,
    )
    config = TinyLMConfig(
        vocab_size=task.vocab_size,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        attention=args.attention,
        nsa={f: getattr(nsa, f) for f in NSAConfig.__dataclass_fields__},
    )
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = TinyLM(config, backend=args.backend).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.attention} ({args.backend}) on {device}: {params:,} parameters; task {task}", file=sys.stderr)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    progress = Progress(args.steps)
    history: list[dict] = []
    accuracy, loss_avg, acc_avg, step = 0.0, math.nan, math.nan, 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args.steps, args.lr)
        batch = make_batch(task, args.batch_size, generator)
        batch.tokens, batch.targets = batch.tokens.to(device), batch.targets.to(device)
        loss, hit = recall_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value, acc_value = loss.item(), hit.float().mean().item()
        loss_avg = loss_value if math.isnan(loss_avg) else 0.95 * loss_avg + 0.05 * loss_value
        acc_avg = acc_value if math.isnan(acc_avg) else 0.95 * acc_avg + 0.05 * acc_value
        out_of_time = args.time_limit is not None and time.perf_counter() - start > args.time_limit
        evaluate_now = step % args.eval_every == 0 or step == args.steps or out_of_time
        text = f"loss {loss_avg:.3f} train acc {acc_avg:.3f}"
        if evaluate_now:
            accuracy = evaluate(model, task, args.eval_sequences, args.eval_seed)
            seconds = round(time.perf_counter() - start, 1)
            row = {"step": step, "seconds": seconds, "loss": loss_avg, "train_accuracy": acc_avg}
            history.append(row | {"heldout_accuracy": accuracy})
            text += f" held-out acc {accuracy:.3f}"
        progress.update(step, text, newline=evaluate_now)
        if out_of_time or (evaluate_now and args.target_accuracy is not None and accuracy >= args.target_accuracy):
            break
    train_seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, task, args.out / f"{args.attention}.pt", half=args.half)
    entry = {
        "attention": args.attention,
        "backend": args.backend if args.attention == "nsa" else "torch",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "heldout_accuracy": accuracy,
        "chance": 1 / task.num_values,
        "eval_sequences": args.eval_sequences,
        "steps": step,
        "seed": args.seed,
        "train_seconds": round(train_seconds, 1),
        "parameters": params,
        "model": dataclasses.asdict(config),
        "task": dataclasses.asdict(task),
        "history": history,
        "command": "python -m examples.train " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    merge_results(args.out / "results.json", args.attention, entry)
    summary = f"held-out accuracy {accuracy:.4f} after {step} steps, {train_seconds:.0f}s; wrote {args.out}"
    print(summary, file=sys.stderr)
    return entry


if __name__ == "__main__":
    main()
