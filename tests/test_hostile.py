"""Hostile but fair input to every script: one stderr line naming the file or flag, exit 1
or 2, no traceback, and the files already there byte-identical afterwards.

Each case builds its bad input in a fresh folder, runs a script's main() in-process and
checks the outcome; the table names the kind of fault each case stands for.
"""

from __future__ import annotations

import errno
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_hellaswag
import prepare_dataset
import sample
import train_gpt2
from data import write_shard
from model import GPT, GPTConfig

VOCAB, SEQ = 256, 32


def shards(root: Path) -> Path:
    folder = root / "shards"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    write_shard(folder / "syn_train_000000.bin", rng.integers(0, VOCAB, 6_000))
    write_shard(folder / "syn_val_000000.bin", rng.integers(0, VOCAB, 2_000))
    return folder


def train_args(root: Path, *extra: str) -> list[str]:
    return [f"--data-dir={shards(root)}", f"--out-dir={root / 'out'}", "--device=cpu",
            "--model=gpt2-tiny", "--n-embd=32", f"--vocab-size={VOCAB}", f"--seq-len={SEQ}",
            "--batch-size=4", f"--total-batch-size={4 * SEQ}", "--val-steps=1",
            "--eval-interval=0", "--hellaswag-interval=0", "--sample-interval=0", *extra]


def checkpoint(root: Path) -> Path:
    """A real train_gpt2.py checkpoint (two steps), for cases that need one beside them."""
    assert train_gpt2.main(train_args(root, "--max-steps=2", "--checkpoint-interval=1")) == 0
    return root / "out" / "ckpt_0000002.pt"


class Payload:
    """Unpickling this calls os.system: a checkpoint that tries to run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def garbage_file(root: Path) -> Path:
    path = root / "garbage.pt"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return path


def empty_file(root: Path) -> Path:
    path = root / "empty.pt"
    path.write_bytes(b"")
    return path


def malicious_file(root: Path) -> Path:
    path = root / "evil.pt"
    torch.save({"model_config": Payload(root / "PWNED"), "model": {}}, path)
    return path


def foreign_pickle(root: Path) -> Path:
    path = root / "foreign.pt"
    with open(path, "wb") as f:
        pickle.dump({"weights": [1, 2, 3]}, f)
    return path


def hf_dir(root: Path) -> Path:
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("gpt2-tiny")).save_hf(root / "hf")
    return root / "hf"


def hellaswag_file(root: Path, lines: list[str]) -> Path:
    path = root / "hs.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@dataclass
class Case:
    main: Callable[[list[str]], int]
    args: Callable[[Path], list[str]]  # builds the bad input, returns the command line
    code: int  # the exit status: 2 for a bad flag, 1 for anything else
    names: str  # what the one error line must name (the file or the flag)
    fault: Callable[[Path, pytest.MonkeyPatch], None] | None = None  # injected after setup


def full_disk_after(fsyncs: int) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """A disk that fills up: the first `fsyncs` fsync calls succeed, every later one fails
    (where a full disk shows for writes that the page cache took)."""
    def fault(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        real, calls = os.fsync, [0]

        def fsync(fd: int) -> None:
            calls[0] += 1
            if calls[0] > fsyncs:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    return fault


def text_corpus(root: Path) -> list[str]:
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"document {i} " * 50)
    return [f"--dataset={corpus}", f"--data-root={root / 'data'}", "--shard-size=2000",
            "--num-proc=1", "--no-progress"]


HELD_LOCKS: list[object] = []


def another_run_holds_the_lock(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    folder = root / "data" / "corpus"
    folder.mkdir(parents=True)
    holder = open(folder / prepare_dataset.LOCK_NAME, "w")  # noqa: SIM115 - held by the test
    holder.write("4242\n")
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    HELD_LOCKS.append(holder)


def hf(root: Path, *extra: str) -> list[str]:
    return [f"--pretrained={hf_dir(root)}", "--device=cpu", *extra]


CASES = {
    # 1. known failure kinds that used to end in a traceback
    "sample: garbage checkpoint": Case(
        sample.main, lambda r: [f"--checkpoint={garbage_file(r)}", "--device=cpu"], 1,
        "garbage.pt"),
    "sample: empty checkpoint": Case(
        sample.main, lambda r: [f"--checkpoint={empty_file(r)}", "--device=cpu"], 1,
        "empty.pt"),
    "sample: code-executing pickle": Case(
        sample.main, lambda r: [f"--checkpoint={malicious_file(r)}", "--device=cpu"], 1,
        "evil.pt"),
    "eval: pickle of something else": Case(
        eval_hellaswag.main, lambda r: [f"--checkpoint={foreign_pickle(r)}", "--device=cpu"],
        1, "foreign.pt"),
    "train: --init-from a garbage file": Case(
        train_gpt2.main, lambda r: train_args(r, f"--init-from={garbage_file(r)}"), 1,
        "garbage.pt"),
    "train: disk full while writing a checkpoint": Case(
        train_gpt2.main, lambda r: resume_args(r), 1, "ckpt_0000003.pt", full_disk_after(1)),
    "prepare: disk full while writing a shard": Case(
        prepare_dataset.main, text_corpus, 1, "corpus_train_000000.bin", full_disk_after(0)),
    "train: --max-lr=-1": Case(train_gpt2.main, lambda r: train_args(r, "--max-lr=-1"), 2,
                               "--max-lr=-1"),
    "train: --max-lr=nan": Case(train_gpt2.main, lambda r: train_args(r, "--max-lr=nan"), 2,
                                "--max-lr=nan"),
    # 2. input that used to give a silently wrong result
    "train: --min-lr=-1 (gradient ascent)": Case(
        train_gpt2.main, lambda r: train_args(r, "--min-lr=-1"), 2, "--min-lr=-1"),
    "train: --grad-clip=inf": Case(
        train_gpt2.main, lambda r: train_args(r, "--grad-clip=inf"), 2, "--grad-clip=inf"),
    "sample: --temperature=nan": Case(
        sample.main, lambda r: hf(r, "--temperature=nan"), 2, "--temperature=nan"),
    "sample: --top-p=0": Case(sample.main, lambda r: hf(r, "--top-p=0"), 2, "--top-p=0"),
    "eval: an empty HellaSwag file": Case(
        eval_hellaswag.main, lambda r: hf(r, f"--data={hellaswag_file(r, [])}"), 1,
        "no HellaSwag examples"),
    "eval: a HellaSwag line that is not JSON": Case(
        eval_hellaswag.main, lambda r: hf(r, f"--data={hellaswag_file(r, ['{oops'])}"), 1,
        "hs.jsonl:1"),
    # 3. concurrency
    "prepare: a second run of the same dataset": Case(
        prepare_dataset.main, text_corpus, 1, "pid 4242", another_run_holds_the_lock),
}


def resume_args(root: Path) -> list[str]:
    checkpoint(root)
    return train_args(root, "--max-steps=4", "--checkpoint-interval=1", "--resume")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root but the training log, which a resumed run appends to."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "log.jsonl"}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    monkeypatch.setenv("NANO_GPT_DATA_ROOT", str(tmp_path / "data-root"))
    args = case.args(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    if case.fault is not None:
        case.fault(tmp_path, monkeypatch)
    code = case.main(args)
    monkeypatch.undo()
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert code == case.code, err
    assert len(error_lines) == 1 and "Traceback" not in err and "Warning" not in err, err
    assert case.names in error_lines[0], err
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "existing files changed"
    assert not list(tmp_path.rglob(".*.tmp")), "a half-written file was left"
    assert not (tmp_path / "PWNED").exists(), "the checkpoint ran code"
