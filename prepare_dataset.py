"""Text source -> GPT-2 tokens in llm.c-format shards, split into train and val.

    python prepare_dataset.py --dataset=stdlib                # offline, about a minute or less
    python prepare_dataset.py --dataset=finewebedu --subset=sample-10BT
    python prepare_dataset.py --dataset=tinyshakespeare
    python prepare_dataset.py --dataset='notes/**/*.md' --name=notes

Every source becomes one stream of documents (strings, in a fixed order). The stream is cut
into chunks of about 256K characters; a pool of threads turns each chunk into one uint16
array (each document preceded by <|endoftext|>) plus the per-document token counts
(tiktoken releases the GIL while it encodes, so threads use every core with no pickling of
text or tokens between processes), and the main thread receives the chunks in order,
assigns whole documents to train or val, and streams tokens into the open shard's
temporary file, which gets its final name once full and fsynced. Memory is therefore a
few chunks, whatever the corpus or shard size.

Validation documents (deterministic, document-level, never in train):
- `--val-tokens=N` (default 10M for the FineWeb sets): the first documents of the stream
  until they hold at least N tokens;
- `--val-tokens=P%` (default 10% for every other source): document i is in val when
  floor((i+1)*P/100) > floor(i*P/100), i.e. every (100/P)-th document, evenly spread;
- tinyshakespeare is one text, cut at the first line break after P% of its characters
  from the end (90/10 by default): the head is train, the tail val.

Resume: after each shard, `progress.json` records, per split, the shards written and the
document (and token offset in it) where the unfinished shard begins. A rerun with the same
arguments keeps those shards, restarts the stream at the earliest such document and
rewrites only unfinished shards, so the result is byte-identical to an uninterrupted run.
`manifest.json`, with `"complete": true`, is written last; a complete dataset is skipped
unless `--force`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import hashlib
import json
import logging
import os
import re
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

import data

HUB_DATASETS = {"finewebedu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
BUILTIN_NAMES = (*HUB_DATASETS, "tinyshakespeare", "stdlib")
LOCAL_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet")
SPLIT_FILE_NAMES = {"train": "train", "validation": "val", "val": "val"}
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"
DEFAULT_SHARD_SIZE = 100_000_000
HUB_VAL_TOKENS = "10000000"
SMALL_VAL_FRACTION = "10%"
# Text per task: big enough that scheduling is noise (a task is tens of ms), small enough
# that the last tasks leave no core idle for long.
CHUNK_CHARS = 1 << 18
EOT = np.array([data.EOT_TOKEN], dtype=np.uint16)


class PrepareError(Exception):
    """A problem the user can fix; main() prints it as one line and exits non-zero.

    `discard` asks for the partial dataset to be removed (the input itself is bad, so the
    shards so far could never be resumed); network trouble keeps them for a later resume.
    """

    def __init__(self, message: str, exit_code: int = 1, discard: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.discard = discard


# ------------------------------------------------------------------------ document stream


@dataclass
class Source:
    """A named, ordered document stream. `documents(start)` yields texts from index start."""

    name: str
    description: dict[str, Any]
    fingerprint: str
    documents: Callable[[int], Iterator[str]]
    rule: SplitRule
    skipped: list[str] = field(default_factory=list)


def stdlib_files() -> list[Path]:
    """The running Python's standard-library .py files, site-packages excluded, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    found: list[str] = []
    for folder, subfolders, names in os.walk(root):
        # Pruned, not filtered afterwards: site-packages can be far bigger than the stdlib.
        subfolders[:] = [d for d in subfolders if d not in excluded]
        rel = Path(folder).relative_to(root)
        found.extend((rel / n).as_posix() for n in names if n.endswith(".py"))
    return [Path(root, rel) for rel in sorted(found)]


def local_files(spec: str) -> list[Path]:
    """The files a --dataset path names: a file, a folder (searched recursively) or a glob."""
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in files if p.is_file()]
    else:
        raise PrepareError(f"--dataset={spec}: no such file or folder; give an existing file, "
                           f"folder or glob, or one of {', '.join(BUILTIN_NAMES)}", exit_code=2)
    return [p for p in files if p.suffix.lower() in LOCAL_SUFFIXES]


def file_documents(files: list[Path], text_field: str, strict: bool,
                   skipped: list[str]) -> Iterator[str]:
    """Documents of local files in order: a text file is one document, a .jsonl line or a
    .parquet row is one. Files that are not UTF-8 are skipped and listed in `skipped`
    (an error with `strict`). Empty documents are dropped."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
            continue
        try:
            if suffix == ".jsonl":
                yield from _jsonl_documents(path, text_field)
            else:
                text = path.read_bytes().decode("utf-8")
                if text:
                    yield text
        except UnicodeDecodeError as exc:
            if strict:
                raise PrepareError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); "
                                   "fix or remove the file, or drop --strict to skip it",
                                   discard=True) from exc
            skipped.append(str(path))


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PrepareError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line "
                                   "must be one JSON object", discard=True) from exc
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise PrepareError(f"{path}:{lineno}: no string field '{text_field}'; name the "
                                   "text field with --text-field", discard=True)
            if text:
                yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise PrepareError(f"{path}: not a readable parquet file ({exc})", discard=True) from exc
    if text_field not in parquet.schema_arrow.names:
        raise PrepareError(f"{path}: no column '{text_field}' (columns: "
                           f"{', '.join(parquet.schema_arrow.names)}); use --text-field",
                           discard=True)
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def hub_documents(repo: str, subset: str, text_field: str, start: int,
                  debug: bool = False) -> Iterator[str]:
    """Stream a Hugging Face dataset (nothing but shards lands on disk)."""
    import datasets

    if not debug:  # its retry warnings would bury the one-line error below
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    hint = (f"cannot stream {repo} ({subset}) from the Hugging Face Hub (no network?): "
            "{err}; offline, download its parquet files elsewhere and pass "
            "--dataset=FOLDER --name=NAME")
    try:
        stream = datasets.load_dataset(repo, name=subset, split="train", streaming=True)
        if start:
            stream = stream.skip(start)
        rows = iter(stream)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            text = row.get(text_field)
            if text:
                yield text
    except PrepareError:
        raise
    except Exception as exc:  # the hub client raises many types; all mean "cannot read it"
        err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise PrepareError(hint.format(err=err)) from exc


def download_cached(url: str, path: Path) -> Path:
    """Download `url` to `path` once (atomic write); later calls use the cached file."""
    if path.is_file() and path.stat().st_size > 0:
        return path
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
    except OSError as exc:
        raise PrepareError(f"cannot download {url} (no network?): {exc}; save that file as "
                           f"{path} and rerun") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, payload)
    return path


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    with data.atomic_output(path) as f:
        f.write(payload)


# ----------------------------------------------------------------------------- val rules


class SplitRule:
    """Decides, document by document, what goes to val; the rest is train."""

    def is_val(self, doc_index: np.ndarray, doc_tokens: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, start: int, state: dict[str, Any], val_tokens_before: int) -> None:
        """Continue from document `start` of a resumed run."""


class EveryKth(SplitRule):
    """Document i is val when floor((i+1)*f) > floor(i*f): exactly floor(n*f) of n, spread."""

    def __init__(self, fraction: Fraction) -> None:
        self.num, self.den = fraction.numerator, fraction.denominator

    def is_val(self, doc_index: np.ndarray, doc_tokens: np.ndarray) -> np.ndarray:
        i = doc_index.astype(np.int64)
        return ((i + 1) * self.num) // self.den > (i * self.num) // self.den

    def describe(self) -> str:
        f = f"{self.num}/{self.den}"
        return f"documents i with floor((i+1)*{f}) > floor(i*{f})"


class FixedDocuments(SplitRule):
    def __init__(self, val_indices: Iterable[int], why: str) -> None:
        self.val_indices = np.array(sorted(val_indices), dtype=np.int64)
        self.why = why

    def is_val(self, doc_index: np.ndarray, doc_tokens: np.ndarray) -> np.ndarray:
        return np.isin(doc_index, self.val_indices)

    def describe(self) -> str:
        return self.why


class FirstTokens(SplitRule):
    """The first documents of the stream, until they hold at least `target` tokens."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.seen = 0
        self.end_doc: int | None = None  # index of the first train document, once known

    def is_val(self, doc_index: np.ndarray, doc_tokens: np.ndarray) -> np.ndarray:
        if self.end_doc is not None:
            return doc_index < self.end_doc
        before = self.seen + np.cumsum(doc_tokens) - doc_tokens
        val = before < self.target
        self.seen += int(doc_tokens[val].sum())
        if not val.all():
            self.end_doc = int(doc_index[np.argmin(val)])
        return val

    def describe(self) -> str:
        return f"the first documents of the stream holding at least {self.target} tokens"

    def state(self) -> dict[str, Any]:
        return {"val_end_doc": self.end_doc}

    def restore(self, start: int, state: dict[str, Any], val_tokens_before: int) -> None:
        self.end_doc = state.get("val_end_doc")
        self.seen = val_tokens_before if start else 0


# ------------------------------------------------------------------------- tokenization

_ENCODER: Any = None


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One uint16 array of `EOT doc0 EOT doc1 ...` and each document's token count (EOT
    included). Runs in the pool's threads; no per-token Python objects are made."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = data.get_tokenizer()
    encode = _ENCODER.encode_to_numpy
    parts: list[np.ndarray] = []
    counts = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        # Nothing allowed, nothing disallowed: special-token text is ordinary text, exactly
        # as encode_ordinary treats it.
        ids = encode(text, allowed_special=set(), disallowed_special=())
        parts.append(EOT)
        parts.append(ids)
        counts[i] = ids.size + 1
    if not parts:
        return np.zeros(0, dtype=np.uint16), counts
    return np.concatenate(parts, dtype=np.uint16, casting="unsafe"), counts


def document_chunks(documents: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for text in documents:
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenized_chunks(chunks: Iterable[list[str]], num_proc: int,
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """encode_documents over chunks, results in input order, at most a few chunks in
    flight (Executor.map would read the whole corpus ahead into its task queue)."""
    global _ENCODER
    if _ENCODER is None:  # built once here, before the threads share it
        _ENCODER = data.get_tokenizer()
    if num_proc <= 1:
        yield from map(encode_documents, chunks)
        return
    with concurrent.futures.ThreadPoolExecutor(num_proc) as pool:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.submit(encode_documents, chunk))
            if len(pending) > 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------- shard output


@dataclass
class SplitState:
    shards: list[dict[str, Any]] = field(default_factory=list)
    next_doc: int = 0  # where the unfinished shard begins: document index...
    next_offset: int = 0  # ...and token offset inside that document
    done: bool = False

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


class SplitWriter:
    """Streams one split's documents into fixed-size shards.

    Tokens go straight to the open shard's temporary file (header first, count patched for
    a short last shard), so memory stays at a chunk whatever the shard size; the file gets
    its shard name only once complete and fsynced.
    """

    def __init__(self, out_dir: Path, name: str, split: str, shard_size: int, state: SplitState,
                 on_shard: Callable[[], None], write: bool = True) -> None:
        self.out_dir, self.name, self.split = out_dir, name, split
        self.shard_size = shard_size
        self.state = state
        self.on_shard = on_shard
        self.write = write
        self.file: Any = None  # the open temporary file of the unfinished shard
        self.tmp_path: Path | None = None
        self.digest: Any = None
        self.fill = 0
        self.eots = 0
        # Tokens before this position are already in finished shards (set by a resume).
        self.skip_doc, self.skip_offset = state.next_doc, state.next_offset

    def add(self, tokens: np.ndarray, doc_index: np.ndarray, doc_tokens: np.ndarray) -> None:
        if not self.write or self.state.done or doc_index.size == 0:
            return
        last_doc = int(doc_index[-1])
        head_offset = 0  # tokens of doc_index[0] missing from `tokens`
        if doc_index[0] < self.skip_doc or (doc_index[0] == self.skip_doc and self.skip_offset):
            keep = doc_index >= self.skip_doc
            tokens = tokens[int(doc_tokens[~keep].sum()):]
            doc_index, doc_tokens = doc_index[keep], doc_tokens[keep]
            if doc_index.size and doc_index[0] == self.skip_doc and self.skip_offset:
                head_offset = self.skip_offset
                tokens = tokens[head_offset:]
                doc_tokens = doc_tokens.copy()
                doc_tokens[0] -= head_offset
        if last_doc >= self.skip_doc:
            self.skip_doc = self.skip_offset = 0
        ends = np.cumsum(doc_tokens)
        pos = 0
        while pos < tokens.size:
            n = min(self.shard_size - self.fill, tokens.size - pos)
            self._append(tokens[pos:pos + n])
            pos += n
            if self.fill == self.shard_size:
                k = int(np.searchsorted(ends, pos, side="right"))
                if k == len(ends):
                    self._close_shard(last_doc + 1, 0)
                else:
                    start_k = int(ends[k - 1]) if k else -head_offset
                    self._close_shard(int(doc_index[k]), pos - start_k)

    def finish(self) -> None:
        if self.write and not self.state.done:
            if self.fill:
                self._close_shard(self.state.next_doc, self.state.next_offset, last=True)
            self.state.done = True
            self.on_shard()

    def abort(self) -> None:
        """Drop the unfinished shard's temporary file (a rerun redoes that shard)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tmp_path is not None:
            self.tmp_path.unlink(missing_ok=True)
            self.tmp_path = None

    def _append(self, piece: np.ndarray) -> None:
        if self.file is None:
            fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{self._file_name()}.",
                                       suffix=".tmp")
            self.tmp_path = Path(tmp)
            os.fchmod(fd, data.default_file_mode())
            self.file = os.fdopen(fd, "wb")
            header = data.shard_header(self.shard_size).tobytes()  # patched if the shard ends short
            self.file.write(header)
            self.digest = hashlib.sha256(header)
        piece = np.ascontiguousarray(piece, dtype="<u2")
        self.file.write(piece.data)
        self.digest.update(piece.data)
        self.fill += piece.size
        self.eots += int(np.count_nonzero(piece == data.EOT_TOKEN))

    def _file_name(self) -> str:
        return data.shard_name(self.name, self.split, len(self.state.shards))

    def _close_shard(self, next_doc: int, next_offset: int, last: bool = False) -> None:
        assert self.file is not None and self.tmp_path is not None
        if self.fill != self.shard_size:
            self.file.seek(0)
            self.file.write(data.shard_header(self.fill).tobytes())
            self.file.flush()
            self.digest = _file_sha256(self.tmp_path)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        file_name = self._file_name()
        os.replace(self.tmp_path, self.out_dir / file_name)
        self.tmp_path = None
        self.state.shards.append({"file": file_name, "tokens": self.fill,
                                  "sha256": self.digest.hexdigest(),
                                  "documents_started": self.eots})
        self.state.next_doc, self.state.next_offset = next_doc, next_offset
        self.fill = self.eots = 0
        if not last:
            self.on_shard()


def _file_sha256(path: Path) -> Any:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest


# ------------------------------------------------------------------------------ pipeline


@dataclass
class Options:
    shard_size: int
    splits: tuple[str, ...]  # file-name splits: "train", "val"
    num_proc: int
    val_tokens: str
    progress: bool = True


@dataclass
class Summary:
    name: str
    out_dir: Path
    splits: dict[str, SplitState]
    skipped: list[str]
    seconds: float
    new_tokens: int
    resumed: bool


def run_pipeline(source: Source, out_dir: Path, options: Options, args_record: dict[str, Any],
                 ) -> Summary:
    """Tokenize `source` into shards in `out_dir` (resuming if a matching progress.json is
    there) and write the manifest. Raises PrepareError on bad input."""
    progress_path = out_dir / PROGRESS_NAME
    states = {split: SplitState() for split in ("train", "val")}
    resumed = _load_progress(progress_path, source, args_record, states)
    active = [s for s in options.splits if not states[s].done]
    start = min((states[s].next_doc for s in active), default=0)
    val_before = states["val"].tokens - states["val"].next_offset
    saved_rule_state = _read_json(progress_path).get("rule", {}) if resumed else {}
    source.rule.restore(start, saved_rule_state, val_before)

    def checkpoint() -> None:
        payload = {"fingerprint": source.fingerprint, "args": args_record,
                   "rule": source.rule.state(),
                   "splits": {s: vars(st) for s, st in states.items()}}
        atomic_write_bytes(progress_path, json.dumps(payload, indent=1).encode())

    writers = {s: SplitWriter(out_dir, source.name, s, options.shard_size, states[s], checkpoint,
                              write=s in options.splits) for s in ("train", "val")}
    started = time.perf_counter()
    new_tokens = 0
    bar = _progress_bar(source.name, options.progress)
    doc_cursor = start
    try:
        chunks = document_chunks(source.documents(start), CHUNK_CHARS)
        for tokens, counts in tokenized_chunks(chunks, options.num_proc):
            doc_index = np.arange(doc_cursor, doc_cursor + counts.size, dtype=np.int64)
            doc_cursor += counts.size
            is_val = source.rule.is_val(doc_index, counts)
            _route(tokens, doc_index, counts, is_val, writers)
            new_tokens += tokens.size
            bar.update(int(tokens.size))
            bar.set_postfix(docs=doc_cursor, refresh=False)
            if isinstance(source.rule, FirstTokens) and source.rule.end_doc is not None:
                writers["val"].finish()  # val is a finished prefix: close it right away
                if "train" not in options.splits:
                    break
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
    if doc_cursor == 0 and not resumed:
        what = f"; {len(source.skipped)} files skipped as not UTF-8" if source.skipped else ""
        raise PrepareError(f"{source.description.get('source', source.name)}: no documents "
                           f"found{what}; check --dataset and --text-field", discard=True)
    for split in ("val", "train"):
        writers[split].finish()
    if "train" in options.splits and not states["train"].shards:
        raise PrepareError(f"{source.name}: no training documents are left after the "
                           f"validation split (--val-tokens={options.val_tokens}); lower it",
                           exit_code=2, discard=True)
    summary = Summary(source.name, out_dir, states, source.skipped,
                      time.perf_counter() - started, new_tokens, resumed)
    _write_manifest(out_dir, source, options, args_record, summary)
    progress_path.unlink(missing_ok=True)
    return summary


def _route(tokens: np.ndarray, doc_index: np.ndarray, counts: np.ndarray, is_val: np.ndarray,
           writers: dict[str, SplitWriter]) -> None:
    if not is_val.any():
        writers["train"].add(tokens, doc_index, counts)
    elif is_val.all():
        writers["val"].add(tokens, doc_index, counts)
    else:
        token_is_val = np.repeat(is_val, counts)
        writers["val"].add(tokens[token_is_val], doc_index[is_val], counts[is_val])
        writers["train"].add(tokens[~token_is_val], doc_index[~is_val], counts[~is_val])


def _progress_bar(name: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(desc=name, unit="tok", unit_scale=True, disable=None if enabled else True,
                dynamic_ncols=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _load_progress(path: Path, source: Source, args_record: dict[str, Any],
                   states: dict[str, SplitState]) -> bool:
    """Fill `states` from a progress file left by an interrupted run with the same input and
    arguments, checking that its shards are still there. False means start afresh."""
    saved = _read_json(path)
    if saved.get("fingerprint") != source.fingerprint or saved.get("args") != args_record:
        return False
    try:
        loaded = {s: SplitState(**saved["splits"][s]) for s in states}
    except (KeyError, TypeError):
        return False
    for state in loaded.values():
        for shard in state.shards:
            shard_path = path.parent / shard["file"]
            if not shard_path.is_file() or shard_path.stat().st_size != (
                    data.HEADER_BYTES + 2 * shard["tokens"]):
                return False
    states.update(loaded)
    return True


def _write_manifest(out_dir: Path, source: Source, options: Options,
                    args_record: dict[str, Any], summary: Summary) -> None:
    splits = {}
    for split, state in summary.splits.items():
        if split in options.splits:
            splits[split] = {
                "tokens": state.tokens,
                "documents": sum(s["documents_started"] for s in state.shards),
                "shards": state.shards,
            }
    manifest = {
        "name": source.name,
        "source": source.description,
        "tokenizer": {"name": "gpt2", "sha256": data.GPT2_RANKS_SHA256,
                      "eot_token": data.EOT_TOKEN, "vocab_size": data.VOCAB_SIZE},
        "format": {"magic": data.SHARD_MAGIC, "version": data.SHARD_VERSION,
                   "header_bytes": data.HEADER_BYTES, "dtype": "uint16"},
        "validation": source.rule.describe(),
        "args": args_record,
        "splits": splits,
        "skipped_not_utf8": summary.skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": True,  # last key: a manifest without it is from an unfinished run
    }
    atomic_write_bytes(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())


def remove_outputs(out_dir: Path, name: str) -> None:
    """Delete this dataset's shards, progress, manifest and leftover temporary files."""
    if not out_dir.is_dir():
        return
    for split in ("train", "val"):
        for path in out_dir.glob(f"{name}_{split}_*.bin"):
            path.unlink(missing_ok=True)
    for path in out_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)
    (out_dir / PROGRESS_NAME).unlink(missing_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)


def remove_stale_files(out_dir: Path, name: str, states: dict[str, SplitState] | None) -> None:
    """Before a resume: temporary files of killed writers and shards past the recorded ones."""
    for path in out_dir.glob(".*.tmp"):
        path.unlink(missing_ok=True)
    keep = {s["file"] for st in (states or {}).values() for s in st.shards}
    for split in ("train", "val"):
        for path in out_dir.glob(f"{name}_{split}_*.bin"):
            if path.name not in keep:
                path.unlink()


def is_prepared(data_root: Path, name: str) -> bool:
    """True when `data_root/name/manifest.json` is complete and its shards are all there."""
    out_dir = Path(data_root) / name
    manifest = _read_json(out_dir / MANIFEST_NAME)
    if manifest.get("complete") is not True:
        return False
    try:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                path = out_dir / shard["file"]
                if not path.is_file() or path.stat().st_size != (
                        data.HEADER_BYTES + 2 * int(shard["tokens"])):
                    return False
    except (KeyError, TypeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------- CLI


def parse_size(text: str) -> int:
    """'100M' -> 100_000_000 (K, M, G suffixes; plain integers too)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a token count such as 100M or 5000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tokenize a text source into GPT-2 llm.c-format shards (train/val).")
    p.add_argument("--dataset", default="stdlib",
                   help=f"one of {', '.join(BUILTIN_NAMES)}, or a local file, folder or glob of "
                        f"{', '.join(LOCAL_SUFFIXES)} files (default: stdlib, fully offline)")
    p.add_argument("--name", default=None,
                   help="output name for a local --dataset (default: derived from the path)")
    p.add_argument("--subset", default="sample-10BT",
                   help="Hugging Face config for finewebedu/fineweb (default: sample-10BT)")
    p.add_argument("--text-field", default="text",
                   help="field holding the text in .jsonl/.parquet and hub rows (default: text)")
    p.add_argument("--splits", default="train,validation",
                   help="comma-separated splits to write: train, validation (default: both)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="output root; shards go to DATA_ROOT/NAME/ (default: "
                        f"${data.DATA_ROOT_ENV} or ~/.cache/nano-gpt/data)")
    p.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE,
                   help="tokens per shard, e.g. 100M (default: 100M)")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1,
                   help="tokenizer threads (default: all CPU cores)")
    p.add_argument("--val-tokens", default=None,
                   help="validation size: N tokens taken from the start of the stream, or P%% "
                        "of the documents spread evenly (default: 10M for finewebedu/fineweb, "
                        "10%% otherwise; tinyshakespeare takes P%% of its text by position)")
    p.add_argument("--force", action="store_true", help="redo a dataset that is already prepared")
    p.add_argument("--strict", action="store_true",
                   help="stop with an error at a file that is not UTF-8 instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def parse_splits(text: str) -> tuple[str, ...]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SPLIT_FILE_NAMES]
    if not names or unknown:
        raise PrepareError(f"--splits={text}: use train, validation or train,validation",
                           exit_code=2)
    return tuple(sorted({SPLIT_FILE_NAMES[s] for s in names}, key=("train", "val").index))


def make_rule(val_tokens: str, default: str) -> SplitRule:
    spec = (val_tokens or default).strip()
    if spec.endswith("%"):
        try:
            percent = Fraction(spec[:-1])
        except ValueError:
            percent = Fraction(-1)
        if not 0 <= percent < 100:
            raise PrepareError(f"--val-tokens={spec}: a percentage must be in [0, 100)",
                               exit_code=2)
        return EveryKth(percent / 100)
    try:
        return FirstTokens(parse_size(spec))
    except argparse.ArgumentTypeError:
        raise PrepareError(f"--val-tokens={spec}: give a token count (10M) or a percentage "
                           "(10%)", exit_code=2) from None


def make_source(args: argparse.Namespace, data_root: Path) -> Source:
    spec: str = args.dataset
    if spec in HUB_DATASETS:
        repo = HUB_DATASETS[spec]
        return Source(spec, {"source": f"hf://datasets/{repo}", "subset": args.subset},
                      f"hub:{repo}:{args.subset}",
                      lambda start: hub_documents(repo, args.subset, args.text_field, start,
                                                  args.debug),
                      make_rule(args.val_tokens, HUB_VAL_TOKENS))
    if spec == "tinyshakespeare":
        return tinyshakespeare_source(data_root, args.val_tokens or SMALL_VAL_FRACTION)
    if spec == "stdlib":
        files = stdlib_files()
        description = {"source": "python-stdlib", "python": sys.version.split()[0],
                       "path": sysconfig.get_paths()["stdlib"], "files": len(files)}
        return local_source("stdlib", files, description, args)
    if not _looks_like_path(spec):
        raise PrepareError(f"--dataset={spec}: unknown dataset; use one of "
                           f"{', '.join(BUILTIN_NAMES)} or a path to local files", exit_code=2)
    files = local_files(spec)
    if not files:
        raise PrepareError(f"--dataset={spec}: no {', '.join(LOCAL_SUFFIXES)} files there",
                           exit_code=2)
    name = args.name or _name_from_path(spec)
    description = {"source": os.path.abspath(os.path.expanduser(spec)), "files": len(files)}
    return local_source(name, files, description, args)


def local_source(name: str, files: list[Path], description: dict[str, Any],
                 args: argparse.Namespace) -> Source:
    listing = hashlib.sha256()
    for path in files:
        stat = path.stat()
        listing.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    skipped: list[str] = []

    def documents(start: int) -> Iterator[str]:
        skipped.clear()  # a resume walks the skipped files again
        stream = file_documents(files, args.text_field, args.strict, skipped)
        for _ in range(start):  # cheap next to tokenizing: only reads the files
            next(stream, None)
        yield from stream

    return Source(name, description, f"files:{listing.hexdigest()}", documents,
                  make_rule(args.val_tokens, SMALL_VAL_FRACTION), skipped)


def tinyshakespeare_source(data_root: Path, val_spec: str) -> Source:
    if not val_spec.strip().endswith("%"):
        raise PrepareError(f"--val-tokens={val_spec}: tinyshakespeare is split by position; "
                           "give a percentage such as 10%", exit_code=2)
    rule = make_rule(val_spec, SMALL_VAL_FRACTION)
    assert isinstance(rule, EveryKth)
    val_fraction = Fraction(rule.num, rule.den)
    cache = data_root / "tinyshakespeare" / "input.txt"

    def documents(start: int) -> Iterator[str]:
        text = download_cached(TINYSHAKESPEARE_URL, cache).read_text(encoding="utf-8")
        head, tail = split_by_position(text, 1 - val_fraction)
        yield from [d for d in (head, tail) if d][start:]

    return Source("tinyshakespeare", {"source": TINYSHAKESPEARE_URL, "cache": str(cache)},
                  f"tinyshakespeare:{val_spec}", documents,
                  FixedDocuments([1], f"the last {float(val_fraction):.0%} of the text, "
                                      "cut at a line break"))


def split_by_position(text: str, head_fraction: Fraction) -> tuple[str, str]:
    """Cut `text` at the first line break at or after head_fraction of its characters."""
    cut = int(len(text) * head_fraction)
    newline = text.find("\n", cut)
    cut = len(text) if newline < 0 else newline + 1
    return text[:cut], text[cut:]


def _looks_like_path(spec: str) -> bool:
    return (os.sep in spec or "/" in spec or glob.has_magic(spec) or spec.startswith((".", "~"))
            or Path(spec).suffix.lower() in LOCAL_SUFFIXES or Path(spec).exists())


def _name_from_path(spec: str) -> str:
    parts = [p for p in Path(os.path.expanduser(spec)).parts if not glob.has_magic(p)]
    base = Path(*parts) if parts else Path("local")
    stem = base.stem if base.suffix.lower() in LOCAL_SUFFIXES else base.name
    name = re.sub(r"[^A-Za-z0-9-]+", "-", stem).strip("-")
    return name or "local"


def prepare_output_dir(data_root: Path, name: str) -> Path:
    out_dir = data_root / name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe.", suffix=".tmp")
        probe.close()
    except OSError as exc:
        raise PrepareError(f"--data-root={data_root}: cannot write to {out_dir} "
                           f"({exc.strerror or exc}); pass a writable --data-root") from exc
    return out_dir


def _report(summary: Summary) -> str:
    pieces = []
    for split, state in summary.splits.items():
        if state.shards:
            count = len(state.shards)
            pieces.append(f"{count} {split} shard{'s' if count > 1 else ''} "
                          f"({state.tokens / 1e6:.2f}M tokens)")
    rate = summary.new_tokens / max(summary.seconds, 1e-9) / 1e6
    resumed = ", resumed" if summary.resumed else ""
    line = (f"{summary.name}: wrote {' and '.join(pieces)} to {summary.out_dir} in "
            f"{summary.seconds:.1f}s ({rate:.2f}M tokens/s{resumed})")
    if summary.skipped:
        line += f"; skipped {len(summary.skipped)} files that are not UTF-8"
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except PrepareError as exc:
        if args.debug:
            raise
        print(f"prepare_dataset.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("prepare_dataset.py: interrupted; finished shards are kept, rerun the same "
              "command to resume", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    if args.shard_size < 1:
        raise PrepareError(f"--shard-size={args.shard_size}: must be at least 1", exit_code=2)
    if args.num_proc < 1:
        raise PrepareError(f"--num-proc={args.num_proc}: must be at least 1", exit_code=2)
    splits = parse_splits(args.splits)
    data_root = (args.data_root or data.default_data_root()).expanduser()
    source = make_source(args, data_root)
    rule = source.rule
    if "val" in splits and ((isinstance(rule, FirstTokens) and rule.target == 0)
                            or (isinstance(rule, EveryKth) and rule.num == 0)):
        raise PrepareError(f"--val-tokens={args.val_tokens} leaves nothing for "
                           "--splits=validation", exit_code=2)
    dataset = args.dataset
    if dataset not in BUILTIN_NAMES:
        dataset = os.path.abspath(os.path.expanduser(dataset))
    args_record = {"dataset": dataset, "subset": args.subset, "text_field": args.text_field,
                   "splits": list(splits), "shard_size": args.shard_size,
                   "val_tokens": args.val_tokens, "strict": args.strict}
    if is_prepared(data_root, source.name) and not args.force:
        earlier = _read_json(data_root / source.name / MANIFEST_NAME).get("args")
        if earlier != args_record:
            changed = sorted(k for k in args_record if (earlier or {}).get(k) != args_record[k])
            raise PrepareError(f"{data_root / source.name} already holds {source.name} prepared "
                               f"with other {', '.join(changed)}; pass --force to redo it or "
                               "--name=OTHER to keep both", exit_code=2)
        print(f"{source.name}: already prepared in {data_root / source.name} "
              "(--force redoes it)")
        return 0
    out_dir = prepare_output_dir(data_root, source.name)
    if args.force:
        remove_outputs(out_dir, source.name)
    options = Options(args.shard_size, splits, args.num_proc,
                      args.val_tokens or "default", progress=not args.no_progress)
    states: dict[str, SplitState] = {"train": SplitState(), "val": SplitState()}
    if not _load_progress(out_dir / PROGRESS_NAME, source, args_record, states):
        remove_outputs(out_dir, source.name)
        states = {}
    remove_stale_files(out_dir, source.name, states)
    try:
        summary = run_pipeline(source, out_dir, options, args_record)
    except PrepareError as exc:
        if exc.discard:
            remove_outputs(out_dir, source.name)
        raise
    print(_report(summary))
    if "val" in splits and not summary.splits["val"].shards:
        print(f"prepare_dataset.py: warning: {source.name} has no validation documents "
              f"(rule: {source.rule.describe()}); pass --val-tokens=N to take the first N "
              "tokens' documents", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
