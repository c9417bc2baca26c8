"""`make demo` (python -m reference.demo): runs end to end, prints its sections, writes the figures."""

from pathlib import Path

import pytest
import torch

from reference import demo

SECTIONS = ("== Native Sparse Attention demo ==", "== Keys read per query", "== Sparsity ==", "== Selected blocks")
FIGURES = ("masks_full.png", "masks_last_queries.png", "masks_zoom.png", "last_query.png", "gates.png")


def test_demo_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--length", "300", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--num-selected", "3"]
    assert demo.main([*argv, "--window", "64", "--compression", "mean", "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out
    for section in (*SECTIONS, "== Gates", "== Figures =="):
        assert section in printed, section
    for branch in ("compressed", "selected", "window", "full"):
        assert branch in printed
    assert "query t=   299, kv head 1" in printed
    for name in FIGURES:
        path = tmp_path / "figs" / name
        assert path.exists() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    assert "--length" in capsys.readouterr().out


def test_keys_read_counts() -> None:
    config = demo.NSAConfig(compress_block=4, compress_stride=2, select_block=4, num_selected=2, num_local=1, window=3)
    block_idx = torch.tensor([[[0, -1]], [[0, -1]], [[0, -1]], [[0, -1]], [[0, 1]], [[0, 1]]])  # [T=6, H=1, n=2]
    reads = demo.keys_read(block_idx, config)
    assert reads["cmp"][:, 0].tolist() == [0, 0, 0, 1, 1, 2]
    assert reads["slc"][:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert reads["win"][:, 0].tolist() == [1, 2, 3, 3, 3, 3]
    masks = demo.token_masks(block_idx[:, 0], config)
    assert masks["cmp"].sum(1).tolist() == [0, 0, 0, 4, 4, 6]
    assert bool((masks["union"] <= masks["full"]).all())
