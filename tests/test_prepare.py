"""prepare_dataset.py end to end on small local corpora. The reference for every token is
the GPT-2 tokenizer's encode_ordinary applied to each input document separately."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data
import prepare_dataset

REPO = Path(__file__).resolve().parent.parent
EOT = data.EOT_TOKEN
WORDS = ["the", "cat", "naïve", "café", "数据", "déjà", "vu", "print(x)", "    return y\n",
         "\n\n", "GPT-2", "1234", "λ", "🙂", "<|endoftext|>", "it's", "   ", "\t", "end."]


def make_documents(count: int, seed: int, max_words: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        n = int(rng.integers(1, max_words))
        docs.append(" ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=n)))
    return docs


def write_txt_corpus(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:05d}.txt").write_text(doc, encoding="utf-8")
    return folder


def encode(doc: str) -> list[int]:
    return list(data.get_tokenizer().encode_ordinary(doc))


def split_tokens(out_dir: Path, split: str) -> np.ndarray:
    shards = data.find_shards(out_dir, split)
    if not shards:
        return np.zeros(0, dtype=np.uint16)
    return np.concatenate([np.asarray(data.read_shard(p)) for p in shards])


def documents_of(tokens: np.ndarray) -> list[list[int]]:
    """Split a token stream at <|endoftext|>; each document must start with one."""
    starts = np.flatnonzero(tokens == EOT)
    assert tokens.size == 0 or starts[0] == 0
    bounds = [*starts.tolist(), tokens.size]
    return [tokens[a + 1:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = prepare_dataset.main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def test_shards_equal_tokenizer_per_document_across_shard_boundaries(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    docs = make_documents(150, seed=1)
    corpus = write_txt_corpus(tmp_path / "corpus", docs)
    monkeypatch.setattr(prepare_dataset, "CHUNK_CHARS", 2000)  # many chunks per shard too
    code, out, err = run([f"--dataset={corpus}", f"--data-root={tmp_path}/root",
                          "--shard-size=997", "--num-proc=2"], capsys)
    assert code == 0, err
    out_dir = tmp_path / "root" / "corpus"
    assert "corpus: wrote" in out

    # 10% of documents, evenly spread: exactly every 10th (i = 9, 19, ...).
    val_index = [i for i in range(len(docs)) if (i + 1) % 10 == 0]
    train_index = [i for i in range(len(docs)) if (i + 1) % 10 != 0]
    train = split_tokens(out_dir, "train")
    val = split_tokens(out_dir, "val")
    assert documents_of(train) == [encode(docs[i]) for i in train_index]
    assert documents_of(val) == [encode(docs[i]) for i in val_index]

    # Shards are full but the last, and some boundary falls inside a document.
    sizes = [data.read_shard(p).size for p in data.find_shards(out_dir, "train")]
    assert len(sizes) > 5 and set(sizes[:-1]) == {997} and 0 < sizes[-1] <= 997
    doc_starts = set(np.flatnonzero(train == EOT).tolist())
    boundaries = np.cumsum(sizes)[:-1].tolist()
    assert any(b not in doc_starts for b in boundaries)

    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["tokenizer"]["sha256"] == data.GPT2_RANKS_SHA256
    assert manifest["args"]["shard_size"] == 997
    for split, tokens, count in (("train", train, len(train_index)),
                                 ("val", val, len(val_index))):
        entry = manifest["splits"][split]
        assert entry["tokens"] == tokens.size
        assert entry["documents"] == count
        for shard in entry["shards"]:
            raw = (out_dir / shard["file"]).read_bytes()
            assert hashlib.sha256(raw).hexdigest() == shard["sha256"]
            assert len(raw) == 1024 + 2 * shard["tokens"]
    assert not (out_dir / "progress.json").exists()


def test_num_proc_and_chunking_do_not_change_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_txt_corpus(tmp_path / "c", make_documents(60, seed=2))
    outputs = []
    for i, (procs, chunk) in enumerate([(1, 1 << 20), (2, 500), (2, 7000)]):
        monkeypatch.setattr(prepare_dataset, "CHUNK_CHARS", chunk)
        code, _, err = run([f"--dataset={corpus}", f"--data-root={tmp_path}/r{i}",
                            "--shard-size=501", f"--num-proc={procs}"], capsys)
        assert code == 0, err
        outputs.append(shard_files(tmp_path / f"r{i}" / "c"))
    assert len(outputs[0]) > 3
    assert outputs[0] == outputs[1] == outputs[2]


def test_val_tokens_count_takes_a_document_prefix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = make_documents(40, seed=3)
    corpus = write_txt_corpus(tmp_path / "c", docs)
    code, _, err = run([f"--dataset={corpus}", f"--data-root={tmp_path}/r", "--val-tokens=700",
                        "--shard-size=300", "--num-proc=1"], capsys)
    assert code == 0, err
    lengths = [len(encode(d)) + 1 for d in docs]
    n_val = int(np.searchsorted(np.cumsum(lengths), 700)) + 1  # first prefix holding >= 700
    assert sum(lengths[:n_val]) >= 700 > sum(lengths[:n_val - 1])
    out_dir = tmp_path / "r" / "c"
    assert documents_of(split_tokens(out_dir, "val")) == [encode(d) for d in docs[:n_val]]
    assert documents_of(split_tokens(out_dir, "train")) == [encode(d) for d in docs[n_val:]]


def test_splits_train_only_keeps_validation_documents_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = make_documents(30, seed=4)
    corpus = write_txt_corpus(tmp_path / "c", docs)
    # The `--key value` spelling as well.
    code, _, err = run(["--dataset", str(corpus), "--data-root", f"{tmp_path}/r",
                        "--splits", "train", "--num-proc", "1"], capsys)
    assert code == 0, err
    out_dir = tmp_path / "r" / "c"
    assert data.find_shards(out_dir, "val") == []
    expected = [encode(d) for i, d in enumerate(docs) if (i + 1) % 10 != 0]
    assert documents_of(split_tokens(out_dir, "train")) == expected


def test_too_few_documents_for_validation_give_val_the_last_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = make_documents(5, seed=11)  # 10% of 5 documents is none
    corpus = write_txt_corpus(tmp_path / "c", docs)
    code, _, err = run([f"--dataset={corpus}", f"--data-root={tmp_path}/r"], capsys)
    assert code == 0 and err == "", err
    out_dir = tmp_path / "r" / "c"
    assert documents_of(split_tokens(out_dir, "val")) == [encode(docs[-1])]
    assert documents_of(split_tokens(out_dir, "train")) == [encode(d) for d in docs[:-1]]
    write_txt_corpus(tmp_path / "one", docs[:1])
    code, _, err = run([f"--dataset={tmp_path}/one", f"--data-root={tmp_path}/r"], capsys)
    assert_one_line_error(code, err, 1, "one document", "--splits=train")
    assert not (tmp_path / "r" / "one").exists()


def test_jsonl_and_parquet_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_documents(45, seed=5)
    folder = tmp_path / "mixed"
    folder.mkdir()
    with (folder / "a.jsonl").open("w", encoding="utf-8") as f:
        for i, doc in enumerate(docs[:20]):
            f.write(json.dumps({"id": i, "body": doc}) + "\n")
        f.write(json.dumps({"id": 99, "body": ""}) + "\n\n")  # empty text, blank line: dropped
    pq.write_table(pa.table({"body": docs[20:40], "n": list(range(20))}), folder / "b.parquet",
                   row_group_size=7)
    (folder / "c.md").write_text(docs[40], encoding="utf-8")
    (folder / "d.py").write_text(docs[41], encoding="utf-8")
    (folder / "e.txt").write_text("\n".join(docs[42:]), encoding="utf-8")
    (folder / "ignored.csv").write_text("not,a,document\n")
    expected_docs = docs[:42] + ["\n".join(docs[42:])]

    code, _, err = run([f"--dataset={folder}", "--text-field=body", "--name=mix",
                        f"--data-root={tmp_path}/r", "--val-tokens=0%", "--splits=train"],
                       capsys)
    assert code == 0, err
    train = split_tokens(tmp_path / "r" / "mix", "train")
    assert documents_of(train) == [encode(d) for d in expected_docs]


def test_glob_input_and_default_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = make_documents(12, seed=6)
    corpus = write_txt_corpus(tmp_path / "notes", docs)
    (corpus / "skip.md").write_text("not matched by the glob")
    code, _, err = run([f"--dataset={corpus}/*.txt", f"--data-root={tmp_path}/r",
                        "--val-tokens=0%", "--splits=train"], capsys)
    assert code == 0, err
    train = split_tokens(tmp_path / "r" / "notes", "train")
    assert documents_of(train) == [encode(d) for d in docs]


def test_missing_text_field_is_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    code, _, err = run([f"--dataset={path}", "--text-field=body", f"--data-root={tmp_path}/r"],
                       capsys)
    assert_one_line_error(code, err, 1, "x.jsonl:1", "--text-field")
    assert list((tmp_path / "r").rglob("*.bin")) == []


def test_tinyshakespeare_from_cached_file_splits_by_position(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [f"LINE {i}: {' '.join(make_documents(1, seed=i, max_words=12))}" for i in range(200)]
    text = "\n".join(lines) + "\n"
    cache = tmp_path / "root" / "tinyshakespeare" / "input.txt"
    cache.parent.mkdir(parents=True)
    cache.write_text(text, encoding="utf-8")
    code, _, err = run(["--dataset=tinyshakespeare", f"--data-root={tmp_path}/root"], capsys)
    assert code == 0, err
    cut = text.index("\n", int(len(text) * 0.9)) + 1
    out_dir = tmp_path / "root" / "tinyshakespeare"
    assert documents_of(split_tokens(out_dir, "train")) == [encode(text[:cut])]
    assert documents_of(split_tokens(out_dir, "val")) == [encode(text[cut:])]
    assert cache.read_text(encoding="utf-8") == text


def test_finished_dataset_is_skipped_and_force_redoes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_txt_corpus(tmp_path / "c", make_documents(30, seed=7))
    args = [f"--dataset={corpus}", f"--data-root={tmp_path}/r", "--shard-size=400",
            "--num-proc=1"]
    assert not prepare_dataset.is_prepared(tmp_path / "r", "c")
    assert run(args, capsys)[0] == 0
    assert prepare_dataset.is_prepared(tmp_path / "r", "c")
    out_dir = tmp_path / "r" / "c"
    first = shard_files(out_dir)
    inodes = {p.name: p.stat().st_ino for p in out_dir.glob("*.bin")}

    # Flip a token (same size, so the dataset still looks complete): a plain rerun skips
    # the dataset and leaves the file alone; --force rebuilds it.
    victim = out_dir / "c_train_000001.bin"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    code, out, _ = run(args, capsys)
    assert code == 0 and "already prepared" in out
    assert {p.name: p.stat().st_ino for p in out_dir.glob("*.bin")} == inodes
    assert victim.read_bytes() == bytes(raw)

    code, out, _ = run([*args, "--force"], capsys)
    assert code == 0 and "wrote" in out
    assert shard_files(out_dir) == first

    # Another corpus or other arguments under the same name are refused, not skipped.
    other = write_txt_corpus(tmp_path / "elsewhere" / "c", make_documents(3, seed=12))
    code, _, err = run([f"--dataset={other}", *args[1:]], capsys)
    assert_one_line_error(code, err, 2, "already holds c", "dataset", "--force", "--name")
    code, _, err = run([*args[:2], "--shard-size=401", *args[3:]], capsys)
    assert_one_line_error(code, err, 2, "shard_size")
    assert shard_files(out_dir) == first

    # A lost shard or a manifest without the completion flag is not "prepared".
    manifest = json.loads((out_dir / "manifest.json").read_text())
    del manifest["complete"]
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    assert not prepare_dataset.is_prepared(tmp_path / "r", "c")
    assert run([*args, "--force"], capsys)[0] == 0
    next(out_dir.glob("c_train_*.bin")).unlink()
    assert not prepare_dataset.is_prepared(tmp_path / "r", "c")


def test_stdlib_files_exclude_site_packages() -> None:
    files = prepare_dataset.stdlib_files()
    names = {p.name for p in files}
    assert "os.py" in names and any(p.parent.name == "json" for p in files)
    assert all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts for p in files)
    assert len(files) > 500


def test_not_utf8_file_is_skipped_and_counted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = make_documents(12, seed=8)
    corpus = write_txt_corpus(tmp_path / "c", docs)
    (corpus / "doc00003.txt").write_bytes(b"caf\xe9 latin-1 text")
    code, out, err = run([f"--dataset={corpus}", f"--data-root={tmp_path}/r", "--splits=train",
                          "--val-tokens=0%"], capsys)
    assert code == 0, err
    assert "skipped 1 files that are not UTF-8" in out
    kept = docs[:3] + docs[4:]
    out_dir = tmp_path / "r" / "c"
    assert documents_of(split_tokens(out_dir, "train")) == [encode(d) for d in kept]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["skipped_not_utf8"] == [str(corpus / "doc00003.txt")]


def test_a_jsonl_with_one_line_not_utf8_is_skipped_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = make_documents(12, seed=8)
    corpus = write_txt_corpus(tmp_path / "c", docs)
    lines = [json.dumps({"text": d}).encode() for d in make_documents(300, seed=3)]
    (corpus / "more.jsonl").write_bytes(b"\n".join([*lines[:200], b'{"text": "\xe9"}', *lines]))
    code, out, err = run([f"--dataset={corpus}", f"--data-root={tmp_path}/r", "--splits=train",
                          "--val-tokens=0%"], capsys)
    assert code == 0 and "skipped 1 files that are not UTF-8" in out, err
    assert documents_of(split_tokens(tmp_path / "r" / "c", "train")) == [encode(d) for d in docs]


def assert_one_line_error(code: int, err: str, expected_code: int, *pieces: str) -> None:
    """One line says what is wrong, and at most one more `hint:` line the fix (cli's policy)."""
    assert code == expected_code
    lines = err.splitlines()
    assert len(lines) in (1, 2) and "Traceback" not in err, err
    assert not lines[0].startswith("hint: ") and all(x.startswith("hint: ") for x in lines[1:]), err
    for piece in pieces:
        assert piece in err, err


def test_strict_not_utf8_is_an_error_and_nothing_is_left(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_txt_corpus(tmp_path / "c", make_documents(40, seed=9))
    bad = corpus / "doc99999.txt"  # last: shards were already written when it is reached
    bad.write_bytes(b"\xff\xfe not utf-8")
    code, _, err = run([f"--dataset={corpus}", f"--data-root={tmp_path}/r", "--strict",
                        "--shard-size=50", "--num-proc=1"], capsys)
    assert_one_line_error(code, err, 1, str(bad), "UTF-8")
    assert not (tmp_path / "r" / "c").exists()


@pytest.mark.parametrize(
    ("make_args", "expected_code", "pieces"),
    [
        (lambda t: [f"--dataset={t}/missing/folder"], 2, ["missing/folder", "no such file"]),
        (lambda t: [f"--dataset={t}/missing.txt"], 2, ["missing.txt", "no such file"]),
        (lambda t: ["--dataset=wikitext103"], 2, ["wikitext103", "unknown dataset", "stdlib"]),
        (lambda t: [f"--dataset={t}/empty"], 1, ["no documents"]),
        (lambda t: [f"--dataset={t}/nothing"], 2, ["nothing", "no .txt"]),
        (lambda t: [f"--dataset={t}/empty", f"--data-root={t}/file.txt/sub"], 1,
         ["file.txt", "--data-root"]),
        (lambda t: [f"--dataset={t}/empty", "--splits=train,test"], 2, ["--splits=train,test"]),
        (lambda t: [f"--dataset={t}/empty", "--val-tokens=lots"], 2, ["--val-tokens=lots"]),
        (lambda t: [f"--dataset={t}/empty", "--val-tokens=0"], 2, ["--val-tokens=0", "validation"]),
        (lambda t: [f"--dataset={t}/empty", "--num-proc=0"], 2, ["--num-proc=0"]),
        (lambda t: [f"--dataset={t}/empty", "--shard-size=0"], 2, ["--shard-size=0"]),
    ],
    ids=["missing-folder", "missing-file", "unknown-name", "empty-corpus", "no-text-files",
         "unwritable-root", "bad-splits", "bad-val-tokens", "val-zero", "num-proc", "shard-size"],
)
def test_bad_input_is_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make_args: object,
        expected_code: int, pieces: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "a.csv").write_text("x,y\n")
    (tmp_path / "file.txt").write_text("I am a file, not a folder")
    args = make_args(tmp_path)  # type: ignore[operator]
    if not any(a.startswith("--data-root") for a in args):
        args.append(f"--data-root={tmp_path}/root")
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, expected_code, *pieces)
    root = tmp_path / "root"
    assert not root.exists() or [p for p in root.rglob("*") if p.is_file()] == []


def test_unreachable_sources_say_no_network_and_how_to_go_local(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    for dataset, pieces in (("finewebedu", ["HuggingFaceFW/fineweb-edu", "no network",
                                            "--dataset=FOLDER"]),
                            ("tinyshakespeare", ["no network", "input.txt"])):
        proc = subprocess.run(
            [sys.executable, str(REPO / "prepare_dataset.py"), f"--dataset={dataset}",
             f"--data-root={tmp_path}/root", "--no-progress"],
            capture_output=True, text=True, env=env, timeout=120)
        assert_one_line_error(proc.returncode, proc.stderr, 1, *pieces)
        assert not list((tmp_path / "root").rglob("*.bin"))


@pytest.mark.parametrize("val_tokens", ["10%", "50000"])
def test_sigkill_mid_run_then_resume_is_byte_identical(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], val_tokens: str) -> None:
    docs = make_documents(1200, seed=10, max_words=900)
    corpus = write_txt_corpus(tmp_path / "c", docs)
    common = [f"--dataset={corpus}", "--shard-size=20000", "--num-proc=2",
              f"--val-tokens={val_tokens}"]

    assert run([*common, f"--data-root={tmp_path}/whole"], capsys)[0] == 0
    whole = shard_files(tmp_path / "whole" / "c")
    assert len(whole) > 20

    out_dir = tmp_path / "killed" / "c"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "prepare_dataset.py"), *common,
         f"--data-root={tmp_path}/killed", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out_dir / "progress.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the workers too, as a power cut would
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out_dir / "manifest.json").exists(), "the run finished before the kill"
    progress = json.loads((out_dir / "progress.json").read_text())
    kept = [s["file"] for st in progress["splits"].values() for s in st["shards"]]
    assert kept
    before = {name: (out_dir / name).stat().st_ino for name in kept}

    code, out, err = run([*common, f"--data-root={tmp_path}/killed"], capsys)
    assert code == 0, err
    assert "resumed" in out
    assert shard_files(out_dir) == whole
    assert {name: (out_dir / name).stat().st_ino for name in kept} == before
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*whole, "manifest.json"])
    manifest = json.loads((out_dir / "manifest.json").read_text())
    reference = json.loads((tmp_path / "whole" / "c" / "manifest.json").read_text())
    assert manifest["splits"] == reference["splits"]


def stop_documents_after(count: int, error: BaseException,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The first document stream to reach document `count` fails there (a network drop or a
    Ctrl-C part-way through); later runs read the files normally."""
    real = prepare_dataset.file_documents
    fired: list[int] = []

    def failing(*args: object, **kwargs: object) -> object:
        stream = real(*args, **kwargs)  # type: ignore[arg-type]

        def cut() -> object:
            for i, doc in enumerate(stream):
                if i == count and not fired:
                    fired.append(1)
                    raise error
                yield doc
        return cut()

    monkeypatch.setattr(prepare_dataset, "file_documents", failing)


@pytest.mark.parametrize(
    ("val_tokens", "splits", "stop_at", "error", "expected_code", "kept_splits"),
    [("10%", "train,validation", 150, KeyboardInterrupt(), 130, {"train", "val"}),
     ("15000", "train,validation", 60, data.DownloadError("connection reset"), 1, {"val"}),
     ("15000", "train,validation", 170, KeyboardInterrupt(), 130, {"train", "val"}),
     ("15000", "validation", 60, KeyboardInterrupt(), 130, {"val"}),
     ("10%", "train", 90, data.DownloadError("connection reset"), 1, {"train"})],
    ids=["every-kth", "prefix-unfinished", "prefix-finished", "prefix-val-only",
         "every-kth-train-only"])
def test_interrupted_run_keeps_finished_shards_and_resumes_byte_identical(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        val_tokens: str, splits: str, stop_at: int, error: BaseException,
        expected_code: int, kept_splits: set[str]) -> None:
    corpus = write_txt_corpus(tmp_path / "c", make_documents(240, seed=13))
    monkeypatch.setattr(prepare_dataset, "CHUNK_CHARS", 1500)
    common = [f"--dataset={corpus}", "--shard-size=701", "--num-proc=2",
              f"--val-tokens={val_tokens}", f"--splits={splits}"]
    assert run([*common, f"--data-root={tmp_path}/whole"], capsys)[0] == 0
    whole = shard_files(tmp_path / "whole" / "c")

    stop_documents_after(stop_at, error, monkeypatch)
    code, _, err = run([*common, f"--data-root={tmp_path}/cut"], capsys)
    assert_one_line_error(code, err, expected_code,
                          "interrupted" if expected_code == 130 else "connection reset")
    out_dir = tmp_path / "cut" / "c"
    left = sorted(p.name for p in out_dir.iterdir())
    assert "progress.json" in left and "manifest.json" not in left
    assert not [name for name in left if name.endswith(".tmp")]
    kept = {name: (out_dir / name).read_bytes() for name in left if name.endswith(".bin")}
    assert {name.split("_")[1] for name in kept} == kept_splits  # stopped where meant to
    assert len(kept) < len(whole)
    assert all(whole[name] == raw for name, raw in kept.items())

    code, out, err = run([*common, f"--data-root={tmp_path}/cut"], capsys)
    assert code == 0, err
    assert "resumed" in out
    assert shard_files(out_dir) == whole
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*whole, "manifest.json"])
    manifest = json.loads((out_dir / "manifest.json").read_text())
    reference = json.loads((tmp_path / "whole" / "c" / "manifest.json").read_text())
    assert manifest["splits"] == reference["splits"]
    assert manifest["validation"] == reference["validation"]


def test_rerun_with_other_arguments_after_an_interruption_starts_afresh(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_txt_corpus(tmp_path / "c", make_documents(200, seed=14))
    monkeypatch.setattr(prepare_dataset, "CHUNK_CHARS", 1500)
    common = [f"--dataset={corpus}", "--num-proc=1"]
    stop_documents_after(120, KeyboardInterrupt(), monkeypatch)
    assert run([*common, f"--data-root={tmp_path}/r", "--shard-size=300"], capsys)[0] == 130
    assert len(list((tmp_path / "r" / "c").glob("c_train_*.bin"))) > 3

    code, out, err = run([*common, f"--data-root={tmp_path}/r", "--shard-size=2000"], capsys)
    assert code == 0, err
    assert "resumed" not in out
    assert run([*common, f"--data-root={tmp_path}/clean", "--shard-size=2000"], capsys)[0] == 0
    assert shard_files(tmp_path / "r" / "c") == shard_files(tmp_path / "clean" / "c")
    assert not (tmp_path / "r" / "c" / "progress.json").exists()


@pytest.mark.parametrize("val_tokens", ["20%", "1500"])
def test_splits_validation_only_writes_exactly_the_validation_documents(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], val_tokens: str) -> None:
    docs = make_documents(50, seed=15)
    corpus = write_txt_corpus(tmp_path / "c", docs)
    code, _, err = run([f"--dataset={corpus}", f"--data-root={tmp_path}/r", "--splits=validation",
                        f"--val-tokens={val_tokens}", "--shard-size=400"], capsys)
    assert code == 0, err
    if val_tokens.endswith("%"):
        val_docs = [d for i, d in enumerate(docs) if (i + 1) % 5 == 0]
    else:
        lengths = np.cumsum([len(encode(d)) + 1 for d in docs])
        val_docs = docs[:int(np.searchsorted(lengths, 1500)) + 1]
    out_dir = tmp_path / "r" / "c"
    assert data.find_shards(out_dir, "train") == []
    assert documents_of(split_tokens(out_dir, "val")) == [encode(d) for d in val_docs]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["val"]
