"""Training-step throughput: tokens/s, MFU and peak memory of three modes, step by step.

- resident batch: the model's own loss on one batch already on the device: the model step.
- full logits: the same step with the plain loss, F.cross_entropy over the full fp32
  (B*T, vocab) logits: the baseline of model.linear_cross_entropy's chunked loss.
- ShardLoader: the model's loss on batches pulled from data.ShardLoader; its difference to
  the resident batch is the loader's share of step time (target: under 1%).

Shards of random tokens are written to a temp folder, so no prepared data is needed.

    python bench/bench_train.py                          # CPU: gpt2-tiny, B=4, T=128
    python bench/bench_train.py --device=cuda --model=gpt2 --batch-size=16 --seq-len=1024 \
        --compile --dtype=bf16 --steps=50
    python bench/bench_train.py --device=cuda --model=gpt2-medium --batch-size=auto \
        --compile --dtype=bf16 --no-baseline
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
import torch.nn.functional as F

import data
import runtime
import train_gpt2
from model import GPT, GPTConfig

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Timing:
    mode: str
    step_s: list[float]  # one entry per timed step
    wait_s: list[float]  # time spent inside next_batch() per timed step
    peak_bytes: int = 0  # the most device memory allocated during a step (CUDA only)

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
                   help="preset (default: gpt2 on a GPU, gpt2-tiny on CPU)")
    p.add_argument("--batch-size", type=train_gpt2.micro_batch_arg, default=None,
                   help="micro-batch, or auto: the largest that fits in GPU memory with the "
                   "model's loss (default: 16 on a GPU, 4 on CPU)")
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
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the full-logits loss (--no-baseline saves its compile)")
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


class FullLogitsLoss(torch.nn.Module):
    """The model with the plain loss: F.cross_entropy over all of the fp32 logits."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.lm_head(self.model.hidden_states(idx))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss


def timed_step(step: Callable[[Callable[[], Batch]], None], next_batch: Callable[[], Batch],
               device: torch.device) -> tuple[float, float, int]:
    """(seconds for one optimizer step, seconds of it inside next_batch, peak bytes)."""
    wait = 0.0

    def timed_next_batch() -> Batch:
        nonlocal wait
        t = time.perf_counter()
        batch = next_batch()
        wait += time.perf_counter() - t
        return batch

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step(timed_next_batch)
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return seconds, wait, peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_batch_size(args: argparse.Namespace, model: GPT, config: train_gpt2.TrainConfig,
                       precision: runtime.Precision, device: torch.device) -> None:
    """--batch-size=auto: the trainer's own search (the eager model, the model's loss)."""
    if args.batch_size != train_gpt2.AUTO:
        return
    if device.type != "cuda":
        raise ValueError("--batch-size=auto searches GPU memory: give a number on "
                         f"{device.type}")
    found, _ = runtime.auto_micro_batch(model, config.samples_per_rank(1), args.seq_len,
                                        precision, device, runtime.DistEnv())
    args.batch_size = found
    print(f"--batch-size=auto: {found}, the largest that fits")


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
        if args.seq_len > gpt_config.block_size:
            raise ValueError(f"--seq-len={args.seq_len} exceeds block size "
                             f"{gpt_config.block_size} of {args.model}")
        torch.manual_seed(1337)
        if device.type == "cuda":
            runtime.enable_tf32()
        assert isinstance(gpt_config, GPTConfig)  # the gpt2 recipe's model
        model = GPT(gpt_config).to(device)
        resolve_batch_size(args, model, config, precision, device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    optimizer = train_gpt2.build_optimizer(model, config, device)
    scaler = runtime.make_grad_scaler(precision, device)

    def compiled(module: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(module) if args.compile else module  # type: ignore[return-value]

    def step_with(train_model: torch.nn.Module) -> Callable[[Callable[[], Batch]], None]:
        def step(next_batch: Callable[[], Batch]) -> None:
            train_gpt2.train_step(train_model, optimizer, scaler, next_batch, args.grad_accum,
                                  precision, device, grad_clip=config.grad_clip)
        return step

    ours, full_logits = step_with(compiled(model)), step_with(compiled(FullLogitsLoss(model)))
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        # The loader hands out the resident batch and the ShardLoader mode's steps.
        tokens = (args.steps + 1) * tokens_per_step + args.seq_len + 1
        files = write_random_shards(Path(tmp), tokens)
        with data.ShardLoader(files, args.batch_size, args.seq_len, device=device,
                              backend=args.loader_backend, vocab_size=gpt_config.vocab_size
                              ) as loader:
            resident = loader.next_batch()
            resident = (resident[0].clone(), resident[1].clone())
            modes = {"resident batch": (ours, lambda: resident),
                     "full logits": (full_logits, lambda: resident),
                     "ShardLoader": (ours, loader.next_batch)}
            for _ in range(args.warmup):
                ours(lambda: resident)
            try:  # the baseline may not fit where the chunked loss does
                for _ in range(args.warmup if args.baseline else 0):
                    full_logits(lambda: resident)
            except torch.OutOfMemoryError:
                print(f"full logits: out of memory at B={args.batch_size}; not timed")
                args.baseline = False
                optimizer.zero_grad(set_to_none=True)
            if not args.baseline:
                del modes["full logits"]
            runs = {name: Timing(name, [], []) for name in modes}
            # Alternating step by step (forward and reversed order, so no mode always goes
            # first) keeps clock drift and neighbours' load out of the ratios.
            for i in range(args.steps):
                order = list(modes.items())
                for name, (step, source) in order if i % 2 == 0 else reversed(order):
                    seconds, wait, peak = timed_step(step, source, device)
                    runs[name].step_s.append(seconds)
                    runs[name].wait_s.append(wait)
                    runs[name].peak_bytes = max(runs[name].peak_bytes, peak)
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
    print(f"{'mode':<16}{'ms/step':>10}{'tok/s':>14}{'MFU':>8}{'in next_batch':>16}"
          f"{'peak memory':>14}")
    for timing in runs.values():
        tok_s = tokens_per_step / timing.median_step
        mfu = f"{100 * flops_per_token * tok_s / peak:6.1f}%" if peak else "     n/a"
        memory = f"{timing.peak_bytes / 2**30:10.2f} GiB" if timing.peak_bytes else "n/a"
        print(f"{timing.mode:<16}{1000 * timing.median_step:10.2f}{tok_s:14,.0f}{mfu:>8}"
              f"{1000 * timing.median_wait:13.3f} ms{memory:>14}")
    ours, real = runs["resident batch"], runs["ShardLoader"]
    if "full logits" in runs:
        base = runs["full logits"]
        print(f"step time chunked loss / full logits: "
              f"{ours.median_step / base.median_step:.4f}")
        if base.peak_bytes:
            print(f"peak memory chunked loss / full logits: "
                  f"{ours.peak_bytes / base.peak_bytes:.4f}")
    ratio = real.median_step / ours.median_step
    print(f"step time ShardLoader / resident: {ratio:.4f} ({100 * (ratio - 1):+.2f}%)")
    print(f"loader share of step time (inside next_batch): "
          f"{100 * real.median_wait / real.median_step:.3f}%")


if __name__ == "__main__":
    sys.exit(main())
