"""Hostile but fair input to every script: one stderr line naming the file or flag, exit 1
or 2, no traceback, and the files already there byte-identical afterwards.

Each case builds its bad input in a fresh folder, runs a script's main() in-process and
checks the outcome; the table names the kind of fault each case stands for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


HELLASWAG = json.dumps({"ctx": "The cat sat on the", "label": 0,
                        "endings": [" mat.", " moon.", " idea.", " seven."]})


def spoiled(root: Path, spoil: Callable[[dict[str, Any]], object], name: str = "bad.pt") -> Path:
    """A real checkpoint's entries (as train_jax.py writes them) after `spoil`, saved."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", n_embd=32, vocab_size=VOCAB))
    state = {"model_config": dataclasses.asdict(model.config), "model": model.state_dict()}
    spoil(state)
    torch.save(state, root / name)
    return root / name


def spoiled_run(root: Path, spoil: Callable[[dict[str, Any]], object]) -> Path:
    """checkpoint()'s newest checkpoint, rewritten after `spoil`."""
    path = checkpoint(root)
    state = torch.load(path, weights_only=True)
    spoil(state)
    torch.save(state, path)
    return path


def hf_spoiled(root: Path, spoil: Callable[[Path], object]) -> list[str]:
    folder = hf_dir(root)
    spoil(folder)
    return [f"--pretrained={folder}", "--device=cpu"]


def edit_config(**changes: Any) -> Callable[[Path], object]:
    def spoil(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                        if v is not None}))
    return spoil


def nan_weights(state: dict[str, Any]) -> None:
    for tensor in state["model"].values():
        tensor.fill_(float("nan"))


def set_weight(key: str, value: torch.Tensor | None) -> Callable[[dict[str, Any]], None]:
    def spoil(state: dict[str, Any]) -> None:
        state["model"].pop(key)
        if value is not None:
            state["model"][key] = value
    return spoil


def set_config(**changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda state: state["model_config"].update(changes)


def nan_safetensors(folder: Path) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    model.state_dict()["transformer.h.0.mlp.c_fc.weight"].fill_(float("inf"))
    model.save_hf(folder)


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def sample_ckpt(path: Path) -> list[str]:
    return [f"--checkpoint={path}", "--device=cpu", "--max-length=4"]


def eval_ckpt(root: Path, path: Path) -> list[str]:
    return [f"--checkpoint={path}", "--device=cpu", f"--data={hellaswag_file(root, [HELLASWAG])}"]


@dataclass
class Case:
    main: Callable[[list[str]], int]
    args: Callable[[Path], list[str]]  # builds the bad input, returns the command line
    code: int  # the exit status: 2 for a bad flag, 1 for anything else
    names: str  # what the one error line must name (the file or the flag)
    fault: Callable[[Path, pytest.MonkeyPatch], None] | None = None  # injected after setup



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
    "sample: a string in a checkpoint's model_config": Case(
        sample.main, lambda r: sample_ckpt(spoiled(r, set_config(n_layer="2"))), 1,
        "bad.pt: model_config['n_layer'] is '2'"),
    "sample: a zero in a checkpoint's model_config": Case(
        sample.main, lambda r: sample_ckpt(spoiled(r, set_config(n_head=0))), 1,
        "bad.pt: model_config['n_head'] is 0"),
    "eval: a checkpoint that lacks a weight": Case(
        eval_hellaswag.main, lambda r: eval_ckpt(r, spoiled(r, set_weight(
            "transformer.h.1.mlp.c_fc.bias", None))), 1,
        "bad.pt: model['transformer.h.1.mlp.c_fc.bias'] is missing"),
    "sample: a checkpoint weight of the wrong shape": Case(
        sample.main, lambda r: sample_ckpt(spoiled(r, set_weight(
            "transformer.ln_f.weight", torch.ones(31)))), 1,
        "bad.pt: model['transformer.ln_f.weight'] has shape (31,)"),
    "sample: a folder named like a checkpoint file": Case(
        sample.main, lambda r: sample_ckpt(folder(r / "ckpt_0000003.pt")), 1,
        "ckpt_0000003.pt: a directory"),
    "sample: a run folder as --checkpoint": Case(
        sample.main, lambda r: sample_ckpt(checkpoint(r).parent), 1,
        "pass one of its checkpoints"),
    "train: --init-from a checkpoint with a float n_embd": Case(
        train_gpt2.main, lambda r: train_args(r, "--init-from=" + str(spoiled(
            r, set_config(n_embd=32.0)))), 1, "bad.pt: model_config['n_embd'] is 32.0"),
    "train: --resume from a checkpoint with a foreign optimizer state": Case(
        train_gpt2.main, lambda r: resume_args(r, lambda s: s.update(optimizer={
            "state": {}, "param_groups": []})), 1, "ckpt_0000002.pt: cannot read its optimizer"),
    "train: --resume where a folder is named like a checkpoint file": Case(
        train_gpt2.main, lambda r: resume_args(r, lambda s: folder(r / "out" / "ckpt_0000003.pt")),
        1, "ckpt_0000003.pt: a directory"),
    "sample: a Hugging Face config.json without n_head": Case(
        sample.main, lambda r: hf_spoiled(r, edit_config(n_head=None)), 1,
        "config.json: 'n_head' is missing"),
    "eval: a Hugging Face config.json with a string n_embd": Case(
        eval_hellaswag.main, lambda r: [*hf_spoiled(r, edit_config(n_embd="64")),
                                        f"--data={hellaswag_file(r, [HELLASWAG])}"], 1,
        "config.json: 'n_embd' is '64'"),
    "sample: a Hugging Face config.json that is not JSON": Case(
        sample.main, lambda r: hf_spoiled(r, lambda f: cut_in_half(f / "config.json")), 1,
        "config.json: not JSON"),
    "sample: a Hugging Face model.safetensors cut short": Case(
        sample.main, lambda r: hf_spoiled(r, lambda f: cut_in_half(
            f / "model.safetensors")), 1, "model.safetensors: not a readable"),
    # 2. input that used to give a silently wrong result
    "eval: a checkpoint of NaN weights (scored 0.25)": Case(
        eval_hellaswag.main, lambda r: eval_ckpt(r, spoiled(r, nan_weights)), 1,
        "bad.pt: model['transformer.wte.weight'] holds NaN"),
    "train: --resume from a checkpoint with an infinite weight": Case(
        train_gpt2.main, lambda r: resume_args(r, lambda s: s["model"][
            "transformer.h.0.attn.c_attn.bias"].fill_(float("inf"))), 1,
        "ckpt_0000002.pt: model['transformer.h.0.attn.c_attn.bias'] holds NaN or infinite"),
    "sample: infinite Hugging Face weights": Case(
        sample.main, lambda r: hf_spoiled(r, nan_safetensors), 1,
        "model.safetensors: 'transformer.h.0.mlp.c_fc.weight' holds NaN"),
    # 3. concurrency
    "prepare: a second run of the same dataset": Case(
        prepare_dataset.main, text_corpus, 1, "pid 4242", another_run_holds_the_lock),
}


def resume_args(root: Path, spoil: Callable[[dict[str, Any]], object] = lambda s: None
                ) -> list[str]:
    spoiled_run(root, spoil)
    return train_args(root, "--max-steps=4", "--checkpoint-interval=1", "--resume")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root but the training log, which a resumed run appends to, and the
    run folder's lock file, which names the pid of the run holding it."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("log.jsonl", ".lock")}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    check_case(CASES[name], tmp_path, capsys, monkeypatch)


def check_case(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str],
               monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the case: one error line naming case.names, case.code, no traceback, the files
    that were there unchanged, no temp file left."""
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
    hint_lines = [line for line in err.splitlines() if line.startswith("hint: ")]
    assert len(hint_lines) <= 1, err
    assert case.names in "\n".join(error_lines + hint_lines), err
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "existing files changed"
    assert not list(tmp_path.rglob(".*.tmp")), "a half-written file was left"
    assert not (tmp_path / "PWNED").exists(), "the checkpoint ran code"


def test_a_full_disk_while_writing_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    """The kernel refuses the write: RLIMIT_FSIZE below the checkpoint's size, SIGXFSZ
    ignored, so write() fails with EFBIG inside torch.save (which would report it as
    "unexpected pos ...")."""
    args = resume_args(tmp_path)
    saved = snapshot(tmp_path)
    limit = (tmp_path / "out" / "ckpt_0000002.pt").stat().st_size // 2  # the log fits

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # -B: no .pyc is written under the limit (a cut-short one would break later imports).
    done = subprocess.run([sys.executable, "-B", train_gpt2.__file__, *args], cwd=tmp_path,
                          env={**os.environ, "NANO_GPT_DATA_ROOT": str(tmp_path / "data-root")},
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size)
    assert done.returncode == 1, done.stderr
    error_lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{tmp_path / 'out' / 'ckpt_0000003.pt'}: cannot write it (File too large)" \
        in error_lines[0], done.stderr
    assert not list(tmp_path.rglob(".*.tmp")), "a half-written file was left"
    assert {k: v for k, v in snapshot(tmp_path).items() if k in saved} == saved
