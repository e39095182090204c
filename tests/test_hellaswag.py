"""eval_hellaswag.py against an independent per-example computation on a random tiny GPT.

Scores are compared with a tight tolerance (1e-5): in fp32 on CPU, matmuls over differently
shaped batches may round differently in the last bits. Predictions are compared exactly.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn import functional as F

import eval_hellaswag as hs
from data import DownloadError, get_tokenizer
from model import GPT, GPTConfig

WORDS = ("the a man woman dog runs jumps into water kitchen knife cuts onion slowly then "
         "quickly and gets ball throws camera shows close up of her his bike rope grass "
         "paints wall smiles at people crowd watches stage piano plays café naïve").split()


def make_example(rng: random.Random, index: int) -> dict[str, Any]:
    """An example in the official file's format, with sentences of varied length."""
    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    ctx_a = sentence(4, 30).capitalize() + "."
    ctx_b = sentence(1, 6)
    return {
        "ind": index, "activity_label": "Doing things", "ctx_a": ctx_a, "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}", "split": "val", "split_type": "indomain",
        "label": rng.randint(0, 3), "endings": [sentence(2, 25) + "." for _ in range(4)],
        "source_id": f"activitynet~v_{index:05d}",
    }


def write_jsonl(path: Path, examples: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def examples() -> list[dict[str, Any]]:
    rng = random.Random(1234)
    return [make_example(rng, i) for i in range(24)]


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2-tiny")).eval()


def reference_scores(model: GPT, example: dict[str, Any]) -> tuple[list[float], list[float]]:
    """One row per forward through the model's own logits; F.cross_entropy on ending tokens."""
    enc = get_tokenizer()
    ctx = enc.encode(example["ctx"])
    sums, means = [], []
    for ending in example["endings"]:
        end = enc.encode(" " + ending)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ctx + end]))
        losses = F.cross_entropy(logits[0, len(ctx) - 1:-1], torch.tensor(end),
                                 reduction="none")
        sums.append(float(losses.sum()))
        means.append(float(losses.mean()))
    return sums, means


def reference_totals(model: GPT, examples: list[dict[str, Any]]) -> tuple[int, int]:
    correct = correct_norm = 0
    for example in examples:
        sums, means = reference_scores(model, example)
        correct += int(min(range(4), key=sums.__getitem__) == example["label"])
        correct_norm += int(min(range(4), key=means.__getitem__) == example["label"])
    return correct, correct_norm


def test_scores_and_predictions_match_per_example_reference(tiny, examples):
    sums, means = hs.score_batch(tiny, examples[:8], "cpu")
    pred, pred_norm = sums.argmin(dim=1), means.argmin(dim=1)
    for i, example in enumerate(examples[:8]):
        ref_sums, ref_means = reference_scores(tiny, example)
        torch.testing.assert_close(sums[i], torch.tensor(ref_sums), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(means[i], torch.tensor(ref_means), rtol=1e-5, atol=1e-5)
        assert int(pred[i]) == min(range(4), key=ref_sums.__getitem__)
        assert int(pred_norm[i]) == min(range(4), key=ref_means.__getitem__)


def test_scoring_keeps_no_autograd_graph(tiny, examples):
    """Scoring under autograd would hold every activation of the batch until it returned."""
    assert torch.is_grad_enabled()
    sums, means = hs.score_batch(tiny, examples[:2], "cpu")
    assert not sums.requires_grad and not means.requires_grad


def test_batched_equals_unbatched(tiny, examples):
    batched = hs.score_batch(tiny, examples, "cpu")
    for i, example in enumerate(examples):
        alone = hs.score_batch(tiny, [example], "cpu")
        for got, want in zip(batched, alone, strict=True):
            torch.testing.assert_close(got[i], want[0], rtol=1e-5, atol=1e-5)
            assert int(got[i].argmin()) == int(want[0].argmin())
    one = hs.evaluate(tiny, examples, "cpu", batch_size=1)
    five = hs.evaluate(tiny, examples, "cpu", batch_size=5)
    assert (one.correct, one.correct_norm, one.total) == (five.correct, five.correct_norm,
                                                          five.total)


def test_padding_and_batch_composition_do_not_change_scores(tiny, examples):
    short = min(examples, key=lambda e: len(e["ctx"]))
    long = dict(short, ctx=" ".join([short["ctx"]] * 6))
    alone = hs.score_batch(tiny, [short], "cpu")
    # Next to a much longer example the short one's row is mostly padding.
    for batch, position in (([long, short], 1), ([short, long], 0),
                            ([examples[3], short, long, examples[5]], 1)):
        mixed = hs.score_batch(tiny, batch, "cpu")
        for got, want in zip(mixed, alone, strict=True):
            torch.testing.assert_close(got[position], want[0], rtol=1e-5, atol=1e-5)


def test_padding_id_does_not_matter(tiny, examples, monkeypatch):
    before = hs.score_batch(tiny, examples[:6], "cpu")
    monkeypatch.setattr(hs, "PAD_ID", 50000)
    after = hs.score_batch(tiny, examples[:6], "cpu")
    for got, want in zip(after, before, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_evaluate_counts_equal_reference(tiny, examples):
    score = hs.evaluate(tiny, examples, "cpu", batch_size=4)
    assert (score.correct, score.correct_norm) == reference_totals(tiny, examples)
    assert score.total == len(examples)
    assert score.acc_norm == score.correct_norm / len(examples)


def test_evaluate_restores_training_mode(tiny, examples):
    tiny.train()
    try:
        hs.evaluate(tiny, examples[:2], "cpu")
        assert tiny.training
    finally:
        tiny.eval()


def test_context_is_packed_once_per_example(tiny, examples, monkeypatch):
    """The model's input row: the context once, then each ending without its last token."""
    enc = get_tokenizer()
    rows = []
    real = tiny.hidden_states

    def recording(idx: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        rows.append(idx[0].tolist())
        return real(idx, **kwargs)

    monkeypatch.setattr(tiny, "hidden_states", recording)
    for example in examples[:6]:
        hs.score_batch(tiny, [example], "cpu")
        context = enc.encode(example["ctx"])
        endings = [enc.encode(" " + e) for e in example["endings"]]
        assert rows.pop() == context + [t for ending in endings for t in ending[:-1]]


def test_packed_logits_equal_each_sequence_alone(tiny):
    """Arbitrary token ids, including a one-token and an empty ending (eval_core can give
    one), against the model's own logits over context + ending with default positions."""
    torch.manual_seed(3)
    examples = [(torch.randint(0, 50257, (n,)).tolist(),
                 [torch.randint(0, 50257, (m,)).tolist() for m in lengths])
                for n, lengths in ((9, (3, 1, 5)), (2, (4, 0, 2, 7)), (20, (1,)))]
    got = hs.packed_logits(tiny, examples, "cpu")
    expected = []
    for context, endings in examples:
        for ending in endings:
            with torch.no_grad():
                logits, _ = tiny(torch.tensor([context + ending]))
            expected.append(logits[0, len(context) - 1:-1])
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [32, 70])
def test_long_context_keeps_its_last_tokens(examples, block_size):
    """block_size 32: every ending cuts the context; 70: only the longer endings do."""
    torch.manual_seed(1)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", block_size=block_size)).eval()
    example = dict(examples[0], ctx=" ".join(examples[0]["ctx"].split()[:30]) * 2,
                   endings=["ran.", "the dog runs into the water and gets the ball slowly.",
                            "a man", "his bike rope grass paints wall smiles at people."])
    enc = get_tokenizer()
    context = enc.encode(example["ctx"])
    endings = [enc.encode(" " + e) for e in example["endings"]]
    lengths = [len(context) + len(e) for e in endings]
    if block_size == 70:
        assert min(lengths) <= block_size + 1 < max(lengths)
    sums, _ = hs.score_batch(model, [example], "cpu")
    for j, ending in enumerate(endings):
        row = (context + ending)[-(block_size + 1):]
        with torch.no_grad():
            logits, _ = model(torch.tensor([row[:-1]]))
        ref = F.cross_entropy(logits[0, -len(ending):], torch.tensor(ending), reduction="sum")
        torch.testing.assert_close(sums[0, j], ref, rtol=1e-5, atol=1e-5)


def test_one_token_endings_match_reference(tiny, examples):
    example = dict(examples[2], endings=["a", "dog", "b.", "the man runs."])
    assert [len(get_tokenizer().encode(" " + e)) for e in example["endings"]][:2] == [1, 1]
    sums, means = hs.score_batch(tiny, [example], "cpu")
    ref_sums, ref_means = reference_scores(tiny, example)
    torch.testing.assert_close(sums[0], torch.tensor(ref_sums), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(means[0], torch.tensor(ref_means), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_worker(rank: int, world_size: int, port: int, state: dict[str, Any],
                 examples: list[dict[str, Any]], out: Any) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world_size)
    try:
        model = GPT(GPTConfig.from_preset("gpt2-tiny"))
        model.load_state_dict(state)
        score = hs.evaluate(model.eval(), examples, "cpu", batch_size=3, rank=rank,
                            world_size=world_size)
        out.put((rank, score.correct, score.correct_norm, score.total))
        torch.distributed.barrier()  # no rank tears gloo down under another (test_optim.py)
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_score_disjoint_shares_and_all_reduce_totals(tiny, examples):
    world_size = 2
    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    mp.start_processes(_rank_worker, args=(world_size, _free_port(), tiny.state_dict(),
                                           examples[:11], out),
                       nprocs=world_size, start_method="spawn")
    results = sorted(out.get() for _ in range(world_size))
    single = hs.evaluate(tiny, examples[:11], "cpu")
    for _, correct, correct_norm, total in results:  # every rank holds the global totals
        assert (correct, correct_norm, total) == (single.correct, single.correct_norm, 11)


# ------------------------------------------------------------------------------ data


def with_lines(path: Path, examples: list[dict]) -> list[dict]:
    """The examples as load_examples gives them: each with the file:line it came from."""
    return [{**e, "where": f"{path}:{number}"} for number, e in enumerate(examples, start=1)]


def test_load_examples_reads_the_official_format_and_limit(tmp_path, examples):
    path = write_jsonl(tmp_path / "val.jsonl", examples)
    assert hs.load_examples(path) == with_lines(path, examples)
    assert hs.load_examples(str(path), limit=5) == with_lines(path, examples)[:5]


@pytest.mark.parametrize("bad", [{"ctx": "x", "endings": ["a", "b", "c"], "label": 0},
                                 {"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4},
                                 {"endings": ["a", "b", "c", "d"], "label": 1},
                                 {"ctx": 3, "endings": ["a", "b", "c", "d"], "label": 1},
                                 {"ctx": "x", "endings": ["a", None, "c", "d"], "label": 1},
                                 {"ctx": "x", "endings": ["a", "b", "c", "d"], "label": True}])
def test_load_examples_rejects_malformed_lines(tmp_path, examples, bad):
    path = write_jsonl(tmp_path / "bad.jsonl", [examples[0], bad])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        hs.load_examples(path)


def test_download_is_cached_and_checked(tmp_path, examples):
    source = write_jsonl(tmp_path / "remote.jsonl", examples)
    cache = tmp_path / "cache"
    path = hs.ensure_validation_file(cache, source.as_uri(), expected_lines=len(examples))
    assert path == cache / hs.HELLASWAG_VAL_FILE
    assert path.read_bytes() == source.read_bytes()
    source.unlink()  # a second call must not download again
    assert hs.ensure_validation_file(cache, source.as_uri(), len(examples)) == path
    assert hs.load_examples(None, cache_dir=cache) == with_lines(path, examples)


def test_incomplete_download_leaves_nothing_behind(tmp_path, examples):
    source = write_jsonl(tmp_path / "remote.jsonl", examples[:5])
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="downloaded 5 lines, expected 10042"):
        hs.ensure_validation_file(cache, source.as_uri())
    assert list(cache.iterdir()) == []


def test_unreachable_server_says_no_network(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/hellaswag_val.jsonl"
    with pytest.raises(DownloadError, match="no network.*--data=JSONL"):
        hs.ensure_validation_file(tmp_path, url)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- CLI


def test_cli_prints_acc_then_accuracy_last(tmp_path, tiny, examples, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", examples)
    tiny.save_hf(tmp_path / "hf")
    code = hs.main([f"--pretrained={tmp_path / 'hf'}", "--data", str(data), "--limit=20",
                    "--batch-size=6", "--device=cpu"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    correct, correct_norm = reference_totals(tiny, examples[:20])
    assert lines[-2] == f"acc: {correct}/20 = {correct / 20:.4f}"
    assert lines[-1] == f"Accuracy: {correct_norm}/20 = {correct_norm / 20:.4f}"


def test_cli_checkpoint_gives_the_same_result(tmp_path, tiny, examples, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", examples)
    checkpoint = tmp_path / "ckpt_0000001.pt"
    torch.save({"model_config": vars(tiny.config), "model": tiny.state_dict()}, checkpoint)
    assert hs.main([f"--checkpoint={checkpoint}", f"--data={data}", "--device=cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    _, correct_norm = reference_totals(tiny, examples)
    assert last == f"Accuracy: {correct_norm}/24 = {correct_norm / 24:.4f}"


def test_cli_missing_data_is_one_line_exit_1(tmp_path, tiny, capsys):
    tiny.save_hf(tmp_path / "hf")
    missing = tmp_path / "nope.jsonl"
    code = hs.main([f"--pretrained={tmp_path / 'hf'}", f"--data={missing}", "--device=cpu"])
    error, fix = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert error.startswith("error: ") and str(missing) in error
    assert fix.startswith("hint: ") and "--data" in fix


def test_cli_bad_batch_size_is_usage_error(capsys):
    assert hs.main(["--batch-size=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size=0" in err
