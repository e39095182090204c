"""train_gpt2.py: LR schedule, gradient accumulation, exact resume, DDP, signals, bad input.

Every run uses a tiny model (2 layers, 32 wide, 256-token vocab) on random-token shards the
tests write themselves, so each training run takes a second or two on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import checkpoint
import data
import model as model_module
import runtime
import train_gpt2
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "train_gpt2.py"
VOCAB = 256
SEQ = 32


def write_shards(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(2):
        data.write_shard(directory / f"syn_train_{i:06d}.bin", rng.integers(0, VOCAB, 12_000))
    data.write_shard(directory / "syn_val_000000.bin", rng.integers(0, VOCAB, 4_000))
    return directory


def tiny_args(shards: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        f"--data-dir={shards}", f"--out-dir={out_dir}", "--device=cpu", "--model=gpt2-tiny",
        "--n-embd=32", f"--vocab-size={VOCAB}", f"--seq-len={SEQ}", "--batch-size=4",
        f"--total-batch-size={2 * 4 * SEQ}", "--warmup-steps=2", "--max-lr=3e-3",
        "--val-steps=2", "--hellaswag-interval=0", "--sample-interval=0", *extra,
    ]


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["NANO_GPT_DATA_ROOT"] = str(tmp_path / "data-root")
    env["OMP_NUM_THREADS"] = "1"
    # Under torchrun the script runs as a plain file; the repo must be importable.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_script(args: list[str], tmp_path: Path,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path,
                          env=subprocess_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def deterministic_events(log: list[dict]) -> list[tuple]:
    """Everything in the log except wall-clock timings; checkpoints by file name."""
    events = []
    for entry in log:
        kept = {k: v for k, v in entry.items() if k not in ("dt_ms", "tok_per_s", "mfu")}
        if "checkpoint" in kept:
            kept["checkpoint"] = Path(kept["checkpoint"]).name
        events.append(tuple(sorted(kept.items())))
    return events


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def newest_ckpt(out_dir: Path) -> Path:
    return sorted(out_dir.glob("ckpt_*.pt"))[-1]


# ------------------------------------------------------------------------------ schedule


def test_lr_schedule_warmup_cosine_and_floor() -> None:
    max_lr, min_lr, warmup, total = 6e-4, 6e-5, 10, 110
    lr = lambda step: max_lr * train_gpt2.lr_multiplier(step, 0.1, warmup, total)  # noqa: E731
    assert lr(0) == pytest.approx(max_lr / 10)
    assert lr(4) == pytest.approx(max_lr * 5 / 10)
    assert lr(9) == pytest.approx(max_lr)
    assert lr(10) == pytest.approx(max_lr)  # cosine starts at its peak
    # A quarter of the way through the decay: cos(pi/4).
    quarter = min_lr + 0.5 * (1 + math.cos(math.pi / 4)) * (max_lr - min_lr)
    assert lr(35) == pytest.approx(quarter)
    assert lr(60) == pytest.approx((max_lr + min_lr) / 2)
    assert lr(110) == pytest.approx(min_lr)
    assert lr(500) == pytest.approx(min_lr)
    values = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_recipe_defaults(tmp_path: Path) -> None:
    argv = [f"--data-dir={tmp_path}"]
    config = train_gpt2.configure(train_gpt2.parse_args(argv), argv)
    assert (config.batch_size, config.seq_len, config.total_batch_size) == (64, 1024, 524288)
    assert (config.max_lr, config.final_lr_frac) == (6e-4, 0.1)
    # The evaluations' own intervals default to --eval-interval's.
    assert config.eval_interval == config.hellaswag_interval == config.sample_interval == 250
    assert (config.warmup_steps, config.max_steps) == (715, 19073)
    assert (config.weight_decay, config.grad_clip, config.vocab_size) == (0.1, 1.0, 50304)
    assert config.grad_accum(world_size=8) == 1
    assert config.grad_accum(world_size=1) == 8


def test_quickstart_keeps_explicit_flags(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv = [f"--data-root={tmp_path}", "--max-steps=7"]
    config = train_gpt2.parse_args(argv)
    resolved = train_gpt2.configure(config, argv)
    assert resolved.quickstart and resolved.dataset == "stdlib"
    assert (resolved.model, resolved.seq_len) == ("gpt2-mini", 256)
    assert resolved.max_steps == 7
    assert "prepare_dataset.py --dataset=finewebedu" in capsys.readouterr().out
    # Prepared finewebedu shards make it the default instead.
    write_shards(tmp_path / "finewebedu")
    resolved = train_gpt2.configure(config, argv)
    assert resolved.dataset == "finewebedu" and not resolved.quickstart


def test_quickstart_prepares_stdlib_trains_and_samples(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("NANO_GPT_DATA_ROOT", str(tmp_path / "root"))
    monkeypatch.chdir(tmp_path)
    # The quickstart's own model; a smaller batch than its default keeps the test quick.
    assert train_gpt2.main(["--device=cpu", "--max-steps=1", "--val-steps=1",
                            "--batch-size=2", "--seq-len=16", "--total-batch-size=32",
                            "--sample-length=8"]) == 0
    stdout = capsys.readouterr().out
    assert "running the built-in quickstart" in stdout
    assert "python prepare_dataset.py --dataset=finewebedu" in stdout
    assert list((tmp_path / "root" / "stdlib").glob("stdlib_train_*.bin"))
    log = read_log(tmp_path / "out")
    assert [e["step"] for e in log if "val_loss" in e] == [0, 1]
    assert [(e["step"], len(e["samples"])) for e in log if "samples" in e] == [(1, 2)]
    assert "> def " in stdout
    model = checkpoint.load_model(None, str(tmp_path / "out" / "ckpt_0000001.pt"), "cpu")
    assert model.config.n_layer == 4 and model.config.n_embd == 128  # gpt2-mini


def test_open_run_cuts_the_log_back_to_the_resumed_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    ckpt = tmp_path / "ckpt_0000002.pt"
    events = [{"step": 0, "val_loss": 5.0}, {"step": 0, "loss": 5.1}, {"step": 1, "loss": 5.0},
              {"step": 2, "checkpoint": str(ckpt)}, {"step": 2, "val_loss": 4.9},
              {"step": 2, "loss": 4.8}, {"step": 3, "loss": 4.7}]
    log.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"step": 4, "lo')
    checkpoint.open_run(tmp_path, ckpt, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == events[:4]
    # A kill after the checkpoint's rename but before its log line: the line is restored.
    log.write_text("".join(json.dumps(e) + "\n" for e in events[:3]))
    checkpoint.open_run(tmp_path, ckpt, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == events[:4]


# ----------------------------------------------------------------------- training runs


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards")
    common = ["--max-steps=3", "--eval-interval=0", "--checkpoint-interval=3"]
    accum = tiny_args(shards, tmp_path / "accum", *common)  # 2 micro-steps of 4
    big = tiny_args(shards, tmp_path / "big", *common, "--batch-size=8")  # 1 of 8
    assert train_gpt2.main(accum) == 0
    assert train_gpt2.main(big) == 0
    a = load_ckpt(tmp_path / "accum" / "ckpt_0000003.pt")["model"]
    b = load_ckpt(tmp_path / "big" / "ckpt_0000003.pt")["model"]
    for key in a:
        # Adam divides by sqrt(v): where a gradient is ~0, summation-order noise of 1e-9
        # can move a weight by ~1e-6 (the LR is 3e-3), so the bound is a fraction of one update.
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)
    losses_a = [e["loss"] for e in read_log(tmp_path / "accum") if "loss" in e]
    losses_b = [e["loss"] for e in read_log(tmp_path / "big") if "loss" in e]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    # The model did move: the weights differ from a fresh init with the same seed.
    config = GPT.from_checkpoint(checkpoint.load(tmp_path / "big" / "ckpt_0000003.pt")).config
    torch.manual_seed(1337)
    fresh = GPT(config)
    assert not torch.equal(fresh.state_dict()["transformer.h.0.mlp.c_fc.weight"],
                           b["transformer.h.0.mlp.c_fc.weight"])


def assert_same_run(out_dir: Path, reference: Path, final: str = "ckpt_0000040.pt") -> None:
    """Identical log events (losses, LRs, grad norms, val losses; each once) and final
    weights and loader state."""
    assert deterministic_events(read_log(out_dir)) == deterministic_events(read_log(reference))
    a = load_ckpt(reference / final)
    b = load_ckpt(out_dir / final)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["loader_states"] == b["loader_states"]
    assert not list(out_dir.glob(".*.tmp"))


def test_resume_after_sigkill_is_exact(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards")
    common = ["--max-steps=40", "--eval-interval=10", "--checkpoint-interval=5"]
    straight = tmp_path / "straight"
    run = run_script(tiny_args(shards, straight, *common, "--keep-checkpoints=0"), tmp_path)
    assert run.returncode == 0, run.stderr
    lines = (straight / "log.jsonl").read_text().splitlines(keepends=True)
    ckpt_10_line = next(i for i, line in enumerate(lines) if "ckpt_0000010.pt" in line)
    step_13_line = next(i for i, line in enumerate(lines) if '"step": 13' in line)

    # What a kill leaves behind at three points, rebuilt from the uninterrupted run's files.
    kill_points = {
        "after checkpoint 10's rename, before its log line": (
            [5, 10], lines[:ckpt_10_line], None),
        "in step 13, a log line and checkpoint 15 half written": (
            [5, 10], [*lines[:step_13_line], '{"step": 13, "lo'], ".ckpt_0000015.pt.x1.tmp"),
        "before the first checkpoint was renamed": (
            [], lines[:3], ".ckpt_0000005.pt.x2.tmp"),
    }
    for name, (checkpoints, log_lines, temp_file) in kill_points.items():
        killed = tmp_path / name.replace(" ", "_").replace(",", "").replace("'", "")
        killed.mkdir()
        for step in checkpoints:
            shutil.copy(straight / f"ckpt_{step:07d}.pt", killed)
        (killed / "log.jsonl").write_text("".join(log_lines))
        if temp_file:
            (killed / temp_file).write_bytes(b"\x80partial")
        resumed = run_script(tiny_args(shards, killed, *common, "--resume",
                                       "--keep-checkpoints=0"), tmp_path)
        assert resumed.returncode == 0, (name, resumed.stderr)
        assert_same_run(killed, straight)

    # And a real SIGKILL wherever it lands after the first checkpoint (or none at all, if
    # the run is quicker than the kill): the resumed run is the same run.
    killed = tmp_path / "sigkill"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *tiny_args(shards, killed, *common)],
                            cwd=tmp_path, env=subprocess_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "ckpt_0000005.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_script(tiny_args(shards, killed, *common, "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(killed, straight)
    assert len(list(killed.glob("ckpt_*.pt"))) == 3  # --keep-checkpoints default
    # The checkpoint is what sample.py and eval_hellaswag.py load.
    model = GPT.from_checkpoint(checkpoint.load(killed / "ckpt_0000040.pt"))
    final = load_ckpt(killed / "ckpt_0000040.pt")["model"]
    assert torch.equal(model.state_dict()["lm_head.weight"], final["lm_head.weight"])


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards")
    out_dir = tmp_path / "out"
    args = tiny_args(shards, out_dir, "--max-steps=100000", "--eval-interval=0",
                     "--checkpoint-interval=0")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=tmp_path,
                            env=subprocess_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    log = out_dir / "log.jsonl"
    while time.monotonic() < deadline and (not log.exists() or
                                           len(log.read_text().splitlines()) < 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    ckpt = newest_ckpt(out_dir)
    steps = [e["step"] for e in read_log(out_dir) if "loss" in e]
    assert steps == list(range(len(steps)))
    state = load_ckpt(ckpt)
    assert state["step"] == len(steps) and ckpt.name == f"ckpt_{len(steps):07d}.pt"
    assert "--resume" in stdout


def single_and_two_gloo_ranks(tmp_path: Path, *common: str) -> tuple[dict, dict]:
    """Checkpoint 3 of one process at --batch-size=4 and of two torchrun ranks at 2 each:
    the same global batches."""
    shards = write_shards(tmp_path / "shards")
    common = ("--max-steps=3", "--eval-interval=3", "--checkpoint-interval=3", *common)
    assert train_gpt2.main(tiny_args(shards, tmp_path / "single", *common,
                                     "--batch-size=4")) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    ddp = subprocess.run(
        [str(torchrun), "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={port}", str(SCRIPT),
         *tiny_args(shards, tmp_path / "ddp", *common, "--batch-size=2")],
        cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True,
        timeout=180)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return (load_ckpt(tmp_path / "single" / "ckpt_0000003.pt"),
            load_ckpt(tmp_path / "ddp" / "ckpt_0000003.pt"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    a, b = single_and_two_gloo_ranks(tmp_path)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=2e-5)
    assert len(b["loader_states"]) == 2
    assert [s["rank"] for s in b["loader_states"]] == [0, 1]
    single_log = [e for e in read_log(tmp_path / "single") if "loss" in e or "val_loss" in e]
    ddp_log = [e for e in read_log(tmp_path / "ddp") if "loss" in e or "val_loss" in e]
    assert len(single_log) == len(ddp_log)
    for x, y in zip(single_log, ddp_log, strict=True):
        key = "loss" if "loss" in x else "val_loss"
        assert x[key] == pytest.approx(y[key], rel=1e-5)  # averaged over ranks


def write_hellaswag(path: Path) -> Path:
    examples = [
        {"ctx": "The cat sat on the", "endings": [" mat.", " moon.", " idea.", " seven."],
         "label": 0},
        {"ctx": "She opened the door and", "endings": [" walked in.", " blue.", " the.",
                                                      " sang loudly to the fridge."],
         "label": 0},
        {"ctx": "Water boils at", "endings": [" noon.", " 100 degrees.", " cats.", " no."],
         "label": 1},
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def test_hellaswag_and_samples_during_training(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import eval_hellaswag

    shards = write_shards(tmp_path / "shards")
    jsonl = write_hellaswag(tmp_path / "hs.jsonl")
    out = tmp_path / "out"
    args = tiny_args(shards, out, "--vocab-size=50304", "--max-steps=2", "--eval-interval=2",
                     "--hellaswag-interval=2", f"--hellaswag-data={jsonl}",
                     "--sample-interval=2", "--num-samples=2", "--sample-length=12",
                     "--sample-prompt=The cat")
    assert train_gpt2.main(args) == 0
    log = read_log(out)
    scored = [e for e in log if "hellaswag_acc_norm" in e]
    assert [e["step"] for e in scored] == [0, 2]
    model = GPT.from_checkpoint(checkpoint.load(out / "ckpt_0000002.pt"))
    reference = eval_hellaswag.evaluate(model, eval_hellaswag.load_examples(jsonl), "cpu")
    assert scored[-1]["hellaswag_acc_norm"] == reference.acc_norm
    samples = [(e["step"], e["samples"]) for e in log if "samples" in e]
    assert [step for step, _ in samples] == [2]  # none from the untrained weights
    assert len(samples[0][1]) == 2 and all(s.startswith("The cat") for s in samples[0][1])
    stdout = capsys.readouterr().out
    assert "> The cat" in stdout and "HellaSwag acc_norm" in stdout

    # Without the HellaSwag file: one warning line, and training goes on.
    missing = tmp_path / "missing.jsonl"
    args = tiny_args(shards, tmp_path / "out2", "--vocab-size=50304", "--max-steps=1",
                     "--eval-interval=1", "--hellaswag-interval=1", f"--hellaswag-data={missing}")
    assert train_gpt2.main(args) == 0
    stderr = capsys.readouterr().err
    warnings = [line for line in stderr.splitlines() if "HellaSwag" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and str(missing) in \
        warnings[0]
    assert not any("hellaswag_acc_norm" in e for e in read_log(tmp_path / "out2"))
    assert [e["step"] for e in read_log(tmp_path / "out2") if "val_loss" in e] == [0, 1]


# ------------------------------------------------------------------------------ bad input


def assert_one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The one error line, and its hint line if it has one, holding every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    hints = [line for line in err.splitlines() if line.startswith("hint: ")]
    assert len(lines) == 1 and len(hints) <= 1, err
    assert "Traceback" not in err
    message = "\n".join(lines + hints)
    for needle in needles:
        assert needle in message, message
    return message


def test_bad_inputs_fail_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANO_GPT_DATA_ROOT", str(tmp_path / "root"))
    shards = write_shards(tmp_path / "shards")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"

    assert train_gpt2.main(tiny_args(empty, out)) == 1
    assert_one_error_line(capsys, str(empty), "*_train_*")
    assert train_gpt2.main(["--dataset=finewebedu", f"--out-dir={out}", "--device=cpu"]) == 1
    assert_one_error_line(capsys, "python prepare_dataset.py --dataset=finewebedu")
    assert train_gpt2.main(tiny_args(shards, out, "--total-batch-size=1000")) == 2
    assert_one_error_line(capsys, "1000", "4 x 32 x 1 = 128")
    assert train_gpt2.main(tiny_args(shards, out, "--model=gpt5")) == 2
    assert_one_error_line(capsys, "--model=gpt5", "gpt2-mini")
    assert train_gpt2.main(tiny_args(shards, out, "--device=tpu")) == 2
    assert_one_error_line(capsys, "--device=tpu")
    assert train_gpt2.main(tiny_args(shards, out, "--seq-len=512",
                                     "--total-batch-size=2048")) == 2
    assert_one_error_line(capsys, "--seq-len=512", "256")
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main(tiny_args(shards, out, "--batch-size=four"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size" in err and "'four'" in err
    assert not out.exists()  # nothing was written by any of these

    assert train_gpt2.main(tiny_args(shards, out, "--max-steps=1", "--eval-interval=0")) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert train_gpt2.main(tiny_args(shards, out, "--max-steps=2", "--resume",
                                     "--n-embd=64")) == 1
    assert_one_error_line(capsys, "ckpt_0000001.pt", "n_embd=32 (this run: 64)")
    assert train_gpt2.main(tiny_args(shards, out, "--max-steps=2")) == 2
    assert_one_error_line(capsys, "--resume", "--overwrite")
    other = tmp_path / "other"
    assert train_gpt2.main(tiny_args(shards, other, "--n-layer=3",
                                     f"--init-from={out / 'ckpt_0000001.pt'}")) == 1
    assert_one_error_line(capsys, "ckpt_0000001.pt", "n_layer=2 (this run: 3)")
    assert not other.exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_non_finite_loss_stops_naming_step_and_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = write_shards(tmp_path / "shards")
    out = tmp_path / "out"
    args = tiny_args(shards, out, "--max-steps=50", "--eval-interval=0", "--warmup-steps=0",
                     "--checkpoint-interval=1", "--keep-checkpoints=0", "--grad-clip=0",
                     "--max-lr=1e30")
    assert train_gpt2.main(args) == 1
    line = assert_one_error_line(capsys, "Last good checkpoint")
    step = int(line.split(" at step ")[1].split(";")[0])
    assert f"ckpt_{step:07d}.pt" in line
    logged = [e["loss"] for e in read_log(out) if "loss" in e]
    assert len(logged) == step and all(math.isfinite(x) for x in logged)
    assert not (out / f"ckpt_{step + 1:07d}.pt").exists()


# ------------------------------------------------------------------------------ plot_log


def test_plot_log_reads_the_three_series(tmp_path: Path) -> None:
    import plot_log

    log = tmp_path / "log.jsonl"
    events = [{"step": 0, "val_loss": 11.0}, {"step": 0, "loss": 10.9, "lr": 1e-4},
              {"step": 1, "loss": 10.1}, {"step": 1, "hellaswag_acc_norm": 0.25},
              {"step": 2, "checkpoint": "out/ckpt_0000002.pt"}]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    curves = plot_log.read_curves(log)
    assert curves.train == [(0, 10.9), (1, 10.1)]
    assert curves.val == [(0, 11.0)]
    assert curves.hellaswag == [(1, 0.25)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        result = subprocess.run([sys.executable, str(REPO / "plot_log.py"), str(log)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "matplotlib" in result.stderr
        assert not log.with_suffix(".png").exists()
    else:
        assert plot_log.main([str(log)]) == 0
        assert log.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def gradient_vector(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Every parameter's gradient (each has one), as one vector."""
    flat = []
    for p in params:
        assert p.grad is not None
        flat.append(p.grad.flatten())
    return torch.cat(flat)


def test_train_step_applies_the_clipped_gradient_and_reports_the_raw_norm() -> None:
    """The gradient the optimizer sees has norm <= --grad-clip; the logged norm is the norm
    before clipping, as an independent backward pass on the same batch measures it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, VOCAB, (4, SEQ), generator=gen),
                torch.randint(0, VOCAB, (4, SEQ), generator=gen)) for _ in range(2)]
    reference = GPT(model.config)
    reference.load_state_dict(model.state_dict())
    for x, y in batches:  # the mean over two micro-batches, as grad_accum=2 computes it
        logits, _ = reference(x)
        (F.cross_entropy(logits.flatten(0, 1), y.flatten()) / 2).backward()
    raw_norm = gradient_vector(reference.parameters()).norm().item()

    clip = 0.01
    assert raw_norm > 10 * clip  # so that clipping has something to do
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    applied: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, *_: applied.append(gradient_vector(
        p for g in opt.param_groups for p in g["params"]).norm().item()))
    precision = runtime.resolve_precision(torch.device("cpu"), "fp32")
    result = train_gpt2.train_step(model, optimizer, runtime.make_grad_scaler(
        precision, torch.device("cpu")), iter(batches).__next__, 2, precision,
        torch.device("cpu"), grad_clip=clip)
    assert result.grad_norm.item() == pytest.approx(raw_norm, rel=1e-5)
    assert applied == [pytest.approx(clip, rel=1e-4)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_train_step_never_waits_for_the_gpu(compiled: bool) -> None:
    """The default CUDA step (autocast, chunked loss, clipping, fused AdamW) makes no host
    sync: CUDA's sync debug mode turns any into an error. The first step runs outside it,
    for one-time set-up (compilation, optimizer state)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    model.to(device)
    config = train_gpt2.TrainConfig(model="gpt2-tiny", batch_size=4, seq_len=SEQ)
    optimizer = train_gpt2.build_optimizer(model, config, device)
    precision = runtime.resolve_precision(device, "auto")
    scaler = runtime.make_grad_scaler(precision, device)
    if scaler.is_enabled():
        pytest.skip("the fp16 GradScaler reads its scale back by design")
    x, y = (torch.randint(0, VOCAB, (4, SEQ), device=device) for _ in range(2))
    train_model: torch.nn.Module = model
    if compiled:
        train_model = torch.compile(model)  # type: ignore[assignment]

    def step() -> train_gpt2.StepResult:
        return train_gpt2.train_step(train_model, optimizer, scaler, lambda: (x, y), 2,
                                     precision, device, grad_clip=1.0)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(result.loss.item()) and math.isfinite(result.grad_norm.item())


# ------------------------------------------------- memory: --batch-size=auto, checkpointing


def auto_sizes_tried(samples: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The micro-batches --batch-size=auto tries, largest first, when none fits."""
    tried: list[int] = []
    monkeypatch.setattr(runtime, "OOM_SEARCH_DEVICES", ("cpu",))
    monkeypatch.setattr(runtime, "trial_micro_step", oom_above(0, tried))
    config = train_gpt2.TrainConfig(batch_size="auto", seq_len=SEQ,
                                    total_batch_size=samples * SEQ)
    model = GPT(GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32))
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="not even 1"):
        runtime.auto_micro_batch(model, config.samples_per_rank(1), SEQ,
                                 runtime.resolve_precision(cpu, "fp32"), cpu, runtime.DistEnv())
    return tried


def test_batch_size_auto_halves_down_through_divisors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert auto_sizes_tried(512, monkeypatch) == [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert auto_sizes_tried(96, monkeypatch) == [96, 48, 24, 12, 6, 3, 1]
    assert auto_sizes_tried(10, monkeypatch) == [10, 5, 2, 1]
    assert auto_sizes_tried(9, monkeypatch) == [9, 3, 1]
    assert auto_sizes_tried(1, monkeypatch) == [1]
    for n in range(1, 200):
        sizes = auto_sizes_tried(n, monkeypatch)
        assert all(n % b == 0 for b in sizes)
        assert all(b <= a // 2 for a, b in zip(sizes, sizes[1:], strict=False))
        # Nothing skipped: no divisor of n lies between a candidate and half of it.
        for a, b in zip(sizes, sizes[1:], strict=False):
            assert not [d for d in range(b + 1, a // 2 + 1) if n % d == 0]


def oom_above(limit: int, tried: list[int]):
    """trial_micro_step as on a GPU with room for `limit` samples: larger ones raise the
    error CUDA's allocator raises; the others run the real trial."""
    real = runtime.trial_micro_step

    def trial(model, batch_size, *args, **kwargs):
        tried.append(batch_size)
        if batch_size > limit:
            raise torch.OutOfMemoryError(f"simulated: {batch_size} samples do not fit")
        real(model, batch_size, *args, **kwargs)
    return trial


def test_batch_size_auto_halves_after_out_of_memory_and_keeps_the_total_batch(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    shards = write_shards(tmp_path / "shards")
    common = ["--max-steps=4", "--eval-interval=4", "--checkpoint-interval=4",
              f"--total-batch-size={8 * SEQ}"]
    # The total batch is 8 samples; the simulated GPU has room for 2 at a time.
    tried: list[int] = []
    monkeypatch.setattr(runtime, "OOM_SEARCH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(runtime, "trial_micro_step", oom_above(2, tried))
    assert train_gpt2.main(tiny_args(shards, tmp_path / "auto", *common,
                                     "--batch-size=auto")) == 0
    assert tried == [8, 4, 2]
    stdout = capsys.readouterr().out
    assert "--batch-size=auto: micro-batch 2 (the largest that fits in GPU memory)" in stdout
    assert f"batch: 2 x {SEQ} tokens x 1 ranks x 4 accumulation = {8 * SEQ} tokens" in stdout
    log = read_log(tmp_path / "auto")
    assert log[0] == {"step": 0, "micro_batch": 2, "grad_accum": 4}
    state = load_ckpt(tmp_path / "auto" / "ckpt_0000004.pt")
    assert state["loader_states"][0]["batch_size"] == 2

    monkeypatch.undo()
    # The trials leave nothing behind: the same run as an explicit --batch-size=2 ...
    assert train_gpt2.main(tiny_args(shards, tmp_path / "two", *common,
                                     "--batch-size=2")) == 0
    losses = {name: [e["loss"] for e in read_log(tmp_path / name) if "loss" in e]
              for name in ("auto", "two")}
    assert losses["auto"] == losses["two"]
    explicit = load_ckpt(tmp_path / "two" / "ckpt_0000004.pt")["model"]
    for key, value in explicit.items():
        assert torch.equal(state["model"][key], value), key
    # ... and the total batch is kept: one micro-batch of all 8 samples gives the same steps.
    assert train_gpt2.main(tiny_args(shards, tmp_path / "eight", *common,
                                     "--batch-size=8")) == 0
    eight = [e["loss"] for e in read_log(tmp_path / "eight") if "loss" in e]
    assert losses["auto"] == pytest.approx(eight, rel=1e-5)


def test_batch_size_auto_with_nothing_fitting_is_one_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    shards = write_shards(tmp_path / "shards")
    tried: list[int] = []
    monkeypatch.setattr(runtime, "OOM_SEARCH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(runtime, "trial_micro_step", oom_above(0, tried))
    out = tmp_path / "out"
    assert train_gpt2.main(tiny_args(shards, out, "--batch-size=auto")) == 1
    assert tried == [8, 4, 2, 1]
    assert_one_error_line(capsys, "--batch-size=auto", f"1 x {SEQ}", "--activation-checkpointing")
    assert not out.exists()
    assert train_gpt2.main(tiny_args(shards, out, "--batch-size=auto",
                                     "--total-batch-size=100")) == 2
    assert_one_error_line(capsys, "--total-batch-size=100", f"{SEQ} x 1 = {SEQ}")


def test_batch_size_auto_on_cpu_takes_the_default_and_resume_keeps_the_saved_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = write_shards(tmp_path / "shards")
    out = tmp_path / "out"
    # 12 samples per step: the default 8 does not divide it, 6 does.
    common = ["--batch-size=auto", f"--total-batch-size={12 * SEQ}", "--eval-interval=0",
              "--checkpoint-interval=2"]
    assert train_gpt2.main(tiny_args(shards, out, *common, "--max-steps=2")) == 0
    assert read_log(out)[0] == {"step": 0, "micro_batch": 6, "grad_accum": 2}
    # Resumed where the default differs (another machine): the checkpoint's micro-batch,
    # which the loader's exact resume needs; no second choice in the log.
    monkeypatch.setattr(runtime, "DEFAULT_AUTO_MICRO_BATCH", 4)
    assert train_gpt2.main(tiny_args(shards, out, *common, "--max-steps=4", "--resume")) == 0
    assert [e for e in read_log(out) if "micro_batch" in e] == [
        {"step": 0, "micro_batch": 6, "grad_accum": 2}]
    assert load_ckpt(out / "ckpt_0000004.pt")["loader_states"][0]["batch_size"] == 6


def search_on_rank(rank: int, port: int, room: list[int], out_dir: str) -> None:
    """One gloo rank of two: --batch-size=auto on a simulated GPU with room for room[rank]
    samples; writes the micro-batch it settles on."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    try:
        runtime.OOM_SEARCH_DEVICES = ("cpu",)
        runtime.trial_micro_step = oom_above(room[rank], [])  # type: ignore[assignment]
        config = train_gpt2.TrainConfig(batch_size="auto", seq_len=SEQ,
                                        total_batch_size=16 * SEQ * 2)
        model = GPT(GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=1, n_head=2,
                              n_embd=32))
        size, _ = runtime.auto_micro_batch(
            model, config.samples_per_rank(2), SEQ,
            runtime.resolve_precision(torch.device("cpu"), "fp32"), torch.device("cpu"),
            runtime.DistEnv(rank, rank, 2))
        Path(out_dir, f"rank{rank}").write_text(str(size))
        torch.distributed.barrier()  # no rank tears gloo down under another (test_optim.py)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_batch_size_auto_ranks_agree_on_the_smallest_fit(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 16 samples per rank and step; rank 0 has room for 8, rank 1 for 2.
    torch.multiprocessing.spawn(search_on_rank, args=(port, [8, 2], str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2", "2"]


def test_activation_checkpointing_recomputes_blocks_with_equal_fp32_losses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = write_shards(tmp_path / "shards")
    common = ["--max-steps=20", "--eval-interval=0", "--checkpoint-interval=20"]
    assert train_gpt2.main(tiny_args(shards, tmp_path / "plain", *common)) == 0
    assert train_gpt2.main(tiny_args(shards, tmp_path / "ckpt", *common,
                                     "--activation-checkpointing")) == 0
    plain = [e["loss"] for e in read_log(tmp_path / "plain") if "loss" in e]
    recomputed = [e["loss"] for e in read_log(tmp_path / "ckpt") if "loss" in e]
    assert len(plain) == 20
    assert recomputed == pytest.approx(plain, abs=1e-6, rel=0)

    # What it does: each block runs twice per step (forward, then again in backward), and
    # the forward pass keeps fewer tensors for backward.
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, VOCAB, (4, SEQ))
    calls: list[int] = []
    block_forward = model_module.Block.forward

    def counted_forward(self: model_module.Block, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Module hooks do not fire in the recomputation, so the method itself counts.
        calls.append(1)
        return block_forward(self, *args, **kwargs)

    monkeypatch.setattr(model_module.Block, "forward", counted_forward)

    def forward_backward() -> tuple[int, int]:
        calls.clear()
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(x, x)
        assert loss is not None
        loss.backward()
        return len(calls), sum(saved)

    plain_calls, plain_bytes = forward_backward()
    model.activation_checkpointing = True
    ckpt_calls, ckpt_bytes = forward_backward()
    assert (plain_calls, ckpt_calls) == (2, 4)
    assert ckpt_bytes < plain_bytes / 2


# ------------------------------------------------------------------------ fp16 loss scaling


def test_fp16_steps_skipped_for_inf_gradients_are_counted_with_the_loss_scale(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU fp16 with a GradScaler whose first scale is far too large, as a GPU's scaler is
    at the start of a run: the scaled fp16 gradients overflow until the scale has halved
    enough. A skipped step is one whose update left the weights untouched."""
    assert runtime.resolve_precision(torch.device("cpu"), "fp16").use_grad_scaler
    monkeypatch.setattr(runtime, "make_grad_scaler", lambda precision, device:
                        torch.amp.GradScaler(device.type, init_scale=2.0**24,
                                             enabled=precision.use_grad_scaler))
    shards = write_shards(tmp_path / "shards")
    out = tmp_path / "out"
    steps = 12
    assert train_gpt2.main(tiny_args(shards, out, "--dtype=fp16", f"--max-steps={steps}",
                                     "--eval-interval=0", "--checkpoint-interval=1",
                                     "--keep-checkpoints=0")) == 0
    log = [e for e in read_log(out) if "loss" in e]
    assert len(log) == steps

    config = GPT.from_checkpoint(checkpoint.load(out / "ckpt_0000001.pt")).config
    torch.manual_seed(1337)  # the run's seed: the weights before step 0
    before = GPT(config).state_dict()
    unchanged = []
    for step in range(steps):
        after = load_ckpt(out / f"ckpt_{step + 1:07d}.pt")["model"]
        unchanged.append(all(torch.equal(before[k], after[k]) for k in after))
        before = after
    assert 0 < sum(unchanged) < steps  # some updates were skipped, training went on

    counted = [e["skipped_steps"] for e in log]
    assert counted == [sum(unchanged[:s + 1]) for s in range(steps)]
    scales = [e["loss_scale"] for e in log]
    assert scales[0] == 2.0**24
    for s in range(steps - 1):  # halved after each skipped step, kept after the others
        assert scales[s + 1] == scales[s] / 2 if unchanged[s] else scales[s]
    assert all(math.isinf(e["grad_norm"]) or math.isnan(e["grad_norm"])
               for e, skipped in zip(log, unchanged, strict=True) if skipped)
    stdout = capsys.readouterr().out
    last_line = [line for line in stdout.splitlines() if line.startswith(f"step {steps - 1:6d}/")]
    assert last_line and last_line[0].endswith(f"| scale {scales[-1]:g} | skipped {counted[-1]}")
    assert load_ckpt(out / f"ckpt_{steps:07d}.pt")["skipped_steps"] == counted[-1]


def test_fp32_steps_show_no_loss_scale(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    shards = write_shards(tmp_path / "shards")
    assert train_gpt2.main(tiny_args(shards, tmp_path / "out", "--max-steps=1",
                                     "--eval-interval=0")) == 0
    assert "scale" not in capsys.readouterr().out
    assert not any("loss_scale" in e for e in read_log(tmp_path / "out"))


def test_quickstart_estimate_counts_steps_accumulation_and_validations() -> None:
    config = dataclasses.replace(train_gpt2.TrainConfig(), max_steps=300, eval_interval=50,
                                 val_steps=6)
    # 300 steps of 2 micro-steps, and 7 validations (steps 0, 50, ..., 300) of 6 forwards.
    assert train_gpt2.estimate_run_seconds(config, 2, 0.5) == pytest.approx(
        0.5 * (600 + 7 * 6 / 3))
