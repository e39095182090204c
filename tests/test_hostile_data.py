"""Hostile data files (HellaSwag rows, text sources, token shards, a full disk): one stderr
line naming the file (and line), exit 1, no traceback, the files already there unchanged.
The same check as tests/test_hostile.py's table, for the files the data scripts read."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import test_hostile
from test_hostile import HELLASWAG, Case, check_case, folder, hellaswag_file, hf, train_args

import eval_hellaswag
import prepare_dataset
import train_gpt2
from data import write_shard


def hellaswag_row(**changes: object) -> list[str]:
    """A good line, then the good line with `changes`: the error must name line 2."""
    return [HELLASWAG, json.dumps({**json.loads(HELLASWAG), **changes})]


def eval_on(lines: list[str]) -> Case:
    return Case(eval_hellaswag.main, lambda r: hf(r, f"--data={hellaswag_file(r, lines)}"), 1,
                "hs.jsonl:2")


def not_utf8_hellaswag(root: Path) -> list[str]:
    path = hellaswag_file(root, [HELLASWAG, HELLASWAG.replace("cat", "cät")])
    path.write_bytes(path.read_bytes().replace("cät".encode(), "cät".encode("latin-1")))
    return hf(root, f"--data={path}")


def prepare_args(corpus: Path, *extra: str) -> list[str]:
    return [f"--dataset={corpus}", f"--data-root={corpus.parent / 'data'}", "--num-proc=1",
            "--no-progress", "--shard-size=2000", *extra]


def jsonl_corpus(root: Path, bad_line: bytes, *extra: str) -> list[str]:
    """A folder with a .jsonl of 200 good lines, then `bad_line`, then more good ones."""
    corpus = root / "corpus"
    corpus.mkdir()
    good = [json.dumps({"text": f"document {i} " * 20}).encode() for i in range(210)]
    (corpus / "docs.jsonl").write_bytes(b"\n".join([*good[:200], bad_line, *good[200:]]))
    return prepare_args(corpus, *extra)


def parquet_of_ints(root: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text " * 50)
    pq.write_table(pa.table({"text": list(range(100))}), corpus / "ints.parquet")
    return prepare_args(corpus)


def file_size_limited(script: str, limit: int) -> Callable[[list[str]], int]:
    """`script` run in a process whose files may not grow past `limit` bytes: the
    kernel refuses the write (RLIMIT_FSIZE, SIGXFSZ ignored, so write() fails with EFBIG),
    as on a disk that fills up."""
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def run(args: list[str]) -> int:
        # -B: Python's own .pyc writes would be cut at the limit and then loaded as they are.
        done = subprocess.run([sys.executable, "-B", script, *args], capture_output=True,
                              text=True, timeout=300, preexec_fn=limited)
        assert done.stderr.count("cannot write it") == 1, done.stderr  # wrapped once
        sys.stderr.write(done.stderr)
        return done.returncode
    return run


def padded_ids(root: Path, *extra: str) -> list[str]:
    """test_hostile's run at the default padded vocabulary, its train shard holding token
    50300 (a padding row of the 50304-row embedding, no GPT-2 token) in every window."""
    args = train_args(root, "--vocab-size=50304", "--max-steps=2", *extra)
    tokens = np.random.default_rng(0).integers(0, 256, 6_000)
    tokens[::32] = 50300
    write_shard(root / "shards" / "syn_train_000000.bin", tokens)
    return args


def shard_folder(root: Path) -> list[str]:
    args = train_args(root, "--max-steps=1")
    folder(root / "shards" / "syn_train_000001.bin")
    return args


CASES = {
    "eval: a number as ctx": eval_on(hellaswag_row(ctx=7)),
    "eval: a null ctx": eval_on(hellaswag_row(ctx=None)),
    "eval: a number as an ending": eval_on(hellaswag_row(endings=["a", 2, "c", "d"])),
    "eval: label true (scored as 1)": eval_on(hellaswag_row(label=True)),
    "eval: a HellaSwag file that is not UTF-8": Case(
        eval_hellaswag.main, not_utf8_hellaswag, 1, "hs.jsonl:2: not a UTF-8 JSON line"),
    "eval: --data=DIR": Case(
        eval_hellaswag.main, lambda r: hf(r, f"--data={folder(r / 'hs.jsonl')}"), 1,
        "hs.jsonl: a directory"),
    "prepare: a parquet text column of ints": Case(
        prepare_dataset.main, parquet_of_ints, 1, "ints.parquet: column 'text' holds int64"),
    "prepare: --strict, a .jsonl line not UTF-8 after 200 documents": Case(
        prepare_dataset.main, lambda r: jsonl_corpus(r, b'{"text": "caf\xe9"}', "--strict"), 1,
        "docs.jsonl:201: not UTF-8"),
    "prepare: --strict, a .jsonl line with a lone surrogate": Case(
        prepare_dataset.main, lambda r: jsonl_corpus(r, b'{"text": "a\\ud800"}', "--strict"),
        1, "docs.jsonl:201: not UTF-8"),
    "prepare: a .jsonl line that is not JSON": Case(
        prepare_dataset.main, lambda r: jsonl_corpus(r, b'{"text": '), 1,
        "docs.jsonl:201: not valid JSON"),
    "prepare: a .jsonl line nested too deep": Case(
        prepare_dataset.main, lambda r: jsonl_corpus(r, b"[" * 100_000), 1,
        "docs.jsonl:201: not valid JSON"),
    "prepare: disk full while writing a shard": Case(
        file_size_limited(prepare_dataset.__file__, 3000), test_hostile.text_corpus, 1,
        "corpus_train_000000.bin: cannot write it (File too large)"),
    "train: padding ids in a shard (numpy loader)": Case(
        train_gpt2.main, lambda r: padded_ids(r, "--loader-backend=numpy"), 1,
        "syn_train_000000.bin: token id 50300 near token"),
    "train: padding ids in a shard (native loader)": Case(
        train_gpt2.main, lambda r: padded_ids(r, "--loader-backend=native"), 1,
        "syn_train_000000.bin: token id 50300 near token"),
    "train: a folder named like a shard": Case(
        train_gpt2.main, shard_folder, 1, "syn_train_000001.bin: a directory"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_data(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    check_case(CASES[name], tmp_path, capsys, monkeypatch)


def test_a_declared_vocabulary_trains_on_ids_past_gpt2s(tmp_path: Path) -> None:
    """--vocab-size=60000 declares ids up to 59999: the same shard trains."""
    assert train_gpt2.main(padded_ids(tmp_path, "--vocab-size=60000")) == 0
