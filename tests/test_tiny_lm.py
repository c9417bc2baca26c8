"""The tiny NSA language model example: task generator, model shapes, a training step, checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from examples.tiny_lm import (
    ATTENTIONS,
    TaskConfig,
    TinyLM,
    TinyLMConfig,
    load_checkpoint,
    make_batch,
    recall_loss,
    save_checkpoint,
)
from examples.train import main
from reference import NSAConfig
from reference.layer import NSALayerAux

CHECKPOINT = Path(__file__).resolve().parent.parent / "examples" / "checkpoints" / "nsa.pt"
SMALL_NSA = NSAConfig(compress_block=4, compress_stride=2, select_block=8, num_selected=3, num_local=1, window=8)
SMALL_TASK = TaskConfig(seq_len=48, min_gap=16, num_pairs=2, num_filler=8, num_keys=4, num_values=4)


def small_model(attention: str = "nsa", seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    config = TinyLMConfig(
        vocab_size=SMALL_TASK.vocab_size,
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        attention=attention,
        nsa=dataclasses.asdict(SMALL_NSA),
    )
    return TinyLM(config)


@pytest.mark.parametrize("num_pairs", [1, 3])
def test_task_answer_is_far_outside_the_window(num_pairs: int) -> None:
    task = TaskConfig(seq_len=128, min_gap=40, num_pairs=num_pairs)
    batch = make_batch(task, 64, torch.Generator().manual_seed(1))
    B, T = batch.tokens.shape
    rows = torch.arange(B)
    assert (B, T) == (64, 128)
    assert bool((batch.value_pos <= T - 1 - task.min_gap).all())  # the answer is >= min_gap tokens back
    assert bool((batch.value_pos >= 1).all())
    assert torch.equal(batch.tokens[rows, batch.value_pos], batch.targets)
    assert torch.equal(batch.tokens[rows, batch.value_pos - 1], batch.tokens[:, -1])  # the key, asked again
    is_key = (batch.tokens >= task.first_key) & (batch.tokens < task.first_value)
    is_value = batch.tokens >= task.first_value
    assert bool((is_key[:, :-1].sum(1) == num_pairs).all()) and bool((is_value.sum(1) == num_pairs).all())
    keys = torch.where(is_key[:, :-1], batch.tokens[:, :-1], -1).sort(dim=1).values[:, -num_pairs:]
    assert bool((keys[:, 1:] != keys[:, :-1]).all())  # distinct keys: the question has one answer
    assert int(batch.value_pos.min()) < 20 and int(batch.value_pos.max()) > 60  # positions spread out


def test_task_is_deterministic_given_the_seed() -> None:
    a = make_batch(SMALL_TASK, 8, torch.Generator().manual_seed(7))
    b = make_batch(SMALL_TASK, 8, torch.Generator().manual_seed(7))
    c = make_batch(SMALL_TASK, 8, torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.tokens, c.tokens)


def test_task_rejects_impossible_geometry() -> None:
    with pytest.raises(ValueError, match="room"):
        TaskConfig(seq_len=32, min_gap=30)
    with pytest.raises(ValueError, match="distinct keys"):
        TaskConfig(num_pairs=5, num_keys=4)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_model_forward_shapes(attention: str) -> None:
    model = small_model(attention)
    tokens = make_batch(SMALL_TASK, 3, torch.Generator().manual_seed(0)).tokens
    logits = model(tokens)
    assert logits.shape == (3, SMALL_TASK.seq_len, SMALL_TASK.vocab_size)
    assert bool(torch.isfinite(logits).all())


def test_nsa_model_returns_each_layers_aux() -> None:
    model = small_model("nsa")
    tokens = make_batch(SMALL_TASK, 2, torch.Generator().manual_seed(0)).tokens
    logits, auxes = model(tokens, return_aux=True)
    assert torch.allclose(logits, model(tokens))
    assert len(auxes) == model.config.num_layers
    for aux in auxes:
        assert isinstance(aux, NSALayerAux)
        assert aux.gates.shape == (2, SMALL_TASK.seq_len, 2, 3)
        assert aux.block_idx.shape == (2, SMALL_TASK.seq_len, 1, SMALL_NSA.num_selected)


def test_window_model_cannot_see_past_the_window() -> None:
    """Changing a token more than layers * (w - 1) back leaves the window model's last logits unchanged."""
    model = small_model("window")
    tokens = make_batch(SMALL_TASK, 2, torch.Generator().manual_seed(0)).tokens
    reach = model.config.num_layers * (SMALL_NSA.window - 1)
    changed = tokens.clone()
    changed[:, : SMALL_TASK.seq_len - 1 - reach] = 0
    assert torch.allclose(model(tokens)[:, -1], model(changed)[:, -1], atol=1e-6)
    changed[:, SMALL_TASK.seq_len - 1 - reach] = 1
    assert not torch.allclose(model(tokens)[:, -1], model(changed)[:, -1], atol=1e-6)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_one_training_step_reduces_the_loss(attention: str) -> None:
    model = small_model(attention)
    batch = make_batch(SMALL_TASK, 16, torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before, _ = recall_loss(model, batch)
    opt.zero_grad()
    before.backward()
    opt.step()
    after, _ = recall_loss(model, batch)
    assert after.item() < before.item()


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    model = small_model("nsa", seed=5).eval()
    save_checkpoint(model, SMALL_TASK, tmp_path / "m.pt")
    loaded, task = load_checkpoint(tmp_path / "m.pt")
    assert task == SMALL_TASK and loaded.config == model.config
    tokens = make_batch(SMALL_TASK, 2, torch.Generator().manual_seed(0)).tokens
    assert torch.equal(loaded(tokens), model(tokens))


def test_train_cli_writes_checkpoint_and_results(tmp_path: Path) -> None:
    argv = "--attention nsa --steps 2 --batch-size 4 --eval-sequences 8 --seq-len 48 --window 8 --num-pairs 2"
    argv += " --compress-block 4 --compress-stride 2 --select-block 8 --num-selected 4 --hidden 32 --layers 1"
    entry = main([*argv.split(), "--out", str(tmp_path), "--half"])
    assert entry["steps"] == 2 and 0.0 <= entry["heldout_accuracy"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["nsa"]["task"]["min_gap"] == 8
    model, task = load_checkpoint(tmp_path / "nsa.pt")
    assert task.seq_len == 48 and model.config.num_layers == 1
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="examples/checkpoints/nsa.pt not trained yet")
def test_committed_checkpoint_loads_and_retrieves() -> None:
    model, task = load_checkpoint(CHECKPOINT)
    assert model.config.attention == "nsa"
    batch = make_batch(task, 64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        _, hit = recall_loss(model, batch)
    assert hit.float().mean().item() > 0.9
