"""Muon's cost against AdamW's, side by side in one process (alternated step by step, in
forward and reversed order, so the load of a shared machine hits all alike).

1. The optimizer step alone, on GPT-2 124M's block matrices (per layer: four 768 x 768
   attention matrices, the 3072 x 768 and 768 x 3072 MLP matrices) for --layers layers (124M
   has 12; a CPU step of all twelve takes tens of seconds, so the default is a stand-in of
   one): AdamW; optim.py's Muon with same-shape matrices batched; the same one matrix at a
   time; torch.optim.Muon (bf16 Newton-Schulz, one at a time).
2. The training step (forward, backward, optimizer) of the modern model at bench_recipe.py's
   setting (gpt2-mini's shape, 8 x 256 tokens): its recipe with Muon on the block matrices,
   the same with AdamW on them, and with torch.optim.Muon on them: the issue's target is
   Muon's step <= 1.15x AdamW's.

    python bench/bench_muon.py                  # ~2-4 minutes on a 2-core CPU
    python bench/bench_muon.py --layers=12      # all of 124M's matrices (slow on a CPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optim  # noqa: E402
from model_modern import ModernConfig, ModernGPT  # noqa: E402


def alternate(steps: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each step, the steps alternated call by call."""
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + reps):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            steps[name]()
            if i >= warmup:
                seconds[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in seconds.items()}


def block_matrices(layers: int, width: int, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * width**-0.5)
              for _ in range(layers) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


class OneAtATime(optim.MuonAdamW):
    """optim.py's Muon with every matrix orthogonalised on its own (a batch of one)."""

    def _muon_step(self, group: dict) -> None:
        for p in group["params"]:
            super()._muon_step({**group, "params": [p]})


def optimizer_steps(layers: int, width: int) -> dict[str, Callable[[], None]]:
    made: dict[str, torch.optim.Optimizer] = {
        "AdamW": torch.optim.AdamW(block_matrices(layers, width, 0), lr=1e-3,
                                   betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
        "Muon, batched (optim.py)": optim.MuonAdamW(
            [dict(kind="muon", params=block_matrices(layers, width, 0), lr=0.02)]),
        "Muon, one at a time (optim.py)": OneAtATime(
            [dict(kind="muon", params=block_matrices(layers, width, 0), lr=0.02)]),
        "torch.optim.Muon (bf16 NS)": torch.optim.Muon(block_matrices(layers, width, 0),
                                                       lr=0.02),
    }
    return {name: o.step for name, o in made.items()}


class TorchMuonRecipe:
    """The modern recipe's AdamW groups in optim.MuonAdamW, the block matrices in
    torch.optim.Muon (what the recipe ran on before optim.py)."""

    def __init__(self, model: ModernGPT) -> None:
        groups = optim.modern_groups(model)
        matrix = next(g for g in groups if g["kind"] == "muon")
        self.adamw = optim.MuonAdamW([g for g in groups if g["kind"] == "adamw"])
        self.muon = torch.optim.Muon(matrix["params"], lr=matrix["lr"],
                                     weight_decay=matrix["weight_decay"])

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)


def training_steps(batch: int, seq_len: int) -> dict[str, Callable[[], None]]:
    config = ModernConfig(block_size=256, n_layer=4, n_head=4, n_embd=128)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen)
    y = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen)
    steps: dict[str, Callable[[], None]] = {}
    for name in ("AdamW on the matrices", "Muon (optim.py)", "torch.optim.Muon"):
        torch.manual_seed(0)
        model = ModernGPT(config)
        optimizer: optim.MuonAdamW | TorchMuonRecipe
        if name == "torch.optim.Muon":
            optimizer = TorchMuonRecipe(model)
        else:
            on_adamw = "AdamW" in name  # an AdamW rate for the matrices (the quickstart's)
            optimizer = optim.modern_optimizer(
                model, matrix_optimizer="adamw" if on_adamw else "muon",
                matrix_lr=3e-3 if on_adamw else optim.MATRIX_LR)

        def step(model: ModernGPT = model,
                 optimizer: optim.MuonAdamW | TorchMuonRecipe = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            _, loss = model(x, y)
            assert loss is not None
            loss.backward()
            optimizer.step()
        steps[name] = step
    return steps


def table(title: str, medians: dict[str, float], baseline: str) -> None:
    print(f"\n{title}")
    print(f"{'':<34}{'ms':>10}  x {baseline}")
    for name, seconds in medians.items():
        print(f"{name:<34}{seconds * 1000:>10.1f}  {seconds / medians[baseline]:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=1, help="124M's block matrices of this many "
                   "layers (124M: 12)")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--reps", type=int, default=5, help="timed alternated rounds per part")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--parts", default="1,2", help="which parts to run (1: optimizer step, "
                   "2: training step)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Newton-Schulz on "
          f"this CPU in {optim.newton_schulz_dtype(torch.device('cpu'))}", flush=True)
    if "1" in args.parts:
        table(f"1. optimizer step alone: {6 * args.layers} block matrices of width {args.width} "
              f"({args.layers} layer(s) of 124M's)",
              alternate(optimizer_steps(args.layers, args.width), args.warmup, args.reps),
              "AdamW")
    if "2" in args.parts:
        table(f"2. training step of the modern model (gpt2-mini's shape, {args.batch_size} x "
              f"{args.seq_len} tokens)",
              alternate(training_steps(args.batch_size, args.seq_len), args.warmup, args.reps),
              "AdamW on the matrices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
