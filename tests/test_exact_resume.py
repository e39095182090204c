"""--resume restores every piece of saved state: each checkpoint a resumed run writes equals,
entry by entry, the one the uninterrupted run wrote at that step (weights, every optimizer
state tensor, the GradScaler's scale and growth tracker, the fp16 skipped-step count, the
loader position), not only its losses.

The runs are tiny (1 layer, 32 wide, 16-token samples, a handful of steps) and in-process,
so the fp16 case can start its GradScaler at a scale that overflows, as a GPU's does at the
start of a run: steps get skipped and the scale moves both ways before the resume point.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import deterministic_events, load_ckpt, read_log, write_shards

import runtime
import train_gpt2

VOCAB, SEQ, BATCH = 256, 16, 2
STEPS, RESUME_AT = 6, 3
# A first scale far too large for fp16 gradients (skips come first), and growth after every
# 2 good steps (the scale also grows back, so the growth tracker matters at the resume point).
INIT_SCALE, GROWTH_INTERVAL = 2.0**20, 2
# Entries that name the run folder or the --resume flag, so differ between the two runs.
RUN_SPECIFIC = {"args", "config"}


def run_args(shards: Path, out_dir: Path, *extra: str) -> list[str]:
    return [f"--data-dir={shards}", f"--out-dir={out_dir}", "--device=cpu", "--model=gpt2-tiny",
            "--n-layer=1", "--n-head=2", "--n-embd=32", f"--vocab-size={VOCAB}",
            f"--seq-len={SEQ}", f"--batch-size={BATCH}",
            f"--total-batch-size={2 * BATCH * SEQ}", f"--max-steps={STEPS}",
            "--warmup-steps=2", "--max-lr=3e-3", "--eval-interval=3", "--val-steps=1",
            "--checkpoint-interval=1", "--keep-checkpoints=0", "--hellaswag-interval=0",
            "--sample-interval=0", *extra]


def overflowing_scaler(monkeypatch: pytest.MonkeyPatch, init_scale: float = INIT_SCALE) -> None:
    """Every run builds torch's own CPU GradScaler, started at `init_scale`."""
    monkeypatch.setattr(runtime, "make_grad_scaler", lambda precision, device:
                        torch.amp.GradScaler(device.type, init_scale=init_scale,
                                             growth_interval=GROWTH_INTERVAL,
                                             enabled=precision.use_grad_scaler))


def assert_same(expected: Any, got: Any, where: str) -> None:
    """Equal structure and values; tensors bit for bit, with dtype and shape."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), where
        assert torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_same(expected[key], got[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == expected, f"{where}: {got!r}, uninterrupted {expected!r}"


def tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else \
        value if isinstance(value, list | tuple) else ()
    return [t for item in items for t in tensors(item)]


def straight_and_resumed(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """An uninterrupted run, and a run killed right after its checkpoint RESUME_AT (what a
    kill leaves: that checkpoint and the log) then resumed; both to STEPS."""
    shards = write_shards(tmp_path / "shards")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_gpt2.main(run_args(shards, straight, *extra)) == 0
    resumed.mkdir()
    shutil.copy(straight / f"ckpt_{RESUME_AT:07d}.pt", resumed)
    shutil.copy(straight / "log.jsonl", resumed)  # --resume cuts it back to the checkpoint
    assert train_gpt2.main(run_args(shards, resumed, *extra, "--resume")) == 0
    return straight, resumed


def assert_resumed_run_is_the_same_run(straight: Path, resumed: Path) -> None:
    """Each checkpoint after the resume point, every entry, and the log's events."""
    assert sorted(p.name for p in resumed.glob("ckpt_*.pt")) == [
        f"ckpt_{s:07d}.pt" for s in range(RESUME_AT, STEPS + 1)]
    for step in range(RESUME_AT + 1, STEPS + 1):
        expected = load_ckpt(straight / f"ckpt_{step:07d}.pt")
        got = load_ckpt(resumed / f"ckpt_{step:07d}.pt")
        assert expected.keys() == got.keys()
        for key in expected.keys() - RUN_SPECIFIC:
            assert_same(expected[key], got[key], f"ckpt_{step:07d}.pt[{key!r}]")
        assert got["step"] == step
    assert deterministic_events(read_log(resumed)) == deterministic_events(read_log(straight))


def test_fp16_resume_restores_the_loss_scale_growth_tracker_and_skipped_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.resolve_precision(torch.device("cpu"), "fp16").use_grad_scaler
    overflowing_scaler(monkeypatch)
    straight, resumed = straight_and_resumed(tmp_path, "--dtype=fp16")
    # The resume point holds state that a resume which forgot it could not rebuild: updates
    # were skipped, the scale fell from its start and the growth tracker is part way.
    saved = load_ckpt(straight / f"ckpt_{RESUME_AT:07d}.pt")
    assert 0 < saved["skipped_steps"] < RESUME_AT
    assert saved["scaler"]["scale"] < INIT_SCALE
    assert saved["scaler"]["_growth_tracker"] > 0
    after = [e["loss_scale"] for e in read_log(straight) if "loss" in e][RESUME_AT:]
    assert len(set(after)) > 1  # and it moves after the resume point
    assert_resumed_run_is_the_same_run(straight, resumed)


def test_modern_resume_restores_every_groups_state(tmp_path: Path) -> None:
    straight, resumed = straight_and_resumed(tmp_path, "--recipe=modern")
    saved = load_ckpt(straight / f"ckpt_{RESUME_AT:07d}.pt")["optimizer"]
    # Every group holds moving state at the resume point: Muon's momentum for the block
    # matrices, AdamW's moments for the rest.
    kinds = [group["name"] for group in saved["param_groups"]]
    assert "matrix" in kinds and len(kinds) > 2
    for group in saved["param_groups"]:
        state = [saved["state"][i] for i in group["params"]]
        assert all(any(t.is_floating_point() and t.dim() > 0 and t.abs().sum() > 0
                       for t in tensors(s)) for s in state), group["name"]
    assert_resumed_run_is_the_same_run(straight, resumed)


def test_modern_recipe_in_fp16_resumes_every_piece(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--recipe=modern (its own model, Muon and per-kind AdamW groups, the wsd schedule)
    under the fp16 GradScaler: all of it at once. Its gradients are smaller than GPT-2's
    (capped logits, zero-initialised projections): a higher first scale overflows."""
    overflowing_scaler(monkeypatch, init_scale=2.0**32)
    straight, resumed = straight_and_resumed(tmp_path, "--recipe=modern", "--dtype=fp16")
    saved = load_ckpt(straight / f"ckpt_{RESUME_AT:07d}.pt")
    assert saved["model_kind"] == "modern"
    assert saved["skipped_steps"] > 0
    assert_resumed_run_is_the_same_run(straight, resumed)
