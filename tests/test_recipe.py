"""The modern recipe beside the 2019 one: model_modern.py's model with optim.py's per-kind
rates and Muon, one schedule multiplying every group's peak rate, through the trainer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_train import (
    assert_same_run,
    load_ckpt,
    read_log,
    single_and_two_gloo_ranks,
    tiny_args,
    write_shards,
)

import checkpoint
import eval_hellaswag
import export
import optim
import train_gpt2
from model_modern import ModernConfig, ModernGPT


def test_wsd_schedule_warms_up_holds_then_decays_linearly() -> None:
    lr = [train_gpt2.lr_multiplier(s, 0.1, 10, 100, cooldown_frac=0.4) for s in range(101)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10:61] == [1.0] * 51
    assert lr[80] == pytest.approx(1.0 + 0.5 * (0.1 - 1.0))
    assert lr[100] == pytest.approx(0.1)


def test_recipe_modern_sets_its_flags_and_each_stays_overridable(tmp_path: Path) -> None:
    argv = [f"--data-dir={tmp_path}", "--recipe=modern", "--no-value-embeddings",
            "--matrix-lr=0.01", "--model=gpt2-tiny", "--n-embd=32"]
    config = train_gpt2.configure(train_gpt2.parse_args(argv), argv)
    assert (config.lr_schedule, config.cooldown_frac, config.final_lr_frac) == ("wsd", 0.65, 0.05)
    assert (config.matrix_lr, config.matrix_optimizer, config.value_embeddings) == (
        0.01, "muon", False)
    shape = train_gpt2.model_config(config)
    assert isinstance(shape, ModernConfig) and not shape.value_embeddings and shape.lambdas
    plain = train_gpt2.configure(train_gpt2.parse_args([f"--data-dir={tmp_path}"]), [])
    assert (plain.lr_schedule, plain.final_lr_frac) == ("cosine", 0.1)  # the 2019 recipe


def test_the_trainer_builds_each_recipes_optimizer_from_its_flags(tmp_path: Path) -> None:
    """Each group's peak rate is the flag's (scaled by width as optim.modern_groups says),
    and the schedule's multiplier sets every group's rate to its peak times it."""
    argv = [f"--data-dir={tmp_path}", "--recipe=modern", "--model=gpt2-tiny", "--n-embd=32",
            "--seq-len=32", "--embedding-lr=0.2", "--head-lr=0.004", "--matrix-lr=0.03",
            "--scalar-lr=0.4"]
    config = train_gpt2.configure(train_gpt2.parse_args(argv), argv)
    model = train_gpt2.build_model(config, {}, None)
    assert isinstance(model, ModernGPT)
    optimizer = train_gpt2.build_optimizer(model, config, torch.device("cpu"))
    scale = (32 / optim.REFERENCE_WIDTH) ** -0.5
    peaks = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert peaks == pytest.approx({"embedding": 0.2 * scale, "value_embedding": 0.1 * scale,
                                   "head": 0.004 * scale, "matrix": 0.03,
                                   "resid_lambda": 0.004, "x0_lambda": 0.4})
    optim.set_lr_multiplier(optimizer, 0.25)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {name: 0.25 * peak for name, peak in peaks.items()})
    gpt2 = train_gpt2.configure(train_gpt2.parse_args(argv[:1] + ["--max-lr=1e-3"]), [])
    adamw = train_gpt2.build_optimizer(train_gpt2.build_model(gpt2, {}, None), gpt2,
                                       torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["initial_lr"] for g in adamw.param_groups] == [1e-3, 1e-3]


def test_modern_recipe_resumes_exactly(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards")
    common = ["--recipe=modern", "--max-steps=6", "--eval-interval=3", "--warmup-steps=2",
              "--checkpoint-interval=3", "--keep-checkpoints=0"]
    straight = tmp_path / "straight"
    assert train_gpt2.main(tiny_args(shards, straight, *common)) == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(straight / "ckpt_0000003.pt", killed)
    lines = (straight / "log.jsonl").read_text().splitlines(keepends=True)
    (killed / "log.jsonl").write_text("".join(lines[:next(
        i for i, line in enumerate(lines) if "ckpt_0000003.pt" in line)]))
    assert train_gpt2.main(tiny_args(shards, killed, *common, "--resume")) == 0
    assert_same_run(killed, straight, "ckpt_0000006.pt")
    state = load_ckpt(straight / "ckpt_0000006.pt")
    assert state["model_kind"] == "modern" and "transformer.wpe.weight" not in state["model"]


def test_modern_run_samples_scores_hellaswag_and_is_refused_by_export(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = write_shards(tmp_path / "shards")
    hellaswag = tmp_path / "hs.jsonl"
    hellaswag.write_text('{"ctx": "The cat sat on the", "endings": [" mat.", " moon.", '
                         '" idea.", " seven."], "label": 0}\n' * 3)
    out = tmp_path / "out"
    assert train_gpt2.main(tiny_args(
        shards, out, "--recipe=modern", "--vocab-size=50304", "--max-steps=2",
        "--eval-interval=2", "--sample-interval=2", "--num-samples=1", "--sample-length=12",
        "--sample-prompt=The cat", "--hellaswag-interval=2",
        f"--hellaswag-data={hellaswag}")) == 0
    log = read_log(out)
    assert [len(e["samples"]) for e in log if "samples" in e] == [1]
    model = checkpoint.model_from_state(checkpoint.load(out / "ckpt_0000002.pt")).eval()
    assert isinstance(model, ModernGPT)
    reference = eval_hellaswag.evaluate(model, eval_hellaswag.load_examples(hellaswag), "cpu")
    assert [e["hellaswag_acc_norm"] for e in log if "hellaswag_acc_norm" in e][-1] == \
        reference.acc_norm
    capsys.readouterr()
    assert export.main([f"--checkpoint={out / 'ckpt_0000002.pt'}", f"--out={tmp_path / 'hf'}"]) == 1
    assert "GPT-2's Hugging Face format cannot hold" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_of_the_first_modern_recipe_is_refused_in_one_line(
        tmp_path: Path) -> None:
    """Before model_modern.py, --recipe=modern switched GPT-2's own classes: such a
    checkpoint (a switch on) says what changed; one with every switch off loads as GPT-2."""
    shards = write_shards(tmp_path / "shards")
    out = tmp_path / "out"
    assert train_gpt2.main(tiny_args(shards, out, "--max-steps=1")) == 0
    state = load_ckpt(out / "ckpt_0000001.pt")
    state["model_config"].update(rotary=False, qk_norm=False, relu_squared=False,
                                 untied_head=False, zero_init=False)
    torch.save(state, tmp_path / "off.pt")
    assert checkpoint.load(tmp_path / "off.pt")["model_kind"] == "gpt2"
    state["model_config"]["rotary"] = True
    torch.save(state, tmp_path / "on.pt")
    with pytest.raises(ValueError, match=r"on.pt: written by the first --recipe=modern \(rotary"):
        checkpoint.load(tmp_path / "on.pt")


def test_resuming_across_recipes_is_one_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    shards = write_shards(tmp_path / "shards")
    out = tmp_path / "out"
    assert train_gpt2.main(tiny_args(shards, out, "--recipe=modern", "--max-steps=1")) == 0
    capsys.readouterr()
    assert train_gpt2.main(tiny_args(shards, out, "--max-steps=2", "--resume")) == 1
    err = capsys.readouterr().err
    assert "checkpoint of another model: a modern model (this run: --recipe=gpt2)" in err
    assert "hint: pass the flags it was trained with" in err


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_gloo_ranks_match_one_process_under_the_modern_recipe(tmp_path: Path) -> None:
    a, b = single_and_two_gloo_ranks(tmp_path, "--recipe=modern")
    # The same losses; the weights agree less tightly than GPT-2's: Newton-Schulz maps every
    # singular value of an update towards 1, rounding-level ones too, and from zero-
    # initialised projections the early gradients have many of those; the scalars' AdamW
    # (rate 0.5, eps 1e-10) turns rounding-level gradients into whole steps.
    single, ddp_log = ([e.get("loss", e.get("val_loss")) for e in read_log(d)
                        if "loss" in e or "val_loss" in e] for d in (tmp_path / "single",
                                                                    tmp_path / "ddp"))
    assert single == pytest.approx(ddp_log, rel=1e-5)
    for key in a["model"]:
        assert (a["model"][key] - b["model"][key]).norm() <= 5e-2 * a["model"][key].norm(), key
