"""The validation step: the model's forward with targets under torch.no_grad, three ways.

- no-grad loss: what the trainer's evaluate_val_loss runs now (linear_cross_entropy sees
  grad mode off and computes the loss alone, one matmul per chunk of rows).
- gradient pieces: the loss as it ran under no_grad before (issue 28), the autograd
  Function's forward, which also makes the two gradient products per chunk.
- full logits: F.cross_entropy over the whole (B*T, vocab) fp32 logits, for reference.

Eager, as evaluate_val_loss runs it; the modes alternate step by step so that load on the
machine falls on all of them alike. Each line: median seconds per step, ratio to the no-grad
loss, peak device memory (CUDA only).

    python bench/bench_loss.py                                   # CPU: gpt2-mini, B=4, T=256
    python bench/bench_loss.py --device=cuda --model=gpt2 --batch-size=64 --seq-len=1024 \
        --dtype=bf16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import model as model_module
import runtime
from model import GPT, GPTConfig

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def with_gradient_pieces(x: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """The pre-fix behaviour: the Function's forward whatever the grad mode."""
    return model_module._LinearCrossEntropy.apply(x, weight, targets,
                                                  model_module.LOSS_CHUNK_ROWS)


def full_logits(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-1)


MODES: dict[str, LossFn] = {
    "no-grad loss": model_module.linear_cross_entropy,
    "gradient pieces": with_gradient_pieces,
    "full logits": full_logits,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    p.add_argument("--model", default="gpt2-mini", help="a preset of model.GPTConfig")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", default="auto", choices=runtime.DTYPE_CHOICES)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision(device, args.dtype)
    torch.manual_seed(0)
    config = GPTConfig.from_preset(args.model)
    model = GPT(config).to(device).eval()
    idx = torch.randint(0, 50257, (args.batch_size, args.seq_len), device=device)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    peaks: dict[str, int] = {}
    losses: dict[str, float] = {}
    real = model_module.linear_cross_entropy
    try:
        for step in range(args.steps + 1):  # step 0 warms up
            for mode, loss_fn in MODES.items():
                model_module.linear_cross_entropy = loss_fn  # type: ignore[assignment]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                runtime.synchronize(device)
                start = time.perf_counter()
                with torch.no_grad(), precision.autocast(device):
                    _, loss = model(idx, idx)
                losses[mode] = float(loss)  # waits for the device
                if step > 0:
                    times[mode].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peaks[mode] = torch.cuda.max_memory_allocated(device)
    finally:
        model_module.linear_cross_entropy = real
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"validation step, {args.model}, B={args.batch_size}, T={args.seq_len}, "
          f"{precision.name}, {device} ({name or platform.machine()}), torch {torch.__version__}")
    base = statistics.median(times["no-grad loss"])
    for mode in MODES:
        median = statistics.median(times[mode])
        peak = f"  peak {peaks[mode] / 2**30:6.2f} GiB" if mode in peaks else ""
        print(f"  {mode:16s} {median * 1000:9.1f} ms  {median / base:5.2f}x  "
              f"loss {losses[mode]:.4f}{peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
