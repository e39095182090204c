"""HellaSwag accuracy of pretrained GPT-2 or a nano-gpt checkpoint.

    python eval_hellaswag.py --pretrained=gpt2          # acc_norm 0.2955, acc 0.2859

An example is scored as four rows, `encode(ctx) + encode(" " + ending)` (the two parts
are encoded separately and then joined), and an ending by the cross-entropy of its own
tokens only: `acc` picks the ending with the lowest sum, `acc_norm` the lowest mean.
The four rows share their context, so the model sees it once: one packed row per example
holds the context and then the endings, each ending attending to the context and to
itself with the positions it would have in a row of its own (same scores, about half the
tokens). The output head runs only where an ending token is predicted. Several examples
go through the model per forward pass, right-padded; padding is masked out.
Under torchrun each rank scores `examples[rank::world_size]` and the three totals are
all-reduced once.

The validation file is downloaded once into `<data root>/hellaswag/` (or `--cache-dir`)
through a temporary file that is checked (10042 lines, each a JSON example with a context,
four endings and a label in 0..3) before it is renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

import cli
import runtime
from data import DownloadError, default_data_root, download, get_tokenizer
from model import GPT

HELLASWAG_VAL_URL = ("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
                     "hellaswag_val.jsonl")
HELLASWAG_VAL_FILE = "hellaswag_val.jsonl"
HELLASWAG_VAL_EXAMPLES = 10042
NUM_ENDINGS = 4
PAD_ID = 0  # any id works: padded positions are never scored


class HellaSwagDataError(RuntimeError):
    """The HellaSwag file is missing, unreachable or malformed; the message says what to do."""


# ----------------------------------------------------------------------------------- data


def default_cache_dir() -> Path:
    return default_data_root() / "hellaswag"


def load_examples(path: str | os.PathLike[str] | None = None, limit: int | None = None,
                  cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Examples from a local jsonl, or (path None) the official validation file, downloaded
    into `cache_dir` on first use. `limit` keeps the first `limit` examples."""
    if path is None:
        path = ensure_validation_file(Path(cache_dir) if cache_dir else default_cache_dir())
    path = Path(path)
    if not path.is_file():
        raise HellaSwagDataError(f"{path}: HellaSwag file not found; pass --data=JSONL with "
                                 "the path of hellaswag_val.jsonl")
    examples: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if line.strip():
                examples.append(parse_example(line, f"{path}:{number}"))
    return examples


def parse_example(line: str, where: str) -> dict[str, Any]:
    try:
        example = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HellaSwagDataError(f"{where}: not a JSON line ({exc.msg})") from None
    if not isinstance(example, dict) or not {"ctx", "endings", "label"} <= example.keys():
        raise HellaSwagDataError(f"{where}: a HellaSwag example needs 'ctx', 'endings' and "
                                 "'label' fields")
    endings, label = example["endings"], example["label"]
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS:
        raise HellaSwagDataError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagDataError(f"{where}: 'label' must be an integer in 0..{NUM_ENDINGS - 1}")
    return example


def ensure_validation_file(cache_dir: Path, url: str = HELLASWAG_VAL_URL,
                           expected_lines: int = HELLASWAG_VAL_EXAMPLES) -> Path:
    """The cached validation file, downloaded first if it is not there yet."""
    try:
        return download(url, cache_dir / HELLASWAG_VAL_FILE,
                        check=lambda path: check_validation_file(path, expected_lines, url))
    except DownloadError as exc:
        raise HellaSwagDataError(f"{exc}, or pass --data=JSONL with a local copy") from None


def check_validation_file(path: Path, expected_lines: int, source: str) -> None:
    """Every line a well-formed example, and exactly as many lines as the official file."""
    with open(path, encoding="utf-8") as f:
        count = 0
        for count, line in enumerate(f, start=1):  # noqa: B007 - count is read after the loop
            parse_example(line, f"{source} line {count}")
    if count != expected_lines:
        raise HellaSwagDataError(f"{source}: downloaded {count} lines, expected {expected_lines}; "
                                 "the download is incomplete, run again or pass --data=JSONL")


# ------------------------------------------------------------------------------ rendering


@dataclass(frozen=True)
class RenderedExample:
    context: list[int]
    endings: list[list[int]]
    label: int


def render_example(example: dict[str, Any]) -> RenderedExample:
    """Tokens of the context and of each ending, " " + ending encoded on its own."""
    enc = get_tokenizer()
    return RenderedExample(context=enc.encode_ordinary(example["ctx"]),
                           endings=[enc.encode_ordinary(" " + e) for e in example["endings"]],
                           label=int(example["label"]))


# -------------------------------------------------------------------------------- scoring


def _unwrap(model: nn.Module) -> GPT:
    """The plain GPT inside a DDP wrapper and/or torch.compile module."""
    inner: Any = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    if not isinstance(inner, GPT):
        raise TypeError(f"expected a GPT model, got {type(inner).__name__}")
    return inner


@dataclass
class PackedExample:
    """One example as a single model row: each context once, then every ending but its last
    token. `segment` and `branch` say what a token may attend to (its segment's context,
    branch 0, and earlier tokens of its own branch); `positions` restart after the context
    for each ending, so every ending sees exactly the positions it would in a row of its own.
    `predicts[j]` lists the row offsets whose outputs predict ending j's tokens."""
    tokens: list[int]
    positions: list[int]
    segment: list[int]
    branch: list[int]
    predicts: list[list[int]]

    def add(self, tokens: Sequence[int], first_position: int, segment: int,
            branch: int) -> range:
        offsets = range(len(self.tokens), len(self.tokens) + len(tokens))
        self.tokens.extend(tokens)
        self.positions.extend(range(first_position, first_position + len(tokens)))
        self.segment.extend([segment] * len(tokens))
        self.branch.extend([branch] * len(tokens))
        return offsets


def pack_example(example: RenderedExample, block_size: int) -> PackedExample:
    """The example's row for score_batch. A context plus ending longer than block_size + 1
    tokens keeps its last block_size + 1 (the input drops the final one); such an example
    gets one context copy per ending, since each ending then keeps a different share of it."""
    if not example.context:
        raise ValueError("a HellaSwag example needs at least one context token")
    cuts = []
    for ending in example.endings:
        if len(ending) > block_size:
            raise ValueError(f"an ending of {len(ending)} tokens does not fit the model's "
                             f"block_size {block_size}")
        cuts.append(max(0, len(example.context) + len(ending) - (block_size + 1)))
    endings = list(enumerate(example.endings))
    if any(cuts):
        segments = [(example.context[cut:], [pair]) for cut, pair in zip(cuts, endings,
                                                                          strict=True)]
    else:
        segments = [(example.context, endings)]
    packed = PackedExample([], [], [], [], [[] for _ in example.endings])
    for segment, (context, members) in enumerate(segments):
        last_context = packed.add(context, 0, segment, branch=0)[-1]
        for j, ending in members:
            inputs = packed.add(ending[:-1], len(context), segment, branch=j + 1)
            packed.predicts[j] = [last_context, *inputs]
    return packed


@torch.no_grad()
def score_batch(model: nn.Module, batch: Sequence[RenderedExample],
                device: torch.device | str,
                precision: runtime.Precision | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and mean of each ending's token cross-entropies, both (len(batch), 4) float32 on
    CPU, from one forward pass with one row per example (see PackedExample)."""
    gpt = _unwrap(model)
    device = torch.device(device)
    packed = [pack_example(example, gpt.config.block_size) for example in batch]
    idx, positions, mask = _packed_inputs(packed)
    # Which output predicts which ending token, flattened over the batch.
    rows, offsets, targets, endings = [], [], [], []
    for r, (example, row) in enumerate(zip(batch, packed, strict=True)):
        for j, (ending, predicts) in enumerate(zip(example.endings, row.predicts,
                                                   strict=True)):
            rows.extend([r] * len(ending))
            offsets.extend(predicts)
            targets.extend(ending)
            endings.extend([r * NUM_ENDINGS + j] * len(ending))
    autocast = precision.autocast(device) if precision is not None else torch.autocast(
        device.type, enabled=False)
    with autocast:
        hidden = gpt.hidden_states(idx.to(device), positions=positions.to(device),
                                   attn_mask=mask.to(device))
        # The output head only where an ending token is predicted: most outputs are not.
        logits = gpt.lm_head(hidden[torch.tensor(rows, device=device),
                                    torch.tensor(offsets, device=device)]).float()
    losses = F.cross_entropy(logits, torch.tensor(targets, device=device), reduction="none")
    sums = torch.zeros(len(batch) * NUM_ENDINGS, device=device).index_add_(
        0, torch.tensor(endings, device=device), losses).cpu()
    lengths = torch.tensor([len(e) for example in batch for e in example.endings])
    means = sums / lengths
    return sums.view(-1, NUM_ENDINGS), means.view(-1, NUM_ENDINGS)


def _packed_inputs(packed: Sequence[PackedExample]) -> tuple[torch.Tensor, ...]:
    """Token ids, position ids (B, W) and the attention mask (B, 1, W, W) of right-padded
    rows. A padding token attends only to padding, and no real token attends to padding."""
    width = max(len(p.tokens) for p in packed)
    idx = torch.full((len(packed), width), PAD_ID, dtype=torch.long)
    positions = torch.zeros((len(packed), width), dtype=torch.long)
    segment = torch.full((len(packed), width), -1, dtype=torch.long)
    branch = torch.full((len(packed), width), -1, dtype=torch.long)
    for r, p in enumerate(packed):
        n = len(p.tokens)
        idx[r, :n] = torch.tensor(p.tokens)
        positions[r, :n] = torch.tensor(p.positions)
        segment[r, :n] = torch.tensor(p.segment)
        branch[r, :n] = torch.tensor(p.branch)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same_segment = segment[:, :, None] == segment[:, None, :]
    visible_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return idx, positions, (causal & same_segment & visible_branch).unsqueeze(1)


def predictions(sums: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen ending per example by total loss (acc) and by mean loss (acc_norm)."""
    return sums.argmin(dim=1), means.argmin(dim=1)


@dataclass
class HellaSwagScore:
    correct: int
    correct_norm: int
    total: int

    @property
    def acc(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.total if self.total else 0.0


def evaluate(model: nn.Module, examples: Sequence[dict[str, Any]], device: torch.device | str,
             batch_size: int = 16, precision: runtime.Precision | None = None, rank: int = 0,
             world_size: int = 1, progress: bool = False) -> HellaSwagScore:
    """acc and acc_norm over `examples`; with world_size > 1 this rank scores
    examples[rank::world_size] and the totals of all ranks are summed (torch.distributed
    must be initialised). The model's train/eval mode is restored afterwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if not examples:
        raise HellaSwagDataError("no HellaSwag examples to score: an accuracy over zero "
                                 "examples is no score; pass a file with examples")
    mine = [render_example(e) for e in examples[rank::world_size]]
    # Similar lengths side by side waste less compute on padding; totals do not depend on
    # the order.
    mine.sort(key=lambda r: len(r.context) + sum(map(len, r.endings)))
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    bar = tqdm(total=len(mine), desc="hellaswag", unit="ex", disable=not progress,
               file=sys.stderr)
    try:
        for begin in range(0, len(mine), batch_size):
            batch = mine[begin:begin + batch_size]
            pred, pred_norm = predictions(*score_batch(model, batch, device, precision))
            labels = torch.tensor([e.label for e in batch])
            correct += int((pred == labels).sum())
            correct_norm += int((pred_norm == labels).sum())
            bar.update(len(batch))
            bar.set_postfix(acc_norm=f"{correct_norm / (begin + len(batch)):.4f}")
    finally:
        bar.close()
        model.train(was_training)
    totals = [correct, correct_norm, len(mine)]
    if world_size > 1:
        totals = _all_reduce_sum(totals, torch.device(device))
    return HellaSwagScore(*totals)


def _all_reduce_sum(values: list[int], device: torch.device) -> list[int]:
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return [int(v) for v in tensor.tolist()]


# ------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--data", default=None,
                        help="a local HellaSwag jsonl (default: the validation file, "
                             "downloaded once into --cache-dir)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the downloaded validation file is kept "
                             "(default <data root>/hellaswag)")
    parser.add_argument("--limit", type=int, default=None, help="score the first N examples")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="examples per forward pass (4 rows each)")
    cli.add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    return args


def run(args: argparse.Namespace) -> None:
    cli.check_range("--limit", args.limit, minimum=1)
    cli.check_range("--batch-size", args.batch_size, minimum=1)
    env = runtime.detect_distributed()
    device, precision = cli.resolve_runtime(args.device, args.dtype)
    device = runtime.distributed_device(env, device)
    with runtime.distributed(env, device):
        model = cli.load_model(None if args.checkpoint else args.pretrained, args.checkpoint,
                               device)
        data = args.data
        if data is None:
            data = _fetch_once(env, Path(args.cache_dir) if args.cache_dir else None)
        examples = load_examples(data, args.limit)
        score = evaluate(model, examples, device, args.batch_size, precision, env.rank,
                         env.world_size, progress=env.is_main)
        runtime.print0(f"acc: {score.correct}/{score.total} = {score.acc:.4f}", env=env)
        runtime.print0(f"Accuracy: {score.correct_norm}/{score.total} = {score.acc_norm:.4f}",
                       env=env)


def _fetch_once(env: runtime.DistEnv, cache_dir: Path | None) -> Path:
    """Rank 0 downloads (if needed) while the other ranks wait, so one copy is written."""
    cache_dir = cache_dir or default_cache_dir()
    if env.is_main:
        ensure_validation_file(cache_dir)
    if env.is_distributed:
        torch.distributed.barrier()
    return cache_dir / HELLASWAG_VAL_FILE


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_script(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
