"""Throughput and memory of prepare_dataset.py on the stdlib corpus.

    python bench/bench_tokenize.py [--repeats=3] [--num-proc=N] [--rss-scale=4]

Three ways to turn the same documents (the running Python's standard library, each .py
file one document) into GPT-2 tokens, timed alternately `--repeats` times (median shown):

- raw: tiktoken's encode_ordinary_batch on documents already in memory, one thread per
  core: the ceiling, with no file reading and no output;
- pool/doc: a multiprocessing.Pool that encodes one document per task (imap, chunksize 1)
  and sends the token list back, a common way to parallelise this;
- prepare: `prepare_dataset.main(["--dataset=stdlib", ...])` end to end: finding and
  reading the files, tokenizing, splitting train/val and writing the shards.

Ratios are against raw, for wall-clock throughput and for CPU time (all processes).
Then peak RSS of a prepare run on the corpus repeated once and `--rss-scale` times (fresh
subprocesses, default shard size): the difference must stay under 64 MB, since memory
must not grow with the corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken

import data
import prepare_dataset

RSS_LIMIT_MB = 64.0


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (user + system)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(method: Callable[[], tuple[int, float]]) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds) of one run."""
    cpu = cpu_seconds()
    tokens, seconds = method()
    return tokens, seconds, cpu_seconds() - cpu


def stdlib_documents() -> list[str]:
    skipped: list[str] = []
    files = prepare_dataset.stdlib_files()
    return list(prepare_dataset.file_documents(files, "text", False, skipped))


def time_raw(docs: list[str], threads: int) -> tuple[int, float]:
    enc = data.get_tokenizer()
    start = time.perf_counter()
    encoded = enc.encode_ordinary_batch(docs, num_threads=threads)
    seconds = time.perf_counter() - start
    return sum(len(ids) for ids in encoded), seconds


def _encode_one(text: str) -> list[int]:
    return list(data.get_tokenizer().encode_ordinary(text))


def time_pool_per_document(docs: list[str], procs: int) -> tuple[int, float]:
    start = time.perf_counter()
    with multiprocessing.Pool(procs) as pool:
        total = sum(len(ids) for ids in pool.imap(_encode_one, docs, chunksize=1))
    return total, time.perf_counter() - start


def time_prepare(root: Path, procs: int) -> tuple[int, float]:
    argv = ["--dataset=stdlib", f"--data-root={root}", f"--num-proc={procs}", "--force",
            "--no-progress"]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = prepare_dataset.main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"prepare_dataset.main({argv}) exited {code}")
    manifest = json.loads((root / "stdlib" / "manifest.json").read_text())
    splits = manifest["splits"].values()
    # Without the <|endoftext|> per document, to count what raw counts.
    return sum(s["tokens"] - s["documents"] for s in splits), seconds


def rss_child(scale: int, root: Path) -> None:
    """Run the real pipeline on the stdlib files repeated `scale` times; print peak RSS."""
    files = prepare_dataset.stdlib_files() * scale
    args = prepare_dataset.build_parser().parse_args(["--no-progress"])
    source = prepare_dataset.local_source(f"stdlib-x{scale}", files, {"source": "bench"}, args)
    out_dir = root / source.name
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its "wrote ..." line
        prepare_dataset.write_dataset(source, out_dir, args, {"bench": scale})
    manifest = json.loads((out_dir / prepare_dataset.MANIFEST_NAME).read_text())
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    print(json.dumps({"tokens": tokens, "peak_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM): ru_maxrss would carry the parent's peak over
    fork and exec, hiding any growth."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure_rss(scale: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, __file__, f"--rss-child={scale}",
                               f"--rss-root={tmp}"], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def medians(results: list[tuple[int, float, float]]) -> tuple[int, float, float]:
    """tokens, median wall seconds, median CPU seconds."""
    return (results[0][0], statistics.median(r[1] for r in results),
            statistics.median(r[2] for r in results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each method")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1,
                   help="threads / processes for every method (default: all cores)")
    p.add_argument("--rss-scale", type=int, default=4,
                   help="corpus multiple for the memory check (0 skips it)")
    p.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rss-root", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.rss_root)
        return 0

    docs = stdlib_documents()
    print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}), load average "
          f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}, tiktoken "
          f"{tiktoken.__version__}; {len(docs)} stdlib documents, "
          f"{sum(map(len, docs)) / 1e6:.1f}M characters; num_proc={args.num_proc}")
    methods: dict[str, Callable[[], tuple[int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        methods["raw encode_ordinary_batch"] = lambda: time_raw(docs, args.num_proc)
        methods["pool, one document per task"] = lambda: time_pool_per_document(
            docs, args.num_proc)
        methods["prepare_dataset end to end"] = lambda: time_prepare(Path(tmp), args.num_proc)
        results: dict[str, list[tuple[int, float, float]]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, method in methods.items():
                results[name].append(timed(method))

    raw_tokens, raw_wall, raw_cpu = medians(results["raw encode_ordinary_batch"])
    print(f"\n{'method':<30} {'tokens':>11} {'wall s':>7} {'Mtok/s':>7} {'vs raw':>7} "
          f"{'CPU s':>7} {'Mtok/CPU-s':>10} {'vs raw':>7}")
    for name, runs in results.items():
        tokens, wall, cpu = medians(runs)
        if tokens != raw_tokens:
            raise SystemExit(f"{name}: {tokens} tokens, raw encoding gave {raw_tokens}")
        print(f"{name:<30} {tokens:>11} {wall:>7.2f} {tokens / wall / 1e6:>7.2f} "
              f"{raw_wall / wall:>7.1%} {cpu:>7.2f} {tokens / cpu / 1e6:>10.2f} "
              f"{raw_cpu / cpu:>7.1%}")
    print("(wall: throughput on this machine as loaded; CPU: work per token, which other "
          "load on the machine disturbs less)")

    if args.rss_scale:
        small, large = measure_rss(1), measure_rss(args.rss_scale)
        print(f"\n{'peak RSS (MB)':<30} {'x1':>9} {'x' + str(args.rss_scale):>9} {'diff':>7}")
        worst = large["peak_mb"] - small["peak_mb"]
        print(f"{'prepare_dataset (threads)':<30} {small['peak_mb']:>9.1f} "
              f"{large['peak_mb']:>9.1f} {worst:>7.1f}")
        print(f"{'tokens':<30} {small['tokens']:>9} {large['tokens']:>9}")
        verdict = "ok" if worst < RSS_LIMIT_MB else "FAIL"
        print(f"RSS growth {worst:.1f} MB (limit {RSS_LIMIT_MB:.0f} MB): {verdict}")
        if worst >= RSS_LIMIT_MB:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
