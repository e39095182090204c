"""Shard I/O in data.py against byte layouts built by hand with struct (the llm.c format)
and numpy.save (the .npy format)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

import data

MAGIC, VERSION = 20240520, 1


def llmc_bytes(tokens: list[int], magic: int = MAGIC, version: int = VERSION,
               ntok: int | None = None) -> bytes:
    header = [magic, version, len(tokens) if ntok is None else ntok] + [0] * 253
    return struct.pack("<256i", *header) + struct.pack(f"<{len(tokens)}H", *tokens)


def test_write_shard_matches_hand_built_llmc_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=1000).tolist() + [65535, 0]
    path = tmp_path / "x_train_000000.bin"
    data.write_shard(path, np.array(tokens, dtype=np.int64))
    assert path.read_bytes() == llmc_bytes(tokens)
    data.write_shard(path, tokens)  # a plain list too, replacing the file
    assert path.read_bytes() == llmc_bytes(tokens)


def test_written_shard_has_umask_mode_and_no_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "x_train_000000.bin"
    data.write_shard(path, [1, 2, 3])
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_read_shard_reads_hand_built_file_memory_mapped(tmp_path: Path) -> None:
    tokens = [50256, 10, 20, 30, 65535]
    path = tmp_path / "llmc_val_000000.bin"
    path.write_bytes(llmc_bytes(tokens))
    array = data.read_shard(path)
    assert isinstance(array, np.memmap)
    assert array.dtype == np.uint16
    assert array.tolist() == tokens


def test_empty_shard_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "e_train_000000.bin"
    data.write_shard(path, np.zeros(0, dtype=np.uint16))
    assert path.read_bytes() == llmc_bytes([])
    assert data.read_shard(path).size == 0


def test_write_shard_rejects_bad_tokens(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint16"):
        data.write_shard(tmp_path / "a.bin", [1, 65536])
    with pytest.raises(ValueError, match="uint16"):
        data.write_shard(tmp_path / "a.bin", [-1, 2])
    with pytest.raises(ValueError, match="1-D"):
        data.write_shard(tmp_path / "a.bin", np.zeros((2, 2), dtype=np.uint16))
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_old_shard_and_no_temp_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x_train_000000.bin"
    data.write_shard(path, [7, 8, 9])
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        data.write_shard(path, list(range(5000)))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def shard_error(path: Path, expected: list[str]) -> str:
    """read_shard's error for `path`: it must name the file and contain each expected piece."""
    with pytest.raises(data.ShardFormatError) as info:
        data.read_shard(path)
    message = str(info.value)
    assert str(path) in message
    for piece in expected:
        assert piece in message
    return message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (llmc_bytes([1, 2, 3], magic=20240801), ["magic number 20240801", "expected 20240520"]),
        (llmc_bytes([1, 2, 3], version=2), ["format version 2", "expected 1"]),
        (llmc_bytes([1, 2, 3])[:-2], ["file size 1028 bytes", "expected 1030", "3 tokens"]),
        (llmc_bytes([1, 2, 3]) + b"\0\0", ["file size 1032 bytes", "expected 1030"]),
        (llmc_bytes([1, 2, 3], ntok=-1), ["expected 1022", "-1 tokens"]),
        (llmc_bytes([])[:1000], ["1000 bytes", "1024-byte"]),
        (b"", ["0 bytes", "1024-byte"]),
    ],
    ids=["magic", "version", "truncated", "trailing-bytes", "negative-count", "short-header",
         "empty-file"],
)
def test_bin_header_corruption_errors(tmp_path: Path, content: bytes,
                                      expected: list[str]) -> None:
    path = tmp_path / "bad_train_000000.bin"
    path.write_bytes(content)
    message = shard_error(path, expected)
    first, *hints = message.split("\n")  # one line naming the file, then at most a hint
    assert all(piece in first for piece in expected)
    assert len(hints) <= 1 and all(h.startswith("hint: ") for h in hints)


def test_missing_shard_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope_train_000000.bin"
    with pytest.raises(FileNotFoundError, match="nope_train_000000.bin"):
        data.read_shard(path)


def test_npy_shard_reads_memory_mapped(tmp_path: Path) -> None:
    tokens = np.random.default_rng(1).integers(0, 50257, size=777).astype(np.uint16)
    path = tmp_path / "edu_train_000001.npy"
    np.save(path, tokens)
    array = data.read_shard(path)
    assert isinstance(array, np.memmap)
    np.testing.assert_array_equal(array, tokens)


def save_truncated(path: Path, cut: int) -> None:
    np.save(path, np.arange(400, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-cut])


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: np.save(p, np.arange(10, dtype=np.int32)), ["dtype int32", "uint16"]),
        (lambda p: np.save(p, np.arange(10, dtype=">u2")), ["dtype >u2", "uint16"]),
        (lambda p: np.save(p, np.zeros((2, 5), dtype=np.uint16)), ["shape (2, 5)", "1-D"]),
        (lambda p: p.write_bytes(b"not numpy at all"), ["not a NumPy token shard", "NUMPY"]),
        (lambda p: p.write_bytes(b""), ["NUMPY"]),
        (lambda p: save_truncated(p, 10), ["not a readable .npy"]),
        (lambda p: save_truncated(p, 800 + 128 - 40), ["not a readable .npy"]),
    ],
    ids=["int32", "big-endian", "2-d", "garbage", "empty", "truncated-data", "truncated-header"],
)
def test_npy_corruption_errors(tmp_path: Path, make: object, expected: list[str]) -> None:
    path = tmp_path / "bad_val_000000.npy"
    make(path)  # type: ignore[operator]
    shard_error(path, expected)


def test_find_shards_picks_split_and_formats_in_order(tmp_path: Path) -> None:
    for name in ["d_train_000001.bin", "d_train_000000.bin", "e_train_000000.npy",
                 "d_val_000000.bin", "d_train_notes.txt", ".d_train_000002.bin.abc.tmp"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in data.find_shards(tmp_path, "train")] == [
        "d_train_000000.bin", "d_train_000001.bin", "e_train_000000.npy"]
    assert [p.name for p in data.find_shards(str(tmp_path), "val")] == ["d_val_000000.bin"]
