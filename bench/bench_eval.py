"""HellaSwag scoring speed, same model, three ways, in examples/s:

1. per-example baseline: one example per forward pass as 4 right-padded rows (context +
   ending), logits at every position, cross-entropy over the ending tokens;
2. eval_hellaswag.score_batch with one example per forward pass (context once, output
   head only at scored positions);
3. eval_hellaswag.score_batch with --batch-size examples per forward pass.

    python bench/bench_eval.py --examples=48 --batch-size=16

Ratios are printed against (1); "vs 1 per forward" isolates what batching alone gives.

Then CORE's multiple choice (eval_core.evaluate, --batch-size rows per forward), packed
(each example's shared prompt once, eval_hellaswag.packed_logits) against every option as
a padded row of its own (pack=False, the path before packing), on a --core-preset model:

    python bench/bench_eval.py --parts=core --core-preset=gpt2-mini --core-examples=16

Random weights and synthetic examples whose lengths follow the real file (context about
20-60 words, endings about 10-30 words; CORE's task is HellaSwag as core.yaml's 10-shot
multiple choice) are enough: speed does not depend on the text. The ways compared must
agree on every prediction; the script checks that.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eval_core  # noqa: E402
import eval_hellaswag as hs  # noqa: E402
import runtime  # noqa: E402
from data import get_tokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

Result = TypeVar("Result")
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
    for example in examples:
        context, endings = encoded(example)
        rows = [context + ending for ending in endings]
        width = max(map(len, rows))
        idx = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, row in enumerate(rows):
            idx[r, :len(row)] = torch.tensor(row)
            scored[r, len(context):len(row)] = True
        idx, scored = idx.to(device), scored.to(device)
        logits, _ = model(idx)
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none")
        losses = losses * scored[:, 1:]
        sums = losses.sum(dim=1)
        means = sums / scored.sum(dim=1)
        correct += int(sums.argmin()) == example["label"]
        correct_norm += int(means.argmin()) == example["label"]
    return hs.HellaSwagScore(correct, correct_norm, len(examples))


def encoded(example: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
    """The context's tokens and each ending's, encoded as eval_hellaswag.score_batch does."""
    enc = get_tokenizer()
    return (enc.encode_ordinary(example["ctx"]),
            [enc.encode_ordinary(" " + ending) for ending in example["endings"]])


def timed(run: Callable[[], Result], repeats: int) -> tuple[float, Result]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def hellaswag_ways(args: argparse.Namespace, device: torch.device) -> None:
    """HellaSwag: the per-example baseline against score_batch, 1 and --batch-size per pass."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).eval().to(device)
    examples = synthetic_examples(args.examples)
    tokens = 0
    for example in examples:
        context, endings = encoded(example)
        tokens += len(context) * 4 + sum(map(len, endings))
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


def core_multiple_choice(args: argparse.Namespace, device: torch.device) -> None:
    """CORE's multiple choice through eval_core.evaluate: packed against a row per option."""
    torch.manual_seed(0)
    # GPT-2's context, so that a 10-shot HellaSwag prompt fits uncut, as it does in CORE.
    model = GPT(GPTConfig.from_preset(args.core_preset, block_size=1024)).eval().to(device)
    rows = [{"query": e["ctx"], "choices": e["endings"], "gold": e["label"]}
            for e in synthetic_examples(args.core_examples, seed=1)]
    with tempfile.TemporaryDirectory() as folder:
        bundle = Path(folder)
        (bundle / "eval_data").mkdir()
        (bundle / "eval_data" / "mc.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        (bundle / "core.yaml").write_text(
            "icl_tasks:\n- label: hellaswag_mc\n  dataset_uri: mc.jsonl\n"
            f"  num_fewshot: [{args.core_shots}]\n  icl_task_type: multiple_choice\n",
            encoding="utf-8")
        (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\n"
                                                   "hellaswag_mc,25.0\n", encoding="utf-8")
        tasks = eval_core.load_tasks(bundle)
        warm_up = eval_core.load_tasks(bundle, limit=args.core_shots + 1)
    task = tasks[0]
    option_rows = unpacked = packed = 0
    for i in range(len(task.examples)):
        options = eval_core.example_rows(task, i, 1024)
        option_rows += len(options)
        unpacked += sum(len(r.tokens) for r in options)
        packed += options[0].start + sum(r.end - r.start for r in options)
    print(f"CORE multiple choice: preset {args.core_preset} (block_size 1024), "
          f"{args.core_examples} examples, {args.core_shots}-shot, {unpacked / option_rows:.0f} "
          f"tokens per option row, {packed / unpacked:.2f} of the tokens when packed; "
          f"--batch-size={args.batch_size} rows; fp32, {device}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    for pack in (True, False):
        eval_core.evaluate(model, warm_up, device, batch_size=args.batch_size, pack=pack)
    methods: dict[str, Callable[[], eval_core.CoreResult]] = {
        "a row per option (pack=False)": lambda: eval_core.evaluate(
            model, tasks, device, batch_size=args.batch_size, pack=False),
        "packed (the default)": lambda: eval_core.evaluate(
            model, tasks, device, batch_size=args.batch_size),
    }
    results = {label: timed(run, args.repeats) for label, run in methods.items()}
    scores = {json.dumps(result.as_json()) for _, result in results.values()}
    if len(scores) != 1:
        raise RuntimeError(f"packed and unpacked CORE disagree: {scores}")
    base_s = results["a row per option (pack=False)"][0]
    print(f"{'method':<30} {'seconds':>8} {'examples/s':>11} {'vs a row per option':>20}")
    for label, (seconds, _) in results.items():
        print(f"{label:<30} {seconds:>8.2f} {args.core_examples / seconds:>11.2f} "
              f"{base_s / seconds:>19.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="hellaswag,core",
                        help="which comparisons: hellaswag, core or both (the default)")
    parser.add_argument("--preset", default="gpt2", help="HellaSwag's model shape (default "
                                                         "gpt2, 124M)")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--core-preset", default="gpt2-mini",
                        help="CORE's model shape (default gpt2-mini), with block_size 1024")
    parser.add_argument("--core-examples", type=int, default=16)
    parser.add_argument("--core-shots", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    parser.add_argument("--device", default="cpu", help="auto, cuda, cuda:N, mps or cpu")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"hellaswag", "core"} or args.core_examples <= args.core_shots:
        parser.error("--parts takes hellaswag and/or core; --core-examples must exceed "
                     "--core-shots")
    device = runtime.resolve_device(args.device)
    if "hellaswag" in parts:
        hellaswag_ways(args, device)
    if "core" in parts:
        core_multiple_choice(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
