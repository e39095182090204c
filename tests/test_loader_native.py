"""The compiled backend against the NumPy backend, and its thread's robustness."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import data

_loader = data.NATIVE_MODULE
pytestmark = pytest.mark.skipif(_loader is None,
                                reason="the _loader extension is not built (pip install -e .)")


def write_shards(directory: Path, lengths: list[int], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, n in enumerate(lengths):
        path = directory / f"toy_train_{i:06d}.bin"
        data.write_shard(path, rng.integers(0, 50257, n))
        paths.append(path)
    return paths


def test_permutation_matches_python_bit_for_bit():
    assert _loader is not None
    for value in (0, 1, 2**63 + 5, 2**64 - 1):
        assert _loader.mix64(value) == int(data._mix64(np.array([value], dtype=np.uint64))[0])
    for seed, epoch, stream in ((0, 0, 0), (7, 3, 12), (2**64 - 1, 10**9, 5)):
        key = data.order_key(seed, epoch, stream)
        assert _loader.order_key(seed, epoch, stream) == key
        for n in (0, 1, 5, 4097):
            assert _loader.seeded_permutation(n, key) == data.seeded_permutation(n, key).tolist()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_native_and_numpy_batches_are_byte_identical(tmp_path, world_size, shuffle):
    paths = write_shards(tmp_path, [3000, 1111, 70, 2500, 4000, 999])
    B, T = 3, 64
    for rank in range(world_size):
        kwargs = dict(rank=rank, world_size=world_size, shuffle=shuffle, seed=123)
        with data.ShardLoader(paths, B, T, backend="native", **kwargs) as native, \
                data.ShardLoader(paths, B, T, backend="numpy", **kwargs) as fallback:
            # ~4 epochs: many shard boundaries and several epoch boundaries.
            for _ in range(4 * native.samples_per_epoch // (B * world_size) + 3):
                nx, ny = native.next_batch()
                fx, fy = fallback.next_batch()
                assert nx.dtype == torch.int64 and nx.shape == (B, T)
                assert nx.numpy().tobytes() == fx.numpy().tobytes()
                assert ny.numpy().tobytes() == fy.numpy().tobytes()


@pytest.mark.parametrize("stop", [0, 5, 37, 150])
def test_state_moves_between_backends(tmp_path, stop):
    paths = write_shards(tmp_path, [3000, 2000, 2600])
    kwargs: dict[str, Any] = dict(rank=1, world_size=2, shuffle=True, seed=9)
    with data.ShardLoader(paths, 4, 32, backend="numpy", **kwargs) as fallback:
        for _ in range(stop):
            fallback.next_batch()
        state = fallback.state_dict()
        expected = [fallback.next_batch() for _ in range(40)]
    with data.ShardLoader(paths, 4, 32, backend="native", **kwargs) as native:
        for _ in range(7):
            native.next_batch()
        native.load_state_dict(state)
        for ex, ey in expected:
            x, y = native.next_batch()
            assert torch.equal(x, ex) and torch.equal(y, ey)


def test_close_during_prefetch_returns_promptly(tmp_path):
    paths = write_shards(tmp_path, [200_000])
    for _ in range(20):
        loader = data.ShardLoader(paths, 64, 1024, shuffle=True, backend="native")
        loader.next_batch()  # the producer is now filling the rest of the ring
        started = time.perf_counter()
        loader.close()
        assert time.perf_counter() - started < 1.0
        with pytest.raises(RuntimeError, match="after close"):
            loader.next_batch()
        loader.close()  # twice is fine


def test_many_loaders_created_and_dropped(tmp_path):
    paths = write_shards(tmp_path, [50_000, 30_000])
    for i in range(200):
        loader = data.ShardLoader(paths, 8, 128, shuffle=bool(i % 2), seed=i, backend="native")
        for _ in range(i % 3):
            loader.next_batch()
        if i % 4 == 0:
            loader.close()
        del loader  # the rest are dropped mid-prefetch and collected
    gc.collect()
    open_fds = len(os.listdir("/proc/self/fd"))
    assert open_fds < 100  # every shard file of every loader was closed


def test_train_and_val_loaders_run_at_once(tmp_path):
    paths = write_shards(tmp_path, [40_000, 40_000, 40_000])
    train = data.ShardLoader(paths[:2], 4, 64, shuffle=True, backend="native")
    val = data.ShardLoader(paths[2:], 4, 64, backend="native")
    train_ref = data.ShardLoader(paths[:2], 4, 64, shuffle=True, backend="numpy")
    val_ref = data.ShardLoader(paths[2:], 4, 64, backend="numpy")
    for step in range(200):
        if step % 50 == 0:
            val.reset()
            val_ref.reset()
        assert torch.equal(train.next_batch()[0], train_ref.next_batch()[0])
        assert torch.equal(val.next_batch()[1], val_ref.next_batch()[1])
    for loader in (train, val, train_ref, val_ref):
        loader.close()


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


def test_interpreter_exit_with_open_loaders_does_not_hang(tmp_path):
    paths = write_shards(tmp_path, [300_000])
    result = run_python(f"""
        import data
        loaders = [data.ShardLoader({[str(p) for p in paths]!r}, 64, 1024, shuffle=True,
                                    backend="native") for _ in range(4)]
        for loader in loaders:
            loader.next_batch()
        kept_cycle = [loaders]
        kept_cycle.append(kept_cycle)
        print("done")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"


def test_auto_says_once_which_backend_it_chose(tmp_path):
    paths = write_shards(tmp_path, [5000])
    result = run_python(f"""
        import data
        for _ in range(3):
            data.ShardLoader({[str(p) for p in paths]!r}, 2, 16).close()
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("using the native backend") == 1


def peak_rss_mb(paths: list[Path], backend: str) -> float:
    """Peak RSS of a fresh process that reads every sample of the shards, shuffled."""
    result = run_python(f"""
        import data
        loader = data.ShardLoader({[str(p) for p in paths]!r}, 64, 1024, shuffle=True,
                                  backend={backend!r})
        for _ in range(loader.samples_per_epoch // 64 + 1):
            loader.next_batch()
        loader.close()
        # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork and exec.
        status = open("/proc/self/status").read().split("VmHWM:")[1]
        print(int(status.split()[0]) / 1024)
    """, timeout=300)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip())


@pytest.fixture(scope="module")
def small_and_large_shard(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    directory = tmp_path_factory.mktemp("rss")
    tokens = np.arange(100_000_000, dtype=np.uint32) % 50257
    small, large = directory / "small_train_000000.bin", directory / "large_train_000000.bin"
    data.write_shard(small, tokens[:10_000_000])
    data.write_shard(large, tokens)
    return [small], [large]


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_rss_is_flat_in_shard_size(small_and_large_shard, backend):
    small, large = small_and_large_shard
    grown = peak_rss_mb(large, backend) - peak_rss_mb(small, backend)
    assert grown < 64, f"peak RSS grew {grown:.0f} MB from a 10M- to a 100M-token shard"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_match_cpu_and_slots_wait_for_their_copy(tmp_path):
    paths = write_shards(tmp_path, [100_000, 77_777])
    kwargs: dict[str, Any] = dict(world_size=2, rank=1, shuffle=True, seed=4)
    with data.ShardLoader(paths, 16, 256, device="cuda", backend="native", **kwargs) as gpu, \
            data.ShardLoader(paths, 16, 256, backend="numpy", **kwargs) as cpu:
        assert isinstance(gpu._source, data._NativeBackend)
        assert all(buf.is_pinned() for buf in gpu._source.slots)
        kept = []
        for step in range(300):
            x, y = gpu.next_batch()
            assert x.is_cuda and x.dtype == torch.int64 and x.shape == (16, 256)
            if step % 10 == 0:
                torch.cuda._sleep(1_000_000)  # a slow stream: slots must wait for the copy
            kept.append((x, y))
            if len(kept) > 8:
                ox, oy = kept.pop(0)
                cx, cy = cpu.next_batch()
                assert torch.equal(ox.cpu(), cx) and torch.equal(oy.cpu(), cy)


def test_views_the_caller_keeps_stay_intact(tmp_path):
    paths = write_shards(tmp_path, [60_000])
    with data.ShardLoader(paths, 4, 32, backend="native") as native, \
            data.ShardLoader(paths, 4, 32, backend="numpy") as fallback:
        kept = []
        for step in range(100):  # over 4 epochs: every ring slot is refilled many times
            x, y = native.next_batch()
            fx, fy = fallback.next_batch()
            if step % 3 == 0:
                kept.append((x[1:, 5:], fx[1:, 5:].clone()))  # only a view of x survives
            del x, y
        for view, expected in kept:
            assert torch.equal(view, expected)


def layout(path: Path) -> tuple[str, int, int]:
    """(path, byte offset of the first token, token count): what BatchLoader takes per shard."""
    return str(path), data.HEADER_BYTES, (path.stat().st_size - data.HEADER_BYTES) // 2


def make_batch_loader(paths: list[Path], B: int, T: int, slots: int
                      ) -> tuple[Any, list[torch.Tensor]]:
    assert _loader is not None
    buffers = [torch.zeros((2, B, T), dtype=torch.int64) for _ in range(slots)]
    shards = [layout(p) for p in paths]
    native = _loader.BatchLoader(shards, B, T, 0, 1, False, 0, 50257,
                                 [b.numpy() for b in buffers])
    return native, buffers


def test_ring_hands_out_slots_in_step_order_and_takes_them_back_in_order(tmp_path):
    paths = write_shards(tmp_path, [20_000])
    B, T = 2, 16
    native, buffers = make_batch_loader(paths, B, T, slots=2)
    tokens = data.read_shard(paths[0]).astype(np.int64)
    try:
        for step in range(5):  # the ring is refilled only as slots come back
            slot = native.acquire()
            assert slot == step % 2
            first_sample = torch.from_numpy(tokens[step * B * T:step * B * T + T + 1])
            assert torch.equal(buffers[slot][0, 0], first_sample[:-1])
            assert torch.equal(buffers[slot][1, 0], first_sample[1:])
            native.release(slot)
        assert [native.acquire(), native.acquire()] == [1, 0]
        with pytest.raises(RuntimeError, match="not the oldest"):
            native.release(0)
        native.release(1)
        native.release(0)
        with pytest.raises(RuntimeError, match="not the oldest"):
            native.release(1)  # nothing is taken
        native.seek(3)
        assert native.acquire() == 1
        kept = buffers[1].clone()
        fresh = torch.full((2, B, T), -1, dtype=torch.int64)
        native.release(1, fresh.numpy())  # from now on slot 1 fills `fresh`
        assert native.acquire() == 0
        native.release(0)
        assert native.acquire() == 1
        step5 = torch.from_numpy(tokens[5 * B * T:5 * B * T + T + 1])
        assert torch.equal(fresh[0, 0], step5[:-1])
        assert torch.equal(buffers[1], kept)  # the old buffer is the caller's, untouched
    finally:
        native.close()


def test_ring_buffers_must_be_writable_and_the_right_size(tmp_path):
    paths = write_shards(tmp_path, [20_000])
    assert _loader is not None
    shards = [layout(p) for p in paths]
    good = np.zeros((2, 2, 16), dtype=np.int64)
    read_only = np.zeros((2, 2, 16), dtype=np.int64)
    read_only.flags.writeable = False
    for bad in (np.zeros((2, 2, 15), dtype=np.int64), read_only, good[:, :, ::2]):
        with pytest.raises((ValueError, BufferError)):
            _loader.BatchLoader(shards, 2, 16, 0, 1, False, 0, 50257, [good, bad])


def test_a_shard_shorter_than_its_layout_says_is_refused(tmp_path):
    paths = write_shards(tmp_path, [1000])
    assert _loader is not None
    path, offset, ntok = layout(paths[0])
    buffers = [np.zeros((2, 2, 16), dtype=np.int64) for _ in range(2)]
    with pytest.raises(ValueError, match="toy_train_000000.bin"):
        _loader.BatchLoader([(path, offset, ntok + 1)], 2, 16, 0, 1, False, 0, 50257, buffers)
