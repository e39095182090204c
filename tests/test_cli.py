"""cli.py: the shared error policy and the `nano-gpt` console command."""

from __future__ import annotations

import argparse
import errno
import importlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import cli
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf")
    GPT(GPTConfig.from_preset("gpt2-tiny")).save_hf(directory)
    return directory


def test_console_command_runs_the_same_main_as_the_script(hf_dir: Path) -> None:
    flags = [f"--pretrained={hf_dir}", "--device=cpu", "--seed=3", "--max-length=12",
             "--num-samples=2", "Once upon"]
    command = Path(sys.executable).parent / "nano-gpt"
    assert command.is_file(), "pip install -e . installs the nano-gpt command"
    via_command = subprocess.run([str(command), "sample", *flags], capture_output=True,
                                 text=True, timeout=120)
    via_script = subprocess.run([sys.executable, str(REPO / "sample.py"), *flags],
                                capture_output=True, text=True, timeout=120)
    assert via_command.returncode == via_script.returncode == 0, via_command.stderr
    assert via_command.stdout == via_script.stdout
    assert via_command.stdout.count("> Once upon") == 2


def test_dispatch_names_each_script(capsys: pytest.CaptureFixture[str]) -> None:
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"nano-gpt {command}" in capsys.readouterr().out
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'serve'" in err and "sample" in err


def test_run_script_exit_codes_and_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def failing(exc: BaseException) -> Callable[[], int]:
        def body() -> int:
            raise exc
        return body

    cases = [(cli.UsageError("--x=1: must be 2\nsecond line"), 2, "--x=1: must be 2"),
             (OSError(errno.ENOSPC, "No space left on device"), 1, "No space left"),
             (ValueError("shard.bin: bad magic"), 1, "shard.bin: bad magic")]
    for exc, code, text in cases:
        assert cli.run_script(failing(exc), debug=False) == code
        err = capsys.readouterr().err
        assert err == f"error: {text}\n" or (code == 1 and err.startswith("error: ")
                                             and text in err and err.count("\n") == 1)
    assert cli.run_script(lambda: 0, debug=False) == 0
    with pytest.raises(ValueError):
        cli.run_script(failing(ValueError("x")), debug=True)
    with pytest.raises(KeyError):  # a bug is not a user error: it keeps its traceback
        cli.run_script(failing(KeyError("x")), debug=False)


def help_entries(text: str) -> dict[str, str]:
    """Each option's entry in --help output (its wrapped lines joined), by its first flag."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag and line.startswith("   "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


@pytest.mark.parametrize("script", ["sample", "eval_hellaswag", "prepare_dataset", "plot_log",
                                    "export", "train_gpt2"])
def test_help_shows_every_default(script: str, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    parsers: list[argparse.ArgumentParser] = []
    parse = cli.Parser.parse_args

    def recording(self: cli.Parser, *args: object, **kwargs: object) -> object:
        parsers.append(self)
        return parse(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cli.Parser, "parse_args", recording)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(["--help"])
    assert exit_info.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    options = [a for a in parsers[0]._actions  # every flag but --help and required ones
               if a.option_strings and a.default is not argparse.SUPPRESS and not a.required]
    assert options
    for action in options:
        entry = entries[action.option_strings[0]]
        assert "(default" in entry and entry.count("(default") == 1, entry
