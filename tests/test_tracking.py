"""tracking.py: train_gpt2.py --wandb-project, checked offline against W&B's own saved files.

The W&B run's history is read back with W&B's own reader of its transaction log
(`wandb leet inspect --json`), so the test sees what `wandb sync` would upload.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_train import read_log, subprocess_env, tiny_args, write_hellaswag, write_shards

import tracking
import train_gpt2


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """W&B with no key, no settings and every folder inside tmp_path; torn down after, as
    W&B reads its environment once per process."""
    wandb = pytest.importorskip("wandb")
    for name in [n for n in os.environ if n.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc key either
    for name in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / f"wandb-{name.lower()}"))
    yield tmp_path
    tracking.finish()
    wandb.teardown()


def wandb_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every record of the one W&B run under out_dir, as W&B reads its .wandb file."""
    (run_dir,) = (out_dir / "wandb").glob("offline-run-*")
    listing = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                              str(run_dir)], capture_output=True, text=True, check=True,
                             timeout=120)
    records = [json.loads(line) for line in listing.stdout.splitlines()]
    assert records and records[-1]["type"] == "exit", listing.stderr
    return records


def test_wandb_offline_history_holds_every_log_value(wandb_home: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    tmp_path = wandb_home
    out = tmp_path / "out"
    jsonl = write_hellaswag(tmp_path / "hs.jsonl")
    args = tiny_args(write_shards(tmp_path / "shards"), out, "--vocab-size=50304",
                     "--max-steps=2", "--eval-interval=1", "--hellaswag-interval=2",
                     f"--hellaswag-data={jsonl}", "--sample-interval=2", "--num-samples=2",
                     "--sample-length=12", "--checkpoint-interval=2", "--wandb-project=test",
                     "--wandb-run-name=tiny")
    assert train_gpt2.main(args) == 0
    tracking.finish()  # what the atexit hook does at the end of a command-line run

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    lines = [line for line in capsys.readouterr().out.splitlines() if "W&B" in line]
    assert lines == [f"W&B offline: run saved in {run_dir}; upload it later with `wandb sync "
                     f"{run_dir}`"]
    records = wandb_records(out)
    history = {r["history"]["item"]["_step"]: r["history"]["item"]
               for r in records if r["type"] == "history"}
    log = read_log(out)
    assert {e["step"] for e in log} == set(history) == {0, 1, 2}
    kinds = set()
    for event in log:
        row = history[event["step"]]
        for key, value in event.items():
            if key == "step":
                continue
            kinds.add(key)
            if key == "samples":  # a media file in the run folder, named by the history
                media = row.get("samples") or {k.partition(".")[2]: v for k, v in row.items()
                                               if k.startswith("samples.")}
                assert media["_type"] == "html-file"
                text = html.unescape((run_dir / "files" / media["path"]).read_text())
                assert all(sample in text for sample in value) and value[0] in text
            else:  # numbers exactly, and the checkpoint's path
                assert row[key] == value, (event["step"], key)
    assert {"loss", "lr", "grad_norm", "tok_per_s", "val_loss", "hellaswag_acc_norm",
            "samples", "checkpoint"} <= kinds
    # Nothing in the history that log.jsonl lacks (W&B's own keys start with "_").
    logged = {(e["step"], k) for e in log for k in e if k != "step"}
    assert {(step, key.split(".")[0]) for step, row in history.items() for key in row
            if not key.startswith("_")} == logged

    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["display_name"] == "tiny" and run["project"] == "test"
    assert run["config"]["update"]["max_lr"] == 3e-3
    assert run["config"]["update"]["wandb_project"] == "test"


def test_no_key_goes_offline_and_a_failing_send_warns_once(
        wandb_home: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    # No WANDB_MODE: the online attempt fails (no API key), the run is saved offline.
    send = tracking.start_wandb("test", None, {"max_lr": 1.0}, wandb_home / "out")
    (run_dir,) = (wandb_home / "out" / "wandb").glob("offline-run-*")
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("W&B offline (") and line.endswith(f"`wandb sync {run_dir}`")
    send(0, {"loss": 2.0})

    def broken_log(*args: Any, **kwargs: Any) -> None:
        raise BrokenPipeError("W&B's process is gone")

    with monkeypatch.context() as patch:
        patch.setattr(wandb.sdk.wandb_run.Run, "log", broken_log)
        send(1, {"loss": 1.5})
        send(2, {"loss": 1.0})  # no second warning, and no exception either
    send(3, {"loss": 0.5})  # sends stay off for the rest of the run
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: W&B logging stopped: W&B's process is gone (log.jsonl has every "
                   "event)"]
    tracking.finish()
    history = [r["history"]["item"] for r in wandb_records(wandb_home / "out")
               if r["type"] == "history"]
    assert [(row["_step"], row["loss"]) for row in history] == [(0, 2.0)]


# Blocks `import wandb` as if the package were not installed.
NO_WANDB = """
import sys
class NoWandb:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "wandb":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoWandb())
sys.modules.pop("wandb", None)
import train_gpt2
sys.exit(train_gpt2.main(sys.argv[1:]))
"""


def test_without_wandb_one_line_names_the_extra(tmp_path: Path) -> None:
    args = tiny_args(write_shards(tmp_path / "shards"), tmp_path / "out", "--max-steps=1",
                     "--wandb-project=test")
    result = subprocess.run([sys.executable, "-c", NO_WANDB, *args], cwd=tmp_path,
                            env=subprocess_env(tmp_path), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert lines == ["error: --wandb-project needs the wandb package",
                     'hint: pip install -e ".[wandb]"'], result.stderr
    assert not (tmp_path / "out" / "wandb").exists()
