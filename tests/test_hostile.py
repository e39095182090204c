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
import export
import plot_log
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
    "train: --final-lr-frac=-1 (gradient ascent)": Case(
        train_gpt2.main, lambda r: train_args(r, "--final-lr-frac=-1"), 2,
        "--final-lr-frac=-1"),
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
            "state": {}, "param_groups": []})), 1, "ckpt_0000002.pt: loaded state dict has a "
        "different number of parameter groups\nhint: the checkpoint is damaged or of another run"),
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


# ------------------------------------------ the 2026-12-07 probe's cases, by the mechanism


def with_log_line(line: bytes) -> Callable[[Path], list[str]]:
    """--resume args, the run's log.jsonl holding `line` in its middle."""
    def args(root: Path) -> list[str]:
        resumed = resume_args(root)
        log = root / "out" / "log.jsonl"
        lines = log.read_bytes().splitlines(keepends=True)
        log.write_bytes(b"".join([lines[0], line + b"\n", *lines[1:]]))
        return resumed
    return args


def plot_args(line: bytes) -> Callable[[Path], list[str]]:
    def args(root: Path) -> list[str]:
        log = root / "log.jsonl"
        log.write_bytes(b'{"step": 0, "loss": 5.0}\n' + line + b"\n")
        return [str(log), f"--output={root / 'plot.png'}"]
    return args


def gpt2_vocab_checkpoint(root: Path, spoil: Callable[[dict[str, Any]], object] = lambda s: None
                          ) -> Path:
    """A tiny model with GPT-2's vocabulary (what export, sampling and HellaSwag take)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", n_embd=32))
    state = {"model_config": dataclasses.asdict(model.config), "model": model.state_dict()}
    spoil(state)
    torch.save(state, root / "gpt2.pt")
    return root / "gpt2.pt"


def export_args(root: Path) -> list[str]:
    return [f"--checkpoint={gpt2_vocab_checkpoint(root)}", f"--out={root / 'hf'}"]


def an_export_there(root: Path) -> list[str]:
    args = export_args(root)
    assert export.main(args) == 0
    return args


def overflowing(state: dict[str, Any]) -> None:
    """Every stored value finite, but the logits overflow to inf and then NaN."""
    state["model"]["transformer.ln_f.weight"].fill_(3e38)


def exploding(state: dict[str, Any]) -> None:
    """Finite weights, a finite loss (about 1e34), and a gradient norm whose square
    overflows to inf at every step."""
    state["model"]["transformer.ln_f.weight"].fill_(1e36)


def wrong_optimizer_shape(state: dict[str, Any]) -> None:
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg"] = torch.zeros(3, *moments["exp_avg"].shape[1:])


def without_wandb(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError


def a_fifo(root: Path) -> list[str]:
    fifo = root / "fifo.jsonl"
    os.mkfifo(fifo)
    return [f"--pretrained={hf_dir(root)}", "--device=cpu", f"--data={fifo}"]


def long_ending(root: Path) -> list[str]:
    row = json.dumps({"ctx": "The cat sat on the", "label": 0,
                      "endings": [" mat." * 300, " moon.", " idea.", " seven."]})
    return [f"--pretrained={hf_dir(root)}", "--device=cpu",
            f"--data={hellaswag_file(root, [HELLASWAG, row])}"]


PROBE_CASES = {
    # A folder held: two runs never write one --out-dir; a usage error comes before any write.
    "train: --overwrite with --wandb-project and no wandb (D-3)": Case(
        train_gpt2.main, lambda r: resume_args(r)[:-1] + ["--overwrite", "--wandb-project=p"],
        2, "--wandb-project needs the wandb package", without_wandb),
    "train: --resume of a checkpoint trained with the removed --optimizer=muon (M-5)": Case(
        train_gpt2.main, lambda r: resume_args(r, lambda s: s["config"].update(
            optimizer="muon")), 1, "trained with --optimizer=muon, which the recipes no longer "
        "have\nhint: start from its weights with --init-from="),
    # Written whole, then renamed: nothing half-written, nothing replaced unasked.
    "export: into a folder holding an earlier export (D-4)": Case(
        export.main, an_export_there, 2, "--overwrite"),
    "plot: --output the log itself (D-5)": Case(
        plot_log.main, lambda r: [str(plot_args(b"")(r)[0]), f"--output={r / 'log.jsonl'}"],
        2, "would overwrite a log"),
    # Values range-checked where they are read, naming the file (and line).
    "train: --resume from a checkpoint at step -5 (S-1)": Case(
        train_gpt2.main, lambda r: resume_args(r, lambda s: s.update(step=-5)), 1,
        "ckpt_0000002.pt: step is -5"),
    "train: --resume from a checkpoint whose step is a string (M-3)": Case(
        train_gpt2.main, lambda r: resume_args(r, lambda s: s.update(step="abc")), 1,
        "ckpt_0000002.pt: step is 'abc'"),
    "train: --resume from a checkpoint of 0 processes (M-4)": Case(
        train_gpt2.main, lambda r: resume_args(r, lambda s: s.update(world_size=0)), 1,
        "ckpt_0000002.pt: world_size is 0"),
    "train: --resume with optimizer state of the wrong shape (M-2)": Case(
        train_gpt2.main, lambda r: resume_args(r, wrong_optimizer_shape), 1,
        "ckpt_0000002.pt: optimizer state: exp_avg of parameter 0 has shape"),
    "sample: a checkpoint whose n_layer is 200000 (M-1)": Case(
        sample.main, lambda r: sample_ckpt(spoiled(r, set_config(n_layer=200_000))), 1,
        "bad.pt: model_config['n_layer'] is 200000, its weights hold 2 layers"),
    "sample: a checkpoint whose block_size is 10**12 (M-1)": Case(
        sample.main, lambda r: sample_ckpt(spoiled(r, set_config(block_size=10**12))), 1,
        "bad.pt: model['transformer.wpe.weight'] has shape"),
    "sample: a Hugging Face config.json with n_positions 10**12 (M-1)": Case(
        sample.main, lambda r: hf_spoiled(r, edit_config(n_positions=10**12)), 1,
        "config.json: its sizes call for wpe.weight"),
    "train: --resume with a log line that is a JSON list (T-2)": Case(
        train_gpt2.main, with_log_line(b"[1, 2]"), 1, "log.jsonl:2: not an event"),
    "train: --resume with a log line whose step is a string (T-2)": Case(
        train_gpt2.main, with_log_line(b'{"step": "x"}'), 1, "log.jsonl:2: not an event"),
    "train: --resume with a log line that is not UTF-8 (M-9)": Case(
        train_gpt2.main, with_log_line(b'{"step": 1, "x": "\xe9"}'), 1,
        "log.jsonl:2: not an event"),
    "plot: a log line that is a JSON list (T-1)": Case(
        plot_log.main, plot_args(b"[1, 2]"), 1, "log.jsonl:2: not an event"),
    "plot: a null loss (T-1)": Case(
        plot_log.main, plot_args(b'{"step": 9, "loss": null}'), 1,
        "log.jsonl:2: loss is None, not a number"),
    "plot: a step that is a list (T-1)": Case(
        plot_log.main, plot_args(b'{"step": [9], "loss": 1.0}'), 1, "log.jsonl:2: not an event"),
    "plot: a string loss (M-10)": Case(
        plot_log.main, plot_args(b'{"step": 9, "loss": "abc"}'), 1,
        "log.jsonl:2: loss is 'abc'"),
    "plot: a line that is not UTF-8 (M-10)": Case(
        plot_log.main, plot_args(b'{"step": 9, "loss": "\xe9"}'), 1,
        "log.jsonl:2: not a UTF-8 JSON line"),
    "plot: a folder as the log (M-10)": Case(
        plot_log.main, lambda r: [str(folder(r / "dir.jsonl"))], 1,
        "dir.jsonl: a directory, not a log"),
    "eval: an ending longer than the context (M-7)": Case(
        eval_hellaswag.main, long_ending, 1, "hs.jsonl:2: an ending of"),
    "eval: a named pipe as --data (M-13)": Case(
        eval_hellaswag.main, a_fifo, 1, "fifo.jsonl: not a regular file"),
    "eval: a HellaSwag file of blank lines": Case(
        eval_hellaswag.main, lambda r: [f"--pretrained={hf_dir(r)}", "--device=cpu",
                                        f"--data={hellaswag_file(r, ['', ''])}"], 1,
        "hs.jsonl: no HellaSwag examples"),
    "prepare: --name as an absolute path (M-12)": Case(
        prepare_dataset.main, lambda r: [*text_corpus(r), f"--name={r / 'victim'}"], 2,
        "--name="),
    # Non-finite values refused where they are scored.
    "eval: finite weights whose losses overflow (S-2)": Case(
        eval_hellaswag.main, lambda r: eval_ckpt(r, gpt2_vocab_checkpoint(r, overflowing)), 1,
        "gpt2.pt: its HellaSwag losses are NaN or infinite"),
    "sample: finite weights whose logits overflow (M-8)": Case(
        sample.main, lambda r: [*sample_ckpt(gpt2_vocab_checkpoint(r, overflowing)), "Hi"], 1,
        "gpt2.pt: its logits on the prompt are NaN or infinite"),
    "train: --resume where every gradient norm is infinite (S-4)": Case(
        train_gpt2.main, lambda r: resume_args(r, exploding), 1, "gradient norm is inf"),
}


@pytest.mark.parametrize("name", list(PROBE_CASES))
def test_probe_case(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    check_case(PROBE_CASES[name], tmp_path, capsys, monkeypatch)


def test_a_copy_named_like_a_checkpoint_is_neither_resumed_nor_pruned(tmp_path: Path) -> None:
    """D-2: ckpt_best.pt (a user's copy) and a ckpt_old/ folder are not the run's."""
    path = checkpoint(tmp_path)
    best = path.with_name("ckpt_best.pt")
    best.write_bytes(path.read_bytes())
    (path.parent / "ckpt_old").mkdir()
    assert train_gpt2.main(train_args(tmp_path, "--max-steps=4", "--checkpoint-interval=1",
                                      "--keep-checkpoints=1", "--resume")) == 0
    names = sorted(p.name for p in path.parent.iterdir() if p.name.startswith("ckpt_"))
    assert names == ["ckpt_0000004.pt", "ckpt_best.pt", "ckpt_old"]
    log = [json.loads(line) for line in (path.parent / "log.jsonl").read_text().splitlines()]
    assert {"step": 2, "checkpoint": str(path)} in log  # resumed from the real newest


def test_an_export_cut_by_a_full_disk_leaves_no_folder(tmp_path: Path) -> None:
    """D-6: the kernel refuses the write (RLIMIT_FSIZE below model.safetensors's size): no
    --out folder appears, so nothing half-written passes for an export."""
    args = export_args(tmp_path)
    limit = 200_000  # below the tiny model's weights, above everything torch imports write

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-B", export.__file__, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size)
    assert done.returncode == 1, done.stderr
    assert "model.safetensors: cannot write it" in done.stderr
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
