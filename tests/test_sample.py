"""sample.py and the model's sampling helpers, on random tiny models, offline.

Tests taking `device` run on CPU, and on CUDA when a GPU is present (generation there goes
through the recorded CUDA graph); `pytest -k cuda` selects the CUDA runs.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import checkpoint
import model as model_module
import runtime
import sample
from data import EOT_TOKEN, get_tokenizer
from model import GPT, GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, GPTConfig, sample_next_token

PROMPT = "Hello, I'm a language model,"
DRAWS = 20_000
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2-tiny")).eval()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=NO_CUDA)])
def device(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each device in turn, with exact fp32 matmuls (TF32 could flip a near-tie argmax)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield request.param
    torch.set_float32_matmul_precision(precision)


def sampled(model: GPT, prompt: str, num_samples: int, max_length: int,
            **options: Any) -> list[str]:
    """sample.py's texts for `prompt` and --max-length, as its run() makes them."""
    tokens = sample.encode_prompt(prompt)
    return sample.generate_text(model, tokens, sample.new_token_count(model, tokens, max_length),
                                num_samples, **options)


def on(device: str, model: GPT) -> GPT:
    """`model` on `device`, leaving the shared CPU fixture where it is."""
    return model if device == "cpu" else copy.deepcopy(model).to(device)


def draw_counts(logits: torch.Tensor, seed: int = 0, device: str = "cpu",
                **kwargs: Any) -> torch.Tensor:
    """How often sample_next_token picks each token in DRAWS independent draws from the
    one row `logits` (V,)."""
    rows = logits.to(device).expand(DRAWS, -1)
    generator = torch.Generator(device=device).manual_seed(seed)
    picks = sample_next_token(rows, generator=generator, **kwargs)
    return torch.bincount(picks.flatten(), minlength=logits.numel()).double().cpu()


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
def test_draws_follow_softmax_of_logits_over_temperature(temperature: float, device: str) -> None:
    probs = torch.softmax(LOGITS / temperature, dim=-1)
    assert_follows(draw_counts(LOGITS, device=device, temperature=temperature), probs)


def test_small_temperature_converges_to_the_argmax(device: str) -> None:
    counts = draw_counts(LOGITS, device=device, temperature=0.01)
    assert counts[0] == DRAWS
    greedy = sample_next_token(LOGITS[None].to(device), temperature=0)
    assert torch.equal(greedy.cpu(), torch.tensor([[0]]))


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_top_k_draws_only_the_k_largest_in_softmax_proportion(k: int, device: str) -> None:
    logits = LOGITS[torch.randperm(LOGITS.numel(), generator=torch.Generator().manual_seed(k))]
    probs = restricted(torch.softmax(logits, dim=-1), brute_top_k(logits, k))
    assert_follows(draw_counts(logits, device=device, top_k=k), probs)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 0.99])
def test_top_p_draws_only_the_smallest_set_reaching_p(p: float, device: str) -> None:
    full = torch.softmax(LOGITS, dim=-1)
    counts = draw_counts(LOGITS, device=device, top_p=p)
    assert_follows(counts, restricted(full, brute_nucleus(full, p)))


def test_top_k_then_top_p_is_the_nucleus_of_the_renormalised_top_k(device: str) -> None:
    top3 = restricted(torch.softmax(LOGITS, dim=-1), brute_top_k(LOGITS, 3))
    nucleus = brute_nucleus(top3, 0.6)
    assert len(nucleus) == 2  # the filters compose: top-p alone would keep a different set
    counts = draw_counts(LOGITS, device=device, top_k=3, top_p=0.6)
    assert_follows(counts, restricted(top3, nucleus))


def reference_greedy(model: GPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by a full forward pass over the whole sequence at every step."""
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1, :GPT2_VOCAB_SIZE].argmax(-1, keepdim=True)], 1)
    return idx


@pytest.fixture(scope="module")
def hf_tiny(tiny: GPT, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """transformers' GPT2LMHeadModel with tiny's weights, exported by GPT.save_hf."""
    from transformers import GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("hf_tiny")
    tiny.save_hf(directory)
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    hf.generation_config.eos_token_id = None  # run to max_new_tokens, as GPT.generate does
    return hf


def hf_greedy(hf: Any, idx: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                           max_new_tokens=steps, pad_token_id=GPT2_VOCAB_SIZE - 1)


def random_prompt(batch: int, length: int, device: str, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, GPT2_VOCAB_SIZE, (batch, length), generator=generator).to(device)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("prompt_len", [1, 7, 30, 236])  # 236 + 20 fills the whole block
def test_greedy_decoding_equals_uncached_reference_and_transformers(
        tiny: GPT, hf_tiny: Any, device: str, batch: int, prompt_len: int) -> None:
    model, hf = on(device, tiny), copy.deepcopy(hf_tiny).to(device)
    idx = random_prompt(batch, prompt_len, device, seed=prompt_len)
    want = reference_greedy(model, idx, 20)
    assert torch.equal(model.generate(idx, 20, temperature=0), want)
    assert torch.equal(model.generate(idx, 20, top_k=1), want)
    assert torch.equal(hf_greedy(hf, idx, 20), want)


def test_sampling_is_deterministic_under_a_seed(tiny: GPT, device: str) -> None:
    model = on(device, tiny)
    first = sampled(model, PROMPT, 3, 24, seed=7, device=device)
    again = sampled(model, PROMPT, 3, 24, seed=7, device=device)
    other = sampled(model, PROMPT, 3, 24, seed=8, device=device)
    assert first == again
    assert first != other
    assert len(set(first)) == 3  # the batch rows are independent samples


def allowed_tokens(logits: torch.Tensor, temperature: float, top_k: int | None,
                   top_p: float | None) -> set[int]:
    """What a draw from the row `logits` (V,) may return, by brute force over its 64 most
    likely tokens (asserted to hold the whole top-p set)."""
    probs = torch.softmax(logits[:GPT2_VOCAB_SIZE].double() / temperature, dim=-1)
    top = torch.topk(probs, 64)
    candidates = top.values[:top_k] / top.values[:top_k].sum() if top_k else top.values
    if top_p is None:
        return set(top.indices[:top_k].tolist())
    assert top_k or candidates.sum() >= top_p
    return {int(top.indices[i]) for i in brute_nucleus(candidates, top_p)}


@pytest.mark.parametrize("temperature, top_k, top_p",
                         [(1.0, 3, None), (1.0, None, 0.5), (0.8, 10, 0.3)])
def test_generated_tokens_come_from_the_top_k_and_top_p_sets(
        tiny: GPT, device: str, temperature: float, top_k: int | None,
        top_p: float | None) -> None:
    peaky = copy.deepcopy(tiny)
    with torch.no_grad():  # sharper distributions, so that top-p keeps only a few tokens
        peaky.transformer.wte.weight *= 20
    model = on(device, peaky)
    idx = random_prompt(4, 7, device)
    generator = torch.Generator(device=device).manual_seed(0)
    out = model.generate(idx, 24, temperature, top_k, top_p, generator)
    with torch.no_grad():
        logits = model(out)[0].cpu()
    for row in range(out.size(0)):
        for t in range(idx.size(1), out.size(1)):
            allowed = allowed_tokens(logits[row, t - 1], temperature, top_k, top_p)
            assert len(allowed) < 40 and int(out[row, t]) in allowed, (row, t)


def test_max_length_counts_prompt_and_new_tokens(tiny: GPT) -> None:
    """Samples are GPT.generate of max_length - prompt tokens, seeded, with top-k 50."""
    enc = get_tokenizer()
    prompt = enc.encode(PROMPT)
    texts = sampled(tiny, PROMPT, 2, len(prompt) + 9, seed=1)
    out = tiny.generate(torch.tensor([prompt] * 2), 9, top_k=50,
                        generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, len(prompt) + 9)
    assert texts == [enc.decode(row) for row in out.tolist()]


def test_an_empty_prompt_starts_a_document_and_hides_its_endoftext(tiny: GPT) -> None:
    assert sample.encode_prompt("") == [EOT_TOKEN]
    texts = sampled(tiny, "", 2, 9, seed=1)
    out = tiny.generate(torch.tensor([[EOT_TOKEN]] * 2), 8, top_k=50,
                        generator=torch.Generator().manual_seed(1))
    assert texts == [get_tokenizer().decode(row[1:]) for row in out.tolist()]


def test_on_token_sees_every_new_token_as_it_is_sampled(tiny: GPT) -> None:
    seen: list[torch.Tensor] = []
    idx = random_prompt(3, 5, "cpu")
    out = tiny.generate(idx, 7, top_k=5, generator=torch.Generator().manual_seed(0),
                        on_token=seen.append)
    assert len(seen) == 7 and all(token.shape == (3, 1) for token in seen)
    assert torch.equal(torch.cat([idx, *seen], dim=1), out)


def test_streamed_text_is_sample_0_whatever_the_chunk(tiny: GPT) -> None:
    """Written token by token (CPU) or in chunks of any size (GPU), the stream is sample 0's
    continuation, exactly as returned, UTF-8 pieces split across tokens included."""
    length = len(get_tokenizer().encode(PROMPT)) + 12
    written = io.StringIO()
    texts = sampled(tiny, PROMPT, 3, length, seed=3, stream=written)
    assert texts == sampled(tiny, PROMPT, 3, length, seed=3)
    assert PROMPT + written.getvalue() == texts[0]
    idx = torch.tensor([get_tokenizer().encode(PROMPT)] * 3)
    for chunk in (1, 5, 12, 100):  # a short last chunk, one exact chunk, more than needed
        by_chunk = io.StringIO()
        tiny.generate(idx, 12, top_k=50, generator=torch.Generator().manual_seed(3),
                      on_token=sample.text_writer(by_chunk, 12, chunk))
        assert by_chunk.getvalue() == written.getvalue(), chunk


def test_streaming_holds_back_a_character_split_across_tokens() -> None:
    enc = get_tokenizer()
    ids = enc.encode("Tokyo 日本")  # 7 tokens: each of the two characters spans several
    pieces: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            pieces.append(text)
            return len(text)

    on_token = sample.text_writer(Recorder(), len(ids), chunk=1)
    for i in ids:
        on_token(torch.tensor([[i]]))
    assert [piece for piece in pieces if piece] == ["Tok", "yo", " ", "日", "本"]


def test_never_samples_a_padding_id_of_a_padded_vocab_model(device: str) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=PADDED_VOCAB_SIZE)).eval()
    with torch.no_grad():  # make the padding rows by far the most likely outputs
        model.transformer.wte.weight[:GPT2_VOCAB_SIZE] *= 0.01
        model.transformer.wte.weight[GPT2_VOCAB_SIZE:] *= 100.0
    model.to(device)
    idx = torch.tensor([get_tokenizer().encode(PROMPT)] * 4, device=device)
    with torch.no_grad():
        logits, _ = model(idx)
    assert int(logits[:, -1].argmax(dim=-1).min()) >= GPT2_VOCAB_SIZE  # the trap is set
    kwargs: dict[str, Any]
    for kwargs in ({}, {"top_k": 5}, {"top_p": 0.9}, {"temperature": 0.0}):
        generator = torch.Generator(device=device).manual_seed(0)
        out = model.generate(idx, 30, generator=generator, **kwargs)
        assert int(out.max()) < GPT2_VOCAB_SIZE, kwargs
    generator = torch.Generator(device=device).manual_seed(0)
    direct = sample_next_token(logits[:, -1], generator=generator)
    assert int(direct.max()) < GPT2_VOCAB_SIZE


def test_the_cache_takes_the_autocast_dtype(tiny: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[model_module.KVCache] = []

    class RecordedCache(model_module.KVCache):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(model_module, "KVCache", RecordedCache)
    idx = random_prompt(2, 5, "cpu")
    tiny.generate(idx, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny.generate(idx, 3, top_k=5, generator=torch.Generator().manual_seed(0))
    assert [cache.keys.dtype for cache in made] == [torch.float32, torch.bfloat16]
    assert out.shape == (2, 8) and int(out.max()) < GPT2_VOCAB_SIZE


@NO_CUDA
@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])
def test_cuda_graph_replays_equal_eager_steps(tiny: GPT, weights: torch.dtype,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weights (sample.py) and fp32 weights under bf16 autocast (the trainer's samples,
    where the graph re-casts the weights in every replay)."""
    model = copy.deepcopy(tiny).to("cuda", weights)
    idx = random_prompt(4, 9, "cuda")
    runs = []
    for graphed in (True, False):
        if not graphed:
            monkeypatch.setattr(model_module, "CUDAGraphStep", lambda step: step)
            monkeypatch.setattr(model, "_decode_graph", None)  # the recorded step, kept
        with torch.autocast("cuda", dtype=torch.bfloat16):
            generator = torch.Generator(device="cuda").manual_seed(0)
            runs.append((model.generate(idx, 40, temperature=0),
                         model.generate(idx, 40, top_k=50, generator=generator)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def greedy_through(step: model_module.CUDAGraphStep, prompt: torch.Tensor,
                   prefill: Any, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with `prefill` for the prompt and `step` for every later token."""
    with torch.no_grad():
        logits, tokens = prefill(prompt), [prompt]
        for i in range(new_tokens):
            tokens.append(logits.argmax(-1, keepdim=True))
            if i + 1 < new_tokens:
                logits = step(tokens[-1])
    return torch.cat(tokens, dim=1)


def test_a_failed_recording_samples_on_eagerly_after_one_warning(
        tiny: GPT, capsys: pytest.CaptureFixture[str]) -> None:
    """Off CUDA, recording the step fails for real: the fallback returns the warm-up's logits,
    warns once, then runs every step eagerly, giving generate's own tokens."""
    prompt = random_prompt(2, 5, "cpu")
    expected = tiny.generate(prompt, 7, temperature=0)
    cache = model_module.KVCache(tiny.config, 2, 12, prompt.device, torch.float32)

    def last_logits(tokens: torch.Tensor) -> torch.Tensor:
        return tiny.lm_head(tiny.hidden_states(tokens, cache)[:, -1, :])
    step = model_module.CUDAGraphStep(last_logits)
    assert torch.equal(greedy_through(step, prompt, last_logits, 7), expected)
    assert step.eager and step.graph is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the decoding step could not be "
                                               "recorded as a CUDA graph")


@NO_CUDA
def test_cuda_recording_that_raises_samples_on_eagerly(
        tiny: GPT, capsys: pytest.CaptureFixture[str]) -> None:
    """A layer that fails only while the step is being recorded (as an op that cannot be
    captured does): the same tokens as with the graph, one warning line."""
    model: Any = copy.deepcopy(tiny).to("cuda")
    prompt = random_prompt(2, 5, "cuda")
    graphed = model.generate(prompt, 12, temperature=0)
    model._decode_graph = None

    def fail_while_capturing(module: torch.nn.Module, args: Any) -> None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("simulated: operation not permitted when stream is capturing")
    model.lm_head.register_forward_pre_hook(fail_while_capturing)
    capsys.readouterr()
    assert torch.equal(model.generate(prompt, 12, temperature=0), graphed)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "simulated: operation not permitted" in err[0]


@NO_CUDA
def test_cuda_generate_replays_its_recorded_graph_and_keeps_the_allocator_cache(
        tiny: GPT) -> None:
    """The trainer samples the same shapes at every interval: one recording, then replays;
    and recording returns no cached block to the driver (no cudaFree)."""
    model: Any = copy.deepcopy(tiny).to("cuda")
    prompt = random_prompt(3, 6, "cuda")
    model.generate(prompt, 4, temperature=0)  # cuBLAS and allocator warm
    model._decode_graph = None
    frees = torch.cuda.memory_stats()["num_device_free"]
    first = model.generate(prompt, 20, temperature=0)
    assert torch.cuda.memory_stats()["num_device_free"] == frees
    kept = model._decode_graph
    assert kept is not None and kept[3].graph is not None
    second = model.generate(random_prompt(3, 6, "cuda", seed=2), 20, temperature=0)
    assert model._decode_graph is kept  # replayed, not recorded again
    assert torch.equal(model.generate(prompt, 20, temperature=0), first)
    assert second.shape == first.shape


@NO_CUDA
def test_cuda_decoding_steps_never_wait_for_the_host(tiny: GPT) -> None:
    model = on("cuda", tiny)
    generator = torch.Generator(device="cuda").manual_seed(0)
    seen: list[torch.Tensor] = []

    def on_token(token: torch.Tensor) -> None:
        seen.append(token)
        if len(seen) == 2:  # after the prefill and the step that is recorded (which syncs)
            torch.cuda.set_sync_debug_mode("error")

    try:
        out = model.generate(random_prompt(4, 9, "cuda"), 30, top_k=50, top_p=0.9,
                             generator=generator, on_token=on_token)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(seen) == 30 and out.shape == (4, 39)


def test_cli_samples_in_bf16_with_bf16_weights(tmp_path: Path, tiny: GPT,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    tiny.save_hf(tmp_path / "hf")
    assert sample.main([f"--pretrained={tmp_path / 'hf'}", "--max-length=16", "--device=cpu",
                        "--dtype=bf16", "--num-samples=2", PROMPT]) == 0
    bf16 = copy.deepcopy(tiny).to(torch.bfloat16)
    precision = runtime.resolve_precision(torch.device("cpu"), "bf16")
    expected = sampled(bf16, PROMPT, 2, 16, precision=precision)
    assert capsys.readouterr().out == "".join(f"> {text}\n\n" for text in expected)


def test_load_model_reads_hf_dir_and_checkpoint(tmp_path, tiny):
    tiny.save_hf(tmp_path / "hf")
    saved = tmp_path / "ckpt_0000010.pt"
    torch.save({"model_config": vars(tiny.config), "model": tiny.state_dict()}, saved)
    idx = torch.tensor([get_tokenizer().encode(PROMPT)])
    want, _ = tiny(idx)
    for model in (checkpoint.load_model(str(tmp_path / "hf"), None, "cpu"),
                  checkpoint.load_model("gpt2", str(saved), "cpu")):
        assert not model.training
        torch.testing.assert_close(model(idx)[0], want)


def test_cli_prints_each_sample_behind_a_marker(tmp_path, tiny, capsys):
    tiny.save_hf(tmp_path / "hf")
    args = [f"--pretrained={tmp_path / 'hf'}", "--seed=42", "--max-length=20",
            "--num-samples=3", "--device=cpu", PROMPT]
    assert sample.main(args) == 0
    out = capsys.readouterr().out
    expected = sampled(tiny, PROMPT, 3, 20, seed=42)
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
    expected = sampled(tiny, "A", 2, 16, top_k=None, top_p=0.8, temperature=0.7)
    assert out == "".join(f"> {text}\n\n" for text in expected)


def test_cli_errors_are_one_line(tmp_path, tiny, capsys):
    tiny.save_hf(tmp_path / "hf")
    assert sample.main([f"--pretrained={tmp_path / 'hf'}", "--max-length=3", PROMPT]) == 2
    assert "--max-length=3" in capsys.readouterr().err
    assert sample.main([f"--checkpoint={tmp_path / 'missing.pt'}"]) == 1
    error, fix = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: ") and "missing.pt" in error and fix.startswith("hint: ")
    assert sample.main([f"--pretrained={tmp_path / 'nowhere'}"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
