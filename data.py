"""GPT-2 tokenizer, the token-shard format, and the batch loader.

Shard format (llm.c's): a 1024-byte header of 256 little-endian int32 `[20240520, 1, ntok, 0,
...]`, then `ntok` little-endian uint16 tokens; the file size is exactly `1024 + 2 * ntok`. 1-D
uint16 `.npy` files (build-nanogpt's shards) are read too. No shard is ever read whole.
"""

from __future__ import annotations

import base64
import bisect
import collections
import contextlib
import fcntl
import functools
import hashlib
import itertools
import os
import shutil
import sys
import tempfile
import threading
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

if TYPE_CHECKING:  # imported where used, so plot_log.py needs neither torch nor tiktoken
    import tiktoken
    import torch

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
GPT2_RANKS_FILE = ASSETS_DIR / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenization regex (the one tiktoken's r50k_base uses).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TOKEN = 50256
VOCAB_SIZE = 50257

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DATA_ROOT_ENV = "NANO_GPT_DATA_ROOT"
LOADER_STATE_FORMAT = "nano-gpt-shard-loader/1"
_MASK64 = (1 << 64) - 1

try:  # the compiled loader (csrc/), built by `pip install -e .`; the NumPy one stands in
    import _loader as NATIVE_MODULE  # type: ignore[import-not-found]
except ImportError:
    NATIVE_MODULE = None
_ANNOUNCED: set[str] = set()  # the backends "auto" has named on stderr in this process


class ShardFormatError(ValueError):
    """A token shard that is not what its format promises; the message names the file."""


class WriteError(OSError):
    """A failed write, its message naming the file it was for; atomic_output passes it on."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_error(path: str | os.PathLike[str], exc: OSError) -> OSError:
    """`exc` (a full disk, no permission) as the WriteError naming `path`; one already is."""
    return exc if isinstance(exc, WriteError) else WriteError(
        exc.errno, f"{path}: cannot write it ({exc.strerror or exc}); free some space, fix "
                   "the permissions or write elsewhere")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 BPE from the ranks file in `assets/`, checked against its sha256."""
    import tiktoken
    raw = GPT2_RANKS_FILE.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise RuntimeError(f"{GPT2_RANKS_FILE}: not the GPT-2 ranks file (sha256 {digest})\n"
                           "hint: restore it from the repository")
    pairs = (line.split() for line in raw.splitlines() if line)
    ranks = {base64.b64decode(token): int(rank) for token, rank in pairs}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN},
                             explicit_n_vocab=VOCAB_SIZE)


# ------------------------------------------------------------------------------ shard I/O
def default_data_root() -> Path:
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nano-gpt" / "data"


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}_{split}_{index:06d}.bin"


def find_shards(directory: str | os.PathLike[str], split: str) -> list[Path]:
    """Sorted `*_{split}_*` shards (`.bin` or `.npy`) in `directory`; split is train or val."""
    return sorted(p for p in Path(directory).glob(f"*_{split}_*") if p.suffix in (".bin", ".npy"))


def shard_header(ntok: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, ntok)
    return header


def write_shard(path: str | os.PathLike[str], tokens: np.ndarray | list[int]) -> None:
    path = Path(path)
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit in uint16 (0..65535)")
    array = array.astype("<u2", copy=False)
    with atomic_output(path) as f:
        f.write(shard_header(array.size).tobytes())
        array.tofile(f)  # straight from the array: no second copy of a large shard


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only once complete (temp file in the same folder,
    fsync, rename; on any error the temp file goes). Its `name` is the temp path, to read back
    before the rename. A failed write is the WriteError naming `path`; another output's
    WriteError, or an OSError of the body naming its own file, goes on unchanged."""
    path = Path(path)
    tmp_name, in_body = None, False
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0)  # rw for whom the umask allows: mkstemp's 0600 hides it from the group
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        os.close(fd)
        with open(tmp_name, "wb") as f:
            in_body = True
            yield f
            in_body = False
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not (in_body and exc.filename is not None):
            raise write_error(path, exc) from None
        raise


def replace_folder(source: Path, target: Path) -> None:
    """Rename the finished folder `source` to `target`, so `target` appears whole; an older
    `target` is moved aside first (a rename cannot replace a folder) and then removed."""
    if not target.exists():
        os.replace(source, target)
        return
    old = target.with_name(f".{target.name}.old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class FolderHeld(RuntimeError):
    """Another process holds the folder (hold_folder); `pid` is the one its lock file names."""

    def __init__(self, folder: Path, pid: str) -> None:
        super().__init__(f"{folder}: held by pid {pid}")
        self.pid = pid


@contextlib.contextmanager
def hold_folder(folder: Path, lock_name: str) -> Iterator[None]:
    """Holds `folder` (made if need be) for this process alone while the block runs: an
    exclusive flock on its lock file, which names our pid. The kernel drops a flock however
    its holder ends, kill -9 too, so a dead holder never blocks the next run. The lock file
    stays: removing it would let a third process lock a new file while a second still holds
    the old one."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / lock_name, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise FolderHeld(folder, lock.read().strip() or "unknown") from None
        lock.truncate(0)
        print(os.getpid(), file=lock, flush=True)
        yield


def download(url: str, path: Path, check: Callable[[Path], None] | None = None) -> Path:
    """`url` saved at `path` once, through a temp file that `check` (if given) validates first."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as out:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        except OSError as exc:  # URLError, timeouts and resets are all OSErrors
            reason = getattr(exc, "reason", exc)
            raise DownloadError(f"cannot download {url} ({reason}; no network?): save that "
                                f"file as {path} and rerun") from None
        out.flush()
        if check is not None:
            check(Path(out.name))
    return path


class DownloadError(RuntimeError):
    """A download that failed; the message says where to put a copy made elsewhere."""


def read_shard(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a `.bin` or `.npy` shard as uint16 tokens, checking its header."""
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a shard file" if path.is_dir() else "shard file not found"
        raise FileNotFoundError(f"{path}: {what}\nhint: data.find_shards(folder, split) lists "
                                "a folder's shards")
    if path.suffix == ".npy":
        with path.open("rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise ShardFormatError(f"{path}: starts with {magic!r}, not the .npy magic "
                                   "b'\\x93NUMPY'; not a NumPy token shard")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError) as exc:  # a truncated header ends in EOFError
            raise ShardFormatError(f"{path}: not a readable .npy file ({exc})") from exc
        if array.dtype != np.dtype("<u2") and array.dtype != np.dtype("=u2"):
            raise ShardFormatError(f"{path}: dtype {array.dtype}, expected uint16 tokens")
        if array.ndim != 1:
            raise ShardFormatError(f"{path}: shape {array.shape}, expected a 1-D token array")
        return array
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardFormatError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte "
                               "shard header\nhint: the file is truncated or not a token shard; "
                               "write it again with prepare_dataset.py")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic_number, version, ntok = (int(v) for v in header[:3])
    if magic_number != SHARD_MAGIC:
        raise ShardFormatError(f"{path}: magic number {magic_number}, expected {SHARD_MAGIC}; "
                               "not an llm.c token shard")
    if version != SHARD_VERSION:
        raise ShardFormatError(f"{path}: format version {version}, expected {SHARD_VERSION} "
                               "(uint16 tokens)")
    expected = HEADER_BYTES + 2 * ntok
    if ntok < 0 or size != expected:
        raise ShardFormatError(f"{path}: file size {size} bytes, expected {expected} for "
                               f"{ntok} tokens\nhint: the shard is truncated or corrupt; write it "
                               "again with prepare_dataset.py")
    if ntok == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))


# ------------------------------------------------------------------------------ batch loader
# Sample stream. A sample is T+1 consecutive tokens; shard s holds the windows
# tokens[j*T : j*T+T+1] for j < (ntok_s-1)//T, so fewer than T tokens per shard go unused. An
# epoch is the shards in epoch order, each shard's windows in epoch order; epochs follow each
# other forever. Global batch k is stream samples [k*W*B, (k+1)*W*B), rank r taking the B from
# k*W*B + r*B: a batch past an epoch's end continues into the next (nothing dropped), and the
# loader's whole state is the batches taken (`step`).
# Order. With shuffle, epoch e orders shards and each shard's windows by sorting indices i
# by splitmix64(key ^ i), key = mix(mix(mix(seed) ^ e) ^ stream) with stream 0 for the shard
# order and 1+s for shard s. mix is a bijection on uint64, so keys never tie and the order
# is a pure function of (seed, epoch); csrc/loader.cpp computes exactly the same.
def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on a uint64 array (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def order_key(seed: int, epoch: int, stream: int) -> int:
    """The 64-bit key of one permutation: stream 0 orders shards, 1+s shard s's windows."""
    def mix(value: int) -> int:
        return int(_mix64(np.array([value & _MASK64], dtype=np.uint64))[0])
    return mix(mix(mix(seed) ^ (epoch & _MASK64)) ^ (stream & _MASK64))


def seeded_permutation(n: int, key: int) -> np.ndarray:
    index = np.arange(n, dtype=np.uint64)
    return np.argsort(_mix64(index ^ np.uint64(key)), kind="stable").astype(np.int64)


class _NumpyBackend:
    """Builds any batch on demand from the files (pure NumPy, no thread, no position).
    Samples are read(), not memory-mapped: a map keeps the pages it touches resident (up to
    2 MB a fault), so shuffled reads of a large shard would grow the resident set."""

    def __init__(self, layouts: list[tuple[str, int, int]], counts: list[int], batch_size: int,
                 seq_len: int, rank: int, world_size: int, shuffle: bool, seed: int,
                 vocab_size: int, device: torch.device) -> None:
        self.layouts, self.counts, self.per_epoch = layouts, counts, sum(counts)
        self.sizes = [os.stat(path).st_size for path, _, _ in layouts]
        self.B, self.T, self.rank, self.W = batch_size, seq_len, rank, world_size
        self.shuffle, self.seed, self.vocab_size, self.device = shuffle, seed, vocab_size, device
        # Only the orders being read are kept: a batch spans few epochs and shards.
        self._cached_shard_order = functools.lru_cache(maxsize=2)(self._shard_order)
        self._cached_window_order = functools.lru_cache(maxsize=4)(self._window_order)

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        tokens = self.batch(step).astype(np.int64)
        xy = torch.from_numpy(np.stack([tokens[:, :-1], tokens[:, 1:]]))
        if self.device.type == "cuda":
            # From pinned memory the copy is queued behind the GPU's work and this returns at
            # once; the host allocator keeps the block until the copy has run.
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        else:
            xy = xy.to(self.device)
        return xy[0], xy[1]

    def batch(self, step: int) -> np.ndarray:
        """Batch `step` of this rank as a (B, T+1) uint16 array."""
        first = (step * self.W + self.rank) * self.B
        places = [self._place(sample) for sample in range(first, first + self.B)]
        out = np.zeros((self.B, self.T + 1), dtype="<u2")
        for shard in sorted({shard for shard, _ in places}):
            path, offset, _ = self.layouts[shard]
            with open(path, "rb", buffering=0) as f:
                for row, (row_shard, start) in zip(out, places, strict=True):
                    if row_shard == shard:
                        f.seek(offset + 2 * start)
                        f.readinto(row.data)  # a short read means the file shrank: caught next
                size = os.fstat(f.fileno()).st_size
            if size != self.sizes[shard]:
                raise ShardFormatError(f"{path}: file size changed from {self.sizes[shard]} to "
                                       f"{size} bytes while the loader was reading it; the "
                                       "shard was truncated or rewritten")
        if int(out.max()) >= self.vocab_size:
            bad = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            shard, start = places[bad]
            raise ShardFormatError(
                f"{self.layouts[shard][0]}: token id {int(out[bad].max())} near token {start} "
                f"is not below the vocabulary size {self.vocab_size}; the shard was made with "
                "another tokenizer or is corrupt")
        return out

    def _place(self, sample: int) -> tuple[int, int]:
        epoch, index = divmod(sample, self.per_epoch)
        order, starts = self._cached_shard_order(epoch)
        k = bisect.bisect_right(starts, index) - 1  # empty shards share a start: take the last
        shard, window = order[k], index - starts[k]
        if self.shuffle:
            window = int(self._cached_window_order(epoch, shard)[window])
        return shard, window * self.T

    def _shard_order(self, epoch: int) -> tuple[list[int], list[int]]:
        """The shards in epoch order, and the epoch index of each one's first sample."""
        n = len(self.counts)
        key = order_key(self.seed, epoch, 0)
        order = seeded_permutation(n, key).tolist() if self.shuffle else list(range(n))
        return order, [0, *itertools.accumulate(self.counts[s] for s in order)]

    def _window_order(self, epoch: int, shard: int) -> np.ndarray:
        return seeded_permutation(self.counts[shard], order_key(self.seed, epoch, 1 + shard))


class _NativeBackend:
    """The compiled `_loader`: a C++ thread fills a ring of (2, B, T) int64 slots ahead. On
    CPU the filled tensor goes to the caller, who owns it, and its slot goes back at once with
    a fresh tensor to fill, so nothing tracks the caller's tensors. On CUDA the slots are
    pinned; a slot goes back once its batch's non-blocking copy's CUDA event has completed."""

    SLOTS = 8

    def __init__(self, layouts: list[tuple[str, int, int]], batch_size: int, seq_len: int,
                 rank: int, world_size: int, shuffle: bool, seed: int, vocab_size: int,
                 device: torch.device) -> None:
        import torch
        self.module, self.device, self.cuda = NATIVE_MODULE, device, device.type == "cuda"
        self.slots = [torch.empty((2, batch_size, seq_len), dtype=torch.int64,
                                  pin_memory=self.cuda) for _ in range(self.SLOTS)]
        try:
            self.native = self.module.BatchLoader(
                layouts, batch_size, seq_len, rank, world_size, shuffle, seed & _MASK64,
                vocab_size, [slot.numpy() for slot in self.slots])
        except self.module.ShardError as exc:
            raise ShardFormatError(str(exc)) from None
        self.copies: collections.deque[tuple[int, torch.cuda.Event]] = collections.deque()
        self._finalizer = weakref.finalize(self, self.native.close)

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `step`, which is the ring's next one: the facade seeks it on every jump."""
        import torch
        if self.cuda:  # half the ring at most waits on copies, so the producer has slots to fill
            self._release_copied(keep=self.SLOTS // 2 - 1)
        try:
            slot = self.native.acquire()
        except self.module.ShardError as exc:
            raise ShardFormatError(str(exc)) from None
        xy = self.slots[slot]
        if self.cuda:
            xy = xy.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
            self.copies.append((slot, copied))
        else:
            self.slots[slot] = torch.empty_like(xy)
            self.native.release(slot, self.slots[slot].numpy())
        return xy[0], xy[1]

    def _release_copied(self, keep: int) -> None:
        """Hand back finished copies' slots, oldest first, and wait while over `keep` fly."""
        while self.copies and (len(self.copies) > keep or self.copies[0][1].query()):
            slot, copied = self.copies.popleft()
            copied.synchronize()
            self.native.release(slot)

    def seek(self, step: int) -> None:
        self._release_copied(keep=0)
        self.native.seek(step)

    def close(self) -> None:
        self._release_copied(keep=0)
        self._finalizer()


SECOND_CONSUMER = ("ShardLoader: called from a second thread while another is inside "
                   "next_batch(), reset() or load_state_dict()\nhint: the loader has one "
                   "consumer; give each thread its own loader")


class ShardLoader:
    """(x, y) int64 batches of shape (batch_size, seq_len) from token shards, forever.

    files: shard paths (`find_shards(folder, split)` lists a folder's), or one path. backend:
    "native" (the compiled `_loader`), "numpy" (byte-identical batches) or "auto" (native when
    built, else numpy; says once per process which). The returned tensors are the caller's.
    Order and sharding: see this section's top; state_dict() is the batches taken and the
    settings to resume with. A token not below vocab_size, or a shard truncated under the
    loader, raises ShardFormatError at its batch and every call after until reset() or
    load_state_dict(). One consumer: next_batch(), reset() and load_state_dict() raise
    RuntimeError at once while another thread is inside one of them."""

    def __init__(self, files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                 batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                 backend: str = "auto", vocab_size: int = VOCAB_SIZE) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"ShardLoader: batch_size ({batch_size}) and seq_len ({seq_len}) "
                             "must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardLoader: rank {rank} is not in 0..world_size-1 "
                             f"(world_size {world_size})")
        if backend not in ("auto", "native", "numpy"):
            raise ValueError(f"ShardLoader: backend {backend!r}; use auto, native or numpy")
        self.paths = ([Path(files)] if isinstance(files, (str, os.PathLike))
                      else [Path(p) for p in files])
        if not self.paths:
            raise ValueError("ShardLoader: the list of shard files is empty")
        layouts = []  # (path, byte offset of the first token, token count) per shard
        for path in self.paths:
            tokens = read_shard(path)
            layouts.append((str(path), int(getattr(tokens, "offset", HEADER_BYTES)), len(tokens)))
        self.num_tokens = [ntok for _, _, ntok in layouts]
        counts = [max(0, (n - 1) // seq_len) for n in self.num_tokens]  # windows per shard
        self.samples_per_epoch = sum(counts)
        if self.samples_per_epoch == 0:
            raise ValueError(f"ShardLoader: no shard among {len(self.paths)} files (first "
                             f"{self.paths[0]}) holds seq_len+1 = {seq_len + 1} tokens\nhint: "
                             "use a shorter seq_len or more data")
        self.batch_size, self.seq_len, self.rank, self.world_size = (batch_size, seq_len,
                                                                     rank, world_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.step = 0  # batches taken: the loader's whole position
        self._consumer = threading.Lock()
        if backend == "auto":
            backend = "native" if NATIVE_MODULE is not None else "numpy"
            if backend not in _ANNOUNCED:
                _ANNOUNCED.add(backend)
                print(f"data.ShardLoader: using the {backend} backend", file=sys.stderr)
        elif backend == "native" and NATIVE_MODULE is None:
            raise RuntimeError("ShardLoader: backend='native' but the _loader extension is not "
                               "built\nhint: run `pip install -e .` or use backend='numpy'")
        self.backend = backend
        import torch
        settings = (batch_size, seq_len, rank, world_size, self.shuffle, self.seed, vocab_size,
                    torch.device(device))
        self._source: _NumpyBackend | _NativeBackend | None = (
            _NativeBackend(layouts, *settings) if self.backend == "native"
            else _NumpyBackend(layouts, counts, *settings))

    @property
    def epoch(self) -> int:
        """The epoch that the next batch starts in."""
        first = (self.step * self.world_size + self.rank) * self.batch_size
        return first // self.samples_per_epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Two threads taking batches at once would duplicate and drop batches: fail loudly.
        if not self._consumer.acquire(blocking=False):
            raise RuntimeError(SECOND_CONSUMER)
        try:
            if self._source is None:
                raise RuntimeError("ShardLoader: next_batch() after close()")
            x, y = self._source.next_batch(self.step)
            self.step += 1
            return x, y
        finally:
            self._consumer.release()

    def next_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """next_batch() as int64 NumPy arrays (no copy on CPU), for frameworks besides torch."""
        x, y = self.next_batch()
        return x.cpu().numpy(), y.cpu().numpy()

    def reset(self, step: int = 0) -> None:
        """Move to batch `step` (the first by default): the next batch is that one."""
        if not self._consumer.acquire(blocking=False):
            raise RuntimeError(SECOND_CONSUMER)
        try:
            self.step = step
            if isinstance(self._source, _NativeBackend):  # the NumPy one reads no batch ahead
                self._source.seek(step)
        finally:
            self._consumer.release()

    def state_dict(self) -> dict[str, Any]:
        """Plain ints/str/lists: all that exact resume needs, plus what must match."""
        return {"format": LOADER_STATE_FORMAT, "files": [str(p) for p in self.paths],
                "num_tokens": list(self.num_tokens), "batch_size": self.batch_size,
                "seq_len": self.seq_len, "rank": self.rank, "world_size": self.world_size,
                "shuffle": self.shuffle, "seed": self.seed, "step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != LOADER_STATE_FORMAT:
            raise ValueError(f"loader state: format {state.get('format')!r}, expected "
                             f"{LOADER_STATE_FORMAT!r}")
        mine = self.state_dict()
        names = [Path(p).name for p in state.get("files", [])]
        if names != [p.name for p in self.paths] or state.get("num_tokens") != mine["num_tokens"]:
            raise ValueError(f"loader state: saved for other shard files ({len(names)} files, "
                             f"first {names[:1]})\nhint: resume with the data it was trained on")
        # The flag that sets each (world_size: the number of processes).
        flags = {"batch_size": "--batch-size", "seq_len": "--seq-len", "shuffle": "--shuffle",
                 "seed": "--seed", "world_size": "processes"}
        for key, flag in flags.items():
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state: saved with {key}={state.get(key)!r}, this "
                                 f"run has {mine[key]!r}\nhint: resume with the same {flag}")
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"loader state: step is {step!r}, not a count of batches")
        self.reset(step)

    def close(self) -> None:
        if isinstance(self._source, _NativeBackend):
            self._source.close()
        self._source = None

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
