"""The offline GPT-2 tokenizer against GPT-2's published token ids."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import data


def test_known_gpt2_ids():
    enc = data.get_tokenizer()
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303,
                                                          2746, 11]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.eot_token == 50256
    assert enc.n_vocab == 50257
    assert enc.encode(" the") == [262]
    assert enc.encode(" world") == [995]


def test_round_trip_on_mixed_text():
    enc = data.get_tokenizer()
    text = "déjà vu — naïve café 🙂\n\tdef f(x):  return x ** 2  # ok\n\n"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_tampered_ranks_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tampered = tmp_path / "gpt2.tiktoken"
    shutil.copy(data.GPT2_RANKS_FILE, tampered)
    with open(tampered, "ab") as f:
        f.write(b"IQ== 50257\n")
    monkeypatch.setattr(data, "GPT2_RANKS_FILE", tampered)
    data.get_tokenizer.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="sha256"):
            data.get_tokenizer()
    finally:
        monkeypatch.undo()
        data.get_tokenizer.cache_clear()
