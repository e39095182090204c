"""GPT-2 tokenizer, the token-shard format, and the batch loader.

Shard format (llm.c's): a 1024-byte header of 256 little-endian int32
`[20240520, 1, ntok, 0, ...]`, then `ntok` little-endian uint16 tokens; the file size is
exactly `1024 + 2 * ntok`. One-dimensional uint16 `.npy` files (build-nanogpt's shards)
are read as well. Shards are always memory-mapped, never read whole.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import functools
import glob as _glob
import hashlib
import os
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


class ShardFormatError(ValueError):
    """A token shard that is not what its format promises; the message names the file."""


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 BPE from the ranks file in `assets/`, checked against its sha256."""
    import tiktoken

    raw = GPT2_RANKS_FILE.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise RuntimeError(f"{GPT2_RANKS_FILE}: sha256 {digest} is not the GPT-2 ranks file "
                           f"({GPT2_RANKS_SHA256}); restore it from the repository")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )


# ------------------------------------------------------------------------------ shard I/O

DATA_ROOT_ENV = "NANO_GPT_DATA_ROOT"


def default_data_root() -> Path:
    """`$NANO_GPT_DATA_ROOT`, else `~/.cache/nano-gpt/data`."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nano-gpt" / "data"


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}_{split}_{index:06d}.bin"


def find_shards(directory: str | os.PathLike[str], split: str) -> list[Path]:
    """Sorted `*_{split}_*` shards (`.bin` or `.npy`) in `directory`; split is train or val."""
    directory = Path(directory)
    found = [p for p in directory.glob(f"*_{split}_*") if p.suffix in (".bin", ".npy")]
    return sorted(found)


def shard_header(ntok: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, ntok)
    return header


def write_shard(path: str | os.PathLike[str], tokens: np.ndarray | list[int]) -> None:
    """Write an llm.c `.bin` shard atomically: temp file, fsync, rename."""
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


def default_file_mode() -> int:
    """rw for whom the umask allows: mkstemp's own 0600 would hide files from the group."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only once complete (temp name in the same
    folder, fsync, rename); on any error the temp file goes and `path` is untouched.
    The file's `name` is the temp path, for checks that read it back before the rename."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
        os.close(fd)
        with open(tmp_name, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def download(url: str, path: Path, check: Callable[[Path], None] | None = None,
             timeout: float = 60) -> Path:
    """`url` saved at `path` once: later calls find the file and return at once. The body
    streams into a temp file that `check` (if given) validates before it is renamed into
    place, so `path` never holds a partial or bad download."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as out:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
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
        raise FileNotFoundError(f"{path}: shard not found")
    if path.suffix == ".npy":
        return _read_npy_shard(path)
    return _read_bin_shard(path)


def _read_bin_shard(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardFormatError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte "
                               "shard header; the file is truncated or not a token shard")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, ntok = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise ShardFormatError(f"{path}: magic number {magic}, expected {SHARD_MAGIC}; "
                               "not an llm.c token shard")
    if version != SHARD_VERSION:
        raise ShardFormatError(f"{path}: format version {version}, expected {SHARD_VERSION} "
                               "(uint16 tokens)")
    expected = HEADER_BYTES + 2 * ntok
    if ntok < 0 or size != expected:
        raise ShardFormatError(f"{path}: file size {size} bytes, expected {expected} for "
                               f"{ntok} tokens; the shard is truncated or corrupt")
    if ntok == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))


def _read_npy_shard(path: Path) -> np.ndarray:
    with path.open("rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise ShardFormatError(f"{path}: starts with {magic!r}, expected the .npy magic "
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


# ------------------------------------------------------------------------------ batch loader
#
# Sample stream. A sample is T+1 consecutive tokens; shard s holds the non-overlapping
# windows tokens[j*T : j*T+T+1] for j < (ntok_s-1)//T (stride T: the last token of a window
# is the first of the next), so fewer than T tokens per shard are never used. One epoch is
# the shards in epoch order, each shard's windows in epoch order; the stream is the epochs
# one after another, forever. Global batch k is stream samples [k*W*B, (k+1)*W*B) and rank r
# takes the B samples starting at k*W*B + r*B. A global batch that runs past the end of an
# epoch simply continues into the next one, so nothing is dropped and the first N samples of
# the stream (N samples per epoch) are exactly one epoch, each window once, across ranks.
# The whole loader state is therefore one integer: the number of batches taken (`step`).
#
# Order. With shuffle, epoch e orders shards and each shard's windows by sorting indices i
# by splitmix64(key ^ i), key = mix(mix(mix(seed) ^ e) ^ stream) with stream 0 for the shard
# order and 1+s for shard s. mix is a bijection on uint64, so keys never tie and the order
# is a pure function of (seed, epoch); csrc/loader.cpp computes exactly the same.

LOADER_STATE_FORMAT = "nano-gpt-shard-loader/1"
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_backend_announced = False
_announce_lock = threading.Lock()


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on a uint64 array (wrapping arithmetic)."""
    z = z + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix64_int(value: int) -> int:
    return int(_mix64(np.array([value & _MASK64], dtype=np.uint64))[0])


def order_key(seed: int, epoch: int, stream: int) -> int:
    """The 64-bit key of one permutation: stream 0 orders shards, 1+s shard s's windows."""
    return _mix64_int(_mix64_int(_mix64_int(seed) ^ (epoch & _MASK64)) ^ (stream & _MASK64))


def seeded_permutation(n: int, key: int) -> np.ndarray:
    """Indices 0..n-1 sorted by splitmix64(key ^ i): a permutation fixed by `key`."""
    index = np.arange(n, dtype=np.uint64)
    return np.argsort(_mix64(index ^ np.uint64(key)), kind="stable").astype(np.int64)


def samples_in_shard(ntok: int, seq_len: int) -> int:
    """How many (seq_len+1)-token windows of stride seq_len fit in a shard."""
    return max(0, (ntok - 1) // seq_len)


def resolve_shard_files(files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
                        ) -> list[Path]:
    """A list of shard paths, a directory (all its .bin/.npy files) or a glob, sorted."""
    if isinstance(files, (str, os.PathLike)):
        path = Path(files)
        if path.is_dir():
            paths = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".npy"))
        elif path.exists():
            paths = [path]
        else:
            paths = [Path(p) for p in sorted(_glob.glob(str(files)))]
        if not paths:
            raise FileNotFoundError(f"{files}: no .bin or .npy shards found; pass shard "
                                    "paths, a folder of shards or a glob")
        return paths
    paths = [Path(p) for p in files]
    if not paths:
        raise ValueError("ShardLoader: the list of shard files is empty")
    return paths


class _EpochPlan:
    """Epoch order: which shard holds the i-th sample of the epoch, and at which token."""

    def __init__(self, counts: list[int], seq_len: int, shuffle: bool, seed: int,
                 epoch: int) -> None:
        nshards = len(counts)
        if shuffle:
            self.shard_order = seeded_permutation(nshards, order_key(seed, epoch, 0))
        else:
            self.shard_order = np.arange(nshards, dtype=np.int64)
        ordered = np.asarray(counts, dtype=np.int64)[self.shard_order]
        self.starts = np.concatenate([[0], np.cumsum(ordered)])
        self.seq_len = seq_len
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.counts = counts
        self._perms: dict[int, np.ndarray] = {}

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, token offsets) of epoch sample indices."""
        slot = np.searchsorted(self.starts, index, side="right") - 1
        shards = self.shard_order[slot]
        local = index - self.starts[slot]
        if self.shuffle:
            pairs = zip(shards.tolist(), local.tolist(), strict=True)
            local = np.array([self._perm(s)[j] for s, j in pairs], dtype=np.int64)
        return shards, local * self.seq_len

    def _perm(self, shard: int) -> np.ndarray:
        if shard not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            key = order_key(self.seed, self.epoch, 1 + shard)
            self._perms[shard] = seeded_permutation(self.counts[shard], key)
        return self._perms[shard]


class _NumpyBackend:
    """Builds batch `step` on demand from memory-mapped shards (pure NumPy, no thread)."""

    # The kernel maps page-cache folios of up to 2 MB whole, so one sample can add 2 MB of
    # resident pages; dropping the maps once the granules touched could add up to the budget
    # keeps the resident set flat in shard size (csrc/loader.cpp does the same).
    _GRANULE_BYTES = 2 << 20
    _MAP_BUDGET_BYTES = 32 << 20

    def __init__(self, paths: list[Path], sizes: list[int], counts: list[int], batch_size: int,
                 seq_len: int, rank: int, world_size: int, shuffle: bool, seed: int,
                 vocab_size: int) -> None:
        self.paths, self.sizes, self.counts = paths, sizes, counts
        self.B, self.T, self.rank, self.W = batch_size, seq_len, rank, world_size
        self.shuffle, self.seed, self.vocab_size = shuffle, seed, vocab_size
        self.per_epoch = sum(counts)
        self._plans: dict[int, _EpochPlan] = {}
        self._maps: dict[int, np.ndarray] = {}
        self._mapped_estimate = 0
        self._last_granule = (-1, -1)

    def batch(self, step: int) -> np.ndarray:
        """Batch `step` of this rank as a (B, T+1) uint16 array."""
        first = (step * self.W + self.rank) * self.B
        positions = np.arange(first, first + self.B, dtype=np.int64)
        epochs, index = np.divmod(positions, self.per_epoch)
        shards = np.empty(self.B, dtype=np.int64)
        offsets = np.empty(self.B, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            shards[sel], offsets[sel] = self._plan(int(epoch)).locate(index[sel])
        out = np.empty((self.B, self.T + 1), dtype=np.uint16)
        self._check_sizes(set(shards.tolist()))
        for row, (shard, offset) in enumerate(zip(shards.tolist(), offsets.tolist(), strict=True)):
            out[row] = self._tokens(shard, offset)[offset:offset + self.T + 1]
        if self.B and int(out.max()) >= self.vocab_size:
            row = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            bad = int(out[row].max())
            raise ShardFormatError(
                f"{self.paths[shards[row]]}: token id {bad} near token {offsets[row]} is not "
                f"below the vocabulary size {self.vocab_size}; the shard was made with another "
                "tokenizer or is corrupt")
        return out

    def close(self) -> None:
        self._maps.clear()

    def _plan(self, epoch: int) -> _EpochPlan:
        if epoch not in self._plans:
            if len(self._plans) > 1:
                self._plans.clear()
            self._plans[epoch] = _EpochPlan(self.counts, self.T, self.shuffle, self.seed, epoch)
        return self._plans[epoch]

    def _check_sizes(self, shards: set[int]) -> None:
        # A file shrunk under a live memory map faults (SIGBUS) on access; check first.
        for shard in shards:
            size = os.stat(self.paths[shard]).st_size
            if size != self.sizes[shard]:
                raise ShardFormatError(f"{self.paths[shard]}: file size changed from "
                                       f"{self.sizes[shard]} to {size} bytes while the loader "
                                       "was reading it; the shard was truncated or rewritten")

    def _tokens(self, shard: int, offset: int) -> np.ndarray:
        """The shard's map, about to be read at token `offset`."""
        first, last = (2 * offset // self._GRANULE_BYTES,
                       (2 * (offset + self.T) + 1) // self._GRANULE_BYTES)
        for granule in range(first, last + 1):
            if (shard, granule) != self._last_granule:
                self._mapped_estimate += self._GRANULE_BYTES
                self._last_granule = (shard, granule)
        if self._mapped_estimate > self._MAP_BUDGET_BYTES:
            self._maps.clear()  # unmapping drops the pages from this process, not the cache
            self._mapped_estimate = 0
        if shard not in self._maps:
            self._maps[shard] = read_shard(self.paths[shard])
        return self._maps[shard]


def _native_module() -> Any | None:
    try:
        import _loader  # type: ignore[import-not-found]
    except ImportError:
        return None
    return _loader if hasattr(_loader, "BatchLoader") else None


def _announce_backend(name: str) -> None:
    global _backend_announced
    with _announce_lock:
        if not _backend_announced:
            _backend_announced = True
            print(f"data.ShardLoader: using the {name} backend", file=sys.stderr)


class ShardLoader:
    """(x, y) int64 batches of shape (batch_size, seq_len) from token shards, forever.

    backend: "native" (the compiled `_loader` extension: memory-mapped shards, a background
    thread filling a ring of host buffers), "numpy" (pure NumPy, byte-identical batches) or
    "auto" (native when built, else numpy; says once per process which it chose).
    On CPU the returned tensors belong to the caller (never reused by the loader). On CUDA
    each batch is one non-blocking copy from a pinned host slot, and that slot is refilled
    only after the copy's CUDA event has completed.
    Token ids are checked against vocab_size for every batch as it is assembled.
    Order and sharding are described at the top of this section: a global batch that runs
    past the end of an epoch continues into the next epoch (nothing is dropped), and
    state_dict() is the number of batches taken plus the settings it must be resumed with.
    A fault in the native thread (a bad token, a shard truncated under it) is raised as
    ShardFormatError by the next next_batch(), and by every call after it until reset() or
    load_state_dict().
    """

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
        self.paths = resolve_shard_files(files)
        self.num_tokens = [int(read_shard(p).shape[0]) for p in self.paths]
        self.sizes = [p.stat().st_size for p in self.paths]
        self.counts = [samples_in_shard(n, seq_len) for n in self.num_tokens]
        if sum(self.counts) == 0:
            raise ValueError(f"ShardLoader: no shard among {len(self.paths)} files (first "
                             f"{self.paths[0]}) holds seq_len+1 = {seq_len + 1} tokens; use a "
                             "shorter seq_len or more data")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.vocab_size = bool(shuffle), int(seed), vocab_size
        import torch

        self.device = torch.device(device)
        self.step = 0
        self.backend = self._pick_backend(backend)
        self._numpy: _NumpyBackend | None = None
        self._native: _NativeRing | None = None
        if self.backend == "native":
            self._native = _NativeRing(self)
        else:
            self._numpy = _NumpyBackend(self.paths, self.sizes, self.counts, batch_size, seq_len,
                                        rank, world_size, self.shuffle, self.seed, vocab_size)

    @property
    def samples_per_epoch(self) -> int:
        return sum(self.counts)

    @property
    def epoch(self) -> int:
        """The epoch that the next batch starts in."""
        first = (self.step * self.world_size + self.rank) * self.batch_size
        return first // self.samples_per_epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._native is not None:
            x, y = self._native.next_batch()
        elif self._numpy is not None:
            x, y = self._numpy_batch()
        else:
            raise RuntimeError("ShardLoader: next_batch() after close()")
        self.step += 1
        return x, y

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self._seek(0)

    def state_dict(self) -> dict[str, Any]:
        """Plain ints/str/lists: all that exact resume needs, plus what must match."""
        return {
            "format": LOADER_STATE_FORMAT,
            "files": [str(p) for p in self.paths],
            "num_tokens": list(self.num_tokens),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "step": self.step,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that saved `state` stopped."""
        if state.get("format") != LOADER_STATE_FORMAT:
            raise ValueError(f"ShardLoader.load_state_dict: format {state.get('format')!r}, "
                             f"expected {LOADER_STATE_FORMAT!r}")
        mine = self.state_dict()
        names = [Path(p).name for p in state.get("files", [])]
        if names != [p.name for p in self.paths] or state.get("num_tokens") != mine["num_tokens"]:
            raise ValueError("ShardLoader.load_state_dict: the state was saved for different "
                             f"shard files ({len(names)} files, first {names[:1]}); resume "
                             "with the same data")
        for key in ("batch_size", "seq_len", "world_size", "shuffle", "seed"):
            if state.get(key) != mine[key]:
                raise ValueError(f"ShardLoader.load_state_dict: the state has {key}="
                                 f"{state.get(key)!r} but this loader has {key}={mine[key]!r}; "
                                 "resume with the same settings")
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"ShardLoader.load_state_dict: bad step {step!r}")
        self._seek(step)

    def close(self) -> None:
        if self._native is not None:
            self._native.close()
            self._native = None
        if self._numpy is not None:
            self._numpy.close()
            self._numpy = None

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _seek(self, step: int) -> None:
        self.step = step
        if self._native is not None:
            self._native.seek(step)

    def _pick_backend(self, backend: str) -> str:
        if backend == "auto":
            backend = "native" if _native_module() is not None else "numpy"
            _announce_backend(backend)
        elif backend == "native" and _native_module() is None:
            raise RuntimeError("ShardLoader: backend='native' but the _loader extension is not "
                               "built; run `pip install -e .` or use backend='numpy'")
        return backend

    def _numpy_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        assert self._numpy is not None
        tokens = self._numpy.batch(self.step)
        xy = torch.empty((2, self.batch_size, self.seq_len), dtype=torch.int64)
        buf = xy.numpy()
        np.copyto(buf[0], tokens[:, :-1])
        np.copyto(buf[1], tokens[:, 1:])
        if self.device.type != "cpu":
            xy = xy.to(self.device)
        return xy[0], xy[1]


def _storage_users(tensor: torch.Tensor) -> int:
    """How many tensors share `tensor`'s memory (-1 where torch cannot say)."""
    import torch

    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return -1
    return int(use_count(tensor.untyped_storage()._cdata))


class _NativeRing:
    """The compiled backend: a C++ thread fills ring slots; this side hands them out."""

    SLOTS = 8
    # On CPU one C++ call takes up to half the ring (the producer refills half at a time):
    # the call and the first tensor operations after the caller's own work are slow with
    # cold caches, so doing them once per group keeps most next_batch() calls trivial.
    GROUP = SLOTS // 2
    LENT_KEPT = 2 * GROUP

    def __init__(self, owner: ShardLoader) -> None:
        module = _native_module()
        assert module is not None
        self.B, self.T = owner.batch_size, owner.seq_len
        self.device = owner.device
        self.cuda = self.device.type == "cuda"
        self.module = module
        try:
            self.native = module.BatchLoader(
                [str(p) for p in owner.paths], owner.batch_size, owner.seq_len, owner.rank,
                owner.world_size, owner.shuffle, owner.seed & _MASK64, owner.vocab_size,
                self.SLOTS)
        except module.ShardError as exc:
            raise ShardFormatError(str(exc)) from None
        # CUDA: persistent pinned slots; CPU: each slot gets a fresh buffer when handed back,
        # so the tensors returned to the caller are never written again.
        self.slots = [self._new_buffer() for _ in range(self.SLOTS)]
        self.lent: list[torch.Tensor] = []
        self.idle_users = _storage_users(self.slots[0])
        for i, buf in enumerate(self.slots):
            self.native.set_buffer(i, buf, buf.data_ptr())
        self.pending: dict[int, torch.cuda.Event] = {}
        self.ready: collections.deque[tuple[torch.Tensor, torch.Tensor]] = collections.deque()
        self.native.start(0)
        self._finalizer = weakref.finalize(self, self.native.close)

    def _new_buffer(self) -> torch.Tensor:
        import torch

        return torch.empty((2, self.B, self.T), dtype=torch.int64, pin_memory=self.cuda)

    def _spare_buffer(self) -> torch.Tensor:
        # A buffer lent to the caller is reused only once no tensor (x, y or any view of
        # them) refers to its memory any more; fresh memory costs page faults on every batch.
        for i, buf in enumerate(self.lent):
            if self.idle_users > 0 and _storage_users(buf) == self.idle_users:
                return self.lent.pop(i)
        if len(self.lent) >= self.LENT_KEPT:
            self.lent.pop(0)
        return self._new_buffer()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cuda:
            if not self.ready:
                self._take_ready_batches()
            return self.ready.popleft()
        import torch

        self._release_finished_copies()
        slot = self._call(self.native.acquire)
        xy = self.slots[slot].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.pending[slot] = event
        self._release_finished_copies()
        return xy[0], xy[1]

    def _take_ready_batches(self) -> None:
        # Each taken slot gets a spare buffer at once, so the producer can refill it while
        # the caller still works through this group; one call hands all of them back.
        handbacks = []
        for slot in self._call(self.native.acquire_ready, self.GROUP):
            buf = self.slots[slot]
            x, y = buf.unbind(0)
            self.ready.append((x, y))
            fresh = self._spare_buffer()
            self.lent.append(buf)
            self.slots[slot] = fresh
            handbacks.append((slot, fresh, fresh.data_ptr()))
        self.native.release_many(handbacks)

    def _call(self, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except self.module.ShardError as exc:
            raise ShardFormatError(str(exc)) from None

    def _release_finished_copies(self) -> None:
        # A pinned slot goes back to the producer only once its copy to the GPU has finished.
        # The slot the next batch needs is waited for, so the ring always makes progress.
        needed = self.native.next_slot()
        for slot, event in list(self.pending.items()):
            if slot == needed:
                event.synchronize()
            elif not event.query():
                continue
            del self.pending[slot]
            self.native.release(slot, self.slots[slot], self.slots[slot].data_ptr())

    def seek(self, step: int) -> None:
        for event in self.pending.values():
            event.synchronize()
        self.pending.clear()
        self.ready.clear()
        self.native.seek(step)

    def close(self) -> None:
        for event in self.pending.values():
            event.synchronize()
        self.pending.clear()
        self.ready.clear()
        self._finalizer()

