"""HellaSwag scoring speed: examples/s with several examples per forward pass against one
example (its 4 rows) per forward pass, same model, same code path.

    python bench/bench_eval.py --examples=48 --batch-size=16

Random 124M-shape weights and synthetic examples whose lengths follow the real file
(context about 20-60 words, endings about 10-30 words) are enough: speed does not depend
on the text. Both settings must agree on every prediction; the script checks that.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eval_hellaswag as hs  # noqa: E402
import runtime  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

WORDS = ("the a man woman dog runs jumps into water kitchen knife cuts onion slowly then "
         "quickly and gets ball throws camera shows close up of her his bike rope grass "
         "paints wall smiles at people crowd watches stage piano plays").split()


def synthetic_examples(count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"ctx": sentence(20, 60), "endings": [sentence(10, 30) for _ in range(4)],
             "label": rng.randint(0, 3)} for _ in range(count)]


def timed(model: GPT, examples: list[dict[str, Any]], batch_size: int,
          repeats: int, device: torch.device) -> tuple[float, hs.HellaSwagScore]:
    best, score = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        score = hs.evaluate(model, examples, device, batch_size=batch_size)
        best = min(best, time.perf_counter() - start)
    assert score is not None
    return best, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2", help="model shape (default gpt2, 124M)")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    parser.add_argument("--device", default="cpu", help="auto, cuda, cuda:N, mps or cpu")
    args = parser.parse_args(argv)
    device = runtime.resolve_device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).eval().to(device)
    examples = synthetic_examples(args.examples)
    rows = [hs.render_example(e) for e in examples]
    tokens = sum(len(r.context) * 4 + sum(map(len, r.endings)) for r in rows)
    print(f"preset {args.preset}, {args.examples} examples ({tokens / args.examples:.0f} tokens "
          f"per example over 4 rows), fp32, {device}, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    hs.evaluate(model, examples[:2], device, batch_size=2)  # warm-up
    results = {}
    for label, batch_size in (("one example per forward", 1),
                              (f"{args.batch_size} examples per forward", args.batch_size)):
        results[label] = timed(model, examples, batch_size, args.repeats, device)
    (base_s, base_score), (fast_s, fast_score) = results.values()
    if (base_score.correct, base_score.correct_norm) != (fast_score.correct,
                                                          fast_score.correct_norm):
        raise RuntimeError("batched and per-example scoring disagree")
    print(f"{'method':<28} {'seconds':>8} {'examples/s':>11} {'vs per-example':>15}")
    for label, (seconds, _) in results.items():
        print(f"{label:<28} {seconds:>8.2f} {args.examples / seconds:>11.2f} "
              f"{base_s / seconds:>14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
