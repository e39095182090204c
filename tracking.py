"""Weights & Biases for train_gpt2.py --wandb-project: every log.jsonl event, from rank 0.
log.jsonl stays the record and W&B a view, so nothing W&B does may stop or slow training:
offline when the server is out of reach, one warning and no more sends when anything breaks."""

from __future__ import annotations

import html
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli import UsageError, first_line

INIT_TIMEOUT_S = 10  # the online attempt; W&B's default (90 s) would hold up the start
_runs: list[Any] = []  # the run started here, for finish()


def require_wandb() -> Any:
    """The wandb module; train_gpt2.py asks before it touches the run folder."""
    try:
        import wandb
    except ImportError:
        raise UsageError('--wandb-project needs the wandb package\nhint: pip install -e '
                         '".[wandb]"') from None
    return wandb


def start_wandb(project: str, run_name: str | None, config: dict[str, Any],
                out_dir: Path) -> Callable[[int, dict[str, Any]], None]:
    """A W&B run in out_dir/wandb holding the run's config; returns send(step, values)."""
    wandb = require_wandb()
    finish()  # a second run in one process (a notebook, the tests) is a new W&B run
    why = ""
    for mode in (None, "offline"):  # None: online, unless WANDB_MODE says otherwise
        try:
            # silent: the one line below instead of W&B's banners, and no login prompt (it
            # would wait on a terminal); console="off": stdout stays the script's own.
            wandb.setup(wandb.Settings(silent=True))
            settings = wandb.Settings(silent=True, console="off", init_timeout=INIT_TIMEOUT_S)
            run = wandb.init(project=project, name=run_name, config=config, dir=str(out_dir),
                             mode=mode, settings=settings)
            break
        except Exception as exc:  # online: no API key, or no network
            why = f" ({first_line(exc)})"
    else:
        print(f"warning: W&B off for this run{why}", file=sys.stderr, flush=True)
        return lambda step, values: None
    _runs.append(run)
    if run.settings.mode in ("offline", "dryrun"):
        path = Path(run.settings.sync_dir).resolve()
        print(f"W&B offline{why}: run saved in {path}; upload it later with `wandb sync "
              f"{path}`", flush=True)
    elif run.url:
        print(f"W&B: {run.url}", flush=True)
    wandb.util.is_pandas_data_frame(None)  # W&B imports pandas (~1 s) at the first sample
    broken: list[str] = []

    def send(step: int, values: dict[str, Any]) -> None:
        if broken:
            return
        try:
            row = dict(values)
            if "samples" in row:  # text in a media panel with a step slider; no artifact
                text = "\n\n".join(html.escape(s) for s in row["samples"])
                row["samples"] = wandb.Html(f'<pre style="white-space:pre-wrap">{text}</pre>',
                                            inject=False)
            # Events that share a step merge into one history row, written when a later
            # step arrives (or at finish); W&B's own process does the writing and uploading.
            run.log(row, step=step)
        except Exception as exc:
            broken.append(first_line(exc))
            print(f"warning: W&B logging stopped: {broken[0]} (log.jsonl has every event)",
                  file=sys.stderr, flush=True)
    return send


def finish() -> None:
    """Close the W&B run now (at exit W&B closes it itself, with the exit status)."""
    while _runs:
        try:
            _runs.pop().finish()
        except Exception as exc:
            print(f"warning: W&B finish failed: {first_line(exc)}", file=sys.stderr, flush=True)
