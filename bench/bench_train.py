"""Training-step throughput: tokens/s and MFU with the real loader vs one resident batch.

The baseline reuses one batch already on the device, so it measures the model step alone;
the difference to the run that pulls every batch from data.ShardLoader is the loader's share
of step time (target: under 1%). Shards of random tokens are written to a temp folder, so no
prepared data is needed.

    python bench/bench_train.py                          # CPU: gpt2-tiny, B=4, T=128
    python bench/bench_train.py --device=cuda --model=gpt2 --batch-size=16 --seq-len=1024 \
        --compile --dtype=bf16 --steps=50
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
import runtime
import train_gpt2
from model import GPT

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Timing:
    mode: str
    step_s: list[float]  # one entry per timed step
    wait_s: list[float]  # time spent inside next_batch() per timed step

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_s)

    @property
    def median_wait(self) -> float:
        return statistics.median(self.wait_s)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    p.add_argument("--model", default=None,
                   help="preset (default: gpt2 on a GPU, gpt2-mini on CPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="micro-batch (default: 16 on a GPU, 4 on CPU)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sample (default: 1024 on a GPU, 128 on CPU)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=None,
                   help="timed optimizer steps per mode (default: 20 on a GPU, 6 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (compilation, allocator; default 5 GPU, 1 CPU)")
    p.add_argument("--dtype", default="auto", choices=runtime.DTYPE_CHOICES)
    p.add_argument("--compile", action="store_true", help="torch.compile the training model")
    p.add_argument("--loader-backend", default="auto", choices=("auto", "native", "numpy"))
    return p.parse_args(argv)


def fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    gpu = device.type == "cuda"
    defaults = dict(model="gpt2" if gpu else "gpt2-tiny", batch_size=16 if gpu else 4,
                    seq_len=1024 if gpu else 128, steps=20 if gpu else 6,
                    warmup=5 if gpu else 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def write_random_shards(directory: Path, tokens_needed: int, seed: int = 0) -> list[Path]:
    """Two train shards of random GPT-2 token ids, enough for every step of the bench."""
    rng = np.random.default_rng(seed)
    per_shard = tokens_needed // 2 + 1
    paths = []
    for i in range(2):
        path = directory / data.shard_name("bench", "train", i)
        data.write_shard(path, rng.integers(0, data.VOCAB_SIZE, per_shard, dtype=np.int64))
        paths.append(path)
    return paths


def timed_step(step: Callable[[Callable[[], Batch]], None], next_batch: Callable[[], Batch],
               device: torch.device) -> tuple[float, float]:
    """(seconds for one optimizer step, seconds of it spent inside next_batch)."""
    wait = 0.0

    def timed_next_batch() -> Batch:
        nonlocal wait
        t = time.perf_counter()
        batch = next_batch()
        wait += time.perf_counter() - t
        return batch

    synchronize(device)
    t0 = time.perf_counter()
    step(timed_next_batch)
    synchronize(device)
    return time.perf_counter() - t0, wait


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = runtime.resolve_device(args.device)
        precision = runtime.resolve_precision(device, args.dtype)
        fill_defaults(args, device)
        config = train_gpt2.TrainConfig(model=args.model, batch_size=args.batch_size,
                                        seq_len=args.seq_len, device=args.device,
                                        dtype=args.dtype, compile=args.compile)
        gpt_config = train_gpt2.model_config(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.seq_len > gpt_config.block_size:
        print(f"error: --seq-len={args.seq_len} exceeds block size {gpt_config.block_size} of "
              f"{args.model}", file=sys.stderr)
        return 2
    torch.manual_seed(1337)
    if device.type == "cuda":
        runtime.enable_tf32()

    model = GPT(gpt_config).to(device)
    optimizer = train_gpt2.build_optimizer(model, config, device)
    scaler = runtime.make_grad_scaler(precision, device)
    train_model: torch.nn.Module = torch.compile(model) if args.compile else model  # type: ignore[assignment]

    def step(next_batch: Callable[[], Batch]) -> None:
        train_gpt2.train_step(train_model, optimizer, scaler, next_batch, args.grad_accum,
                              precision, device, lr=config.max_lr, grad_clip=config.grad_clip)

    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    total_steps = args.warmup + 2 * args.steps + 1
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        files = write_random_shards(Path(tmp), total_steps * tokens_per_step + args.seq_len + 1)
        with data.ShardLoader(files, args.batch_size, args.seq_len, device=device,
                              backend=args.loader_backend, vocab_size=gpt_config.vocab_size
                              ) as loader:
            resident = loader.next_batch()
            resident = (resident[0].clone(), resident[1].clone())
            for _ in range(args.warmup):
                step(loader.next_batch)
            runs = {"resident batch": Timing("resident batch", [], []),
                    "ShardLoader": Timing("ShardLoader", [], [])}
            sources = {"resident batch": lambda: resident, "ShardLoader": loader.next_batch}
            # Alternating step by step (ABBA, so neither mode always goes first) keeps clock
            # drift and neighbours' load out of the ratio.
            for i in range(args.steps):
                order = list(sources.items())
                for mode, source in order if i % 2 == 0 else reversed(order):
                    seconds, wait = timed_step(step, source, device)
                    runs[mode].step_s.append(seconds)
                    runs[mode].wait_s.append(wait)
            backend = loader.backend

    report(args, device, precision, model, tokens_per_step, backend, runs)
    return 0


def report(args: argparse.Namespace, device: torch.device, precision: runtime.Precision,
           model: GPT, tokens_per_step: int, backend: str, runs: dict[str, Timing]) -> None:
    peak = runtime.gpu_peak_flops(device)
    flops_per_token = model.flops_per_token(args.seq_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {device} ({name or platform.machine()}), torch {torch.__version__}, "
          f"{precision.name}, compile={args.compile}, threads={torch.get_num_threads()}")
    print(f"model: {args.model} ({model.num_params() / 1e6:.1f}M params), B={args.batch_size} "
          f"T={args.seq_len} grad_accum={args.grad_accum}, {tokens_per_step} tokens/step, "
          f"loader backend {backend}, {args.steps} timed steps per mode, medians")
    print(f"{'mode':<16}{'ms/step':>10}{'tok/s':>14}{'MFU':>8}{'in next_batch':>16}")
    for timing in runs.values():
        tok_s = tokens_per_step / timing.median_step
        mfu = f"{100 * flops_per_token * tok_s / peak:6.1f}%" if peak else "     n/a"
        print(f"{timing.mode:<16}{1000 * timing.median_step:10.2f}{tok_s:14,.0f}{mfu:>8}"
              f"{1000 * timing.median_wait:13.3f} ms")
    base, real = runs["resident batch"], runs["ShardLoader"]
    ratio = real.median_step / base.median_step
    print(f"step time ShardLoader / resident: {ratio:.4f} ({100 * (ratio - 1):+.2f}%)")
    print(f"loader share of step time (inside next_batch): "
          f"{100 * real.median_wait / real.median_step:.3f}%")


if __name__ == "__main__":
    sys.exit(main())
