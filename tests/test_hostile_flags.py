"""Flags at and beyond the edges of their domains, and a newcomer's first commands.

Every numeric flag's domain is what the code downstream takes: a value just inside it runs,
one just outside is one stderr line naming the flag, exit 2, before any work. The train
sweep is generated from TrainConfig's option domains, so a new flag is swept too. Then the
cases a new user meets first: a prompt longer than the model's context, a dataset that is
not prepared yet (the hint is a command that works), and `--pretrained=gpt2` without a
network (one line at once, not half a minute of hub retries).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

import numpy as np
import pytest
import torch

import cli
import eval_hellaswag
import prepare_dataset
import sample
import train_gpt2
from data import write_shard
from model import GPT, GPTConfig

VOCAB, SEQ = 256, 32
HELLASWAG = json.dumps({"ctx": "The cat sat on the", "label": 0,
                        "endings": [" mat.", " moon.", " idea.", " seven."]})


def shards(root: Path, high: int = VOCAB) -> Path:
    """Random-token shards below `high` (1: all zeros)."""
    folder = root / f"shards{high}"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    write_shard(folder / "syn_train_000000.bin", rng.integers(0, high, 6_000))
    write_shard(folder / "syn_val_000000.bin", rng.integers(0, high, 2_000))
    return folder


def hellaswag_file(root: Path) -> Path:
    path = root / "hs.jsonl"
    path.write_text(HELLASWAG + "\n")
    return path


def train_args(root: Path, *extra: str) -> list[str]:
    return [f"--data-dir={shards(root)}", f"--out-dir={root / 'out'}", "--device=cpu",
            "--model=gpt2-tiny", "--n-embd=32", f"--vocab-size={VOCAB}", f"--seq-len={SEQ}",
            "--batch-size=4", f"--total-batch-size={4 * SEQ}", "--max-steps=1",
            "--val-steps=1", "--eval-interval=0", "--hellaswag-interval=0",
            "--sample-interval=0", *extra]


def hf_dir(root: Path, **config: int) -> Path:
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("gpt2-tiny", **config)).save_hf(root / "hf")
    return root / "hf"


def checkpoint_file(root: Path, **config: int) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", **config))
    path = root / "ckpt_0000001.pt"
    torch.save({"model_config": dataclasses.asdict(model.config), "model": model.state_dict()},
               path)
    return path


def one_error_line(err: str) -> str:
    """The one error line, with the hint line after it if there is one."""
    lines = [line for line in err.splitlines() if "error" in line]
    hints = [line for line in err.splitlines() if line.startswith("hint: ")]
    assert len(lines) == 1 and len(hints) <= 1 and "Traceback" not in err, err
    return "\n".join(lines + hints)


# ------------------------------------------------------------------- the train sweep

SAMPLING = ("--vocab-size=50304", "--sample-interval=1")
# What a boundary value needs beside it to run (the tiny run's other flags fit it).
NEEDS: dict[str, tuple[str, ...]] = {
    "n_embd": ("--n-head=1",),
    "block_size": ("--seq-len=1", "--total-batch-size=4"),
    "seq_len": ("--total-batch-size=4",),
    "total_batch_size": ("--batch-size=1", "--seq-len=1"),
    "vocab_size": ("--data-dir={zeros}",),
    "cooldown_frac": ("--lr-schedule=wsd", "--max-steps=2"),
    "muon_lr": ("--optimizer=muon",),
    "beta1": ("--max-steps=2",),
    "beta2": ("--max-steps=2",),
    "adam_eps": ("--max-steps=2",),  # 0: 0/0 in the unused position rows, a NaN loss
    "num_samples": SAMPLING,
    "sample_length": (*SAMPLING, "--sample-prompt=a"),  # one token, so 2 is the least
    "hellaswag_limit": ("--vocab-size=50304", "--hellaswag-interval=1",
                        "--hellaswag-data={hellaswag}"),
}


def numeric_options() -> list[tuple[dataclasses.Field[Any], type]]:
    hints = get_type_hints(train_gpt2.TrainConfig)
    found = []
    for f in dataclasses.fields(train_gpt2.TrainConfig):
        kind = next((t for t in get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        if kind in (int, float):
            found.append((f, kind))
    return found


def boundary_values() -> list[tuple[str, str, bool]]:
    """(field, value, inside) for each edge of each numeric option's domain: the bound
    itself (or, for an open one, the float just inside it) and the value just beyond."""
    cases = []
    for f, kind in numeric_options():
        domain = f.metadata["domain"]
        for key, step in (("minimum", -1), ("maximum", 1), ("below", 1)):
            bound = domain[key]
            if bound is None:
                continue
            inside: float
            outside: float
            if kind is int:
                inside, outside = int(bound), int(bound) + step
            elif key == "below":
                inside, outside = math.nextafter(bound, -math.inf), bound
            else:
                inside, outside = bound, math.nextafter(bound, step * math.inf)
            cases += [(f.name, repr(inside), True), (f.name, repr(outside), False)]
        if kind is int and domain["maximum"] is None:
            cases.append((f.name, str(2**63), False))  # beyond int64
    return cases


def test_every_numeric_option_has_a_domain() -> None:
    for f, _ in numeric_options():
        assert any(v is not None for v in f.metadata["domain"].values()), f.name


@pytest.mark.parametrize("name,value,inside", boundary_values(),
                         ids=[f"{n}={v}-{'in' if i else 'out'}" for n, v, i in boundary_values()])
def test_train_flag_at_its_edge(name: str, value: str, inside: bool, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "muon_lr" and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch 2.9")
    monkeypatch.setenv("NANO_GPT_DATA_ROOT", str(tmp_path / "data-root"))
    flag = "--" + name.replace("_", "-")
    needs = [n.format(zeros=shards(tmp_path, 1), hellaswag=hellaswag_file(tmp_path))
             for n in NEEDS.get(name, ())]
    code = train_gpt2.main(train_args(tmp_path, *needs, f"{flag}={value}"))
    err = capsys.readouterr().err
    if inside:
        assert code == 0, err
        log = (tmp_path / "out" / "log.jsonl")
        losses = [e["loss"] for e in map(json.loads, log.read_text().splitlines())
                  if "loss" in e] if log.exists() else []
        assert all(math.isfinite(loss) for loss in losses), losses
    else:
        assert code == 2, err
        kind = {f.name: k for f, k in numeric_options()}[name]
        assert f"{flag}={kind(value)}:" in one_error_line(err)
        assert not (tmp_path / "out").exists()  # refused before any work


# ------------------------------------------------------------ sample and eval sweeps

# flag: (values that run, values refused), for a tiny model of context 16 and prompt "a".
SAMPLE_EDGES = {
    "--num-samples": (["1"], ["0"]),
    "--max-length": (["2", "16"], ["0", "1", "17"]),
    "--top-k": (["0", "1"], ["-1"]),
    "--top-p": (["5e-324", "1.0"], ["0.0", repr(math.nextafter(1, 2))]),
    "--temperature": (["0.0", "1e-06"], ["-5e-324", repr(math.nextafter(1e-6, 0))]),
    "--seed": ([str(v) for v in cli.SEED_RANGE],
               [str(cli.SEED_RANGE[0] - 1), str(cli.SEED_RANGE[1] + 1)]),
}
EVAL_EDGES = {"--limit": (["1"], ["0", str(2**63)]), "--batch-size": (["1"], ["0"])}


def edges(table: dict[str, tuple[list[str], list[str]]]) -> list[tuple[str, str, bool]]:
    return [(flag, v, ok) for flag, (good, bad) in table.items()
            for ok, values in ((True, good), (False, bad)) for v in values]


@pytest.mark.parametrize("script,flag,value,inside",
                         [("sample", *e) for e in edges(SAMPLE_EDGES)]
                         + [("eval", *e) for e in edges(EVAL_EDGES)])
def test_sample_and_eval_flags_at_their_edges(script: str, flag: str, value: str, inside: bool,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = [f"--pretrained={hf_dir(tmp_path, block_size=16)}", "--device=cpu"]
    if script == "sample":
        code = sample.main([*args, "--max-length=4", "--num-samples=1", f"{flag}={value}",
                            "a"])
    else:
        code = eval_hellaswag.main([*args, f"--data={hellaswag_file(tmp_path)}",
                                    f"{flag}={value}"])
    err = capsys.readouterr().err
    if inside:
        assert code == 0, err
    else:
        assert code == 2 and f"{flag}=" in one_error_line(err), err


# ------------------------------------------------------------------ a newcomer's path


@dataclass
class Case:
    main: Callable[[list[str]], int]
    args: Callable[[Path], list[str]]  # builds the input, returns the command line
    code: int
    names: str  # what the one error line must say


def long_prompt(root: Path) -> list[str]:
    return [f"--pretrained={hf_dir(root)}", "--device=cpu", "--max-length=300", " a" * 300]


def dataset_args(root: Path, name: str, checkpoints: bool = False) -> list[str]:
    if checkpoints:  # an --out-dir that would need --resume or --overwrite
        (root / "out").mkdir()
        (root / "out" / "ckpt_0000001.pt").write_bytes(b"")
    return [f"--dataset={name}", f"--out-dir={root / 'out'}", "--device=cpu"]


CASES = {
    "sample: a prompt longer than the model's context": Case(
        sample.main, long_prompt, 2, "the prompt has 300 tokens and the model's context is 256"),
    "sample: a prompt beyond the model's 256-token vocabulary": Case(
        sample.main, lambda r: [f"--checkpoint={checkpoint_file(r, vocab_size=VOCAB)}",
                                "--device=cpu", "--max-length=12"], 2,
        "the prompt holds token id 15496, beyond this model's 256-token vocabulary"),
    "sample: a temperature whose logits overflow": Case(
        sample.main, lambda r: [f"--pretrained={hf_dir(r)}", "--temperature=1e-40"], 2,
        "--temperature=1e-40: must be at least 1e-06"),
    "train: a sample prompt longer than --sample-length": Case(
        train_gpt2.main, lambda r: train_args(r, *SAMPLING, "--sample-length=8"), 2,
        "--sample-length=8: out of range\nhint: pass 9 to 256"),
    "train: a sample prompt beyond a 256-token vocabulary": Case(
        train_gpt2.main, lambda r: train_args(r, "--sample-interval=1"), 2,
        "--sample-prompt holds token id 15496"),
    "train: --beta1=1 (torch: 'Invalid beta parameter')": Case(
        train_gpt2.main, lambda r: train_args(r, "--beta1=1"), 2, "--beta1=1.0: must be below 1"),
    "train: a --dataset of the user's text not prepared yet": Case(
        train_gpt2.main, lambda r: dataset_args(r, "mytext"), 1,
        "python prepare_dataset.py --dataset=PATH/TO/TEXT --name=mytext"),
    "train: a built-in --dataset not prepared yet": Case(
        train_gpt2.main, lambda r: dataset_args(r, "tinyshakespeare"), 1,
        "python prepare_dataset.py --dataset=tinyshakespeare (prepared in"),
    "train: an unknown --dataset before an --out-dir holding checkpoints": Case(
        train_gpt2.main, lambda r: dataset_args(r, "nope", checkpoints=True), 1,
        "--dataset=PATH/TO/TEXT --name=nope"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_newcomer_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    monkeypatch.setenv("NANO_GPT_DATA_ROOT", str(tmp_path / "data-root"))
    args = case.args(tmp_path)
    capsys.readouterr()
    code = case.main(args)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert case.names in one_error_line(err), err


def test_the_missing_dataset_hint_lists_what_is_prepared_and_its_command_works(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data-root"
    (root / "other").mkdir(parents=True)
    write_shard(root / "other" / "other_train_000000.bin", np.zeros(10, dtype=np.uint16))
    args = [f"--data-root={root}", "--dataset=notes", "--device=cpu",
            f"--out-dir={tmp_path / 'out'}"]
    assert train_gpt2.main(args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"(prepared in {root}: other)" in line, line
    command = line.split("prepare it first: python prepare_dataset.py ")[1].split(" (")[0]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"document {i} about the notes " * 40)
    prepare = [a.replace("PATH/TO/TEXT", str(corpus)) for a in command.split()]
    assert prepare_dataset.main([*prepare, "--shard-size=2000", "--num-proc=1",
                                 "--no-progress"]) == 0
    tiny = ["--model=gpt2-tiny", "--batch-size=2", "--seq-len=32", "--total-batch-size=64",
            "--max-steps=1", "--val-steps=1", "--hellaswag-interval=0", "--sample-interval=0"]
    assert train_gpt2.main([*args, *tiny]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------- the hub, offline


def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache under tmp_path, and no network: every connection fails at once,
    as on a machine without one (whatever this one has)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the network is what is missing

    def unreachable(*args: Any, **kwargs: Any) -> socket.socket:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    return cache


def test_pretrained_name_without_network_is_one_line_at_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    offline_hub(tmp_path, monkeypatch)
    start = time.monotonic()
    code = sample.main(["--pretrained=gpt2", "--device=cpu"])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    one_error_line(err)
    assert code == 1 and err.count("\n") == 2, err  # the hint, no hub retry messages either
    assert "could not download 'gpt2'" in err and "--pretrained=/path/to/gpt2" in err
    assert seconds < 5, f"{seconds:.1f} s"


def test_pretrained_name_loads_a_cached_copy_without_network(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    repo = offline_hub(tmp_path, monkeypatch) / "models--openai-community--gpt2"
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("gpt2-tiny")).save_hf(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert sample.main(["--pretrained=gpt2", "--device=cpu", "--max-length=12",
                        "--num-samples=1"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("> Hello")
