"""What every script's command line shares, and the `nano-gpt` console command.

    nano-gpt train --device=cuda            # the same as: python train_gpt2.py --device=cuda
    nano-gpt sample --pretrained=gpt2       # python sample.py --pretrained=gpt2
    nano-gpt eval --pretrained=gpt2         # python eval_hellaswag.py --pretrained=gpt2
    nano-gpt core --pretrained=gpt2         # python eval_core.py --pretrained=gpt2
    nano-gpt prepare_dataset --dataset=stdlib
    nano-gpt export --checkpoint=out/ckpt_0000075.pt --out=hf/

Error policy: bad input ends as one line on stderr naming the flag or file and what is wrong,
then, where there is one, a `hint:` line with the fix;
a UsageError (a bad flag) exits 2, a runtime failure (a missing or unreadable file, an
OSError such as a full disk, a bad value in a data file) exits 1. `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch

    import runtime

COMMANDS = {"train": "train_gpt2", "sample": "sample", "eval": "eval_hellaswag",
            "core": "eval_core", "prepare_dataset": "prepare_dataset", "export": "export"}


class UsageError(ValueError):
    """Bad command-line input: one line on stderr, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each optional flag's default after its help, unless the help states it in words
    ("(default: all CPU cores)") or the flag is required."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with flag errors as one line (not the whole usage block) and defaults shown."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


def check_range(flag: str, value: float | None, minimum: float | None = None,
                maximum: float | None = None, below: float | None = None,
                above: float | None = None) -> None:
    """A numeric flag's domain: finite, within [minimum, maximum] and strictly between `above`
    and `below` where given (an integer with no upper bound: int64's). None: left unset."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag}={value}: must be a finite number")
    if isinstance(value, int) and maximum is None and below is None:
        maximum = 2**63 - 1
    if minimum is not None and value < minimum:
        raise UsageError(f"{flag}={value}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{flag}={value}: must be at most {maximum}")
    if above is not None and value <= above:
        raise UsageError(f"{flag}={value}: must be above {above}")
    if below is not None and value >= below:
        raise UsageError(f"{flag}={value}: must be below {below}")


def first_line(exc: BaseException) -> str:
    """What an error says, in one line (its type where it says nothing)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def hint(exc: BaseException) -> str | None:
    """The `hint:` line of an error's message, where it has one: the fix."""
    return next((line for line in str(exc).splitlines() if line.startswith("hint: ")), None)


def run_script(body: Callable[[], int | None], debug: bool) -> int:
    """A script's exit status under the error policy above."""
    try:
        return body() or 0
    except (OSError, ValueError, RuntimeError) as exc:
        if debug:
            raise
        print(f"error: {first_line(exc)}", file=sys.stderr)
        if fix := hint(exc):
            print(fix, file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--pretrained / --checkpoint: where the model comes from."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--pretrained", default="gpt2",
                        help="hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local "
                             "Hugging Face directory")
    source.add_argument("--checkpoint", default=None,
                        help="a train_gpt2.py checkpoint (.pt file or --fsdp folder) instead "
                             "of --pretrained")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype and --debug, as every model-running script takes them."""
    import runtime

    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--dtype", default="auto", choices=runtime.DTYPE_CHOICES,
                        help="autocast dtype (auto: bf16/fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def resolve_runtime(device_name: str, dtype: str) -> tuple[torch.device, runtime.Precision]:
    """Device and precision from the flags; a device that is not there is a usage error."""
    import runtime

    try:
        device = runtime.resolve_device(device_name)
        return device, runtime.resolve_precision(device, dtype)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """`nano-gpt COMMAND [FLAGS]`: runs the main() of the script COMMAND names."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        given = ""
        if argv and argv[0] not in ("-h", "--help"):
            given = f"unknown command {argv[0]!r}; "
        print(f"nano-gpt: {given}usage: nano-gpt {{{','.join(COMMANDS)}}} [FLAGS] "
              "(each command's --help lists its flags)", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    script = importlib.import_module(COMMANDS[argv[0]])
    sys.argv[0] = f"nano-gpt {argv[0]}"
    return int(script.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
