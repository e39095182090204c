"""Beyond the 2019 recipe: --optimizer=muon, the architecture switches and --recipe=modern."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_train import (
    VOCAB,
    assert_same_run,
    load_ckpt,
    read_log,
    single_and_two_gloo_ranks,
    tiny_args,
    write_shards,
)

import checkpoint
import eval_hellaswag
import train_gpt2
from model import GPT, GPTConfig

ALL_SWITCHES = dict(rotary=True, qk_norm=True, relu_squared=True, untied_head=True,
                    zero_init=True)


def tiny(**switches: bool) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32,
                         **switches))


@pytest.mark.parametrize("switches", [{}, ALL_SWITCHES], ids=["gpt2", "modern"])
def test_every_parameter_in_one_group_and_block_matrices_in_muons(
        switches: dict[str, bool]) -> None:
    model = tiny(**switches)
    optimizer = model.configure_optimizers(0.1, 1e-3, muon_lr=0.02)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(id(p) for p in model.parameters())
    assert len(grouped) == len(set(map(id, grouped)))  # none twice
    muon = optimizer.parts["muon"]  # type: ignore[attr-defined]
    expected = {id(p) for name, p in model.named_parameters()
                if name.startswith("transformer.h.") and p.dim() == 2}
    assert {id(p) for group in muon.param_groups for p in group["params"]} == expected
    assert isinstance(muon, torch.optim.Muon)
    # The embeddings, the head and the 1-D parameters stay with AdamW.
    adamw = optimizer.parts["adamw"]  # type: ignore[attr-defined]
    assert isinstance(adamw, torch.optim.AdamW)
    assert id(model.transformer.wte.weight) in {id(p) for g in adamw.param_groups
                                                for p in g["params"]}


def test_switches_off_build_gpt2_and_on_change_the_model() -> None:
    plain, modern = tiny(), tiny(**ALL_SWITCHES)
    assert plain.lm_head.weight is plain.transformer.wte.weight
    assert modern.lm_head.weight is not modern.transformer.wte.weight
    assert not hasattr(modern.transformer, "wpe")
    projections = [p for n, p in modern.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projections) == 4 and all(not p.any() for p in projections)
    assert set(plain.state_dict()) <= set(modern.state_dict()) | {"transformer.wpe.weight"}


def test_wsd_schedule_warms_up_holds_then_decays_linearly() -> None:
    lr = [train_gpt2.get_lr(s, 1.0, 0.1, 10, 100, cooldown_frac=0.4) for s in range(101)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10:61] == [1.0] * 51
    assert lr[80] == pytest.approx(1.0 + 0.5 * (0.1 - 1.0))
    assert lr[100] == pytest.approx(0.1)


def test_recipe_modern_sets_its_flags_and_each_stays_overridable(tmp_path: Path) -> None:
    argv = [f"--data-dir={tmp_path}", "--recipe=modern", "--no-rotary", "--muon-lr=0.01"]
    config = train_gpt2.configure(train_gpt2.parse_args(argv), argv)
    assert (config.optimizer, config.lr_schedule, config.muon_lr) == ("muon", "wsd", 0.01)
    assert config.qk_norm and config.relu_squared and config.untied_head and config.zero_init
    assert not config.rotary
    plain = train_gpt2.configure(train_gpt2.parse_args([f"--data-dir={tmp_path}"]), [])
    assert plain.optimizer == "adamw"  # the 2019 recipe by default


def test_modern_recipe_resumes_exactly(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards")
    common = ["--recipe=modern", "--max-steps=6", "--eval-interval=3",
              "--checkpoint-interval=3", "--keep-checkpoints=0", "--muon-lr=0.02"]
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
    assert set(state["optimizer"]) == {"muon", "adamw"}
    assert state["model_config"]["rotary"] and "transformer.wpe.weight" not in state["model"]


def test_muon_alone_on_gpt2_trains_and_resumes_with_fp32_accumulation(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards")
    common = ["--optimizer=muon", "--max-steps=4", "--eval-interval=2",
              "--checkpoint-interval=2", "--keep-checkpoints=0"]
    straight = tmp_path / "straight"
    assert train_gpt2.main(tiny_args(shards, straight, *common)) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "ckpt_0000002.pt", resumed)
    assert train_gpt2.main(tiny_args(shards, resumed, *common, "--resume")) == 0
    a, b = (load_ckpt(d / "ckpt_0000004.pt") for d in (straight, resumed))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_modern_run_samples_scores_hellaswag_and_its_checkpoint_loads(
        tmp_path: Path) -> None:
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
    model = GPT.from_checkpoint(checkpoint.load(out / "ckpt_0000002.pt")).eval()
    reference = eval_hellaswag.evaluate(model, eval_hellaswag.load_examples(hellaswag), "cpu")
    assert [e["hellaswag_acc_norm"] for e in log if "hellaswag_acc_norm" in e][-1] == \
        reference.acc_norm
    with pytest.raises(ValueError, match="cannot hold"):
        model.save_hf(tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_muon_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = write_shards(tmp_path / "shards")
    assert train_gpt2.main(tiny_args(shards, tmp_path / "o", "--optimizer=muon",
                                     "--max-lr=0")) == 2
    assert "--max-lr above 0" in capsys.readouterr().err


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_gloo_ranks_match_one_process_under_the_modern_recipe(tmp_path: Path) -> None:
    a, b = single_and_two_gloo_ranks(tmp_path, "--recipe=modern")
    # The same losses; the weights agree less tightly than AdamW's: Newton-Schulz maps every
    # singular value of an update towards 1, rounding-level ones too, and from zero-
    # initialised projections the early gradients have many of those.
    single, ddp_log = ([e.get("loss", e.get("val_loss")) for e in read_log(d)
                        if "loss" in e or "val_loss" in e] for d in (tmp_path / "single",
                                                                    tmp_path / "ddp"))
    assert single == pytest.approx(ddp_log, rel=1e-5)
    for key in a["model"]:
        assert (a["model"][key] - b["model"][key]).norm() <= 2e-2 * a["model"][key].norm(), key
