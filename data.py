"""GPT-2 tokenizer, the token-shard format, and the batch loader.

Shard format (llm.c's): a 1024-byte header of 256 little-endian int32
`[20240520, 1, ntok, 0, ...]`, then `ntok` little-endian uint16 tokens; the file size is
exactly `1024 + 2 * ntok`. One-dimensional uint16 `.npy` files (build-nanogpt's shards)
are read as well. Shards are always memory-mapped, never read whole.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import tiktoken

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


def tokenizer_sha256() -> str:
    return GPT2_RANKS_SHA256


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
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(shard_header(array.size).tobytes())
            f.write(array.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


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
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ShardFormatError(f"{path}: not a readable .npy file ({exc})") from exc
    if array.dtype != np.dtype("<u2") and array.dtype != np.dtype("=u2"):
        raise ShardFormatError(f"{path}: dtype {array.dtype}, expected uint16 tokens")
    if array.ndim != 1:
        raise ShardFormatError(f"{path}: shape {array.shape}, expected a 1-D token array")
    return array
