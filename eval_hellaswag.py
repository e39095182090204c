"""HellaSwag accuracy of pretrained GPT-2 or a nano-gpt checkpoint.

    python eval_hellaswag.py --pretrained=gpt2          # acc_norm 0.2955, acc 0.2859

An ending is scored by the cross-entropy of its own tokens in `encode(ctx) + encode(" " +
ending)`: acc picks the ending with the lowest summed loss, acc_norm the lowest mean loss per
token. One packed row per example holds the context once, then the endings, each attending to
the context and itself with the positions it would have alone (same scores, about half the
tokens, and the output head only where an ending token is predicted); rows are batched,
right-padded and masked; eval_core.py packs multiple-choice options the same way. Under
torchrun each rank scores `examples[rank::world_size]` and the totals are all-reduced once.
The validation file is downloaded once into `<data root>/hellaswag/` (or `--cache-dir`) and
checked (10042 examples) before it is kept.
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
        what = "HellaSwag file not found"
        if path.is_dir():
            what = "a directory, not a file"
        elif path.exists():
            what = "not a regular file"
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
            raise ValueError(f"{url}: downloaded {count} lines, expected {expected_lines}\n"
                             "hint: the download is incomplete; run again, or pass --data=JSONL")

    folder = Path(cache_dir) if cache_dir else default_data_root() / "hellaswag"
    try:
        return download(url, folder / HELLASWAG_VAL_FILE, check=check)
    except DownloadError as exc:
        raise DownloadError(f"{exc}, or pass --data=JSONL with a local copy") from None


# -------------------------------------------------------------------------------- scoring
@dataclass
class HellaSwagScore:
    correct: int  # acc: the ending with the lowest summed loss is the label
    correct_norm: int  # acc_norm: the ending with the lowest mean loss per token is the label
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
    # Similar lengths side by side waste less compute on padding; totals do not depend on order.
    # Characters stand in for tokens here, which score_batch counts.
    mine = sorted(examples[rank::world_size],
                  key=lambda e: len(e["ctx"]) + sum(map(len, e["endings"])))
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
            # The lowest summed loss (acc) favours short endings; the lowest mean per token
            # (acc_norm) does not.
            labels = torch.tensor([int(e["label"]) for e in batch])
            correct += int((sums.argmin(dim=1) == labels).sum())
            correct_norm += int((means.argmin(dim=1) == labels).sum())
            bar.update(len(batch))
            bar.set_postfix(acc_norm=f"{correct_norm / (begin + len(batch)):.4f}")
    finally:
        bar.close()
        model.train(was_training)
    totals = torch.tensor([correct, correct_norm, len(mine)], device=torch.device(device))
    if world_size > 1:
        torch.distributed.all_reduce(totals)  # summed over the ranks
    return HellaSwagScore(*totals.tolist())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper and/or torch.compile. Evaluation calls it with a new
    shape every batch, which the compiled module would recompile for."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


@torch.no_grad()
def score_batch(model: nn.Module, batch: Sequence[dict[str, Any]], device: torch.device | str,
                precision: runtime.Precision | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and mean of each ending's token cross-entropies, both (len(batch), 4) float32 on
    CPU, for examples as load_examples gives them, from one forward pass (packed_logits).
    An ending is scored as `encode(" " + ending)` after `encode(ctx)`: encoded on its own, so
    every ending starts at the same token boundary."""
    gpt = unwrap(model)
    if not isinstance(gpt, GPT | ModernGPT):
        raise TypeError(f"expected a GPT or ModernGPT model, got {type(gpt).__name__}")
    enc = get_tokenizer()
    tokens = []
    for example in batch:
        where = example.get("where", "a HellaSwag example")
        context = enc.encode_ordinary(example["ctx"])
        endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
        if not context:
            raise ValueError(f"{where}: a HellaSwag example needs at least one context token")
        for ending in endings:
            if len(ending) > gpt.config.block_size:
                raise ValueError(f"{where}: an ending of {len(ending)} tokens does not fit "
                                 f"the model's block_size {gpt.config.block_size}")
        tokens.append((context, endings))
    logits = packed_logits(gpt, tokens, device, precision)
    device = logits.device
    targets = torch.tensor([t for _, endings in tokens for ending in endings for t in ending],
                           device=device)
    losses = F.cross_entropy(logits, targets, reduction="none")
    lengths = torch.tensor([len(ending) for _, endings in tokens for ending in endings])
    ending_of_token = torch.arange(len(lengths)).repeat_interleave(lengths).to(device)
    sums = torch.zeros(len(lengths), device=device).index_add_(0, ending_of_token, losses).cpu()
    return sums.view(-1, NUM_ENDINGS), (sums / lengths).view(-1, NUM_ENDINGS)


def packed_logits(gpt: GPT | ModernGPT,
                  examples: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                  device: torch.device | str,
                  precision: runtime.Precision | None = None) -> torch.Tensor:
    """The float32 logits that predict every ending token of `examples` (context tokens,
    endings' tokens), in order of example, ending and token, from one forward pass with one
    packed row per example (rows right-padded to one width). A row holds the context once,
    then each ending but its last token (only ever predicted), each ending attending to the
    context and to itself with the positions it would have in a row of its own. A context
    plus ending over block_size + 1 tokens keeps its last block_size + 1, so that each ending
    then gets its own copy of the context. Contexts must not be empty, nor endings longer
    than block_size. eval_core.py packs a multiple-choice example's options the same way."""
    device = torch.device(device)
    block_size = gpt.config.block_size
    # Per row: token ids, position ids, and for the attention mask each token's span (the
    # offset where its context or ending starts) and the context span it also sees.
    rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
    scored: list[tuple[int, int]] = []  # (row, offset) of the output predicting each token
    for row, (context, endings) in enumerate(examples):
        tokens: list[int] = []
        positions: list[int] = []
        span: list[int] = []
        sees: list[int] = []
        predictors: list[list[int]] = [[] for _ in endings]
        cuts = [max(0, len(context) + len(ending) - (block_size + 1)) for ending in endings]
        # (the context kept, the endings that follow it): one copy for all unless cut.
        groups = ([(context[cut:], [j]) for j, cut in enumerate(cuts)] if any(cuts)
                  else [(context, range(len(endings)))])
        for kept, members in groups:
            context_start = len(tokens)
            tokens += kept
            positions += range(len(kept))
            span += [context_start] * len(kept)
            sees += [context_start] * len(kept)
            last_context = len(tokens) - 1  # its output predicts each ending's first token
            for j in members:
                inputs, ending_start = endings[j][:-1], len(tokens)
                if endings[j]:  # an empty ending (eval_core can give one) predicts nothing
                    predictors[j] = [last_context, *range(ending_start,
                                                          ending_start + len(inputs))]
                tokens += inputs
                positions += range(len(kept), len(kept) + len(inputs))
                span += [ending_start] * len(inputs)
                sees += [context_start] * len(inputs)
        scored += [(row, offset) for offsets in predictors for offset in offsets]
        rows.append((tokens, positions, span, sees))
    # Padding gets span -1, so it attends only to padding and no real token attends to it.
    idx, position_ids, span_ids, sees_ids = (
        pad_sequence([torch.tensor(r[k]) for r in rows], batch_first=True, padding_value=fill)
        for k, fill in enumerate((PAD_ID, 0, -1, -1)))
    width = idx.size(1)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    key_span = span_ids[:, None, :]
    mask = causal & ((key_span == span_ids[:, :, None]) | (key_span == sees_ids[:, :, None]))
    outputs = torch.tensor([row * width + offset for row, offset in scored], dtype=torch.long)
    autocast = precision.autocast(device) if precision is not None else torch.autocast(
        device.type, enabled=False)
    with autocast:
        hidden = gpt.hidden_states(idx.to(device), positions=position_ids.to(device),
                                   attn_mask=mask.unsqueeze(1).to(device))
        # The output head only where an ending token is predicted: most outputs are not.
        return gpt.lm_head(hidden.flatten(0, 1)[outputs.to(device)]).float()


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
