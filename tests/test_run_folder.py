"""One run per --out-dir: a training run holds its folder from before its first write to its
exit, a second run into it stops naming the holder, and a holder killed with SIGKILL blocks
nothing. Real processes throughout: the lock is the kernel's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_fsdp import free_port
from test_hostile import train_args
from test_train import SCRIPT, subprocess_env

import checkpoint
import data


def start_run(root: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), *train_args(root, *extra)], cwd=root,
                            env=subprocess_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until_training(run: subprocess.Popen[str], out_dir: Path) -> None:
    """Until the run has written its first log line (it holds the folder by then)."""
    deadline = time.monotonic() + 120
    while not (out_dir / checkpoint.LOG_NAME).exists():
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "the first run did not start training"
        time.sleep(0.2)


def test_a_second_run_into_a_held_folder_stops_and_a_killed_holder_blocks_nothing(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = start_run(tmp_path, "--max-steps=100000", "--checkpoint-interval=1",
                      "--keep-checkpoints=2")
    try:
        wait_until_training(first, out)
        for flag in ("--overwrite", "--resume", "--seed=2"):
            second = subprocess.run([sys.executable, str(SCRIPT),
                                     *train_args(tmp_path, "--max-steps=3", flag)],
                                    cwd=tmp_path, env=subprocess_env(tmp_path),
                                    capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, second.stderr
            error = second.stderr.splitlines()[0]
            assert error == (f"error: --out-dir={out}: another run (pid {first.pid}) is "
                             "writing this folder"), second.stderr
        assert first.poll() is None, "the second run stopped the first"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    kept = checkpoint.find(out)
    assert kept, "the first run wrote no checkpoint"
    resumed = subprocess.run([sys.executable, str(SCRIPT),
                              *train_args(tmp_path, f"--max-steps={int(kept[-1].stem[5:]) + 1}",
                                          "--resume")],
                             cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {kept[-1]}" in resumed.stdout


def test_every_torchrun_rank_stops_when_the_folder_is_held(tmp_path: Path) -> None:
    """The test process holds the folder; both ranks of a torchrun job into it stop (rank 0
    alone tries the lock and tells the others), naming this process's pid."""
    out = tmp_path / "out"
    with data.hold_folder(out, checkpoint.LOCK_NAME):
        launcher = Path(sys.executable).parent / "torchrun"
        done = subprocess.run(
            [str(launcher), "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
             f"--master_port={free_port()}", str(SCRIPT),
             *train_args(tmp_path, "--max-steps=2", "--batch-size=2")],
            cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True,
            timeout=300)
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines()
                if f"another run (pid {os.getpid()}) is writing this folder" in line]
    assert len(refusals) == 2, done.stderr  # each rank's own line
    assert not checkpoint.find(out) and not (out / checkpoint.LOG_NAME).exists()
