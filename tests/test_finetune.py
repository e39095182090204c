"""The fine-tuning recipe end to end, as the README gives it: a local text folder prepared,
GPT-2 weights (here a small local Hugging Face folder) trained on it with --recipe=finetune,
sampled, and exported back to a folder transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prepare_dataset
import sample
import train_gpt2
from model import GPT, GPTConfig

SENTENCES = ["The river runs past the old mill.", "A heron waits by the water.",
             "The miller counts the sacks of flour.", "Rain falls on the mill roof."]


def write_text_folder(folder: Path, files: int = 30) -> Path:
    folder.mkdir(parents=True)
    for i in range(files):
        lines = [SENTENCES[(i + j) % len(SENTENCES)] for j in range(40)]
        (folder / f"note_{i:02d}.txt").write_text(" ".join(lines) + "\n")
    return folder


def pretrained_folder(folder: Path) -> Path:
    """A small GPT-2 with GPT-2's vocabulary, saved as Hugging Face weights."""
    torch.manual_seed(0)
    GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)
        ).save_hf(folder)
    return folder


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    texts = write_text_folder(root / "my_notes")
    assert prepare_dataset.main([f"--dataset={texts}", "--name=notes",
                                 f"--data-root={root / 'data'}", "--no-progress"]) == 0
    out = root / "out"
    assert train_gpt2.main([
        "--recipe=finetune", f"--init-from={pretrained_folder(root / 'hf')}", "--dataset=notes",
        f"--data-root={root / 'data'}", f"--out-dir={out}", "--device=cpu",
        # The recipe's own values but for the size: a short run of a small model.
        "--seq-len=64", "--total-batch-size=512", "--max-steps=20", "--val-steps=2",
        "--eval-interval=10", "--sample-length=24", "--num-samples=1"]) == 0
    return out


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_finetuning_lowers_the_validation_loss_and_keeps_the_vocabulary(finetuned: Path) -> None:
    val = [e["val_loss"] for e in read_log(finetuned) if "val_loss" in e]
    assert len(val) == 3 and val[-1] < val[1] < val[0] and val[0] - val[-1] > 0.1
    state = torch.load(finetuned / "ckpt_0000020.pt", map_location="cpu", weights_only=True)
    assert state["model_config"]["vocab_size"] == 50257
    assert state["config"]["recipe"] == "finetune"
    lrs = [e["lr"] for e in read_log(finetuned) if "lr" in e]
    assert max(lrs) == pytest.approx(3e-5)


def test_sample_reads_the_finetuned_checkpoint(finetuned: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert sample.main([f"--checkpoint={finetuned / 'ckpt_0000020.pt'}", "--device=cpu",
                        "--num-samples=1", "--max-length=20", "The river"]) == 0
    assert capsys.readouterr().out.startswith("> The river")


def test_finetune_without_a_dataset_is_one_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert train_gpt2.main(["--recipe=finetune", f"--out-dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "--recipe=finetune: no data given\nhint: pass --dataset=NAME" in err


def test_the_finetuned_checkpoint_exports_to_a_folder_transformers_loads(
        finetuned: Path, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    import checkpoint
    import export

    ckpt = finetuned / "ckpt_0000020.pt"
    assert export.main([f"--checkpoint={ckpt}", f"--out={tmp_path / 'hf'}"]) == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = GPT.from_checkpoint(checkpoint.load(ckpt)).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
