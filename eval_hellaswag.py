"""HellaSwag accuracy of pretrained GPT-2 or a nano-gpt checkpoint.

    python eval_hellaswag.py --pretrained=gpt2          # acc_norm 0.2955, acc 0.2859

An ending is scored by the cross-entropy of its own tokens in `encode(ctx) + encode(" " +
ending)`; pick_answers says which ending acc and acc_norm choose. One packed row per example
holds the context once, then the endings, each attending to the context and itself with the
positions it would have alone (same scores, about half the tokens); rows are batched,
right-padded and masked. Under torchrun each rank scores `examples[rank::world_size]` and
the totals are all-reduced once. The validation file is downloaded once into
`<data root>/hellaswag/` (or `--cache-dir`) and checked (10042 examples) before it is kept.
"""

from __future__ import annotations

import argparse
import itertools
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
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import checkpoint
import cli
import runtime
from data import DownloadError, default_data_root, download, get_tokenizer
from model import GPT
from model_modern import ModernGPT

HELLASWAG_VAL_URL = ("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
                     "hellaswag_val.jsonl")
HELLASWAG_VAL_FILE = "hellaswag_val.jsonl"
HELLASWAG_VAL_EXAMPLES = 10042
NUM_ENDINGS = 4
PAD_ID = 0  # any id works: padded positions are never scored


# ----------------------------------------------------------------------------------- data
def load_examples(path: str | os.PathLike[str] | None = None, limit: int | None = None,
                  cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The first `limit` examples of a local jsonl, or (path None) of the validation file."""
    path = Path(path) if path is not None else ensure_validation_file(cache_dir)
    if not path.is_file():
        what = ("a directory, not a file" if path.is_dir() else "not a regular file"
                if path.exists() else "HellaSwag file not found")
        raise FileNotFoundError(f"{path}: {what}\nhint: pass --data=JSONL with the path of "
                                "hellaswag_val.jsonl")
    with open(path, "rb") as f:
        lines = ((number, line) for number, line in enumerate(f, start=1) if line.strip())
        examples = [parse_example(line, f"{path}:{number}")
                    for number, line in itertools.islice(lines, limit)]
    if not examples:
        raise ValueError(f"{path}: no HellaSwag examples in it (the file is empty)\nhint: pass "
                         "--data=JSONL with the path of hellaswag_val.jsonl")
    return examples


def parse_example(line: str | bytes, where: str) -> dict[str, Any]:
    """One line of a HellaSwag file, every field it is scored by checked; errors name `where`."""
    try:
        example = json.loads(line)  # bytes: decoded as UTF-8
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{where}: not a UTF-8 JSON line ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(example, dict) or not {"ctx", "endings", "label"} <= example.keys():
        raise ValueError(f"{where}: a HellaSwag example needs 'ctx', 'endings' and 'label' "
                         "fields")
    ctx, endings, label = example["ctx"], example["endings"], example["label"]
    if not isinstance(ctx, str) or not ctx:
        raise ValueError(f"{where}: 'ctx' is {ctx!r}; it must be a non-empty string")
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS
            and all(isinstance(e, str) for e in endings)):
        raise ValueError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if type(label) is not int or not 0 <= label < NUM_ENDINGS:  # True is an int: refused
        raise ValueError(f"{where}: 'label' is {label!r}; it must be an integer in "
                         f"0..{NUM_ENDINGS - 1}")
    return {**example, "where": where}


def ensure_validation_file(cache_dir: str | os.PathLike[str] | None,
                           url: str = HELLASWAG_VAL_URL,
                           expected_lines: int = HELLASWAG_VAL_EXAMPLES) -> Path:
    """The validation file in `cache_dir`, downloaded if need be and kept only if complete."""
    def check(path: Path) -> None:
        with open(path, "rb") as f:
            count = 0
            for count, line in enumerate(f, start=1):  # noqa: B007 - read after the loop
                parse_example(line, f"{url} line {count}")
        if count != expected_lines:
            raise ValueError(f"{url}: downloaded {count} lines, expected {expected_lines}; "
                             "the download is incomplete, run again or pass --data=JSONL")

    folder = Path(cache_dir) if cache_dir else default_data_root() / "hellaswag"
    try:
        return download(url, folder / HELLASWAG_VAL_FILE, check=check)
    except DownloadError as exc:
        raise DownloadError(f"{exc}, or pass --data=JSONL with a local copy") from None


@dataclass(frozen=True)
class RenderedExample:
    context: list[int]
    endings: list[list[int]]
    label: int
    where: str = "a HellaSwag example"  # file:line, for errors


def render_example(example: dict[str, Any]) -> RenderedExample:
    """Tokens of the context and of each ending, " " + ending encoded on its own."""
    enc = get_tokenizer()
    return RenderedExample(context=enc.encode_ordinary(example["ctx"]),
                           endings=[enc.encode_ordinary(" " + e) for e in example["endings"]],
                           label=int(example["label"]),
                           where=example.get("where", RenderedExample.where))


# -------------------------------------------------------------------------------- scoring
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

    def add(self, tokens: Sequence[int], first_position: int, segment: int, branch: int) -> range:
        offsets = range(len(self.tokens), len(self.tokens) + len(tokens))
        self.tokens.extend(tokens)
        self.positions.extend(range(first_position, first_position + len(tokens)))
        self.segment.extend([segment] * len(tokens))
        self.branch.extend([branch] * len(tokens))
        return offsets


def pack_example(example: RenderedExample, block_size: int) -> PackedExample:
    """The example's row for score_batch. A context plus ending over block_size + 1 tokens
    keeps its last block_size + 1, so each ending then gets its own copy of the context."""
    context, endings = example.context, example.endings
    if not context:
        raise ValueError(f"{example.where}: a HellaSwag example needs at least one context "
                         "token")
    for ending in endings:
        if len(ending) > block_size:
            raise ValueError(f"{example.where}: an ending of {len(ending)} tokens does not fit "
                             f"the model's block_size {block_size}")
    cuts = [max(0, len(context) + len(ending) - (block_size + 1)) for ending in endings]
    # Segments: (the context they keep, the endings that share it).
    segments = ([(context[cut:], [j]) for j, cut in enumerate(cuts)] if any(cuts)
                else [(context, list(range(len(endings))))])
    packed = PackedExample([], [], [], [], [[] for _ in endings])
    for segment, (kept, members) in enumerate(segments):
        last_context = packed.add(kept, 0, segment, branch=0)[-1]
        for j in members:
            inputs = packed.add(endings[j][:-1], len(kept), segment, branch=j + 1)
            packed.predicts[j] = [last_context, *inputs]
    return packed


def _packed_inputs(packed: Sequence[PackedExample]) -> tuple[torch.Tensor, ...]:
    """Token ids, positions (B, W) and mask (B, 1, W, W) of right-padded rows; padding and
    real tokens never attend to each other."""
    def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
        return pad_sequence([torch.tensor(r) for r in rows], batch_first=True,
                            padding_value=fill)

    idx = padded([p.tokens for p in packed], PAD_ID)
    positions = padded([p.positions for p in packed], 0)
    segment = padded([p.segment for p in packed], -1)
    branch = padded([p.branch for p in packed], -1)
    causal = torch.ones((idx.shape[1], idx.shape[1]), dtype=torch.bool).tril()
    same_segment = segment[:, :, None] == segment[:, None, :]
    visible_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return idx, positions, (causal & same_segment & visible_branch).unsqueeze(1)


def _unwrap(model: nn.Module) -> GPT | ModernGPT:
    """The plain model inside a DDP wrapper and/or torch.compile module."""
    inner: Any = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    if not isinstance(inner, GPT | ModernGPT):
        raise TypeError(f"expected a GPT or ModernGPT model, got {type(inner).__name__}")
    return inner


@torch.no_grad()
def score_batch(model: nn.Module, batch: Sequence[RenderedExample], device: torch.device | str,
                precision: runtime.Precision | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and mean of each ending's token cross-entropies, both (len(batch), 4) float32 on
    CPU, from one forward pass with one row per example (see PackedExample)."""
    gpt = _unwrap(model)
    device = torch.device(device)
    packed = [pack_example(example, gpt.config.block_size) for example in batch]
    idx, positions, mask = _packed_inputs(packed)
    # Which output predicts which ending token, flattened over the batch and its endings.
    rows = [r for r, p in enumerate(packed) for predicts in p.predicts for _ in predicts]
    offsets = [o for p in packed for predicts in p.predicts for o in predicts]
    targets = [t for example in batch for ending in example.endings for t in ending]
    lengths = torch.tensor([len(ending) for example in batch for ending in example.endings])
    autocast = precision.autocast(device) if precision is not None else torch.autocast(
        device.type, enabled=False)
    with autocast:
        hidden = gpt.hidden_states(idx.to(device), positions=positions.to(device),
                                   attn_mask=mask.to(device))
        # The output head only where an ending token is predicted: most outputs are not.
        logits = gpt.lm_head(hidden[torch.tensor(rows, device=device),
                                    torch.tensor(offsets, device=device)]).float()
    losses = F.cross_entropy(logits, torch.tensor(targets, device=device), reduction="none")
    ending_of_token = torch.arange(len(lengths)).repeat_interleave(lengths).to(device)
    sums = torch.zeros(len(lengths), device=device).index_add_(0, ending_of_token, losses).cpu()
    return sums.view(-1, NUM_ENDINGS), (sums / lengths).view(-1, NUM_ENDINGS)


def pick_answers(sums: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ending each example picks, for acc and for acc_norm, from score_batch's losses.
    acc takes the ending with the highest log-likelihood (lowest summed loss over its
    tokens), which favours short endings; acc_norm the highest length-normalised one
    (lowest mean loss per token)."""
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
             world_size: int = 1, progress: bool = False,
             source: str = "the model") -> HellaSwagScore:
    """acc and acc_norm over `examples` (this rank's share, summed over initialised ranks);
    the model's train/eval mode is restored afterwards. Losses that are not finite stop it
    with an error naming `source`: an argmin over NaN would pick ending 0 and score it."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if not examples:
        raise ValueError("no HellaSwag examples to score\nhint: pass a file with examples")
    mine = [render_example(e) for e in examples[rank::world_size]]
    # Similar lengths side by side waste less compute on padding; totals do not depend on order.
    mine.sort(key=lambda r: len(r.context) + sum(map(len, r.endings)))
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    bar = tqdm(total=len(mine), desc="hellaswag", unit="ex", disable=not progress,
               file=sys.stderr)
    try:
        for begin in range(0, len(mine), batch_size):
            batch = mine[begin:begin + batch_size]
            sums, means = score_batch(model, batch, device, precision)
            if not bool(sums.isfinite().all()):
                raise ValueError(f"{source}: its HellaSwag losses are NaN or infinite\nhint: its "
                                 "weights overflow or are damaged; pass another checkpoint")
            pred, pred_norm = pick_answers(sums, means)
            labels = torch.tensor([e.label for e in batch])
            correct += int((pred == labels).sum())
            correct_norm += int((pred_norm == labels).sum())
            bar.update(len(batch))
            bar.set_postfix(acc_norm=f"{correct_norm / (begin + len(batch)):.4f}")
    finally:
        bar.close()
        model.train(was_training)
    totals = torch.tensor([correct, correct_norm, len(mine)], device=torch.device(device))
    if world_size > 1:
        torch.distributed.all_reduce(totals)  # summed over the ranks
    return HellaSwagScore(*totals.tolist())


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
    parser.add_argument("--limit", type=int, default=None,
                        help="score the first N examples (default: all)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="examples per forward pass (4 rows each)")
    cli.add_runtime_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    cli.check_range("--limit", args.limit, minimum=1)
    cli.check_range("--batch-size", args.batch_size, minimum=1)
    env = runtime.detect_distributed()
    device, precision = cli.resolve_runtime(args.device, args.dtype)
    device = runtime.distributed_device(env, device)
    with runtime.distributed(env, device):
        model = checkpoint.load_model(args.pretrained, args.checkpoint, device)  # checkpoint first
        if args.data is None:  # rank 0 downloads (if need be) while the other ranks wait
            if env.is_main:
                ensure_validation_file(args.cache_dir)
            if env.is_distributed:
                torch.distributed.barrier()
        examples = load_examples(args.data, args.limit, args.cache_dir)
        score = evaluate(model, examples, device, args.batch_size, precision, env.rank,
                         env.world_size, progress=env.is_main,
                         source=args.checkpoint or args.pretrained)
        runtime.print0(f"acc: {score.correct}/{score.total} = {score.acc:.4f}", env=env)
        runtime.print0(f"Accuracy: {score.correct_norm}/{score.total} = {score.acc_norm:.4f}",
                       env=env)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_script(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
