"""train_gpt2.py --fsdp on CPU with gloo: the same losses as DDP, and sharded checkpoints
(torch.distributed.checkpoint folders) that resume in a single process at the exact step
and data position, and that sample.py and HellaSwag read.

The runs are shared by the tests below (each torchrun start costs seconds on a small CPU).
"""

from __future__ import annotations

import pickle
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_hostile import Case, Payload, check_case
from test_train import (
    SCRIPT,
    read_log,
    run_script,
    subprocess_env,
    tiny_args,
    write_hellaswag,
    write_shards,
)
from torch.distributed.checkpoint import format_utils

import checkpoint
import data
import eval_hellaswag
import export
import sample
import sharding
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
    # No temp folders left; .lock is the run's hold on the folder.
    assert names == [".lock", "ckpt_0000010", "ckpt_0000020", "ckpt_0000030"]
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
    plain = checkpoint.load_model(None, str(runs / "resumed" / f"ckpt_{STEPS:07d}.pt"), "cpu")
    sharded = checkpoint.load_model(None, str(runs / "fsdp" / f"ckpt_{STEPS:07d}"), "cpu")
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
        train_gpt2.main, lose_the_metadata, f"ckpt_{STEPS:07d}/.metadata: missing"),
    "sample: a string in train_state.pt's model_config": (
        sample.main, lambda f: edit_train_state(f, lambda s: s["model_config"].update(
            n_head="2")), "train_state.pt: model_config['n_head'] is '2'"),
    "eval: train_state.pt of another model (no checksums)": (
        eval_hellaswag.main, lambda f: edit_train_state(f, lambda s: (
            s.pop("sha256"), s["model_config"].update(n_layer=3))),
        "model_config['n_layer'] is 3, its weights hold 2 layers"),
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


# ------------------------------------------------------- a folder that tries to run code


def matching_checksums(folder: Path) -> None:
    """The checksum map rewritten over the folder as it is now: what a hostile author of the
    folder writes too."""
    sums = {p.name: data.file_sha256(p) for p in folder.iterdir() if p.name != "train_state.pt"}
    edit_train_state(folder, lambda state: state.update(sha256=sums))


def hostile_metadata(checksums: str) -> Callable[[Path, Path], None]:
    """`.metadata` a pickle whose loading would create the marker file."""
    def spoil(folder: Path, marker: Path) -> None:
        (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        if checksums == "none":
            without_checksums(folder)
        else:
            matching_checksums(folder)
    return spoil


def hostile_shard_file(folder: Path, marker: Path) -> None:
    """A shard file swapped for such a pickle, the checksums matching."""
    (folder / "__0_0.distcp").write_bytes(pickle.dumps(Payload(marker)))
    matching_checksums(folder)


def hostile_byte_item(folder: Path, marker: Path) -> None:
    """The folder written anew by torch.distributed.checkpoint with the optimizer's
    param_groups holding the payload (DCP saves non-tensor values as pickled byte items),
    its metadata genuine and its checksums matching."""
    whole = folder.parent / "whole.pt"
    format_utils.dcp_to_torch_save(folder, whole)  # the test trusts the folder it wrote
    state = torch.load(whole, weights_only=False)
    state["optimizer"]["param_groups"][0]["lr"] = Payload(marker)
    for old in [folder / ".metadata", *folder.glob("*.distcp")]:
        old.unlink()
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    whole.unlink()
    matching_checksums(folder)


def hostile_train_state(folder: Path, marker: Path) -> None:
    """train_state.pt swapped for a pickle of the payload."""
    torch.save({"model_config": Payload(marker)}, folder / "train_state.pt")


HOSTILE_FOLDERS = {
    "metadata, no checksums": hostile_metadata("none"),
    "metadata, matching checksums": hostile_metadata("matching"),
    "a shard file, matching checksums": hostile_shard_file,
    "a byte item, genuine metadata, matching checksums": hostile_byte_item,
    "train_state.pt": hostile_train_state,
}
ENTRY_POINTS = ["sample", "eval", "train --init-from", "train --resume", "export",
                "train_jax --init-from"]


def entry_point_args(entry: str, runs: Path, root: Path,
                     folder: Path) -> tuple[Callable[[list[str]], int], list[str]]:
    shards = runs / "shards"
    if entry == "sample":
        return sample.main, [f"--checkpoint={folder}", "--device=cpu", "--max-length=4"]
    if entry == "eval":
        return eval_hellaswag.main, [f"--checkpoint={folder}", "--device=cpu",
                                     f"--data={write_hellaswag(root / 'hs.jsonl')}"]
    if entry == "train --init-from":
        return train_gpt2.main, tiny_args(shards, root / "new", "--max-steps=1",
                                          f"--init-from={folder}")
    if entry == "train --resume":
        return train_gpt2.main, tiny_args(shards, root / "out", *COMMON, "--batch-size=4",
                                          "--resume")
    if entry == "export":
        return export.main, [f"--checkpoint={folder}", f"--out={root / 'hf'}"]
    import train_jax

    return train_jax.main, tiny_args(shards, root / "new", "--max-steps=1", "--batch-size=4",
                                     f"--init-from={folder}")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("hostile", list(HOSTILE_FOLDERS))
def test_a_hostile_fsdp_folder_runs_nothing(runs: Path, tmp_path: Path, hostile: str, entry: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever the folder holds and whatever its checksums say: one line naming the folder,
    exit 1, the payload never run (its marker file absent), nothing written."""
    if hostile.startswith("a byte item") and entry != "train --resume":
        pytest.skip("only --resume reads the optimizer state, where the byte items are")
    if entry == "train_jax --init-from":
        pytest.importorskip("jax")
    marker = tmp_path / "PAYLOAD-RAN"
    folder = copy_of_run(runs, tmp_path, lambda f: HOSTILE_FOLDERS[hostile](f, marker))
    main, args = entry_point_args(entry, runs, tmp_path, folder)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != ".lock")
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(folder) in errors[0] and "Traceback" not in err, err
    assert not marker.exists(), "the folder ran code"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != ".lock")
    assert after == before, "something was written"


def test_the_metadata_reader_admits_what_dcp_writes(runs: Path) -> None:
    """The restricted reader gives the same Metadata as torch's own (plain pickle) reader."""
    folder = runs / "fsdp" / f"ckpt_{STEPS:07d}"
    ours = sharding.read_metadata(folder)
    theirs = dcp.FileSystemReader(folder).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data


def test_a_folder_without_checksums_still_loads(runs: Path, tmp_path: Path) -> None:
    folder = copy_of_run(runs, tmp_path, without_checksums)
    old = checkpoint.load_model(None, str(folder), "cpu")
    new = checkpoint.load_model(None, str(runs / "fsdp" / f"ckpt_{STEPS:07d}"), "cpu")
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
