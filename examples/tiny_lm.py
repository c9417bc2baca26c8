"""A tiny decoder-only language model with NSA layers, and the synthetic long-range task it learns.

The task (``TaskConfig``, ``make_batch``) is associative recall over a long distance: a sequence of
random filler tokens holds ``num_pairs`` (key, value) pairs, each planted at least ``min_gap`` tokens
before the end; the last token repeats one of the keys and the model must predict that key's value.
With ``min_gap >= num_layers * window`` no stack of sliding-window layers can even see the value,
so only a model with long-range attention (NSA's compressed and selected branches, or full
attention) can beat chance, ``1 / num_values``.

The model (``TinyLMConfig``, ``TinyLM``) is a pre-norm transformer whose attention is one of:

* ``"nsa"``: ``reference.layer.NativeSparseAttention`` (``backend="triton"`` runs the Triton kernels);
* ``"window"``: causal softmax attention over the last ``window`` tokens only (NSA's window branch alone);
* ``"full"``: causal softmax attention over every earlier token (``torch`` SDPA).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reference import NSAConfig
from reference.layer import NativeSparseAttention
from reference.masks import window_visible
from reference.rope import apply_rope

ATTENTIONS = ("nsa", "window", "full")


@dataclass(frozen=True)
class TaskConfig:
    """Token layout and geometry of the recall task: ids are [filler | keys | values]."""

    seq_len: int = 256
    min_gap: int = 64  # the queried value sits at position <= seq_len - 1 - min_gap
    num_pairs: int = 1
    num_filler: int = 32
    num_keys: int = 16
    num_values: int = 16

    def __post_init__(self) -> None:
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} needs at least as many distinct keys, got {self.num_keys}")
        if self.num_slots < self.num_pairs:
            raise ValueError(
                f"seq_len={self.seq_len} and min_gap={self.min_gap} leave room for {self.num_slots} pairs, "
                f"need {self.num_pairs}"
            )

    @property
    def vocab_size(self) -> int:
        """Filler, key and value tokens together."""
        return self.num_filler + self.num_keys + self.num_values

    @property
    def first_key(self) -> int:
        """Token id of key 0."""
        return self.num_filler

    @property
    def first_value(self) -> int:
        """Token id of value 0."""
        return self.num_filler + self.num_keys

    @property
    def num_slots(self) -> int:
        """Non-overlapping two-token slots that end at or before ``seq_len - 1 - min_gap``."""
        return (self.seq_len - self.min_gap - 1) // 2


@dataclass
class Batch:
    """One batch of the recall task."""

    tokens: torch.Tensor  # [B, T] int64; tokens[:, -1] is the queried key
    targets: torch.Tensor  # [B] int64, the value token to predict at the last position
    value_pos: torch.Tensor  # [B] int64, where the queried value sits (its key is one position earlier)


def make_batch(task: TaskConfig, batch_size: int, generator: torch.Generator) -> Batch:
    """Random filler with ``num_pairs`` planted (key, value) pairs; the last token asks for one key again.

    Pairs occupy two-token slots ``(2 s + shift, 2 s + shift + 1)`` with a random per-sequence
    ``shift`` in {0, 1}, so pairs never overlap and may straddle any block boundary. Deterministic
    given the generator's state (on the CPU).
    """
    B, T, P = batch_size, task.seq_len, task.num_pairs
    rows = torch.arange(B)[:, None]
    tokens = torch.randint(0, task.num_filler, (B, T), generator=generator)
    slots = torch.rand(B, task.num_slots, generator=generator).argsort(dim=1)[:, :P]  # [B, P] distinct slots
    shift = torch.randint(0, 2, (B, 1), generator=generator)
    key_pos = 2 * slots + shift
    keys = torch.rand(B, task.num_keys, generator=generator).argsort(dim=1)[:, :P]  # distinct keys per sequence
    values = torch.randint(0, task.num_values, (B, P), generator=generator)
    tokens[rows, key_pos] = task.first_key + keys
    tokens[rows, key_pos + 1] = task.first_value + values
    asked = torch.randint(0, P, (B, 1), generator=generator)
    tokens[:, -1] = task.first_key + keys.gather(1, asked)[:, 0]
    return Batch(tokens, task.first_value + values.gather(1, asked)[:, 0], key_pos.gather(1, asked)[:, 0] + 1)


class SoftmaxAttention(nn.Module):
    """Baseline GQA attention with RoPE: causal over all keys (``window=None``) or the last ``window`` keys."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.window = num_heads, num_kv_heads, head_dim, window
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(hidden_size, 2 * num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]."""
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.num_heads, self.head_dim))
        k, v = self.kv_proj(x).view(B, T, 2, self.num_kv_heads, self.head_dim).unbind(dim=2)
        q, k, v = q.transpose(1, 2), apply_rope(k).transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            t = torch.arange(T, device=x.device)
            mask = window_visible(t, t, NSAConfig(window=self.window))  # t - w < s <= t
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


@dataclass(frozen=True)
class TinyLMConfig:
    """Sizes of the tiny model; ``nsa`` holds the ``NSAConfig`` fields (its ``window`` also sizes ``"window"``)."""

    vocab_size: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_ratio: int = 4
    attention: str = "nsa"
    nsa: dict[str, int] = field(default_factory=lambda: dataclasses.asdict(NSAConfig()))

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")

    @property
    def nsa_config(self) -> NSAConfig:
        """The NSA block sizes as an ``NSAConfig``."""
        return NSAConfig(**self.nsa)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TinyLMConfig, backend: str) -> None:
        super().__init__()
        c = config
        self.attn_norm = nn.RMSNorm(c.hidden_size)
        self.attn: nn.Module
        if c.attention == "nsa":
            self.attn = NativeSparseAttention(
                c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, config=c.nsa_config, backend=backend
            )
        else:
            window = c.nsa_config.window if c.attention == "window" else None
            self.attn = SoftmaxAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, window)
        self.mlp_norm = nn.RMSNorm(c.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(c.hidden_size, c.mlp_ratio * c.hidden_size),
            nn.GELU(),
            nn.Linear(c.mlp_ratio * c.hidden_size, c.hidden_size),
        )

    def forward(self, x: torch.Tensor, return_aux: bool = False) -> tuple[torch.Tensor, Any]:
        """x [B, T, hidden] -> (x', the NSA layer's aux or None)."""
        aux = None
        if return_aux:
            a, aux = self.attn(self.attn_norm(x), return_aux=True)
        else:
            a = self.attn(self.attn_norm(x))
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), aux


class TinyLM(nn.Module):
    """Token embedding, ``num_layers`` blocks, a final norm and an untied output head."""

    def __init__(self, config: TinyLMConfig, backend: str = "reference") -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, backend) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, return_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[Any]]:
        """tokens [B, T] -> logits [B, T, vocab] (and each layer's NSA aux when ``return_aux``)."""
        x = self.embed(tokens)
        auxes = []
        for block in self.blocks:
            x, aux = block(x, return_aux)
            auxes.append(aux)
        logits = self.head(self.norm(x))
        return (logits, auxes) if return_aux else logits


def recall_loss(model: TinyLM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the answer at the last position, and the per-sequence correctness [B] bool."""
    logits = model(batch.tokens)[:, -1]  # type: ignore[index]
    loss = F.cross_entropy(logits.float(), batch.targets)
    return loss, logits.argmax(dim=-1) == batch.targets


@torch.no_grad()
def evaluate(model: TinyLM, task: TaskConfig, num_sequences: int, seed: int, batch_size: int = 64) -> float:
    """Accuracy on ``num_sequences`` fresh sequences drawn with a fixed ``seed`` (held-out data)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, num_sequences, batch_size):
        b = make_batch(task, min(batch_size, num_sequences - start), generator)
        _, hit = recall_loss(model, Batch(b.tokens.to(device), b.targets.to(device), b.value_pos))
        correct += int(hit.sum())
    model.train(was_training)
    return correct / num_sequences


def save_checkpoint(model: TinyLM, task: TaskConfig, path: Path, half: bool = False) -> None:
    """Write ``path`` (.pt state dict, fp16 if ``half``) and ``path`` with suffix .json (both configs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    torch.save(state, path)
    meta = {"model": dataclasses.asdict(model.config), "task": dataclasses.asdict(task)}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(path: Path | str, backend: str = "reference") -> tuple[TinyLM, TaskConfig]:
    """Rebuild the model (fp32, CPU, eval mode) and its task from ``save_checkpoint``'s two files."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    model = TinyLM(TinyLMConfig(**meta["model"]), backend=backend)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval(), TaskConfig(**meta["task"])
