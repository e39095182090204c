"""export.py: a real checkpoint to a Hugging Face folder, checked against transformers itself
(the same logits, the same token ids as tiktoken) and refused where GPT-2 cannot hold it."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from test_train import tiny_args, write_shards

import checkpoint
import cli
import data
import export
import train_gpt2
from model import GPT, GPTConfig
from model_modern import MODEL_KIND, ModernConfig, ModernGPT

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello, world! It's a test; we'll see.", "naïve café, Straße, 日本語のテキスト, Ελληνικά",
         "emoji 😀👍🏽👨‍👩‍👧 and ⚙️", "   leading, trailing   \n\n\n\t\ttabs  \r\n  ", "x" * 300,
         "<|endoftext|>one document<|endoftext|>the next", "endoftext <|endoftext", "\u200b\ufeff"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last checkpoint of a two-step train_gpt2.py run with GPT-2's padded vocabulary."""
    tmp = tmp_path_factory.mktemp("run")
    out_dir = tmp / "out"
    argv = tiny_args(write_shards(tmp / "shards"), out_dir, "--vocab-size=50304",
                     "--max-steps=2", "--eval-interval=0")
    assert train_gpt2.main(argv) == 0
    return sorted(out_dir.glob("ckpt_*.pt"))[-1]


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    assert cli.main(["export", f"--checkpoint={trained}", f"--out={out}"]) == 0
    return out


def test_transformers_gives_the_checkpoints_logits(trained: Path, exported: Path) -> None:
    ours = GPT.from_checkpoint(checkpoint.load(trained)).eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50257, (2, ours.config.block_size), generator=generator)
    with torch.no_grad():
        expected = ours(idx)[0][..., :50257]  # the padding rows are not exported
        torch.testing.assert_close(theirs(idx).logits, expected, atol=1e-5, rtol=1e-5)


def random_text(seed: int, length: int) -> str:
    """Code points from every plane in use (no surrogates), to reach rare byte merges."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x2FFF), (0x3000, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


def test_tokenizer_matches_tiktoken(exported: Path) -> None:
    enc = data.get_tokenizer()
    texts = [*TEXTS, Path(json.__file__).read_text(), random_text(0, 5000)]
    tokenizers = [transformers.AutoTokenizer.from_pretrained(exported),
                  transformers.GPT2TokenizerFast.from_pretrained(exported)]
    for tokenizer in tokenizers:
        assert tokenizer.eos_token_id == tokenizer.bos_token_id == data.EOT_TOKEN
        assert tokenizer.model_max_length == 256  # gpt2-tiny's block_size
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            # HF's GPT-2 tokenizer reads "<|endoftext|>" in text as the special token.
            assert ids == enc.encode(text, allowed_special="all"), text[:40]
            assert tokenizer.decode(ids) == text


def saved_as(path: Path, trained: Path, config: GPTConfig | ModernConfig) -> Path:
    """A checkpoint in train_gpt2.py's format holding a fresh model of `config`."""
    state = torch.load(trained, weights_only=True)
    model = ModernGPT(config) if isinstance(config, ModernConfig) else GPT(config)
    kind = MODEL_KIND if isinstance(config, ModernConfig) else "gpt2"
    state.update(model_kind=kind, model_config=dataclasses.asdict(config),
                 model=model.state_dict())
    torch.save(state, path)
    return path


@pytest.mark.parametrize("config, words", [
    (ModernConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32),
     "GPT-2's Hugging Face format cannot hold"),
    (GPTConfig.from_preset("gpt2-tiny", n_embd=32, vocab_size=256), "vocab_size 256")])
def test_refuses_what_gpt2_cannot_hold(config: GPTConfig | ModernConfig, words: str,
                                       trained: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, out = saved_as(tmp_path / "ckpt.pt", trained, config), tmp_path / "hf"
    assert export.main([f"--checkpoint={ckpt}", f"--out={out}"]) == 1
    err = capsys.readouterr().err
    error = err.splitlines()[0]
    assert error.startswith("error: ") and words in error
    assert not out.exists() or not any(out.iterdir())
