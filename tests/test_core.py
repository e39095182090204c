"""eval_core.py against a reference worked out here from a tiny model's own logits.

The reference renders each prompt with f-strings written from nanochat's templates, draws
few-shot examples with nanochat's literal `Random(1234 + i).sample([j for j != i], k)`, runs
the model on one sequence at a time and takes per-option mean losses with F.cross_entropy;
eval_core batches, pads and gathers instead. Bundles are written in tmp_path in the real
bundle's layout (core.yaml with num_fewshot lists, eval_meta_data.csv, eval_data/*.jsonl).
"""

from __future__ import annotations

import http.server
import io
import json
import math
import os
import random
import re
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import cli
import eval_core as core
from data import DownloadError, get_tokenizer
from model import GPT, GPTConfig
from model_modern import ModernConfig, ModernGPT

WORDS = ("the a man woman dog runs jumps into water kitchen knife cuts onion slowly then "
         "quickly and gets ball throws camera shows close up of her his bike rope grass "
         "paints wall smiles at people crowd watches stage piano plays café naïve").split()
BOS = 50256
VOCAB = 50257
# A padded vocabulary (50304 rows), and a small width: the output head is most of the cost.
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50304, block_size=64)


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def mc_rows(rng: random.Random, n: int, choices: int = 4) -> list[dict[str, Any]]:
    return [{"query": sentence(rng, 3, 12).capitalize() + "?",
             "choices": [sentence(rng, 1, 5) for _ in range(choices)],
             "gold": rng.randrange(choices)} for _ in range(n)]


def schema_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [{"context_options": [sentence(rng, 3, 10) for _ in range(2)],
             "continuation": sentence(rng, 2, 6) + ".", "gold": rng.randrange(2)}
            for _ in range(n)]


def lm_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [{"context": sentence(rng, 4, 14) + " ", "continuation": sentence(rng, 1, 2)}
            for _ in range(n)]


# label -> (task type, shots, continuation_delimiter or None, random baseline, rows)
Spec = tuple[str, int, "str | None", float, list[dict[str, Any]]]


def task_specs() -> dict[str, Spec]:
    rng = random.Random(7)
    return {
        "mc_zero": ("multiple_choice", 0, None, 25.0, mc_rows(rng, 9)),
        "mc_few": ("multiple_choice", 3, "\nAnswer: ", 25.0, mc_rows(rng, 8)),
        "schema_zero": ("schema", 0, None, 50.0, schema_rows(rng, 8)),
        "schema_few": ("schema", 2, None, 50.0, schema_rows(rng, 7)),
        "lm_zero": ("language_modeling", 0, None, 0.0, lm_rows(rng, 5)),
        "lm_few": ("language_modeling", 2, " ", 0.0, lm_rows(rng, 5)),
    }


def write_bundle(folder: Path, specs: dict[str, Spec]) -> Path:
    """A bundle in the real layout: core.yaml's block-list form, the CSV's real columns."""
    (folder / "eval_data" / "sub").mkdir(parents=True)
    yaml_lines = ["icl_tasks:"]
    csv_lines = ["Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,"
                 "Centered Metric?,Description"]
    for label, (kind, shots, delimiter, baseline, rows) in specs.items():
        yaml_lines += ["-", f"  label: {label}", f"  dataset_uri: sub/{label}.jsonl",
                       f"  num_fewshot: [{shots}]", f"  icl_task_type: {kind}"]
        if delimiter is not None:
            yaml_lines.append(f"  continuation_delimiter: {json.dumps(delimiter)}")
        csv_lines.append(f'{label},cat,{kind},{shots},{len(rows)},{baseline},,"a, b"')
        (folder / "eval_data" / "sub" / f"{label}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "core.yaml").write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")
    (folder / "eval_meta_data.csv").write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def specs() -> dict[str, Spec]:
    return task_specs()


@pytest.fixture
def bundle(tmp_path: Path, specs: dict[str, Spec]) -> Path:
    return write_bundle(tmp_path / "eval_bundle", specs)


@pytest.fixture(scope="module")
def tiny() -> GPT:
    """A padded vocabulary whose extra rows would win every softmax they took part in."""
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = 3.0 * torch.randn(50304 - VOCAB, 16)
    return model


# ------------------------------------------------------------------------------ reference
def reference_prompts(kind: str, shots: int, delimiter: str, data: list[dict[str, Any]],
                      i: int) -> list[str]:
    picks = random.Random(1234 + i).sample([j for j in range(len(data)) if j != i], shots) \
        if shots else []
    item = data[i]
    if kind == "multiple_choice":
        prefix = "".join(f"{data[j]['query']}{delimiter}{data[j]['choices'][data[j]['gold']]}"
                         "\n\n" for j in picks)
        return [prefix + item["query"] + delimiter + c for c in item["choices"]]
    if kind == "schema":
        prefix = "".join(data[j]["context_options"][data[j]["gold"]] + delimiter
                         + data[j]["continuation"] + "\n\n" for j in picks)
        return [prefix + o + delimiter + item["continuation"] for o in item["context_options"]]
    prefix = "".join(data[j]["context"].strip() + delimiter + data[j]["continuation"] + "\n\n"
                     for j in picks)
    body = prefix + item["context"].strip() + delimiter
    return [body.strip(), body + item["continuation"]]


def reference_spans(kind: str, prompts: list[str]) -> list[tuple[list[int], int, int]]:
    enc = get_tokenizer()
    tokens = [[BOS, *enc.encode_ordinary(p)] for p in prompts]
    if kind == "multiple_choice":
        start = len(os.path.commonprefix(tokens))
        return [(t, start, len(t)) for t in tokens]
    if kind == "schema":
        suffix = len(os.path.commonprefix([t[::-1] for t in tokens]))
        return [(t, len(t) - suffix, len(t)) for t in tokens]
    return [(tokens[1], len(tokens[0]), len(tokens[1]))]


def reference_example(model: nn.Module, kind: str, spans: list[tuple[list[int], int, int]],
                      block_size: int) -> tuple[list[float], bool]:
    """Per-option mean losses and the greedy match, one unpadded sequence at a time."""
    means, greedy = [], True
    for tokens, start, end in spans:
        cut = max(0, len(tokens) - block_size)
        tokens, start, end = tokens[cut:], start - cut, end - cut
        with torch.no_grad():
            logits = model(torch.tensor([tokens]))[0][0, :, :VOCAB]
        targets = torch.tensor(tokens[start:end], dtype=torch.long)
        means.append(F.cross_entropy(logits[start - 1:end - 1], targets).item())
        greedy = bool((logits[start - 1:end - 1].argmax(-1) == targets).all())
    return means, greedy


def reference_accuracy(model: nn.Module, spec: Spec, limit: int | None = None,
                       block_size: int = 64) -> tuple[float, list[list[float]]]:
    kind, shots, delimiter, _, rows = spec
    data = list(rows)
    random.Random(1337).shuffle(data)
    data = data[:limit]
    correct, all_means = 0, []
    for i in range(len(data)):
        spans = reference_spans(kind, reference_prompts(kind, shots, delimiter or " ", data, i))
        means, greedy = reference_example(model, kind, spans, block_size)
        all_means.append(means)
        if kind == "language_modeling":
            correct += greedy
        else:
            correct += means.index(min(means)) == data[i]["gold"]
    return correct / len(data), all_means


# ---------------------------------------------------------------------------- scoring
def test_every_task_type_matches_the_reference(tiny: GPT, bundle: Path, specs):
    tasks = core.load_tasks(bundle)
    assert [t.label for t in tasks] == list(specs)
    result = core.evaluate(tiny, tasks, "cpu", batch_size=5)
    centred = []
    for task in tasks:
        spec = specs[task.label]
        accuracy, means = reference_accuracy(tiny, spec)
        assert result.results[task.label] == accuracy, task.label
        if spec[0] != "language_modeling":
            assert 0 < accuracy < 1, f"{task.label}: the data must tell right from wrong"
            for i, expected in enumerate(means):  # the losses themselves, not just the pick
                got, _ = core.score_rows(tiny, [core.example_rows(task, i, 64)], "cpu")
                assert got == pytest.approx(expected, abs=1e-5)
        baseline = spec[3] / 100
        centred.append((accuracy - baseline) / (1 - baseline))
        assert result.centered[task.label] == pytest.approx(centred[-1], abs=1e-12)
    assert result.core == pytest.approx(sum(centred) / len(centred), abs=1e-12)


class SuccessorLM(nn.Module):
    """A second model class with GPT's interface: each token's next-token logits favour its
    successor in a fixed table, and the padding rows above GPT-2's vocabulary score higher
    still, so an unmasked argmax would never match."""

    def __init__(self, successors: dict[int, int]) -> None:
        super().__init__()
        table = torch.zeros(50304, dtype=torch.long)
        for token, successor in successors.items():
            table[token] = successor
        self.register_buffer("table", table)
        self.max_seq_len = 64

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits = torch.zeros(*idx.shape, 50304)
        logits[..., VOCAB:] = 100.0
        logits.scatter_(-1, self.get_buffer("table")[idx].unsqueeze(-1), 10.0)
        return logits, None


def test_language_modelling_counts_exact_greedy_continuations(tmp_path: Path):
    enc = get_tokenizer()
    red, green, blue = (enc.encode_ordinary(w)[0] for w in (" red", " green", " blue"))
    model = SuccessorLM({red: green, green: blue, blue: red})
    rows = [{"context": "colours: red", "continuation": "green"},          # right
            {"context": "colours: red", "continuation": "green blue"},     # right, 2 tokens
            {"context": "colours: red", "continuation": "green red"},      # second token wrong
            {"context": "colours: blue", "continuation": "green"},         # wrong
            {"context": "colours: blue ", "continuation": "red green"}]    # right (trimmed)
    write_bundle(tmp_path / "b", {"lm": ("language_modeling", 0, None, 0.0, rows)})
    result = core.evaluate(model, core.load_tasks(tmp_path / "b"), "cpu", batch_size=2)
    assert result.results == {"lm": 3 / 5}
    assert result.core == pytest.approx(3 / 5)


def random_modern() -> ModernGPT:
    """A tiny ModernGPT with every weight random: at its own init the output projections are
    zero, every block the identity, and the options' losses would barely differ."""
    torch.manual_seed(0)
    model = ModernGPT(ModernConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50304,
                                   block_size=64))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt", "modern"])
def test_packed_options_score_as_rows_of_their_own(kind: str, tiny: GPT, specs,
                                                   tmp_path: Path):
    """A multiple-choice example's options in one packed row (the shared context once) give
    the per-option mean losses and greedy flags of one padded row per option, and the same
    accuracies, which equal the one-sequence-at-a-time reference. The few-shot prompts are
    cropped to the context (some options by different amounts: those keep a row each); in
    mc_prefix one choice is all shared prefix, so it scores no token (a nan mean) either way."""
    model = tiny if kind == "gpt" else random_modern()
    rows = specs["mc_few"][4]
    prefix_rows = [dict(row, choices=["dog dog", "dog", "dog runs", "dog cuts onion"])
                   for row in rows]
    mc = {"mc_zero": specs["mc_zero"], "mc_few": specs["mc_few"],
          "mc_six": ("multiple_choice", 6, "\nAnswer: ", 25.0, rows),
          "mc_prefix": ("multiple_choice", 0, None, 25.0, prefix_rows)}
    tasks = core.load_tasks(write_bundle(tmp_path / "b", mc))
    shared = cut_apart = 0
    for task in tasks:
        for i in range(len(task.examples)):
            example = core.example_rows(task, i, 64)
            if len({tuple(r.tokens[:r.start]) for r in example}) > 1:
                assert any(len(r.tokens) > 64 for r in core.example_rows(task, i, None))
                cut_apart += 1
                continue
            shared += 1
            packed = core.score_rows(model, [example], "cpu", packed=True)
            alone = core.score_rows(model, [example], "cpu")
            assert packed[0] == pytest.approx(alone[0], abs=1e-5, nan_ok=True)
            assert packed[1] == alone[1]
            assert (task.label == "mc_prefix") == any(math.isnan(m) for m in packed[0])
    assert shared > 10 and cut_apart > 0
    result = core.evaluate(model, tasks, "cpu", batch_size=7)
    assert result.as_json() == core.evaluate(model, tasks, "cpu", batch_size=7,
                                             pack=False).as_json()
    for label, spec in mc.items():
        accuracy, _ = reference_accuracy(model, spec)
        assert result.results[label] == accuracy, label


def test_left_crop_keeps_the_last_tokens(tiny: GPT, specs, tmp_path: Path):
    few = dict(specs)
    few["mc_few"] = ("multiple_choice", 6, "\nAnswer: ", 25.0, specs["mc_few"][4])
    write_bundle(tmp_path / "b", {"mc_few": few["mc_few"]})
    task = core.load_tasks(tmp_path / "b")[0]
    for i in range(len(task.examples)):
        full = core.example_rows(task, i, None)
        cropped = core.example_rows(task, i, 64)
        assert any(len(r.tokens) > 64 for r in full)
        for f, c in zip(full, cropped, strict=True):
            cut = max(0, len(f.tokens) - 64)
            assert c.tokens == f.tokens[-64:] and len(c.tokens) == min(64, len(f.tokens))
            assert (c.start, c.end) == (f.start - cut, f.end - cut)
            assert c.tokens[c.start:c.end] == f.tokens[f.start:f.end]
    accuracy, _ = reference_accuracy(tiny, few["mc_few"])
    assert core.evaluate(tiny, [task], "cpu").results["mc_few"] == accuracy


def test_a_continuation_longer_than_the_context_is_refused(tmp_path: Path):
    rows = [{"context": "a", "continuation": "word " * 80}] * 2
    write_bundle(tmp_path / "b", {"lm": ("language_modeling", 0, None, 0.0, rows)})
    task = core.load_tasks(tmp_path / "b")[0]
    with pytest.raises(ValueError, match=r"lm\.jsonl:1: \d+ scored tokens do not fit .* 64"):
        core.example_rows(task, 0, 64)


def test_limit_takes_the_first_n_after_the_seeded_shuffle(tiny: GPT, bundle: Path, specs):
    tasks = core.load_tasks(bundle, ["mc_few", "schema_few"], limit=5)
    for task in tasks:
        kind, shots, delimiter, _, rows = specs[task.label]
        expected = list(rows)
        random.Random(1337).shuffle(expected)
        assert task.examples == expected[:5]
        for i in range(5):  # few-shot examples come from the limited list, never i itself
            assert core.render_prompts(task, i) == reference_prompts(
                kind, shots, delimiter or " ", expected[:5], i)
    result = core.evaluate(tiny, tasks, "cpu")
    assert result.results["mc_few"] == reference_accuracy(tiny, specs["mc_few"], limit=5)[0]


def test_fewshot_draw_equals_the_literal_list_sample():
    for count, index, k in [(13, 0, 3), (13, 12, 3), (50, 17, 10), (11, 5, 10)]:
        literal = random.Random(1234 + index).sample(
            [j for j in range(count) if j != index], k)
        assert core.fewshot_indices(index, count, k) == literal


def test_evaluate_restores_training_mode(tiny: GPT, bundle: Path):
    tiny.train()
    try:
        core.evaluate(tiny, core.load_tasks(bundle, ["schema_zero"], limit=3), "cpu")
        assert tiny.training
    finally:
        tiny.eval()


# --------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_worker(rank: int, world_size: int, port: int, state: dict[str, Any], bundle: str,
                 out: Any) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world_size)
    try:
        model = GPT(TINY)
        model.load_state_dict(state)
        tasks = core.load_tasks(bundle, ["mc_few", "lm_few"], limit=7)
        out.put((rank, core.evaluate(model.eval(), tasks, "cpu", rank=rank,
                                     world_size=world_size).as_json()))
        torch.distributed.barrier()  # no rank tears gloo down under another (test_optim.py)
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_share_examples_and_sum_counts(tiny: GPT, bundle: Path):
    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    mp.start_processes(_rank_worker, args=(2, _free_port(), tiny.state_dict(), str(bundle),
                                           out), nprocs=2, start_method="spawn")
    results = [out.get() for _ in range(2)]
    single = core.evaluate(tiny, core.load_tasks(bundle, ["mc_few", "lm_few"], limit=7), "cpu")
    for _, result in results:
        assert result == single.as_json()  # exact: counts, then the same arithmetic


# ------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def hf_dir(tiny: GPT, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    tiny.save_hf(folder)  # keeps GPT-2's 50257 rows: the padded ones are never scored
    return folder


def test_cli_prints_tasks_then_core_and_writes_json(hf_dir: Path, bundle: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "core.json"
    flags = [f"--pretrained={hf_dir}", f"--bundle={bundle}", "--tasks=mc_zero,schema_few",
             "--limit=6", "--batch-size=3", "--device=cpu", f"--out={out}"]
    assert core.main(flags) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    written = json.loads(out.read_text())
    expected = core.evaluate(GPT.from_pretrained(str(hf_dir)),
                             core.load_tasks(bundle, ["mc_zero", "schema_few"], 6), "cpu")
    assert written == expected.as_json()
    assert set(written) == {"results", "centered_results", "core_metric"}
    assert lines[-1] == f"CORE: {expected.core:.4f}"
    for line, label in zip(lines[-3:-1], ["mc_zero", "schema_few"], strict=True):
        assert line.split()[:-2] == [label, "accuracy", f"{expected.results[label]:.4f}", "|",
                                     "centered", f"{expected.centered[label]:.4f}", "|"]
        assert line.endswith(" s") and float(line.split()[-2]) >= 0
    assert cli.main(["core", *flags[:-1]]) == 0  # nano-gpt core: the same main()
    again = capsys.readouterr().out.strip().splitlines()
    assert [line.rsplit("|", 1)[0] for line in again[-3:]] == [
        line.rsplit("|", 1)[0] for line in lines[-3:]]


def test_cli_checkpoint_gives_the_same_core(tiny: GPT, bundle: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]):
    checkpoint = tmp_path / "ckpt_0000001.pt"
    torch.save({"model_config": vars(tiny.config), "model": tiny.state_dict()}, checkpoint)
    assert core.main([f"--checkpoint={checkpoint}", f"--bundle={bundle}", "--tasks=lm_few",
                      "--device=cpu"]) == 0
    expected = core.evaluate(tiny, core.load_tasks(bundle, ["lm_few"]), "cpu")
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"CORE: {expected.core:.4f}"


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


# (how to break the bundle, what the one line must name)
BAD_BUNDLES = {
    "no core.yaml": (lambda b: (b / "core.yaml").unlink(), r"core\.yaml: not found"),
    "no csv": (lambda b: (b / "eval_meta_data.csv").unlink(), r"eval_meta_data\.csv: not found"),
    "no jsonl": (lambda b: (b / "eval_data/sub/schema_few.jsonl").unlink(),
                 r"schema_few\.jsonl: not found"),
    "bad yaml": (lambda b: _replace(b / "core.yaml", "  label: mc_few", "  label: [mc_few"),
                 r"core\.yaml:\d+: not valid YAML"),
    "no icl_tasks": (lambda b: _replace(b / "core.yaml", "icl_tasks:", "tasks:"),
                     r"core\.yaml: needs an 'icl_tasks' list"),
    "shots not a list": (lambda b: _replace(b / "core.yaml", "num_fewshot: [3]",
                                            "num_fewshot: 3"),
                         r"core\.yaml: task 'mc_few': 'num_fewshot' is 3"),
    "unknown type": (lambda b: _replace(b / "core.yaml", "icl_task_type: schema",
                                        "icl_task_type: generation"),
                     r"core\.yaml: task 'schema_zero': unknown icl_task_type 'generation'"),
    "label not in csv": (lambda b: _replace(b / "eval_meta_data.csv", "\nlm_few,", "\nlm_6,"),
                         r"eval_meta_data\.csv: no row for task 'lm_few'"),
    "csv columns": (lambda b: _replace(b / "eval_meta_data.csv", "Random baseline", "Chance"),
                    r"eval_meta_data\.csv: needs 'Eval Task' and 'Random baseline'"),
    "csv value": (lambda b: _replace(b / "eval_meta_data.csv", ",50.0,", ",fifty,"),
                  r"eval_meta_data\.csv:4: random baseline 'fifty'"),
    "row shape": (lambda b: _replace(b / "eval_data/sub/mc_zero.jsonl", '"gold": ',
                                     '"answer": '),
                  r"mc_zero\.jsonl:1: a multiple_choice row needs query, choices, gold"),
    "gold range": (lambda b: _replace(b / "eval_data/sub/mc_few.jsonl", '"gold": ',
                                      '"gold": 9, "x": '),
                   r"mc_few\.jsonl:1: 'gold' is 9"),
    "not json": (lambda b: _replace(b / "eval_data/sub/lm_zero.jsonl", "}\n", "\n", ),
                 r"lm_zero\.jsonl:1: not a UTF-8 JSON line"),
    "choices": (lambda b: _replace(b / "eval_data/sub/mc_zero.jsonl", '"choices": [',
                                   '"choices": [1, '),
                r"mc_zero\.jsonl:1: 'choices' must be a non-empty list of strings"),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_bad_bundle_is_one_line_naming_the_file(case: str, bundle: Path, hf_dir: Path,
                                                capsys: pytest.CaptureFixture[str]):
    breaks, message = BAD_BUNDLES[case]
    breaks(bundle)
    code = core.main([f"--pretrained={hf_dir}", f"--bundle={bundle}", "--device=cpu"])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 1 and lines[0].startswith("error: "), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), err
    assert re.search(message, err), err


def test_too_few_examples_for_the_shots_names_the_file(bundle: Path):
    with pytest.raises(ValueError, match=r"mc_few\.jsonl: 3 examples, too few for mc_few's "
                                         r"3-shot"):
        core.load_tasks(bundle, ["mc_few"], limit=3)


def test_unknown_task_label_and_bad_flags_are_usage_errors(bundle: Path,
                                                           capsys: pytest.CaptureFixture[str]):
    for flags in ([f"--bundle={bundle}", "--tasks=mc_zero,nope"], ["--limit=0"],
                  ["--batch-size=0"], ["--tasks=,"]):
        assert core.main([*flags, "--device=cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") <= 2, err
    assert core.main([f"--bundle={bundle}", "--tasks=nope"]) == 2
    assert "mc_zero" in capsys.readouterr().err  # names the tasks there are


# ------------------------------------------------------------------------------ download
class RangeServer(http.server.ThreadingHTTPServer):
    """Serves `payload` at any path; honours `Range: bytes=N-` when `ranges` is set."""

    def __init__(self, payload: bytes, ranges: bool = True) -> None:
        self.payload, self.ranges = payload, ranges
        self.requests: list[str | None] = []  # each GET's Range header
        super().__init__(("127.0.0.1", 0), RangeHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/eval_bundle.zip"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    server: RangeServer

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        wanted = self.headers.get("Range")
        self.server.requests.append(wanted)
        body, status = self.server.payload, 200
        if wanted and self.server.ranges:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            body, status = body[start:], 206
            self.send_response(status)
            self.send_header("Content-Range", f"bytes {start}-{len(self.server.payload) - 1}/"
                                              f"{len(self.server.payload)}")
        else:
            self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[RangeServer] = []

    def start(payload: bytes, ranges: bool = True) -> RangeServer:
        server = RangeServer(payload, ranges)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def zipped(bundle: Path, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for path in sorted(bundle.rglob("*")):
            zf.write(path, Path("eval_bundle") / path.relative_to(bundle))
    return buffer.getvalue()


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_download_resumes_a_partial_file_and_unpacks_once(bundle: Path, tmp_path: Path, serve):
    payload = zipped(bundle)
    server = serve(payload)
    root = tmp_path / "root"
    root.mkdir()
    (root / "eval_bundle.zip.tmp").write_bytes(payload[:1000])
    folder = core.ensure_bundle(root, server.url)
    assert folder == root / "eval_bundle" and same_tree(folder, bundle)
    assert server.requests == ["bytes=1000-"]
    assert sorted(p.name for p in root.iterdir()) == ["eval_bundle"]  # no zip, tmp, staging
    server.payload = b"not fetched again"
    assert core.ensure_bundle(root, server.url) == folder and len(server.requests) == 1
    assert [t.label for t in core.load_tasks(folder)] == list(task_specs())


def test_download_starts_over_when_the_server_ignores_ranges(bundle: Path, tmp_path: Path,
                                                             serve):
    payload = zipped(bundle)
    server = serve(payload, ranges=False)
    root = tmp_path / "root"
    root.mkdir()
    (root / "eval_bundle.zip.tmp").write_bytes(b"stale bytes from another file")
    assert same_tree(core.ensure_bundle(root, server.url), bundle)
    assert server.requests == ["bytes=29-"]


def test_file_url_downloads_too(bundle: Path, tmp_path: Path):
    source = tmp_path / "remote.zip"
    source.write_bytes(zipped(bundle))
    assert same_tree(core.ensure_bundle(tmp_path / "root", source.as_uri()), bundle)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_corrupt_archive_is_deleted_and_named(bundle: Path, tmp_path: Path, serve,
                                              compression: int):
    payload = bytearray(zipped(bundle, compression))
    with zipfile.ZipFile(io.BytesIO(bytes(payload))) as zf:
        member = zf.getinfo("eval_bundle/core.yaml")
    data_at = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    payload[data_at + 2] ^= 0xFF  # one flipped byte in core.yaml's stored data
    server = serve(bytes(payload))
    root = tmp_path / "root"
    with pytest.raises(ValueError, match=r"(?s)eval_bundle\.zip: .*deleted it\nhint: run again"):
        core.ensure_bundle(root, server.url)
    assert list(root.iterdir()) == []


def test_unreachable_server_says_no_network(tmp_path: Path):
    url = f"http://127.0.0.1:{_free_port()}/eval_bundle.zip"
    with pytest.raises(DownloadError, match="(?s)no network.*--bundle=DIR"):
        core.ensure_bundle(tmp_path, url)
    assert not (tmp_path / "eval_bundle").exists()


# ------------------------------------------------------------------------------ plot_log
def test_plot_log_draws_core_beside_hellaswag(tmp_path: Path):
    pytest.importorskip("matplotlib")
    import plot_log

    events = [{"step": 0, "loss": 10.0}, {"step": 0, "val_loss": 9.0},
              {"step": 0, "hellaswag_acc_norm": 0.25, "hellaswag_acc": 0.24},
              {"step": 0, "core_metric": -0.01}, {"step": 5, "loss": 7.0},
              {"step": 5, "core_metric": 0.02}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    curves = plot_log.read_curves(log)
    assert curves.core == [(0, -0.01), (5, 0.02)] and curves.hellaswag == [(0, 0.25)]
    assert plot_log.main([str(log)]) == 0
    assert (tmp_path / "log.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_train_gpt2_logs_core_at_its_interval(bundle: Path, specs, tmp_path: Path) -> None:
    """--core-interval=N: CORE at steps 0, N, ... and the last, in log.jsonl, each the score
    eval_core gives the weights of that step (here: the last checkpoint's)."""
    from test_train import read_log, tiny_args, write_shards

    import checkpoint
    import train_gpt2

    shards = write_shards(tmp_path / "shards")
    out = tmp_path / "out"
    assert train_gpt2.main(tiny_args(shards, out, "--vocab-size=50304", "--max-steps=2",
                                     "--core-interval=2", f"--core-bundle={bundle}",
                                     "--core-limit=5", "--eval-interval=0")) == 0
    logged = {e["step"]: e for e in read_log(out) if "core_metric" in e}
    assert sorted(logged) == [0, 2]
    model = checkpoint.model_from_state(checkpoint.load(out / "ckpt_0000002.pt")).eval()
    expected = core.evaluate(model, core.load_tasks(bundle, limit=5), "cpu")
    assert logged[2]["core_metric"] == pytest.approx(expected.core, abs=1e-6)
    assert logged[2]["core_results"] == pytest.approx(expected.results, abs=1e-6)
