"""Batch loader benchmark: throughput, resident memory and training-loop wait times.

Throughput (tokens/s) and peak RSS, for each batch size at T=1024, of
  raw     np.copyto of the same tokens from a warm memmap into int64 x/y buffers (the limit)
  raw-ring  the same into a ring of 8 x/y buffers, as many as the native loader cycles
  native  data.ShardLoader(backend="native")
  numpy   data.ShardLoader(backend="numpy")
  whole   each shard read whole into a torch int64 tensor, then sliced sequentially
  random  a fresh np.memmap per batch and B random offsets, stacked into int64 tensors
Then the training-loop view: the time spent in next_batch() when the consumer works
--work-ms per batch, over every shard (so over each shard boundary), for native, numpy and
whole, with the largest wait split into the batches around a shard change and the rest,
and the resident set (VmRSS) after the first 5% of the batches against its largest value
later in the epoch. Each measurement runs in a fresh process so its peak RSS (VmHWM) is its
own. The last lines check the native loader against the targets a training run feels:
throughput at least half of the raw copy, no wait above 2 ms at a shard boundary, resident
memory flat over the epoch (the loader's share of a training step: bench_train.py).

Example: python bench/bench_loader.py --shard-tokens=100000000 --num-shards=3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import data

THROUGHPUT_METHODS = ("raw", "raw-ring", "native", "numpy", "whole", "random")
TRAIN_METHODS = ("native", "numpy", "whole")


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it restarts at exec)."""
    return status_mb("VmHWM")


def write_bench_shards(directory: Path, num_shards: int, shard_tokens: int) -> list[Path]:
    paths = []
    rng = np.random.default_rng(0)
    block = rng.integers(0, data.VOCAB_SIZE, 1 << 20).astype(np.uint16)
    for i in range(num_shards):
        path = directory / data.shard_name("bench", "train", i)
        if not path.exists() or path.stat().st_size != data.HEADER_BYTES + 2 * shard_tokens:
            reps = -(-shard_tokens // block.size)
            data.write_shard(path, np.tile(np.roll(block, i), reps)[:shard_tokens])
        paths.append(path)
    return paths


# ------------------------------------------------------------------------ batch sources

class RawCopy:
    """The copy limit: B*T+1 consecutive tokens of a warm memmap into int64 x and y.

    With ring=1 the destination stays in the cache; ring=8 cycles through as many
    destination buffers as the native loader's ring, so each batch is written to memory.
    """

    def __init__(self, paths: list[Path], B: int, T: int, ring: int = 1) -> None:
        self.maps = [data.read_shard(p) for p in paths]
        scratch = np.empty(1 << 22, np.uint16)
        for tokens in self.maps:  # warm the page cache; the map keeps what it touches resident
            for start in range(0, len(tokens), scratch.size):
                chunk = tokens[start:start + scratch.size]
                np.copyto(scratch[:len(chunk)], chunk)
        self.B, self.T, self.shard, self.pos = B, T, 0, 0
        self.buffers = [np.empty((2, B, T), np.int64) for _ in range(ring)]
        self.turn = 0

    def next_batch(self) -> tuple[Any, Any]:
        n = self.B * self.T
        if self.pos + n + 1 > len(self.maps[self.shard]):
            self.shard, self.pos = (self.shard + 1) % len(self.maps), 0
        chunk = self.maps[self.shard][self.pos:self.pos + n + 1]
        xy = self.buffers[self.turn]
        self.turn = (self.turn + 1) % len(self.buffers)
        np.copyto(xy[0], chunk[:-1].reshape(self.B, self.T))
        np.copyto(xy[1], chunk[1:].reshape(self.B, self.T))
        self.pos += n
        return xy[0], xy[1]


class WholeShard:
    """Each shard read whole into an int64 tensor when reached, then sliced in order."""

    def __init__(self, paths: list[Path], B: int, T: int) -> None:
        self.paths, self.B, self.T, self.shard = paths, B, T, 0
        self.tokens = self._load(0)
        self.pos = 0

    def _load(self, i: int) -> torch.Tensor:
        return torch.tensor(np.array(data.read_shard(self.paths[i])).astype(np.int64))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.B * self.T
        if self.pos + n + 1 > len(self.tokens):
            self.shard = (self.shard + 1) % len(self.paths)
            del self.tokens
            self.tokens, self.pos = self._load(self.shard), 0
        buf = self.tokens[self.pos:self.pos + n + 1]
        self.pos += n
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)


class RandomOffsets:
    """A fresh memmap each batch and B random window starts, stacked into int64 tensors."""

    def __init__(self, paths: list[Path], B: int, T: int) -> None:
        self.path, self.B, self.T = paths[0], B, T
        self.ntok = (self.path.stat().st_size - data.HEADER_BYTES) // 2

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = np.memmap(self.path, dtype=np.uint16, mode="r", offset=data.HEADER_BYTES,
                           shape=(self.ntok,))
        ix = torch.randint(self.ntok - self.T, (self.B,))
        x = torch.stack([torch.from_numpy(tokens[i:i + self.T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + self.T].astype(np.int64))
                         for i in ix])
        return x, y


def make_source(method: str, paths: list[Path], B: int, T: int) -> Any:
    if method == "raw":
        return RawCopy(paths, B, T)
    if method == "raw-ring":
        return RawCopy(paths, B, T, ring=8)
    if method == "whole":
        return WholeShard(paths, B, T)
    if method == "random":
        return RandomOffsets(paths, B, T)
    return data.ShardLoader(paths, B, T, backend=method)


# ------------------------------------------------------------------------ measurements

def measure_throughput(method: str, paths: list[Path], B: int, T: int,
                       seconds: float) -> dict[str, float]:
    source = make_source(method, paths, B, T)
    source.next_batch()
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(8):
            source.next_batch()
        batches += 8
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": batches * B * T / elapsed, "peak_rss_mb": peak_rss_mb()}


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure_waits(method: str, paths: list[Path], B: int, T: int,
                  work_ms: float) -> dict[str, float]:
    source = make_source(method, paths, B, T)
    ntok = sum((p.stat().st_size - data.HEADER_BYTES) // 2 for p in paths)
    waits = []
    batch = None
    count = ntok // (B * T) + 2  # every shard once: each boundary, and the wrap
    rss_early, rss_later = float("nan"), 0.0
    for i in range(count):
        started = time.perf_counter()
        fresh = source.next_batch()
        waits.append(time.perf_counter() - started)
        # As in a training loop, the consumer holds its batch while it works and lets the
        # previous one go afterwards, outside next_batch() (freeing it is not loader time).
        batch = fresh
        spin(work_ms / 1000)
        if i == count // 20:
            rss_early = status_mb("VmRSS")
        elif i > count // 20 and i % 50 == 0:
            rss_later = max(rss_later, status_mb("VmRSS"))
    del batch
    us = np.array(waits) * 1e6
    near = boundary_batches(paths, B, T, len(us))
    elsewhere = np.ones(len(us), dtype=bool)
    elsewhere[near] = False
    return {"mean_us": float(us.mean()), "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99)), "max_us": float(us.max()),
            "max_boundary_us": float(us[near].max()),
            "max_elsewhere_us": float(us[elsewhere].max()), "over_2ms": int((us > 2000).sum()),
            "batches": len(us), "peak_rss_mb": peak_rss_mb(), "rss_early_mb": rss_early,
            "rss_growth_mb": rss_later - rss_early}


def boundary_batches(paths: list[Path], B: int, T: int, count: int) -> np.ndarray:
    """Indices of the batches from 2 before to 8 after each shard change (a ring's depth),
    where a loader that opens or reads a shard late would stall. The benchmark shards are
    all the same size, so the boundaries fall at the same batches in any shard order."""
    samples = [((p.stat().st_size - data.HEADER_BYTES) // 2 - 1) // T for p in paths]
    starts = np.cumsum(samples) // B
    near = {i for start in starts for i in range(start - 2, start + 9) if 0 <= i < count}
    return np.array(sorted(near), dtype=np.int64)


def run_worker(args: argparse.Namespace, paths: list[Path]) -> dict[str, Any]:
    kind, method = args.worker.split(":")
    if kind == "throughput":
        return measure_throughput(method, paths, args.batch_size, args.seq_len, args.seconds)
    return measure_waits(method, paths, args.batch_size, args.seq_len, args.work_ms)


def in_fresh_process(argv: list[str], worker: str, batch_size: int) -> dict[str, Any]:
    command = [sys.executable, __file__, *argv, f"--worker={worker}",
               f"--batch-size={batch_size}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{worker} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline_rss_mb() -> float:
    code = ("import data, torch, numpy\n"
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def print_throughput(rows: dict[tuple[str, int], dict[str, float]], batch_sizes: list[int],
                     base_rss: float) -> None:
    print(f"\nthroughput, T={1024}: tokens/s, ratio to raw copy, peak RSS "
          f"(imports alone: {base_rss:.0f} MB)")
    print(f"{'method':9} {'B':>4} {'Mtok/s':>9} {'x raw':>7} {'x raw-ring':>11} "
          f"{'peak RSS MB':>12}")
    for B in batch_sizes:
        raw = rows[("raw", B)]["tokens_per_s"]
        ring = rows[("raw-ring", B)]["tokens_per_s"]
        for method in THROUGHPUT_METHODS:
            r = rows[(method, B)]
            print(f"{method:9} {B:>4} {r['tokens_per_s'] / 1e6:>9.1f} "
                  f"{r['tokens_per_s'] / raw:>7.2f} {r['tokens_per_s'] / ring:>11.2f} "
                  f"{r['peak_rss_mb']:>12.0f}")


def print_waits(rows: dict[str, dict[str, float]], B: int, work_ms: float) -> None:
    print(f"\ntraining-loop view, B={B}: time in next_batch() with {work_ms} ms of work "
          "per batch, every shard once")
    print(f"{'method':8} {'mean us':>9} {'p50 us':>9} {'p99 us':>9} {'max us':>11} "
          f"{'at bound.':>11} {'elsewhere':>11} {'>2ms':>6} {'batches':>8} {'peak RSS MB':>12} "
          f"{'RSS growth MB':>14}")
    for method in TRAIN_METHODS:
        r = rows[method]
        print(f"{method:8} {r['mean_us']:>9.1f} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} "
              f"{r['max_us']:>11.0f} {r['max_boundary_us']:>11.0f} {r['max_elsewhere_us']:>11.0f} "
              f"{r['over_2ms']:>6} {r['batches']:>8} {r['peak_rss_mb']:>12.0f} "
              f"{r['rss_growth_mb']:>14.1f}")


def print_targets(throughput: dict[tuple[str, int], dict[str, float]],
                  waits: dict[str, dict[str, float]], batch_sizes: list[int]) -> None:
    """The native loader against the targets a training run feels."""
    ratios = [throughput[("native", B)]["tokens_per_s"] / throughput[("raw", B)]["tokens_per_s"]
              for B in batch_sizes]
    native = waits["native"]
    checks = [
        ("throughput >= 0.5x raw copy", ", ".join(f"{r:.2f}x" for r in ratios),
         min(ratios) >= 0.5),
        ("no wait > 2 ms at a shard boundary", f"max {native['max_boundary_us'] / 1000:.2f} ms",
         native["max_boundary_us"] <= 2000),
        ("resident memory flat over the epoch (< 64 MB growth)",
         f"{native['rss_growth_mb']:+.1f} MB after {native['rss_early_mb']:.0f} MB",
         native["rss_growth_mb"] < 64),
    ]
    print("\nnative loader targets:")
    for name, figure, met in checks:
        print(f"  {name:55} {figure:32} {'met' if met else 'MISSED'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder for the benchmark shards (default: a temporary folder)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000,
                        help="tokens per benchmark shard")
    parser.add_argument("--num-shards", type=int, default=3, help="number of shards")
    parser.add_argument("--seq-len", type=int, default=1024, help="T")
    parser.add_argument("--batch-sizes", default="16,64", help="comma-separated B values")
    parser.add_argument("--train-batch-size", type=int, default=64,
                        help="B for the training-loop view")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="duration of each throughput measurement")
    parser.add_argument("--work-ms", type=float, default=1.0,
                        help="consumer work per batch in the training-loop view")
    parser.add_argument("--worker", default=None,
                        help="internal: run one measurement (KIND:METHOD) here, print JSON")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="internal: B of the --worker measurement")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        directory = args.data_dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        paths = write_bench_shards(directory, args.num_shards, args.shard_tokens)
        if args.worker:
            print(json.dumps(run_worker(args, paths)))
            return 0
        child_argv = [a for a in argv if not a.startswith("--data-dir")]
        child_argv.append(f"--data-dir={directory}")
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        throughput = {(m, B): in_fresh_process(child_argv, f"throughput:{m}", B)
                      for B in batch_sizes for m in THROUGHPUT_METHODS}
        waits = {m: in_fresh_process(child_argv, f"train:{m}", args.train_batch_size)
                 for m in TRAIN_METHODS}
        print(f"{args.num_shards} shards x {args.shard_tokens:,} tokens, T={args.seq_len}, "
              f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at the end")
        print_throughput(throughput, batch_sizes, baseline_rss_mb())
        print_waits(waits, args.train_batch_size, args.work_ms)
        print_targets(throughput, waits, batch_sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
