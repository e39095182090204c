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
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_hostile import Case, check_case
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
import eval_hellaswag
import sample
import train_gpt2

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


def flip_a_byte(path: Path) -> None:
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))


def edit_train_state(folder: Path, edit: Callable[[dict], object]) -> None:
    state = torch.load(folder / "train_state.pt", weights_only=True)
    edit(state)
    torch.save(state, folder / "train_state.pt")


def without_checksums(folder: Path) -> None:
    """The folder as train_gpt2.py wrote it before checksums."""
    edit_train_state(folder, lambda state: state.pop("sha256"))


def copy_of_run(runs: Path, root: Path, spoil: Callable[[Path], object]) -> Path:
    """runs/fsdp copied to root/out, its newest checkpoint folder spoiled."""
    shutil.copytree(runs / "fsdp", root / "out")
    spoil(root / "out" / f"ckpt_{STEPS:07d}")
    return root / "out" / f"ckpt_{STEPS:07d}"


def cut_a_shard(folder: Path) -> None:
    without_checksums(folder)
    shard = folder / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])


def lose_the_metadata(folder: Path) -> None:
    without_checksums(folder)
    (folder / ".metadata").unlink()


FOLDER_FAULTS = {  # name: (script, spoil, what the one error line names)
    "sample: a flipped byte in a shard": (
        sample.main, lambda f: flip_a_byte(f / "__0_0.distcp"), "__0_0.distcp: not the file"),
    "eval: a flipped byte in the metadata": (
        eval_hellaswag.main, lambda f: flip_a_byte(f / ".metadata"), ".metadata: not the file"),
    "train: --resume with a flipped byte in a shard": (
        train_gpt2.main, lambda f: flip_a_byte(f / "__1_0.distcp"), "__1_0.distcp: not the file"),
    "sample: a shard cut short (no checksums)": (
        sample.main, cut_a_shard, f"ckpt_{STEPS:07d}: cannot read its shards"),
    "train: --resume from a folder whose metadata is gone (no checksums)": (
        train_gpt2.main, lose_the_metadata, f"ckpt_{STEPS:07d}: cannot read its shards"),
    "sample: a string in train_state.pt's model_config": (
        sample.main, lambda f: edit_train_state(f, lambda s: s["model_config"].update(
            n_head="2")), "train_state.pt: model_config['n_head'] is '2'"),
    "eval: train_state.pt of another model (no checksums)": (
        eval_hellaswag.main, lambda f: edit_train_state(f, lambda s: (
            s.pop("sha256"), s["model_config"].update(n_layer=3))), "Missing key"),
}


@pytest.mark.parametrize("name", list(FOLDER_FAULTS))
def test_a_damaged_fsdp_folder_is_one_line(runs: Path, name: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    script, spoil, names = FOLDER_FAULTS[name]

    def args(root: Path) -> list[str]:
        folder = copy_of_run(runs, root, spoil)
        if script is train_gpt2.main:
            return tiny_args(runs / "shards", root / "out", *COMMON, "--batch-size=4",
                             "--resume")
        if script is eval_hellaswag.main:
            return [f"--checkpoint={folder}", "--device=cpu",
                    f"--data={write_hellaswag(root / 'hs.jsonl')}"]
        return [f"--checkpoint={folder}", "--device=cpu", "--max-length=4"]

    check_case(Case(script, args, 1, names), tmp_path, capsys, monkeypatch)


def test_a_folder_without_checksums_still_loads(runs: Path, tmp_path: Path) -> None:
    folder = copy_of_run(runs, tmp_path, without_checksums)
    old = cli.load_model(None, str(folder), "cpu")
    new = cli.load_model(None, str(runs / "fsdp" / f"ckpt_{STEPS:07d}"), "cpu")
    for name, weight in new.state_dict().items():
        assert torch.equal(old.state_dict()[name], weight), name


def test_init_from_an_fsdp_folder(runs: Path, tmp_path: Path) -> None:
    """The folder's weights start the run: its first validation loss is the last one of the
    run that wrote the folder."""
    folder = runs / "fsdp" / f"ckpt_{STEPS:07d}"
    assert train_gpt2.main(tiny_args(runs / "shards", tmp_path / "out", "--max-steps=1",
                                     "--eval-interval=1", f"--init-from={folder}")) == 0
    assert val_losses(tmp_path / "out")[0] == pytest.approx(
        val_losses(runs / "fsdp")[STEPS], abs=1e-5)
