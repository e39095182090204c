"""sample.py and the model's sampling helpers, on random tiny models, offline."""

from __future__ import annotations

import pytest
import torch

import cli
import sample
from data import get_tokenizer
from model import GPT, GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, GPTConfig, sample_next_token

PROMPT = "Hello, I'm a language model,"
DRAWS = 20_000


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2-tiny")).eval()


def draw_counts(logits: torch.Tensor, seed: int = 0, **kwargs: object) -> torch.Tensor:
    """How often sample_next_token picks each token in DRAWS independent draws from the
    one row `logits` (V,)."""
    rows = logits.expand(DRAWS, -1)
    picks = sample_next_token(rows, generator=torch.Generator().manual_seed(seed), **kwargs)
    return torch.bincount(picks.flatten(), minlength=logits.numel()).double()


def assert_follows(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Draw frequencies within 5 standard errors of `probs`, and nothing drawn outside it."""
    assert counts[probs == 0].sum() == 0
    freq = counts / counts.sum()
    tolerance = 5 * (probs * (1 - probs) / counts.sum()).sqrt() + 1e-9
    assert ((freq - probs).abs() <= tolerance).all(), (freq, probs)


def brute_top_k(logits: torch.Tensor, k: int) -> set[int]:
    return set(sorted(range(logits.numel()), key=lambda i: -float(logits[i]))[:k])


def brute_nucleus(probs: torch.Tensor, p: float) -> set[int]:
    """Tokens by falling probability until their sum reaches p."""
    kept, total = set(), 0.0
    for i in sorted(range(probs.numel()), key=lambda i: -float(probs[i])):
        kept.add(i)
        total += float(probs[i])
        if total >= p:
            break
    return kept


def restricted(probs: torch.Tensor, keep: set[int]) -> torch.Tensor:
    mask = torch.zeros_like(probs, dtype=torch.bool)
    mask[list(keep)] = True
    out = probs.where(mask, 0.0)
    return out / out.sum()


LOGITS = torch.tensor([2.0, 1.6, 1.5, 1.2, 0.9, 0.4, 0.0, -0.5, -1.0, -3.0], dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(temperature: float) -> None:
    probs = torch.softmax(LOGITS / temperature, dim=-1)
    assert_follows(draw_counts(LOGITS, temperature=temperature), probs)


def test_small_temperature_converges_to_the_argmax() -> None:
    counts = draw_counts(LOGITS, temperature=0.01)
    assert counts[0] == DRAWS
    assert torch.equal(sample_next_token(LOGITS[None], temperature=0), torch.tensor([[0]]))


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_top_k_draws_only_the_k_largest_in_softmax_proportion(k: int) -> None:
    logits = LOGITS[torch.randperm(LOGITS.numel(), generator=torch.Generator().manual_seed(k))]
    probs = restricted(torch.softmax(logits, dim=-1), brute_top_k(logits, k))
    assert_follows(draw_counts(logits, top_k=k), probs)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 0.99])
def test_top_p_draws_only_the_smallest_set_reaching_p(p: float) -> None:
    full = torch.softmax(LOGITS, dim=-1)
    assert_follows(draw_counts(LOGITS, top_p=p), restricted(full, brute_nucleus(full, p)))


def test_top_k_then_top_p_is_the_nucleus_of_the_renormalised_top_k() -> None:
    top3 = restricted(torch.softmax(LOGITS, dim=-1), brute_top_k(LOGITS, 3))
    nucleus = brute_nucleus(top3, 0.6)
    assert len(nucleus) == 2  # the filters compose: top-p alone would keep a different set
    assert_follows(draw_counts(LOGITS, top_k=3, top_p=0.6), restricted(top3, nucleus))


def reference_greedy(model: GPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by a full forward pass over the whole sequence at every step."""
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1, :GPT2_VOCAB_SIZE].argmax(-1, keepdim=True)], 1)
    return idx


def test_sampling_is_deterministic_under_a_seed(tiny):
    first = sample.generate_text(tiny, PROMPT, 3, 24, seed=7)
    again = sample.generate_text(tiny, PROMPT, 3, 24, seed=7)
    other = sample.generate_text(tiny, PROMPT, 3, 24, seed=8)
    assert first == again
    assert first != other
    assert len(set(first)) == 3  # the batch rows are independent samples


@pytest.mark.parametrize("batch", [1, 4])
def test_cached_greedy_decoding_equals_full_forward_passes(tiny: GPT, batch: int) -> None:
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (batch, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(tiny.generate(idx, 20, temperature=0), reference_greedy(tiny, idx, 20))
    assert torch.equal(tiny.generate(idx, 20, top_k=1), reference_greedy(tiny, idx, 20))


def test_max_length_counts_prompt_and_new_tokens(tiny):
    prompt_len = len(get_tokenizer().encode(PROMPT))
    steps = list(sample.stream_tokens(tiny, PROMPT, 2, prompt_len + 9, seed=1))
    assert len(steps) == 9 and all(len(s) == 2 for s in steps)
    texts = sample.generate_text(tiny, PROMPT, 2, prompt_len + 9, seed=1)
    enc = get_tokenizer()
    for row, text in enumerate(texts):
        assert text == enc.decode(enc.encode(PROMPT) + [s[row] for s in steps])


def test_never_samples_a_padding_id_of_a_padded_vocab_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=PADDED_VOCAB_SIZE)).eval()
    with torch.no_grad():  # make the padding rows by far the most likely outputs
        model.transformer.wte.weight[:GPT2_VOCAB_SIZE] *= 0.01
        model.transformer.wte.weight[GPT2_VOCAB_SIZE:] *= 100.0
    idx = torch.tensor([get_tokenizer().encode(PROMPT)] * 4)
    logits, _ = model(idx)
    assert int(logits[:, -1].argmax(dim=-1).min()) >= GPT2_VOCAB_SIZE  # the trap is set
    for kwargs in ({}, {"top_k": 5}, {"top_p": 0.9}, {"temperature": 0.0}):
        out = model.generate(idx, 30, generator=torch.Generator().manual_seed(0), **kwargs)
        assert int(out.max()) < GPT2_VOCAB_SIZE, kwargs
    direct = sample_next_token(logits[:, -1], generator=torch.Generator().manual_seed(0))
    assert int(direct.max()) < GPT2_VOCAB_SIZE


def test_load_model_reads_hf_dir_and_checkpoint(tmp_path, tiny):
    tiny.save_hf(tmp_path / "hf")
    checkpoint = tmp_path / "ckpt_0000010.pt"
    torch.save({"model_config": vars(tiny.config), "model": tiny.state_dict()}, checkpoint)
    idx = torch.tensor([get_tokenizer().encode(PROMPT)])
    want, _ = tiny(idx)
    for model in (cli.load_model(str(tmp_path / "hf"), None, "cpu"),
                  cli.load_model("gpt2", str(checkpoint), "cpu")):
        assert not model.training
        torch.testing.assert_close(model(idx)[0], want)


def test_cli_prints_each_sample_behind_a_marker(tmp_path, tiny, capsys):
    tiny.save_hf(tmp_path / "hf")
    args = [f"--pretrained={tmp_path / 'hf'}", "--seed=42", "--max-length=20",
            "--num-samples=3", "--device=cpu", PROMPT]
    assert sample.main(args) == 0
    out = capsys.readouterr().out
    expected = sample.generate_text(tiny, PROMPT, 3, 20, seed=42)
    assert out == "".join(f"> {text}\n\n" for text in expected)
    assert sample.main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == out  # streaming prints the very same text


def test_cli_checkpoint_and_sampling_flags(tmp_path, tiny, capsys):
    checkpoint = tmp_path / "ckpt_0000001.pt"
    torch.save({"model_config": vars(tiny.config), "model": tiny.state_dict()}, checkpoint)
    assert sample.main([f"--checkpoint={checkpoint}", "--top-k=0", "--top-p=0.8",
                        "--temperature=0.7", "--num-samples=2", "--max-length=16",
                        "--device=cpu", "A"]) == 0
    out = capsys.readouterr().out
    expected = sample.generate_text(tiny, "A", 2, 16, top_k=None, top_p=0.8, temperature=0.7)
    assert out == "".join(f"> {text}\n\n" for text in expected)


def test_cli_errors_are_one_line(tmp_path, tiny, capsys):
    tiny.save_hf(tmp_path / "hf")
    assert sample.main([f"--pretrained={tmp_path / 'hf'}", "--max-length=3", PROMPT]) == 2
    assert "--max-length=3" in capsys.readouterr().err
    assert sample.main([f"--checkpoint={tmp_path / 'missing.pt'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.pt" in err
    assert sample.main([f"--pretrained={tmp_path / 'nowhere'}"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
