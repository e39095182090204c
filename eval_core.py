"""The DCLM CORE score of pretrained GPT-2 or a nano-gpt checkpoint, as nanochat computes it.

    python eval_core.py --pretrained=gpt2                  # nanochat's notebook: 124M 0.1139
    python eval_core.py --checkpoint=out/ckpt_0019073.pt --limit=100
    torchrun --nproc_per_node=8 eval_core.py --pretrained=gpt2-xl     # OpenAI's 1.5B: 0.2565

CORE (the DCLM paper, arXiv 2406.11794) averages 22 in-context tasks, each accuracy first
centred on its random baseline: `(acc - 0.01 * baseline) / (1 - 0.01 * baseline)`. The task
data is nanochat's eval_bundle: core.yaml lists the tasks, eval_meta_data.csv holds each
task's random baseline (percent), eval_data/ the jsonl files. Without --bundle it is
downloaded once into `<data root>/eval_bundle/` (resumable, CRC-checked, unpacked into a
temp folder that is then renamed).

Each task is shuffled with seed 1337 and cut to --limit; example i draws its few-shot
examples from that list with `random.Random(1234 + i)`, never itself. Prompts start with
GPT-2's <|endoftext|> as BOS; a sequence longer than the model's context keeps its last
tokens. Multiple choice and schema examples pick the option whose scored tokens have the
lowest mean cross-entropy (multiple choice: the choices after their common token prefix;
schema: the common token suffix after each context); a language-modelling example counts
when greedy decoding reproduces every continuation token. Logits beyond GPT-2's 50257
tokens (a padded vocabulary's extra rows) take part in no softmax. A multiple-choice
example's options share their context, so a GPT or ModernGPT scores them as HellaSwag's
endings are scored: one packed row, the context once (eval_hellaswag.packed_logits; the same
scores with fewer tokens). Under torchrun rank r scores examples r, r + world_size, ...; the
counts are summed with all_reduce.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
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
import eval_hellaswag
import runtime
from data import (
    EOT_TOKEN,
    VOCAB_SIZE,
    DownloadError,
    atomic_output,
    default_data_root,
    get_tokenizer,
    write_error,
)
from model import GPT
from model_modern import ModernGPT

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_DIR = "eval_bundle"
CORE_YAML = "core.yaml"
META_CSV = "eval_meta_data.csv"
DATA_DIR = "eval_data"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # nanochat's: the order --limit takes its first N from
FEWSHOT_SEED = 1234  # example i draws its few-shot examples with Random(FEWSHOT_SEED + i)
BOS_ID = EOT_TOKEN  # GPT-2 has no BOS of its own; <|endoftext|> starts every document


# ------------------------------------------------------------------------------- bundle
@dataclass(frozen=True)
class Task:
    """One line of core.yaml with its examples (shuffled, limited) and random baseline."""

    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent, as eval_meta_data.csv gives it
    examples: list[dict[str, Any]]
    lines: list[int]  # each example's line in `source`, for error messages
    source: Path


def load_tasks(bundle: str | os.PathLike[str] | None, labels: Sequence[str] | None = None,
               limit: int | None = None) -> list[Task]:
    """The tasks of an unpacked bundle (None: the downloaded one), in core.yaml's order,
    only `labels` if given, each cut to its first `limit` examples after the seeded shuffle."""
    folder = Path(bundle) if bundle is not None else ensure_bundle()
    config_path = folder / CORE_YAML
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not found\nhint: --bundle must name the folder "
                                "that holds core.yaml, eval_meta_data.csv and eval_data/")
    specs = read_core_yaml(config_path)
    if labels:
        unknown = [label for label in labels if label not in specs]
        if unknown:
            raise cli.UsageError(f"--tasks: {', '.join(unknown)} not in {config_path}\nhint: "
                                 f"its tasks are {', '.join(specs)}")
        specs = {label: specs[label] for label in dict.fromkeys(labels)}
    baselines = read_baselines(folder / META_CSV, list(specs))
    tasks = []
    for label, spec in specs.items():
        source = folder / DATA_DIR / spec["dataset_uri"]
        numbered = read_examples(source, spec["icl_task_type"])
        random.Random(SHUFFLE_SEED).shuffle(numbered)
        numbered = numbered[:limit]
        if len(numbered) <= spec["num_fewshot"]:
            raise ValueError(f"{source}: {len(numbered)} examples, too few for {label}'s "
                             f"{spec['num_fewshot']}-shot prompts\nhint: raise --limit (an "
                             "example is never its own few-shot example)")
        tasks.append(Task(label, spec["icl_task_type"], spec["num_fewshot"],
                          spec["continuation_delimiter"], baselines[label],
                          [example for _, example in numbered],
                          [line for line, _ in numbered], source))
    return tasks


def read_core_yaml(path: Path) -> dict[str, dict[str, Any]]:
    """core.yaml's icl_tasks by label, each checked; num_fewshot a one-item list, as
    nanochat scores only its first value."""
    import yaml  # safe_load: plain data only, no Python objects

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or cli.first_line(exc)
        raise ValueError(f"{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    tasks = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{path}: needs an 'icl_tasks' list of tasks")
    specs: dict[str, dict[str, Any]] = {}
    for number, task in enumerate(tasks, start=1):
        where = f"{path}: task {number}"
        if not isinstance(task, dict):
            raise ValueError(f"{where}: not a mapping of label, dataset_uri, num_fewshot, "
                             "icl_task_type")
        label, uri = task.get("label"), task.get("dataset_uri")
        shots, kind = task.get("num_fewshot"), task.get("icl_task_type")
        delimiter = task.get("continuation_delimiter", " ")
        if not isinstance(label, str) or not label:
            raise ValueError(f"{where}: 'label' must be a non-empty string")
        where = f"{path}: task {label!r}"
        if label in specs:
            raise ValueError(f"{where}: the label appears twice")
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"{where}: 'dataset_uri' must be a path under {DATA_DIR}/")
        if not (isinstance(shots, list) and len(shots) == 1 and type(shots[0]) is int
                and shots[0] >= 0):
            raise ValueError(f"{where}: 'num_fewshot' is {shots!r}; it must be a list of one "
                             "count, such as [0] or [10]")
        if kind not in TASK_TYPES:
            raise ValueError(f"{where}: unknown icl_task_type {kind!r}; one of "
                             f"{', '.join(TASK_TYPES)}")
        if not isinstance(delimiter, str):
            raise ValueError(f"{where}: 'continuation_delimiter' must be a string")
        specs[label] = dict(dataset_uri=uri, num_fewshot=shots[0], icl_task_type=kind,
                            continuation_delimiter=delimiter)
    return specs


def read_baselines(path: Path, labels: Sequence[str]) -> dict[str, float]:
    """The random baseline (percent) of each of `labels` from eval_meta_data.csv."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (it holds the tasks' random baselines)")
    found: dict[str, tuple[str, int]] = {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "Eval Task" not in columns or "Random baseline" not in columns:
                raise ValueError(f"{path}: needs 'Eval Task' and 'Random baseline' columns "
                                 f"(found {', '.join(columns) or 'none'})")
            for row in reader:
                found[row["Eval Task"]] = (row["Random baseline"], reader.line_num)
    except csv.Error as exc:
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    baselines = {}
    for label in labels:
        if label not in found:
            raise ValueError(f"{path}: no row for task {label!r}; its random baseline is "
                             "needed to centre the accuracy")
        text, line = found[label]
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if not 0 <= value < 100:
            raise ValueError(f"{path}:{line}: random baseline {text!r} of {label!r}; it must "
                             "be a percentage in [0, 100)")
        baselines[label] = value
    return baselines


# Fields a row of each task type needs, and the list `gold` indexes.
ROW_FIELDS = {"multiple_choice": ("query", "choices", "gold"),
              "schema": ("context_options", "continuation", "gold"),
              "language_modeling": ("context", "continuation")}


def read_examples(path: Path, task_type: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, example) for each non-blank line of a task's jsonl, shapes checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a dataset_uri of core.yaml names it)")
    with open(path, "rb") as f:
        numbered = [(number, parse_row(line, task_type, f"{path}:{number}"))
                    for number, line in enumerate(f, start=1) if line.strip()]
    if not numbered:
        raise ValueError(f"{path}: no examples")
    return numbered


def parse_row(line: bytes, task_type: str, where: str) -> dict[str, Any]:
    """One jsonl row of a task of `task_type`, every field it is scored by checked."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{where}: not a UTF-8 JSON line ({getattr(exc, 'msg', exc)})") from None
    fields = ROW_FIELDS[task_type]
    if not isinstance(row, dict) or not set(fields) <= row.keys():
        raise ValueError(f"{where}: a {task_type} row needs {', '.join(fields)}")
    options_key = {"multiple_choice": "choices", "schema": "context_options"}.get(task_type)
    for key in fields:
        value = row[key]
        if key == options_key:
            if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                raise ValueError(f"{where}: '{key}' must be a non-empty list of strings")
        elif key == "gold":
            if type(value) is not int or not 0 <= value < len(row[options_key]):
                raise ValueError(f"{where}: 'gold' is {value!r}; it must index "
                                 f"'{options_key}' (0..{len(row[options_key]) - 1})")
        elif not isinstance(value, str):
            raise ValueError(f"{where}: '{key}' must be a string")
    return row


# ----------------------------------------------------------------------------- download
def ensure_bundle(data_root: str | os.PathLike[str] | None = None,
                  url: str = EVAL_BUNDLE_URL) -> Path:
    """`<data root>/eval_bundle`, downloaded and unpacked the first time. An interrupted
    download resumes from its `.tmp` file; the archive's CRCs are tested before unpacking,
    and the folder appears only once whole."""
    root = Path(data_root) if data_root is not None else default_data_root()
    folder = root / BUNDLE_DIR
    if (folder / CORE_YAML).is_file():
        return folder
    if folder.exists():
        raise FileExistsError(f"{folder}: exists without {CORE_YAML}\nhint: remove it to "
                              "download the bundle again, or pass --bundle=DIR")
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"{BUNDLE_DIR}.zip"
    if not archive.is_file():
        partial = root / f"{BUNDLE_DIR}.zip.tmp"
        print(f"downloading {url} into {root} (once)", file=sys.stderr, flush=True)
        fetch_resumable(url, partial)
        os.replace(partial, archive)
    try:
        unpack_bundle(archive, folder)
    except (zipfile.BadZipFile, ValueError) as exc:
        archive.unlink(missing_ok=True)
        raise ValueError(f"{archive}: {cli.first_line(exc)}; deleted it\nhint: run again to "
                         "download it afresh") from None
    archive.unlink()
    return folder


def fetch_resumable(url: str, partial: Path) -> None:
    """`url` into `partial`, continuing after the bytes already there when the server honours
    an HTTP Range request (anything else starts over)."""
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    hint = "hint: unpack eval_bundle.zip on a machine with network and pass --bundle=DIR"
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing after `have`: the file is whole already
            return
        raise DownloadError(f"cannot download {url} (HTTP {exc.code})\n{hint}") from None
    except OSError as exc:  # URLError, timeouts and resets are all OSErrors
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot download {url} ({reason}; no network?)\n{hint}") from None
    with response:
        content_range = response.headers.get("Content-Range", "")
        resume = have > 0 and response.status == 206 and content_range.startswith(
            f"bytes {have}-")
        try:
            out = open(partial, "ab" if resume else "wb")
        except OSError as exc:
            raise write_error(partial, exc) from None
        with out:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except OSError as exc:
                    raise DownloadError(f"download of {url} interrupted ({exc})\nhint: run "
                                        f"again to resume from {partial}") from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise write_error(partial, exc) from None
            out.flush()
            os.fsync(out.fileno())


def unpack_bundle(archive: Path, folder: Path) -> None:
    """The archive's CRCs tested, its content unpacked into a temp folder beside `folder`,
    the part holding core.yaml renamed to `folder`."""
    with zipfile.ZipFile(archive) as zf:
        try:
            bad = zf.testzip()
        except (zlib.error, EOFError) as exc:  # damage deflate itself trips over
            raise ValueError(f"corrupt compressed data ({exc})") from None
        if bad is not None:
            raise ValueError(f"CRC check failed for {bad}")
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            zf.extractall(staging)  # extractall keeps every member inside `staging`
            top = staging / BUNDLE_DIR if (staging / BUNDLE_DIR).is_dir() else staging
            if not (top / CORE_YAML).is_file():
                raise ValueError(f"no {CORE_YAML} inside; not nanochat's eval_bundle.zip")
            os.replace(top, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Row:
    """One token sequence of an example: BOS, the prompt, and which tokens are scored
    (tokens[start:end], each predicted by the output one position before it)."""

    tokens: list[int]
    start: int
    end: int


def fewshot_indices(index: int, count: int, num_fewshot: int) -> list[int]:
    """Indices of example `index`'s few-shot examples among `count`: what nanochat's
    `Random(1234 + index).sample([j for j in range(count) if j != index], k)` gives,
    drawn over positions so no list of `count` items is built per example."""
    drawn = random.Random(FEWSHOT_SEED + index).sample(range(count - 1), num_fewshot)
    return [j + (j >= index) for j in drawn]


def render_prompts(task: Task, index: int) -> list[str]:
    """The prompt texts of example `index`, as nanochat's templates render them: few-shot
    examples solved and separated by blank lines, then one prompt per option (language
    modelling: the prompt without its continuation, stripped, then with it)."""
    item, sep = task.examples[index], task.delimiter
    shots = []
    if task.num_fewshot:
        drawn = fewshot_indices(index, len(task.examples), task.num_fewshot)
        shots = [task.examples[j] for j in drawn]
    if task.task_type == "multiple_choice":
        prefix = "".join(f"{s['query']}{sep}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{sep}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{sep}{s['continuation']}\n\n"
                         for s in shots)
        return [f"{prefix}{option}{sep}{item['continuation']}"
                for option in item["context_options"]]
    prefix = "".join(f"{s['context'].strip()}{sep}{s['continuation']}\n\n" for s in shots)
    without = f"{prefix}{item['context'].strip()}{sep}"
    return [without.strip(), without + item["continuation"]]


def common_length(sequences: Sequence[Sequence[int]], from_end: bool = False) -> int:
    """How many leading (from_end: trailing) tokens all sequences share."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        position = -1 - i if from_end else i
        if any(s[position] != sequences[0][position] for s in sequences):
            return i
    return shortest


def example_rows(task: Task, index: int, max_len: int | None) -> list[Row]:
    """The rows example `index` is scored on, each longer than `max_len` cut to its last
    `max_len` tokens."""
    enc = get_tokenizer()
    where = f"{task.source}:{task.lines[index]}"
    tokens = [[BOS_ID, *enc.encode_ordinary(p)] for p in render_prompts(task, index)]
    if task.task_type == "multiple_choice":  # the choices follow their shared prefix
        start = common_length(tokens)
        rows = [Row(t, start, len(t)) for t in tokens]
    elif task.task_type == "schema":  # the shared continuation follows each context
        suffix = common_length(tokens, from_end=True)
        rows = [Row(t, len(t) - suffix, len(t)) for t in tokens]
    else:
        without, with_continuation = tokens
        if (len(without) >= len(with_continuation)
                or with_continuation[:len(without)] != without):
            raise ValueError(f"{where}: the prompt without its continuation does not tokenize "
                             "as a prefix of the prompt with it")
        rows = [Row(with_continuation, len(without), len(with_continuation))]
    if max_len is None:
        return rows
    cropped = []
    for row in rows:
        cut = max(0, len(row.tokens) - max_len)
        if row.start - cut < 1:  # the first scored token needs one token before it
            raise ValueError(f"{where}: {row.end - row.start} scored tokens do not fit the "
                             f"model's context of {max_len} tokens")
        cropped.append(Row(row.tokens[cut:], row.start - cut, row.end - cut))
    return cropped


# ------------------------------------------------------------------------------- scoring
def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model takes: config.block_size, or a max_seq_len attribute."""
    inner = eval_hellaswag.unwrap(model)
    config = getattr(inner, "config", None)
    length = getattr(config, "block_size", None) or getattr(inner, "max_seq_len", None)
    return int(length) if length else None


@torch.no_grad()
def score_rows(model: nn.Module, examples: Sequence[Sequence[Row]], device: torch.device | str,
               precision: runtime.Precision | None = None,
               packed: bool = False) -> tuple[list[float], list[bool]]:
    """For each row of each example, from one forward pass: the mean cross-entropy of its
    scored tokens, and whether greedy decoding reproduces them all. Each row is a sequence of
    its own, right-padded: padding comes after every scored token, so causal attention never
    sees it. `packed` (a GPT or ModernGPT whose examples' rows share their tokens before
    `start`): one row per example instead, the shared context once and each option after it,
    as eval_hellaswag.packed_logits packs HellaSwag's endings (the same scores, fewer tokens)."""
    device = torch.device(device)
    rows = [row for example in examples for row in example]
    spans = [range(r.start, r.end) for r in rows]
    targets = torch.tensor([r.tokens[p] for r, span in zip(rows, spans, strict=True)
                            for p in span], dtype=torch.long, device=device)
    if packed:
        if not isinstance(model, GPT | ModernGPT):
            raise TypeError(f"packed scoring needs a GPT or ModernGPT, got {type(model).__name__}")
        logits = eval_hellaswag.packed_logits(
            model, [(example[0].tokens[:example[0].start],
                     [r.tokens[r.start:r.end] for r in example]) for example in examples],
            device, precision)
    else:
        idx = pad_sequence([torch.tensor(r.tokens) for r in rows], batch_first=True,
                           padding_value=BOS_ID).to(device)
        autocast = precision.autocast(device) if precision is not None else torch.autocast(
            device.type, enabled=False)
        with autocast:
            output = model(idx)
        logits = output[0] if isinstance(output, tuple) else output
        which = torch.tensor([i for i, span in enumerate(spans) for _ in span], dtype=torch.long)
        before = torch.tensor([p - 1 for span in spans for p in span], dtype=torch.long)
        logits = logits[which.to(device), before.to(device)]
    if logits.size(-1) < VOCAB_SIZE:
        raise ValueError(f"the model has {logits.size(-1)} output logits, fewer than GPT-2's "
                         f"{VOCAB_SIZE} tokens")
    # Only GPT-2's real tokens: a padded vocabulary's extra rows are no possible answer.
    picked = logits[:, :VOCAB_SIZE].float()
    losses = F.cross_entropy(picked, targets, reduction="none").cpu()
    hits = (picked.argmax(dim=-1) == targets).cpu()
    lengths = [len(span) for span in spans]
    means = [float(chunk.mean()) for chunk in losses.split(lengths)]  # empty: nan
    greedy = [bool(chunk.all()) for chunk in hits.split(lengths)]
    return means, greedy


def judge(task: Task, index: int, means: list[float], greedy: list[bool]) -> bool:
    """Whether example `index` is answered right. The option with the lowest mean loss wins,
    the first on ties (Python's min, as nanochat picks it, also where a loss is nan)."""
    if task.task_type == "language_modeling":
        return greedy[0]
    pick = min(range(len(means)), key=means.__getitem__)
    return bool(pick == task.examples[index]["gold"])


# An example to score: its index in the task, its rows, whether they go in one packed row.
Scored = tuple[int, list[Row], bool]


def batches(items: list[Scored], max_rows: int) -> list[list[Scored]]:
    """Consecutive examples grouped so a group holds at most `max_rows` rows (an example
    with more rows goes alone): an example's options stay in one forward pass."""
    groups: list[list[Scored]] = []
    rows = 0
    for item in items:
        if not groups or rows + len(item[1]) > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(item)
        rows += len(item[1])
    return groups


@dataclass
class CoreResult:
    """Accuracy and centred accuracy per task label; `core` their mean."""

    results: dict[str, float]
    centered: dict[str, float]

    @property
    def core(self) -> float:
        return sum(self.centered.values()) / len(self.centered) if self.centered else math.nan

    def as_json(self) -> dict[str, Any]:
        return {"results": self.results, "centered_results": self.centered,
                "core_metric": self.core}


def centered(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so the random baseline (percent) scores 0 and a perfect score 1."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def evaluate(model: nn.Module, tasks: Sequence[Task], device: torch.device | str,
             precision: runtime.Precision | None = None, rank: int = 0, world_size: int = 1,
             batch_size: int = 16, progress: bool = False,
             report: Callable[[str, float, float, float], None] | None = None,
             pack: bool = True) -> CoreResult:
    """Every task scored by `model` (forward(idx) -> (logits, None)); this rank takes examples
    rank::world_size and the counts are summed over initialised ranks. `batch_size` is rows
    per forward pass; `report(label, accuracy, centred, seconds)` is called as each task
    finishes. A GPT or ModernGPT scores an example whose options share their context in one
    packed row (score_rows); pack=False scores every option as a row of its own instead,
    for comparison. The model's train/eval mode is restored afterwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    device = torch.device(device)
    runner, max_len = eval_hellaswag.unwrap(model), context_length(model)
    # Packing needs hidden_states that take positions and an attention mask.
    packable = pack and isinstance(runner, GPT | ModernGPT)
    was_training = model.training
    model.eval()
    result = CoreResult({}, {})
    try:
        for task in tasks:
            started = time.perf_counter()
            mine: list[Scored] = []
            for i in range(rank, len(task.examples), world_size):
                rows = example_rows(task, i, max_len)
                # Multiple choice: the options follow one context, unless the crop cut them
                # by different amounts. Schema rows differ in context, language modelling
                # has one row: those keep a row per option.
                shared = len(rows) > 1 and len({tuple(r.tokens[:r.start]) for r in rows}) == 1
                mine.append((i, rows, packable and shared))
            mine.sort(key=lambda item: max(len(r.tokens) for r in item[1]))  # less padding
            correct = 0
            with tqdm(total=len(mine), desc=task.label, unit="ex", disable=not progress,
                      file=sys.stderr, leave=False) as bar:
                for group in batches(mine, batch_size):
                    for packed in (True, False):
                        part = [(index, rows) for index, rows, shared in group
                                if shared == packed]
                        if not part:
                            continue
                        means, greedy = score_rows(runner, [rows for _, rows in part], device,
                                                   precision, packed)
                        offset = 0
                        for index, rows in part:
                            span = slice(offset, offset + len(rows))
                            correct += judge(task, index, means[span], greedy[span])
                            offset += len(rows)
                    bar.update(len(group))
            total = torch.tensor([correct], dtype=torch.float64, device=device)
            if world_size > 1:
                torch.distributed.all_reduce(total)  # summed over the ranks
            accuracy = float(total) / len(task.examples)
            result.results[task.label] = accuracy
            result.centered[task.label] = centered(accuracy, task.random_baseline)
            if report is not None:
                report(task.label, accuracy, result.centered[task.label],
                       time.perf_counter() - started)
    finally:
        model.train(was_training)
    return result


# ------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--bundle", default=None,
                        help="an unpacked eval bundle: the folder holding core.yaml, "
                             "eval_meta_data.csv and eval_data/ (default: nanochat's, "
                             "downloaded once into <data root>/eval_bundle)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task labels; CORE is then their mean "
                             "(default: every task in core.yaml)")
    parser.add_argument("--limit", type=int, default=None,
                        help="score the first N examples of each task after the seeded "
                             "shuffle (default: all)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="token sequences per forward pass; an example's options stay "
                             "together")
    parser.add_argument("--out", default=None,
                        help="also write results, centered_results and core_metric to this "
                             "JSON file (default: none)")
    cli.add_runtime_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    cli.check_range("--limit", args.limit, minimum=1)
    cli.check_range("--batch-size", args.batch_size, minimum=1)
    labels = None
    if args.tasks is not None:
        labels = [label.strip() for label in args.tasks.split(",") if label.strip()]
        if not labels:
            raise cli.UsageError(f"--tasks={args.tasks!r}: name at least one task label")
    env = runtime.detect_distributed()
    device, precision = cli.resolve_runtime(args.device, args.dtype)
    device = runtime.distributed_device(env, device)
    with runtime.distributed(env, device):
        bundle = args.bundle
        if bundle is None:  # rank 0 downloads (if need be) while the other ranks wait
            if env.is_main:
                ensure_bundle()
            if env.is_distributed:
                torch.distributed.barrier()
            bundle = default_data_root() / BUNDLE_DIR
        tasks = load_tasks(bundle, labels, args.limit)  # a bad bundle fails before the model
        model = checkpoint.load_model(args.pretrained, args.checkpoint, device)

        def report(label: str, accuracy: float, centred: float, seconds: float) -> None:
            runtime.print0(f"{label:<34} accuracy {accuracy:.4f} | centered {centred:.4f} | "
                           f"{seconds:.1f} s", env=env)

        result = evaluate(model, tasks, device, precision, env.rank, env.world_size,
                          args.batch_size, progress=env.is_main, report=report)
        runtime.print0(f"CORE: {result.core:.4f}", env=env)
        if args.out is not None and env.is_main:
            with atomic_output(args.out) as f:
                f.write((json.dumps(result.as_json(), indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_script(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
