"""sample.py and the model's sampling helpers, on random tiny models, offline."""

from __future__ import annotations

import pytest
import torch

import sample
from data import get_tokenizer
from model import (
    GPT,
    GPT2_VOCAB_SIZE,
    PADDED_VOCAB_SIZE,
    GPTConfig,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

PROMPT = "Hello, I'm a language model,"


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2-tiny")).eval()


def kept(logits: torch.Tensor) -> set[int]:
    return {int(i) for i in torch.nonzero(torch.isfinite(logits)).flatten()}


@pytest.mark.parametrize("k", [1, 5, 37, 200])
def test_top_k_keeps_exactly_the_k_largest(k):
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(3, 200, generator=gen, dtype=torch.float64)
    filtered = top_k_filter(logits, k)
    for row, out in zip(logits, filtered, strict=True):
        brute = set(sorted(range(200), key=lambda i: -float(row[i]))[:k])
        assert kept(out) == brute
        assert torch.equal(out[list(brute)], row[list(brute)])  # survivors keep their value


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p):
    gen = torch.Generator().manual_seed(int(p * 1000))
    logits = torch.randn(3, 300, generator=gen, dtype=torch.float64) * 3
    filtered = top_p_filter(logits, p)
    for row, out in zip(logits, filtered, strict=True):
        probs = torch.softmax(row, dim=-1).tolist()
        order = sorted(range(300), key=lambda i: -probs[i])
        brute, total = set(), 0.0
        for i in order:  # take tokens by falling probability until p is reached
            brute.add(i)
            total += probs[i]
            if total >= p:
                break
        assert kept(out) == brute


def test_sampling_is_deterministic_under_a_seed(tiny):
    first = sample.generate_text(tiny, PROMPT, 3, 24, seed=7)
    again = sample.generate_text(tiny, PROMPT, 3, 24, seed=7)
    other = sample.generate_text(tiny, PROMPT, 3, 24, seed=8)
    assert first == again
    assert first != other
    assert len(set(first)) == 3  # the batch rows are independent samples


def test_cached_and_uncached_sampling_draw_the_same_tokens(tiny):
    idx = torch.tensor([get_tokenizer().encode(PROMPT)] * 2)
    runs = [tiny.generate(idx, 20, top_k=50, generator=torch.Generator().manual_seed(3),
                          use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


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
    for model in (sample.load_model(str(tmp_path / "hf"), None, "cpu"),
                  sample.load_model("gpt2", str(checkpoint), "cpu")):
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
