"""HellaSwag scoring speed, same model, three ways, in examples/s:

1. per-example baseline: one example per forward pass as 4 right-padded rows (context +
   ending), logits at every position, cross-entropy over the ending tokens;
2. eval_hellaswag.score_batch with one example per forward pass (context once, output
   head only at scored positions);
3. eval_hellaswag.score_batch with --batch-size examples per forward pass.

    python bench/bench_eval.py --examples=48 --batch-size=16

Ratios are printed against (1); "vs 1 per forward" isolates what batching alone gives.

Random 124M-shape weights and synthetic examples whose lengths follow the real file
(context about 20-60 words, endings about 10-30 words) are enough: speed does not depend
on the text. All three must agree on every prediction; the script checks that.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

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


@torch.no_grad()
def per_example_baseline(model: GPT, examples: list[dict[str, Any]],
                         device: torch.device) -> hs.HellaSwagScore:
    """One example (4 rows) per forward pass, the whole logits tensor computed."""
    correct = correct_norm = 0
    for rendered in map(hs.render_example, examples):
        rows = [rendered.context + ending for ending in rendered.endings]
        width = max(map(len, rows))
        idx = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, row in enumerate(rows):
            idx[r, :len(row)] = torch.tensor(row)
            scored[r, len(rendered.context):len(row)] = True
        idx, scored = idx.to(device), scored.to(device)
        logits, _ = model(idx)
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none")
        losses = losses * scored[:, 1:]
        sums = losses.sum(dim=1)
        means = sums / scored.sum(dim=1)
        correct += int(sums.argmin()) == rendered.label
        correct_norm += int(means.argmin()) == rendered.label
    return hs.HellaSwagScore(correct, correct_norm, len(examples))


def timed(run: Callable[[], hs.HellaSwagScore], repeats: int) -> tuple[float, hs.HellaSwagScore]:
    best, score = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        score = run()
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
    per_example_baseline(model, examples[:2], device)
    methods: dict[str, Callable[[], hs.HellaSwagScore]] = {
        "per-example baseline": lambda: per_example_baseline(model, examples, device),
        "score_batch, 1 per forward": lambda: hs.evaluate(model, examples, device,
                                                          batch_size=1),
        f"score_batch, {args.batch_size} per forward": lambda: hs.evaluate(
            model, examples, device, batch_size=args.batch_size),
    }
    results = {label: timed(run, args.repeats) for label, run in methods.items()}
    counts = {(score.correct, score.correct_norm) for _, score in results.values()}
    if len(counts) != 1:
        raise RuntimeError(f"the methods disagree on the predictions: {counts}")
    base_s = results["per-example baseline"][0]
    one_s = results["score_batch, 1 per forward"][0]
    print(f"{'method':<30} {'seconds':>8} {'examples/s':>11} {'vs baseline':>12} "
          f"{'vs 1 per forward':>17}")
    for label, (seconds, _) in results.items():
        print(f"{label:<30} {seconds:>8.2f} {args.examples / seconds:>11.2f} "
              f"{base_s / seconds:>11.2f}x {one_s / seconds:>16.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
