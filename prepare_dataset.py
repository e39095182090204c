"""Text source -> GPT-2 tokens in llm.c-format shards, split into train and val.

    python prepare_dataset.py --dataset=stdlib                # offline, about a minute or less
    python prepare_dataset.py --dataset=finewebedu --subset=sample-10BT
    python prepare_dataset.py --dataset=tinyshakespeare
    python prepare_dataset.py --dataset='notes/**/*.md' --name=notes

Every source becomes one stream of documents in a fixed order, cut into ~256K-character
chunks. Threads (tiktoken releases the GIL) turn each chunk into one uint16 array, each
document preceded by <|endoftext|>; the main thread takes them in order, assigns whole
documents to train or val and streams tokens into the open shard, which data.atomic_output
names only once full and fsynced. Memory stays a few chunks.

Validation documents (deterministic, never in train): `--val-tokens=N` (default 10M for
the FineWeb sets) takes the first documents until they hold N tokens; `--val-tokens=P%`
(default 10% elsewhere) takes document i when floor((i+1)*P/100) > floor(i*P/100), evenly
spread; tinyshakespeare's one text is cut at the line break P% from its end.

Resume: once a chunk has closed a shard, `progress.json` records per split the shards
written and where the unfinished one begins (document, token offset). A rerun with the same
arguments keeps those shards and rewrites the rest, byte-identical to an uninterrupted run.
A complete `manifest.json` is written last; a complete dataset is skipped unless `--force`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import sysconfig
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

import cli
import data

HUB_DATASETS = {"finewebedu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")
BUILTIN_NAMES = (*HUB_DATASETS, "tinyshakespeare", "stdlib")
LOCAL_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet")
SPLIT_FILE_NAMES = {"train": "train", "validation": "val", "val": "val"}
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".prepare.lock"
PROGRESS_NAME = "progress.json"
HUB_VAL_TOKENS = "10000000"
SMALL_VAL_FRACTION = "10%"
# Text per task: big enough that scheduling is noise (a task is tens of ms), small enough
# that the last tasks leave no core idle for long.
CHUNK_CHARS = 1 << 18
EOT = np.array([data.EOT_TOKEN], dtype=np.uint16)


class PrepareError(RuntimeError):
    """Input that cannot be prepared as given: exit 1, and the partial dataset is removed.
    Network trouble raises data.DownloadError instead, which keeps the shards for a resume."""


class NotUTF8(PrepareError):
    """A local file that is not UTF-8 text. It is skipped whole, or with --strict an error."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cli.run_script(lambda: prepare(args), args.debug)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("prepare_dataset.py: interrupted; finished shards are kept, rerun the same "
              "command to resume", file=sys.stderr)
        return 130


def prepare(args: argparse.Namespace) -> None:
    """Prepares the dataset `args` names, unless it is prepared with the same arguments."""
    cli.check_range("--shard-size", args.shard_size, minimum=1)
    cli.check_range("--num-proc", args.num_proc, minimum=1)
    data_root = (args.data_root or data.default_data_root()).expanduser()
    source = make_source(args, data_root)
    dataset = args.dataset if args.dataset in BUILTIN_NAMES else source.description["source"]
    args_record = {"dataset": dataset, "subset": args.subset, "text_field": args.text_field,
                   "splits": list(parse_splits(args.splits)), "shard_size": args.shard_size,
                   "val_tokens": args.val_tokens, "strict": args.strict}
    out_dir = data_root / source.name
    if is_prepared(data_root, source.name) and not args.force:
        earlier = _read_json(out_dir / MANIFEST_NAME).get("args") or {}
        changed = ", ".join(k for k in sorted(args_record) if earlier.get(k) != args_record[k])
        if changed:
            raise cli.UsageError(f"{out_dir}: already holds {source.name} prepared with other "
                                 f"{changed}\nhint: --force redoes it; --name=OTHER keeps both")
        print(f"{source.name}: already prepared in {out_dir} (--force redoes it)")
        return
    # The folder is made if need be and held for this run alone: a second run would delete
    # this one's temporary files.
    fresh = not out_dir.exists()
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(data.hold_folder(out_dir, LOCK_NAME))
        except data.FolderHeld as exc:
            raise PrepareError(f"{out_dir}: another prepare_dataset.py (pid {exc.pid}) is "
                               "writing it\nhint: wait for it or stop it, then rerun") from None
        except OSError as exc:
            raise PrepareError(f"--data-root={out_dir.parent}: cannot write to {out_dir} "
                               f"({exc.strerror or exc})\nhint: pass a writable --data-root"
                               ) from exc
        try:
            write_dataset(source, out_dir, args, args_record)
        except (PrepareError, cli.UsageError):
            # The input or the arguments must change, so these shards could never be resumed.
            remove_outputs(out_dir, source.name)
            raise
        finally:  # a dataset folder holds only the dataset once no run is writing it
            (out_dir / LOCK_NAME).unlink(missing_ok=True)
            if fresh:
                with contextlib.suppress(OSError):
                    out_dir.rmdir()


# ---------------------------------------------------------------------------- the shards
def write_dataset(source: Source, out_dir: Path, args: argparse.Namespace,
                  args_record: dict[str, Any]) -> None:
    """Tokenizes `source` into shards in `out_dir`, going on from an interrupted run with the
    same input and `args_record` unless --force; then writes the manifest and prints a line."""
    from tqdm import tqdm
    splits = parse_splits(args.splits)
    rule = source.val
    resume = None if args.force else load_progress(out_dir, source, args_record)
    states, rule.end_doc = resume or ({split: SplitState() for split in ("train", "val")}, None)
    remove_outputs(out_dir, source.name, keep=states if resume else None)
    start = min((states[s].next_doc for s in splits if not states[s].done), default=0)
    # Only a prefix rule reads val_tokens, and only before its end is known; train is empty
    # then, so the stream restarts at 0 or at val's unfinished shard.
    rule.val_tokens = states["val"].tokens - states["val"].next_offset if start else 0
    skipped: list[str] = []  # the files that are not UTF-8, from the start of the stream
    started, new_tokens, doc_cursor = time.perf_counter(), 0, start
    with contextlib.ExitStack() as stack:
        writers = {s: SplitWriter(out_dir, source.name, s, args.shard_size, states[s])
                   for s in splits}
        for writer in writers.values():  # left on an error, it deletes the unfinished shard
            stack.enter_context(writer.open_shard)
        bar = stack.enter_context(tqdm(desc=source.name, unit="tok", unit_scale=True,
                                       disable=args.no_progress or None, dynamic_ncols=True))
        for tokens, counts in tokenized_chunks(source.documents(start, skipped), args.num_proc):
            doc_index = np.arange(doc_cursor, doc_cursor + counts.size, dtype=np.int64)
            doc_cursor += counts.size
            is_val = rule.is_val(doc_index, counts)
            progress_changed = False
            for split, taken in (("val", is_val), ("train", ~is_val)):
                if split in writers:  # a split not asked for has none
                    progress_changed |= writers[split].add(tokens[np.repeat(taken, counts)],
                                                           doc_index[taken], counts[taken])
            if rule.end_doc is not None and "val" in writers:  # val is a finished prefix
                progress_changed |= writers["val"].finish()
            if progress_changed:
                save_progress(out_dir, source, args_record, states)
            new_tokens += tokens.size
            bar.update(int(tokens.size))
            bar.set_postfix(docs=doc_cursor, refresh=False)
            if rule.end_doc is not None and "train" not in writers:
                break
        if doc_cursor == 0 and not resume:
            what = f"; {len(skipped)} files skipped as not UTF-8" if skipped else ""
            raise PrepareError(f"{source.description['source']}: no documents found{what}"
                               "\nhint: check --dataset and --text-field")
        for writer in writers.values():
            writer.finish()
        save_progress(out_dir, source, args_record, states)
    if "train" in splits and not states["train"].shards:
        now = args.val_tokens or "the default"
        raise cli.UsageError(f"{source.name}: no training documents left after the validation "
                             f"split\nhint: lower --val-tokens (now {now})")
    seconds = time.perf_counter() - started
    write_manifest(out_dir, source, args_record, {s: states[s] for s in splits}, skipped)
    (out_dir / PROGRESS_NAME).unlink(missing_ok=True)
    pieces = [f"{len(states[s].shards)} {s} shard{'s' if len(states[s].shards) > 1 else ''} "
              f"({states[s].tokens / 1e6:.2f}M tokens)" for s in splits if states[s].shards]
    rate = new_tokens / max(seconds, 1e-9) / 1e6
    resumed = ", resumed" if resume else ""
    skipped_note = f"; skipped {len(skipped)} files that are not UTF-8" if skipped else ""
    print(f"{source.name}: wrote {' and '.join(pieces)} to {out_dir} in {seconds:.1f}s "
          f"({rate:.2f}M tokens/s{resumed}){skipped_note}")


@dataclass
class SplitState:
    """One split's entry in progress.json: its finished shards and where the next begins."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    next_doc: int = 0  # the unfinished shard begins in this document...
    next_offset: int = 0  # ...at this token of it
    done: bool = False

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


class SplitWriter:
    """Streams one split's documents, from where `state` stands, into shards of `shard_size`
    tokens; only the open shard's temporary file grows, so memory stays one chunk."""

    def __init__(self, out_dir: Path, name: str, split: str, shard_size: int,
                 state: SplitState) -> None:
        self.out_dir, self.name, self.split = out_dir, name, split
        self.shard_size, self.state = shard_size, state
        self.open_shard = contextlib.ExitStack()  # the unfinished shard's atomic_output
        self.file: BinaryIO | None = None
        self.file_name = ""
        self.fill = self.eots = 0

    def add(self, tokens: np.ndarray, doc_index: np.ndarray, doc_tokens: np.ndarray) -> bool:
        """Writes this split's share of a chunk from state.next_doc on; says if a shard closed."""
        state = self.state
        first = int(np.searchsorted(doc_index, state.next_doc))  # the first one not yet written
        if state.done or first == doc_index.size:
            return False
        ends = np.cumsum(doc_tokens)
        starts = ends - doc_tokens
        pos = int(starts[first]) + (state.next_offset if doc_index[first] == state.next_doc else 0)
        closed = False
        try:
            while pos < tokens.size:
                if self.file is None:
                    self.file_name = data.shard_name(self.name, self.split, len(state.shards))
                    path = self.out_dir / self.file_name
                    self.file = self.open_shard.enter_context(data.atomic_output(path))
                    self.file.write(data.shard_header(self.shard_size).tobytes())
                piece = np.ascontiguousarray(tokens[pos:pos + self.shard_size - self.fill], "<u2")
                self.file.write(piece.data)
                self.fill += piece.size
                self.eots += int(np.count_nonzero(piece == data.EOT_TOKEN))
                pos += piece.size
                if self.fill == self.shard_size:  # the next shard starts in document k
                    k = int(np.searchsorted(ends, pos, side="right"))
                    if k == doc_index.size:
                        self._close_shard(int(doc_index[-1]) + 1, 0)
                    else:
                        self._close_shard(int(doc_index[k]), pos - int(starts[k]))
                    closed = True
        except OSError as exc:  # named here: the other split's open shard would name itself
            raise data.write_error(self.out_dir / self.file_name, exc) from None
        return closed

    def finish(self) -> bool:
        """Closes the short last shard: nothing more comes. Says whether the split was open."""
        if self.state.done:
            return False
        self.state.done = True
        try:
            if self.fill:
                self._close_shard(self.state.next_doc, self.state.next_offset)
        except OSError as exc:
            raise data.write_error(self.out_dir / self.file_name, exc) from None
        return True

    def _close_shard(self, next_doc: int, next_offset: int) -> None:
        assert self.file is not None
        if self.fill != self.shard_size:  # a short last shard: the header gets its count
            self.file.seek(0)
            self.file.write(data.shard_header(self.fill).tobytes())
        self.file.flush()
        sha256 = data.file_sha256(Path(self.file.name))  # the temporary file, header included
        self.file = None
        self.open_shard.close()  # fsync, then the shard's own name
        self.state.shards.append({"file": self.file_name, "tokens": self.fill,
                                  "sha256": sha256, "documents_started": self.eots})
        self.state.next_doc, self.state.next_offset = next_doc, next_offset
        self.fill = self.eots = 0


def tokenized_chunks(documents: Iterable[str], num_proc: int,
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields encode_documents of chunks of CHUNK_CHARS or more, in stream order, with at most
    a few chunks in flight (Executor.map would read the whole corpus ahead into its queue)."""
    data.get_tokenizer()  # built (and cached) here, before the threads share it
    with concurrent.futures.ThreadPoolExecutor(num_proc) as pool:
        pending: deque[Any] = deque()
        chunk: list[str] = []
        size = 0
        for text in documents:
            chunk.append(text)
            size += len(text)
            if size >= CHUNK_CHARS:
                pending.append(pool.submit(encode_documents, chunk))
                chunk, size = [], 0
                if len(pending) > 2 * num_proc:
                    yield pending.popleft().result()
        if chunk:
            pending.append(pool.submit(encode_documents, chunk))
        while pending:
            yield pending.popleft().result()


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Returns one uint16 array of `EOT doc0 EOT doc1 ...` and each document's token count,
    EOT included. It runs in the pool's threads and makes no per-token Python objects."""
    encode = data.get_tokenizer().encode_to_numpy
    # Nothing allowed, nothing disallowed: special-token text is ordinary text (encode_ordinary's)
    docs = [encode(text, allowed_special=set(), disallowed_special=()) for text in texts]
    counts = np.array([ids.size + 1 for ids in docs], dtype=np.int64)
    parts = [part for ids in docs for part in (EOT, ids)]
    return np.concatenate(parts, dtype=np.uint16, casting="unsafe"), counts


# ------------------------------------------------------------ progress.json and the manifest
def load_progress(out_dir: Path, source: Source, args_record: dict[str, Any],
                  ) -> tuple[dict[str, SplitState], int | None] | None:
    """The split states and val end_doc an interrupted run of the same command saved, or None."""
    saved = _read_json(out_dir / PROGRESS_NAME)
    if (saved.get("fingerprint") != source.fingerprint or saved.get("args") != args_record
            or not _shards_intact(out_dir, saved.get("splits"))):
        return None
    try:
        return ({s: SplitState(**saved["splits"][s]) for s in ("train", "val")},
                saved.get("rule", {}).get("val_end_doc"))
    except (AttributeError, KeyError, TypeError):
        return None


def save_progress(out_dir: Path, source: Source, args_record: dict[str, Any],
                  states: dict[str, SplitState]) -> None:
    _write_json(out_dir / PROGRESS_NAME, {
        "fingerprint": source.fingerprint, "args": args_record,
        "rule": {"val_end_doc": source.val.end_doc},
        "splits": {split: vars(state) for split, state in states.items()}})


def remove_outputs(out_dir: Path, name: str, keep: dict[str, SplitState] | None = None) -> None:
    """Deletes what a run cannot build on: killed writers' temporary files, the manifest, every
    shard that `keep` does not list, and progress.json unless `keep` is given."""
    kept = {s["file"] for state in keep.values() for s in state.shards} if keep else set()
    shards = [*out_dir.glob(f"{name}_train_*.bin"), *out_dir.glob(f"{name}_val_*.bin")]
    for path in [*(p for p in shards if p.name not in kept), *out_dir.glob(".*.tmp")]:
        path.unlink(missing_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    if keep is None:
        (out_dir / PROGRESS_NAME).unlink(missing_ok=True)


def is_prepared(data_root: Path, name: str) -> bool:
    """Says whether DATA_ROOT/NAME holds a complete manifest and every shard it lists."""
    out_dir = Path(data_root) / name
    manifest = _read_json(out_dir / MANIFEST_NAME)
    return manifest.get("complete") is True and _shards_intact(out_dir, manifest.get("splits"))


def _shards_intact(out_dir: Path, splits: Any) -> bool:
    """Says whether the shards a manifest's or progress.json's `splits` lists are all there."""
    try:
        shards = [s for split in splits.values() for s in split["shards"]]
        sizes = {out_dir / s["file"]: data.HEADER_BYTES + 2 * s["tokens"] for s in shards}
    except (AttributeError, KeyError, TypeError):
        return False
    # The count itself, not int() of it: that would pass "810" and truncate 810.5.
    return (all(type(s["tokens"]) is int for s in shards)
            and all(path.is_file() and path.stat().st_size == size for path, size in sizes.items()))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with data.atomic_output(path) as f:
        f.write(json.dumps(payload, indent=1).encode())


def write_manifest(out_dir: Path, source: Source, args_record: dict[str, Any],
                   states: dict[str, SplitState], skipped: list[str]) -> None:
    splits = {split: {"tokens": state.tokens,
                      "documents": sum(s["documents_started"] for s in state.shards),
                      "shards": state.shards} for split, state in states.items()}
    _write_json(out_dir / MANIFEST_NAME, {
        "name": source.name, "source": source.description,
        "tokenizer": {"name": "gpt2", "sha256": data.GPT2_RANKS_SHA256,
                      "eot_token": data.EOT_TOKEN, "vocab_size": data.VOCAB_SIZE},
        "format": {"magic": data.SHARD_MAGIC, "version": data.SHARD_VERSION,
                   "header_bytes": data.HEADER_BYTES, "dtype": "uint16"},
        "validation": source.val.description, "args": args_record, "splits": splits,
        "skipped_not_utf8": skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": True,  # last key: a manifest without it is from an unfinished run
    })


# ---------------------------------------------------------------------------- the sources
@dataclass
class Source:
    """What write_dataset needs of any source: `documents(start, skipped)` yields the texts from
    index `start` on, listing the files that are not UTF-8 in `skipped`."""
    name: str
    description: dict[str, Any]
    fingerprint: str
    documents: Callable[[int, list[str]], Iterator[str]]
    val: ValSplit


def make_source(args: argparse.Namespace, data_root: Path) -> Source:
    spec: str = args.dataset
    if spec in HUB_DATASETS:
        repo = HUB_DATASETS[spec]
        return Source(spec, {"source": f"hf://datasets/{repo}", "subset": args.subset},
                      f"hub:{repo}:{args.subset}",
                      lambda start, _: hub_documents(repo, args, start),
                      val_split(args, HUB_VAL_TOKENS))
    if spec == "tinyshakespeare":
        val_spec = args.val_tokens or SMALL_VAL_FRACTION
        if not val_spec.strip().endswith("%"):
            raise cli.UsageError(f"--val-tokens={val_spec}: tinyshakespeare is split by "
                                 "position\nhint: give a percentage such as 10%")
        val_fraction = Fraction(parse_val_tokens(val_spec))
        cache = data_root / "tinyshakespeare" / "input.txt"
        why = f"the last {float(val_fraction):.0%} of the text, cut at a line break"
        return Source("tinyshakespeare", {"source": TINYSHAKESPEARE_URL, "cache": str(cache)},
                      f"tinyshakespeare:{val_spec}",
                      lambda start, _: iter(tinyshakespeare_texts(cache, val_fraction)[start:]),
                      ValSplit(why, fraction=Fraction(1, 2)))  # the second of two documents
    if spec == "stdlib":
        files = stdlib_files()
        description = {"source": "python-stdlib", "python": sys.version.split()[0],
                       "path": sysconfig.get_paths()["stdlib"], "files": len(files)}
        return local_source("stdlib", files, description, args)
    files = local_files(spec)
    name = args.name
    if name and (Path(name).is_absolute() or Path(name).name != name):
        raise cli.UsageError(f"--name={name}: a dataset name, not a path\nhint: pass a plain "
                             "name; the dataset goes into --data-root/NAME")
    if not name:  # the path less its wildcard parts, its last part less a known suffix
        parts = [p for p in Path(os.path.expanduser(spec)).parts if not glob.has_magic(p)]
        base = Path(*parts) if parts else Path("local")
        stem = base.stem if base.suffix.lower() in LOCAL_SUFFIXES else base.name
        name = re.sub(r"[^A-Za-z0-9-]+", "-", stem).strip("-") or "local"
    description = {"source": os.path.abspath(os.path.expanduser(spec)), "files": len(files)}
    return local_source(name, files, description, args)


def local_source(name: str, files: list[Path], description: dict[str, Any],
                 args: argparse.Namespace) -> Source:
    """The documents of `files`, fingerprinted by their paths, sizes and modification times."""
    stats = ((path, path.stat()) for path in files)
    listing = "".join(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n" for path, st in stats)
    def documents(start: int, skipped: list[str]) -> Iterator[str]:
        # A resume walks the skipped files again: skipping is cheap next to tokenizing.
        stream = file_documents(files, args.text_field, args.strict, skipped)
        return itertools.islice(stream, start, None)
    rule = val_split(args, SMALL_VAL_FRACTION)
    if rule.fraction and "val" in parse_splits(args.splits):
        # Fewer than 1/fraction documents would give val none: it gets the last one then.
        few = sum(1 for _ in itertools.islice(documents(0, []), int(1 / rule.fraction) + 1))
        if few == 1:
            raise PrepareError(f"{description['source']}: one document, so no validation "
                               "split\nhint: split it into several files, or pass --splits=train")
        if 1 < few < 1 / rule.fraction:
            rule = every_kth(Fraction(1, few))
    return Source(name, description, f"files:{hashlib.sha256(listing.encode()).hexdigest()}",
                  documents, rule)


def tinyshakespeare_texts(cache: Path, val_fraction: Fraction) -> list[str]:
    """Downloads the text to `cache` once and cuts it in two (train, val) at the first line
    break at or after 1 - `val_fraction` of its characters."""
    text = decode_utf8(data.download(TINYSHAKESPEARE_URL, cache).read_bytes(), str(cache))
    newline = text.find("\n", int(len(text) * (1 - val_fraction)))
    cut = len(text) if newline < 0 else newline + 1
    return [d for d in (text[:cut], text[cut:]) if d]


def hub_documents(repo: str, args: argparse.Namespace, start: int) -> Iterator[str]:
    """Streams a Hugging Face dataset; nothing but the shards lands on disk."""
    import datasets
    if not args.debug:  # its retry warnings would bury the one-line error below
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        stream = datasets.load_dataset(repo, name=args.subset, split="train", streaming=True)
        if start:
            stream = stream.skip(start)
        yield from filter(None, (row.get(args.text_field) for row in stream))
    except Exception as exc:  # the hub client raises many types; all mean "cannot read it"
        err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise data.DownloadError(f"--dataset={args.dataset}: cannot stream {repo} ({err}); no "
                                 "network?\nhint: download its parquet files elsewhere, then "
                                 "pass --dataset=FOLDER --name=NAME") from exc


def stdlib_files() -> list[Path]:
    """The running Python's standard library .py files, without installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        # Pruned, not filtered afterwards: site-packages can be far bigger than the stdlib.
        subfolders[:] = [d for d in subfolders
                         if d not in {"site-packages", "dist-packages", "__pycache__"}]
        found.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def local_files(spec: str) -> list[Path]:
    """The text files a --dataset path names: a file, a folder (recursively) or a glob."""
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                       if Path(p).is_file())
    elif (os.sep in spec or "/" in spec or spec.startswith((".", "~"))
          or path.suffix.lower() in LOCAL_SUFFIXES or path.exists()):
        raise cli.UsageError(f"--dataset={spec}: no such file or folder\nhint: give an existing "
                             f"file, folder or glob, or one of {', '.join(BUILTIN_NAMES)}")
    else:
        raise cli.UsageError(f"--dataset={spec}: unknown dataset\nhint: use one of "
                             f"{', '.join(BUILTIN_NAMES)} or a path to local files")
    files = [p for p in files if p.suffix.lower() in LOCAL_SUFFIXES]
    if not files:
        raise cli.UsageError(f"--dataset={spec}: no {', '.join(LOCAL_SUFFIXES)} files there")
    return files


def file_documents(files: list[Path], text_field: str, strict: bool,
                   skipped: list[str]) -> Iterator[str]:
    """Yields the non-empty documents of `files`: a text file, a .jsonl line, a .parquet row.
    A file that is not UTF-8 is skipped whole and listed in `skipped` (an error if `strict`)."""
    for path in files:
        suffix = path.suffix.lower()
        try:
            if suffix == ".parquet":
                yield from parquet_documents(path, text_field)
            elif suffix == ".jsonl":
                # Read through first: a line that is not UTF-8 skips the file before any goes out.
                deque(jsonl_documents(path, text_field), maxlen=0)
                yield from jsonl_documents(path, text_field)
            elif text := decode_utf8(path.read_bytes(), str(path)):
                yield text
        except NotUTF8 as exc:
            if strict:
                raise PrepareError(f"{exc}\nhint: fix or remove the file, or drop --strict to "
                                   "skip it") from exc
            skipped.append(str(path))


def decode_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotUTF8(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc


def jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_utf8(raw, f"{path}:{lineno}").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise PrepareError(f"{path}:{lineno}: not valid JSON ({getattr(exc, 'msg', exc)})"
                                   "\nhint: each line must be one JSON object") from exc
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise PrepareError(f"{path}:{lineno}: no string field '{text_field}'\nhint: "
                                   "name the text field with --text-field")
            try:
                text.encode("utf-8")  # a lone surrogate escape ("\ud800") is not text
            except UnicodeEncodeError as exc:
                raise NotUTF8(f"{path}:{lineno}: not UTF-8 ({exc.reason})") from exc
            if text:
                yield text


def parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            raise PrepareError(f"{path}: no column '{text_field}' (columns: "
                               f"{', '.join(schema.names)})\nhint: name the text column with "
                               "--text-field")
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PrepareError(f"{path}: column '{text_field}' holds {kind}, not text\nhint: "
                               "name the text column with --text-field")
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            yield from (text for text in batch.column(0).to_pylist() if text)
    except (pa.ArrowException, UnicodeDecodeError) as exc:  # not parquet, or a damaged one
        raise PrepareError(f"{path}: not a readable parquet file ({exc})") from exc


# ------------------------------------------------------------------------ the validation rule
@dataclass
class ValSplit:
    """The rule that says which documents go to val (see the module docstring). A prefix rule
    counts `val_tokens` until the first train document, `end_doc`, which progress.json saves."""
    description: str
    fraction: Fraction | None = None
    prefix_tokens: int = 0
    val_tokens: int = 0
    end_doc: int | None = None

    def is_val(self, doc_index: np.ndarray, doc_tokens: np.ndarray) -> np.ndarray:
        """Says which of consecutive documents (stream indices, token counts with the EOT) are
        val; chunks come in stream order."""
        if self.fraction is not None:
            num, den = self.fraction.numerator, self.fraction.denominator
            return (doc_index + 1) * num // den > doc_index * num // den
        if self.end_doc is not None:
            return doc_index < self.end_doc
        tokens_before = self.val_tokens + np.cumsum(doc_tokens) - doc_tokens
        val = tokens_before < self.prefix_tokens
        self.val_tokens += int(doc_tokens[val].sum())
        if not val.all():
            self.end_doc = int(doc_index[np.argmin(val)])
        return val


def every_kth(fraction: Fraction) -> ValSplit:
    f = f"{fraction.numerator}/{fraction.denominator}"
    return ValSplit(f"documents i with floor((i+1)*{f}) > floor(i*{f})", fraction=fraction)


def val_split(args: argparse.Namespace, default: str) -> ValSplit:
    """The rule that --val-tokens, or `default` without it, asks for."""
    amount = parse_val_tokens(args.val_tokens or default)
    if amount == 0 and "val" in parse_splits(args.splits):
        raise cli.UsageError(f"--val-tokens={args.val_tokens} leaves nothing for "
                             "--splits=validation")
    if isinstance(amount, Fraction):
        return every_kth(amount)
    return ValSplit(f"the first documents of the stream holding at least {amount} tokens",
                    prefix_tokens=amount)


def parse_val_tokens(spec: str) -> Fraction | int:
    spec = spec.strip()
    if spec.endswith("%"):
        with contextlib.suppress(ValueError, ZeroDivisionError):
            percent = Fraction(spec[:-1])
            if 0 <= percent < 100:
                return percent / 100
        raise cli.UsageError(f"--val-tokens={spec}: a percentage must be in [0, 100)")
    with contextlib.suppress(argparse.ArgumentTypeError):
        return parse_size(spec)
    raise cli.UsageError(f"--val-tokens={spec}: give a token count (10M) or a percentage (10%)")


# ---------------------------------------------------------------------------- the flags
def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
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
    p.add_argument("--data-root", type=Path, default=None, help="output root; shards go to "
                   f"DATA_ROOT/NAME/ (default: ${data.DATA_ROOT_ENV} or ~/.cache/nano-gpt/data)")
    p.add_argument("--shard-size", type=parse_size, default=100_000_000,
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


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a token count such as 100M or 5000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def parse_splits(text: str) -> tuple[str, ...]:
    names = {s.strip() for s in text.split(",")} - {""}
    if not names or not names <= SPLIT_FILE_NAMES.keys():
        raise cli.UsageError(f"--splits={text}: use train, validation or train,validation")
    return tuple(sorted({SPLIT_FILE_NAMES[s] for s in names}, key=("train", "val").index))


if __name__ == "__main__":
    sys.exit(main())
