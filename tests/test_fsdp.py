"""train_gpt2.py --fsdp on CPU with gloo: the same losses as DDP, and sharded checkpoints
(torch.distributed.checkpoint folders) that resume in a single process at the exact step
and data position, and that sample.py and HellaSwag read.

The runs are shared by the tests below (each torchrun start costs seconds on a small CPU).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import (
    SCRIPT,
    read_log,
    run_script,
    subprocess_env,
    tiny_args,
    write_hellaswag,
    write_shards,
)

import cli
import sample

STEPS = 30
RESUME_STEP = 20
# Two ranks take 2 samples each per micro-step; one process takes all 4.
COMMON = [f"--max-steps={STEPS}", "--eval-interval=10", "--checkpoint-interval=10",
          "--keep-checkpoints=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(args: list[str], cwd: Path, ranks: int = 2) -> None:
    launcher = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [str(launcher), "--nnodes=1", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", str(SCRIPT), *args],
        cwd=cwd, env=subprocess_env(cwd), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def losses(out_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_log(out_dir) if "loss" in e}


def grad_norms(out_dir: Path) -> list[float]:
    return [e["grad_norm"] for e in read_log(out_dir) if "grad_norm" in e]


def val_losses(out_dir: Path) -> dict[int, float]:
    return {e["step"]: e["val_loss"] for e in read_log(out_dir) if "val_loss" in e}


def cut_back(source: Path, out_dir: Path, step: int) -> None:
    """out_dir: a copy of source's run as if it had been killed after the step's checkpoint."""
    shutil.copytree(source, out_dir)
    for later in range(step + 10, STEPS + 1, 10):
        shutil.rmtree(out_dir / f"ckpt_{later:07d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ddp/ and fsdp/: 30 steps on 2 ranks each; resumed/: fsdp/ cut back to its step-20
    checkpoint and finished by one plain process; fsdp4/ and ddp2/: cut back to step 10 and
    finished by FSDP on four ranks and by DDP on two."""
    root = tmp_path_factory.mktemp("fsdp")
    shards = write_shards(root / "shards")
    torchrun(tiny_args(shards, root / "ddp", *COMMON, "--batch-size=2"), root)
    torchrun(tiny_args(shards, root / "fsdp", *COMMON, "--batch-size=2", "--fsdp"), root)
    cut_back(root / "fsdp", root / "resumed", RESUME_STEP)
    done = run_script(tiny_args(shards, root / "resumed", *COMMON, "--batch-size=4",
                                "--resume"), root)
    assert done.returncode == 0, done.stderr[-4000:]
    cut_back(root / "fsdp", root / "fsdp4", 10)
    torchrun(tiny_args(shards, root / "fsdp4", *COMMON, "--batch-size=1", "--fsdp",
                       "--resume"), root, ranks=4)
    cut_back(root / "fsdp", root / "ddp2", 10)
    torchrun(tiny_args(shards, root / "ddp2", *COMMON, "--batch-size=2", "--resume"), root)
    return root


def test_fsdp_logs_the_losses_of_ddp(runs: Path) -> None:
    ddp, fsdp = losses(runs / "ddp"), losses(runs / "fsdp")
    assert sorted(fsdp) == list(range(STEPS))
    for step, loss in ddp.items():
        assert fsdp[step] == pytest.approx(loss, abs=1e-5), step
    # The clipping norm is over the whole model, not this rank's shard of the gradients.
    assert grad_norms(runs / "fsdp") == pytest.approx(grad_norms(runs / "ddp"), rel=1e-4)
    assert val_losses(runs / "fsdp") == pytest.approx(val_losses(runs / "ddp"), abs=1e-5)


def test_fsdp_checkpoints_are_complete_folders(runs: Path) -> None:
    names = sorted(p.name for p in (runs / "fsdp").iterdir() if p.name.startswith(("ckpt", ".")))
    assert names == ["ckpt_0000010", "ckpt_0000020", "ckpt_0000030"]  # no temp folders left
    state = torch.load(runs / "fsdp" / "ckpt_0000030" / "train_state.pt", weights_only=True)
    assert state["step"] == STEPS and state["world_size"] == 2
    assert "model" not in state and "optimizer" not in state  # those are in the shards


def test_one_process_resumes_a_two_rank_fsdp_checkpoint_exactly(runs: Path) -> None:
    whole, resumed = losses(runs / "fsdp"), losses(runs / "resumed")
    assert sorted(resumed) == list(range(STEPS))
    for step in range(RESUME_STEP, STEPS):
        assert resumed[step] == pytest.approx(whole[step], abs=1e-5), step
    assert val_losses(runs / "resumed")[STEPS] == pytest.approx(
        val_losses(runs / "fsdp")[STEPS], abs=1e-5)
    # The plain process writes .pt checkpoints; the sharded folder loads as the same weights.
    plain = cli.load_model(None, str(runs / "resumed" / f"ckpt_{STEPS:07d}.pt"), "cpu")
    sharded = cli.load_model(None, str(runs / "fsdp" / f"ckpt_{STEPS:07d}"), "cpu")
    for name, weight in plain.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("run", ["fsdp4", "ddp2"])
def test_fsdp_and_ddp_resume_a_two_rank_fsdp_checkpoint_exactly(runs: Path, run: str) -> None:
    whole, resumed = losses(runs / "fsdp"), losses(runs / run)
    assert sorted(resumed) == list(range(STEPS))
    for step in range(10, STEPS):
        assert resumed[step] == pytest.approx(whole[step], abs=1e-5), step


def test_a_different_global_micro_batch_is_refused(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(runs / "fsdp", out)
    done = run_script(tiny_args(runs / "shards", out, *COMMON, "--batch-size=2", "--resume"),
                      tmp_path)
    assert done.returncode == 1
    assert "resume with --batch-size=4" in done.stderr


def test_hellaswag_and_samples_under_fsdp(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    shards = write_shards(tmp_path / "shards")
    jsonl = write_hellaswag(tmp_path / "hs.jsonl")
    out = tmp_path / "out"
    torchrun(tiny_args(shards, out, "--vocab-size=50304", "--max-steps=2", "--batch-size=2",
                       "--eval-interval=2", "--hellaswag-interval=2",
                       f"--hellaswag-data={jsonl}", "--sample-interval=2", "--num-samples=1",
                       "--sample-length=16", "--fsdp"), tmp_path)
    log = read_log(out)
    assert [e["step"] for e in log if "hellaswag_acc_norm" in e] == [0, 2]
    assert [len(e["samples"]) for e in log if "samples" in e] == [1]
    assert sample.main([f"--checkpoint={out / 'ckpt_0000002'}", "--device=cpu",
                        "--max-length=4", "--num-samples=1", "Hello"]) == 0
    assert capsys.readouterr().out.startswith("> Hello")
