"""Plot a train_gpt2.py log: train/val loss, HellaSwag acc_norm and CORE against step, as a PNG.

    python plot_log.py out/log.jsonl                 # writes out/log.png
    python plot_log.py out/log.jsonl --output=curves.png

matplotlib is an optional extra: pip install -e ".[plot]".
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cli
from data import atomic_output


@dataclass
class Curves:
    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    hellaswag: list[tuple[int, float]] = field(default_factory=list)
    core: list[tuple[int, float]] = field(default_factory=list)


def read_curves(path: str | os.PathLike[str]) -> Curves:
    """The loss, val_loss, hellaswag_acc_norm and core_metric series of a log.jsonl, in file
    order."""
    curves = Curves()
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                event = json.loads(line)  # bytes: decoded as UTF-8
            except ValueError:  # JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"{where}: not a UTF-8 JSON line\nhint: pass a train_gpt2.py "
                                 "log.jsonl") from None
            if not isinstance(event, dict) or type(event.get("step", 0)) is not int:
                raise ValueError(f"{where}: not an event of train_gpt2.py's log (a JSON object "
                                 "with an integer step)")
            for key, series in (("loss", curves.train), ("val_loss", curves.val),
                                ("hellaswag_acc_norm", curves.hellaswag),
                                ("core_metric", curves.core)):
                if key not in event or "step" not in event:
                    continue
                value = event[key]
                if type(value) not in (int, float):
                    raise ValueError(f"{where}: {key} is {value!r}, not a number")
                series.append((event["step"], float(value)))
    return curves


def plot(curves: Curves, output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels = 2 if curves.hellaswag or curves.core else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    loss_ax = axes[0][0]
    if curves.train:
        loss_ax.plot(*zip(*curves.train, strict=True), label="train", linewidth=0.8, alpha=0.8)
    if curves.val:
        loss_ax.plot(*zip(*curves.val, strict=True), label="val", marker="o", markersize=3)
    loss_ax.legend()
    scores = [(name, series, color) for name, series, color in
              (("HellaSwag acc_norm", curves.hellaswag, "tab:green"),
               ("CORE", curves.core, "tab:purple")) if series]
    for name, series, color in scores:  # both in one panel: a run's quality beside HellaSwag
        axes[0][1].plot(*zip(*series, strict=True), marker="o", markersize=3, color=color,
                        label=name)
    if len(scores) == 2:
        axes[0][1].legend()
    score_label = scores[0][0] if len(scores) == 1 else "score"
    for ax, label in zip(axes[0], ("loss", score_label), strict=False):
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_output(output) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="a train_gpt2.py log.jsonl")
    p.add_argument("--output", default=None, help="PNG path (default: the log's, .png)")
    args = p.parse_args(argv)
    return cli.run_script(lambda: run(Path(args.log), args.output), debug=False)


def run(log: Path, output_name: str | None) -> None:
    output = Path(output_name) if output_name else log.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError('plot_log.py needs matplotlib: pip install -e ".[plot]" (or pip '
                           'install matplotlib)') from None
    if not log.is_file():
        what = "a directory, not a log" if log.is_dir() else "no such log"
        raise FileNotFoundError(f"{log}: {what}\nhint: train_gpt2.py writes OUT_DIR/log.jsonl")
    if output.suffix == ".jsonl" or output.resolve() == log.resolve():
        raise cli.UsageError(f"--output={output}: would overwrite a log with the plot\nhint: "
                             "pass a .png path")
    curves = read_curves(log)
    if not (curves.train or curves.val):
        raise ValueError(f"{log}: no loss or val_loss entries to plot")
    plot(curves, output, title=str(log))
    print(f"wrote {output}")

if __name__ == "__main__":
    sys.exit(main())
