"""Recipes side by side: the tokens each needs to reach the GPT-2 recipe's validation loss.

Two recipes train on the offline stdlib corpus (the Python standard library in GPT-2
tokens) for the same token budget, batch, sequence length, warmup and model size:

- gpt2: the 2019 recipe: model.GPT (learned positions, GELU, tied head), AdamW at --max-lr
  over every parameter, cosine decay to 10% of the peak.
- modern: --recipe=modern: model_modern.ModernGPT (rotary, QK-norm, ReLU^2, an untied
  soft-capped head, value embeddings, per-layer lambdas) trained by optim.MuonAdamW with a
  rate per kind of parameter (--embedding-lr, --head-lr, --matrix-lr on Muon, --scalar-lr)
  and a warmup-stable-decay schedule down to 5% of the peak.
(The earlier `muon` recipe, GPT-2 with Muon on its blocks, no longer exists: --optimizer and
--muon-lr were removed when the modern model got its own module.)

Learning rates: a multiplier scales a recipe's rates together: gpt2's --max-lr (base 3e-3,
the quickstart's) and all four of modern's per-kind rates (base: its defaults). Multiplier 1
of modern passes no rate flag at all: the recipe at its defaults, as a new user runs it.
Seed 0's final validation loss picks each recipe's multiplier; where the best sits at an
edge of the grid the one past it is tried too (--extend), the baseline as much as the
challenger. The target is gpt2's final validation loss at its best multiplier (mean over
--seeds); tokens to target is where a curve first reaches it (linear between evaluations),
as a ratio to gpt2's, which is the whole budget by construction.

--ablations trains modern at its defaults without each of its parts (seed 0): no value
embeddings, no lambdas, no per-kind rates (every AdamW group at gpt2's chosen --max-lr) and
no Muon (the blocks' matrices on AdamW at that same rate).

Runs go in order of importance, so a run cut short still has the first answers (and with
--keep-runs a rerun reads every finished run back): gpt2's sweep and modern at its defaults;
the other seeds; the ablations; modern's own sweep (--modern-multipliers).

Step time: gpt2 at its chosen rate and modern at its defaults, their train_gpt2.train_step
alternated step by step in this process (forward, then reversed order) on one resident
batch, so the load of a shared machine hits both alike; ratios to gpt2. The training runs'
own dt_ms is printed as well.

    python bench/bench_recipe.py --quick              # smoke test: gpt2-tiny, a few minutes
    python bench/bench_recipe.py --jobs=2 --ablations # its own setting: gpt2-mini, 8 x 256
    python bench/bench_recipe.py --jobs=2 --seq-len=128 --steps=50 --warmup=5 \\
        --eval-interval=5 --seeds=1 --out=bench/recipe_curves_seq128.png   # a second one
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import optim  # noqa: E402
import runtime  # noqa: E402
import train_gpt2  # noqa: E402

BASELINE, CHALLENGER = "gpt2", "modern"
BASE_MAX_LR = 3e-3  # gpt2's, tuned for the quickstart (train_gpt2.QUICKSTART_FLAGS)
MODERN_RATES = {"embedding-lr": optim.EMBEDDING_LR, "head-lr": optim.HEAD_LR,
                "matrix-lr": optim.MATRIX_LR, "scalar-lr": optim.SCALAR_LR}
# The ablations: modern at its defaults without one part. "one-rate" and "no-muon" take the
# rate gpt2's sweep chose (Run.rate), so they are judged at a tuned single AdamW rate.
ABLATIONS = {
    "modern-no-value-embeddings": ["--no-value-embeddings"],
    "modern-no-lambdas": ["--no-lambdas"],
    "modern-one-rate": [],  # + --embedding-lr=R --head-lr=R --scalar-lr=R
    "modern-no-muon": ["--matrix-optimizer=adamw"],  # + --matrix-lr=R
}
SKIP_STEPS = 3  # first steps of a training run left out of its dt_ms median (allocator warmup)

# Defaults of the full comparison and of --quick; any flag given wins over both.
FULL = dict(model="gpt2-mini", batch_size=8, seq_len=256, steps=100, warmup=10,
            eval_interval=10, val_steps=4, gpt2_multipliers="0.25,0.5,1",
            modern_multipliers="1,0.5,2", seeds="0,1", timing_steps=10, timing_warmup=2)
QUICK = dict(model="gpt2-tiny", batch_size=4, seq_len=128, steps=24, warmup=4,
             eval_interval=6, val_steps=2, gpt2_multipliers="1,2", modern_multipliers="1",
             seeds="0", timing_steps=3, timing_warmup=1)


@dataclass(frozen=True)
class Run:
    recipe: str  # gpt2, modern or one of ABLATIONS
    multiplier: float
    seed: int
    steps: int  # the length of its own schedule
    rate: float = 0.0  # the single AdamW rate of the one-rate and no-muon ablations

    @property
    def name(self) -> str:
        rate = f"-r{self.rate:g}" if self.rate else ""
        return f"{self.recipe}-x{self.multiplier:g}{rate}-seed{self.seed}-{self.steps}steps"


@dataclass
class Result:
    run: Run
    curve: list[tuple[int, float]]  # (step, validation loss) at each evaluation
    dt_ms: list[float]  # one per optimizer step
    diverged: bool
    seconds: float

    @property
    def final(self) -> float:
        """The last evaluation's loss; infinite if the run did not get to its last step, so a
        diverged learning rate always loses the sweep."""
        if self.diverged or not self.curve or self.curve[-1][0] != self.run.steps:
            return math.inf
        return self.curve[-1][1]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a small smoke test (gpt2-tiny, 24 steps of 4 x 128)")
    p.add_argument("--model", default=None, help=f"preset (default {FULL['model']})")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (256)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps: the token budget (default {FULL['steps']})")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps, every recipe (10)")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between evals (10)")
    p.add_argument("--val-steps", type=int, default=None, help="val batches per eval (4)")
    p.add_argument("--gpt2-multipliers", default=None,
                   help="multipliers of gpt2's --max-lr 3e-3 swept on seed 0 "
                   f"(default {FULL['gpt2_multipliers']})")
    p.add_argument("--modern-multipliers", default=None,
                   help="multipliers of modern's four default rates swept on seed 0, 1 (its "
                   f"defaults) first; 1 alone: no sweep (default {FULL['modern_multipliers']})")
    p.add_argument("--seeds", default=None, help="seeds at the chosen rates (default 0,1)")
    p.add_argument("--extend", type=int, default=1,
                   help="where a recipe's best multiplier is at an edge of the grid, try the "
                   "next one past it (x0.5 or x2), up to this many times per recipe")
    p.add_argument("--ablations", action="store_true",
                   help="also modern at its defaults without each part (seed 0)")
    p.add_argument("--timing-steps", type=int, default=None,
                   help="timed steps per recipe, alternated (default 10)")
    p.add_argument("--timing-warmup", type=int, default=None,
                   help="untimed alternated steps first (default 2)")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once, each with cores/jobs threads (on a shared "
                   "2-core machine 2 single-thread runs finish sooner than one 2-thread run)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--data-root", default=None,
                   help="where the stdlib corpus is (prepared there if missing; default: a "
                   "temp folder)")
    p.add_argument("--keep-runs", default=None,
                   help="keep each run's folder (log.jsonl, stdout) here; default: a temp one")
    p.add_argument("--out", default=None,
                   help="the PNG (default bench/recipe_curves.png; --quick: the temp dir)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.gpt2_multipliers = floats(args.gpt2_multipliers)
    args.modern_multipliers = floats(args.modern_multipliers)
    args.seeds = ints(args.seeds)
    if not args.gpt2_multipliers or 1.0 not in args.modern_multipliers or not args.seeds:
        p.error("--gpt2-multipliers and --seeds need one value at least; "
                "--modern-multipliers must hold 1 (the recipe's defaults)")
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "recipe_curves_quick.png" if args.quick
                    else ROOT / "bench" / "recipe_curves.png")
    return args


def rate_flags(run: Run) -> list[str]:
    """The learning-rate flags of one run: gpt2's --max-lr; for modern, none at multiplier 1
    (its defaults), else all four per-kind rates scaled; the ablations' single rate."""
    if run.recipe == BASELINE:
        return [f"--max-lr={BASE_MAX_LR * run.multiplier:g}"]
    flags = [] if run.multiplier == 1 else [f"--{name}={rate * run.multiplier:g}"
                                            for name, rate in MODERN_RATES.items()]
    if run.recipe == "modern-one-rate":
        flags += [f"--{name}={run.rate:g}" for name in ("embedding-lr", "head-lr", "scalar-lr")]
    if run.recipe == "modern-no-muon":
        flags += [f"--matrix-lr={run.rate:g}"]
    return flags


def train_flags(args: argparse.Namespace, run: Run, out_dir: Path) -> list[str]:
    """train_gpt2 flags of one run: only the recipe, its parts and its rates differ."""
    recipe = [] if run.recipe == BASELINE else ["--recipe=modern", *ABLATIONS.get(run.recipe, [])]
    return [
        "--dataset=stdlib", f"--data-root={args.data_root}", *recipe,
        f"--model={args.model}", f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}",
        f"--total-batch-size={args.batch_size * args.seq_len}", f"--max-steps={run.steps}",
        f"--warmup-steps={args.warmup}", *rate_flags(run),
        f"--eval-interval={args.eval_interval}", f"--val-steps={args.val_steps}",
        "--hellaswag-interval=0", "--sample-interval=0", "--checkpoint-interval=0",
        f"--seed={run.seed}", f"--device={args.device}", f"--out-dir={out_dir}",
        "--overwrite",
    ]


def read_log(path: Path) -> tuple[list[tuple[int, float]], list[float]]:
    curve, dt_ms = [], []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if "val_loss" in event:
            curve.append((int(event["step"]), float(event["val_loss"])))
        if "dt_ms" in event:
            dt_ms.append(float(event["dt_ms"]))
    return curve, dt_ms


def train(args: argparse.Namespace, run: Run, work: Path, threads: int) -> Result:
    """One run of train_gpt2.py in its own process: a fresh interpreter per run (no state
    carried between recipes), and runs can go side by side with --jobs."""
    out_dir = work / run.name
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = train_flags(args, run, out_dir)
    # A finished run with the very same flags is read back, not trained again: with
    # --keep-runs a rerun with more multipliers, seeds or --extend trains only what is new.
    record = out_dir / "flags.json"
    if record.exists() and json.loads(record.read_text()) == flags:
        curve, dt_ms = read_log(out_dir / "log.jsonl")
        diverged = (out_dir / "diverged").exists()
        return Result(run, curve, dt_ms, diverged, 0.0)
    # A bytecode cache of our own: on a shared checkout another process rewriting a module's
    # .pyc made a run fail at import ("marshal data too short").
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    t0 = time.perf_counter()
    for attempt in range(2):  # one retry: a failure that is not the run's own (see above)
        with open(out_dir / "stdout.txt", "w") as stdout:
            rc = subprocess.call([sys.executable, str(ROOT / "train_gpt2.py"), *flags],
                                 stdout=stdout, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        text = (out_dir / "stdout.txt").read_text()
        # The trainer stops with exit status 1 on a non-finite loss: a too-large LR, a result.
        diverged = rc == 1 and "error: loss is" in text
        if rc == 0 or diverged:
            break
        if attempt == 1:
            raise RuntimeError(f"{run.name} failed (exit {rc}):\n{text[-3000:]}")
        print(f"  {run.name} failed (exit {rc}), retrying once:\n{text[-600:]}", flush=True)
    seconds = time.perf_counter() - t0
    log = out_dir / "log.jsonl"
    curve, dt_ms = read_log(log) if log.exists() else ([], [])
    if diverged:
        (out_dir / "diverged").touch()
    record.write_text(json.dumps(flags))
    return Result(run, curve, dt_ms, diverged, seconds)


def train_all(args: argparse.Namespace, runs: list[Run], work: Path,
              done: list[Result]) -> list[Result]:
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    total = len(done) + len(runs)

    def one(run: Run) -> Result:
        result = train(args, run, work, threads)
        done.append(result)
        state = "diverged" if result.diverged else f"final val {result.final:.4f}"
        took = f"{result.seconds:.0f} s" if result.seconds else "reused"
        print(f"  [{len(done)}/{total}] {run.name}: {state} ({took})", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(one, runs))


def losses_by_step(results: list[Result]) -> list[tuple[int, list[float]]]:
    """Each evaluation step that every run reached (a diverged seed's curve ends early),
    with the runs' losses there."""
    by_step: dict[int, list[float]] = {}
    for r in results:
        for step, loss in r.curve:
            by_step.setdefault(step, []).append(loss)
    return [(s, v) for s, v in sorted(by_step.items()) if len(v) == len(results)]


def mean_curve(results: list[Result]) -> list[tuple[int, float]]:
    return [(s, statistics.fmean(v)) for s, v in losses_by_step(results)]


def steps_to_target(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first (fractional) step where the curve reaches `target`, linear between
    evaluations; None if it never does."""
    for i, (step, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return float(step)
            prev_step, prev_loss = curve[i - 1]
            return prev_step + (prev_loss - target) / (prev_loss - loss) * (step - prev_step)
    return None


def time_steps(args: argparse.Namespace, runs: dict[str, Run]) -> dict[str, list[float]]:
    """Seconds per training step of each run's recipe at its rates, the recipes alternated
    step by step (forward, then reversed order) on one resident batch of the corpus."""
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision(device, "auto")
    files = data.find_shards(Path(args.data_root) / "stdlib", "train")
    steps: dict[str, Callable[[], None]] = {}
    with data.ShardLoader(files, args.batch_size, args.seq_len, device=device) as loader:
        x, y = loader.next_batch()
    for label, run in runs.items():
        argv = train_flags(args, run, Path("unused"))
        config = train_gpt2.configure(train_gpt2.parse_args(argv), argv)
        torch.manual_seed(0)
        model = train_gpt2.build_model(config, {}, None).to(device)
        optimizer = train_gpt2.build_optimizer(model, config, device)
        optim.set_lr_multiplier(optimizer, 1.0)  # the peak rates, as after warmup
        scaler = runtime.make_grad_scaler(precision, device)

        def step(model: torch.nn.Module = model, optimizer: torch.optim.Optimizer = optimizer,
                 scaler: torch.amp.GradScaler = scaler,
                 config: train_gpt2.TrainConfig = config) -> None:
            result = train_gpt2.train_step(model, optimizer, scaler, lambda: (x, y), 1,
                                           precision, device, config.grad_clip)
            result.loss.item()  # waits for the device, as the trainer's loss read-back does
        steps[label] = step
    labels = list(runs)
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(args.timing_warmup + args.timing_steps):
        for label in labels if i % 2 == 0 else labels[::-1]:
            t0 = time.perf_counter()
            steps[label]()
            if i >= args.timing_warmup:
                seconds[label].append(time.perf_counter() - t0)
    return seconds


COLORS = {"gpt2": "tab:blue", "modern": "tab:green", "modern, swept": "tab:olive",
          "modern-no-value-embeddings": "tab:orange", "modern-no-lambdas": "tab:purple",
          "modern-one-rate": "tab:red", "modern-no-muon": "tab:brown"}


def plot(args: argparse.Namespace, curves: dict[str, list[tuple[int, float]]],
         target: float, tokens_per_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for label, curve in curves.items():
        tokens = [s * tokens_per_step / 1e3 for s, _ in curve]
        ablation = label in ABLATIONS
        ax.plot(tokens, [v for _, v in curve], color=COLORS.get(label, "gray"),
                linestyle="--" if ablation else "-", linewidth=1 if ablation else 1.8,
                label=label)
    ax.axhline(target, color="gray", linestyle=":", label=f"target {target:.3f} (gpt2 final)")
    lowest = min(v for c in curves.values() for _, v in c)
    ax.set_ylim(lowest - 0.1, target + 2.5)  # the first evaluations (~10.9) would flatten it
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{args.model}, {args.batch_size} x {args.seq_len} tokens/step, seeds "
                 f"{','.join(map(str, args.seeds))} (gpt2, modern: mean); ablations seed "
                 f"{args.seeds[0]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)


def prepare_data(args: argparse.Namespace, tmp: Path) -> None:
    if args.data_root is None:
        args.data_root = str(tmp / "data")
    if not data.find_shards(Path(args.data_root) / "stdlib", "train"):
        # Prepared once up front, so parallel runs never race to prepare it.
        subprocess.check_call([sys.executable, str(ROOT / "prepare_dataset.py"),
                               "--dataset=stdlib", f"--data-root={args.data_root}"], cwd=ROOT)


def fmt_tokens(steps: float | None, tokens_per_step: int) -> str:
    return "not reached" if steps is None else f"{steps * tokens_per_step:,.0f}"


def lr_text(run: Run) -> str:
    if run.recipe == BASELINE:
        return f"max-lr {BASE_MAX_LR * run.multiplier:g}"
    flags = rate_flags(run)
    return " ".join(f.removeprefix("--") for f in flags) if flags else "defaults"


def median_after(values: Iterable[list[float]], skip: int) -> float:
    return statistics.median(v for run in values for v in run[skip:])


class Sweep:
    """Seed 0's runs of one recipe by multiplier, and the grid's next point past an edge."""

    def __init__(self, recipe: str, args: argparse.Namespace) -> None:
        self.recipe, self.args = recipe, args
        self.results: dict[float, Result] = {}

    def run(self, multiplier: float) -> Run:
        return Run(self.recipe, multiplier, self.args.seeds[0], self.args.steps)

    def best(self) -> float:
        """The multiplier of the lowest final val loss (the smaller of a tie)."""
        return min(sorted(self.results), key=lambda m: self.results[m].final)

    def past_edge(self) -> float | None:
        """The next multiplier beyond the grid's edge when the best sits on it, so no recipe,
        the baseline included, is judged at a learning rate the grid cut short."""
        grid = sorted(self.results)
        if len(grid) < 2:
            return None
        if self.best() == grid[0]:
            return grid[0] / 2
        if self.best() == grid[-1]:
            return grid[-1] * 2
        return None


def sweep_table(sweeps: dict[str, Sweep]) -> None:
    print(f"\nsweep (seed {sweeps[BASELINE].args.seeds[0]}, final val loss; * = chosen):")
    for recipe, sweep in sweeps.items():
        cells = [f"x{m:g} {sweep.results[m].final:.4f}{'*' if m == sweep.best() else ''}"
                 for m in sorted(sweep.results)]
        print(f"  {recipe:<7} " + "  ".join(cells))
        if sweep.past_edge() is not None:
            print(f"  note: {recipe}'s best is still at the edge of its grid")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    tokens_per_step = args.batch_size * args.seq_len
    seed0 = args.seeds[0]
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        prepare_data(args, Path(tmp))
        work = Path(args.keep_runs) if args.keep_runs else Path(tmp) / "runs"
        print(f"model {args.model}, {args.batch_size} x {args.seq_len} = {tokens_per_step} "
              f"tokens/step, {args.steps} steps = {args.steps * tokens_per_step:,} tokens, "
              f"warmup {args.warmup}, eval every {args.eval_interval} steps on "
              f"{args.val_steps} batches; seeds {args.seeds}; device {args.device}, torch "
              f"{torch.__version__}, {args.jobs} job(s) at a time", flush=True)
        done: list[Result] = []

        def train_batch(runs: list[Run]) -> dict[Run, Result]:
            return dict(zip(runs, train_all(args, runs, work, done), strict=True))

        gpt2, modern = Sweep(BASELINE, args), Sweep(CHALLENGER, args)
        sweeps = {BASELINE: gpt2, CHALLENGER: modern}
        # 1. gpt2's sweep and modern at its defaults, seed 0.
        first = [gpt2.run(m) for m in args.gpt2_multipliers] + [modern.run(1.0)]
        print(f"1. gpt2's sweep (x{args.gpt2_multipliers} of max-lr {BASE_MAX_LR:g}) and "
              "modern at its defaults", flush=True)
        for run, result in train_batch(first).items():
            sweeps[run.recipe].results[run.multiplier] = result
        # 2. gpt2 past an edge of its grid (and the ablations that need no rate from it);
        # then the other seeds and the ablations at gpt2's chosen rate.
        ablations: dict[Run, Result] = {}
        early = [Run(a, 1.0, seed0, args.steps) for a in ABLATIONS
                 if args.ablations and not a.startswith(("modern-one-rate", "modern-no-muon"))]
        for i in range(args.extend + 1):
            extra = [gpt2.run(m)] if i < args.extend and (m := gpt2.past_edge()) else []
            if not extra and not early:
                break
            print(f"2. {', '.join(r.name for r in extra + early)}", flush=True)
            for run, result in train_batch(extra + early).items():
                if run.recipe == BASELINE:
                    gpt2.results[run.multiplier] = result
                else:
                    ablations[run] = result
            early = []
        rate = BASE_MAX_LR * gpt2.best()
        more = [Run(BASELINE, gpt2.best(), s, args.steps) for s in args.seeds[1:]]
        more += [Run(CHALLENGER, 1.0, s, args.steps) for s in args.seeds[1:]]
        more += [Run(a, 1.0, seed0, args.steps, rate) for a in ("modern-one-rate",
                                                                "modern-no-muon")
                 if args.ablations]
        print(f"3. gpt2 chose max-lr {rate:g}: {len(args.seeds) - 1} more seed(s) of gpt2 and "
              f"modern, {'the' if args.ablations else 'no'} ablations at that rate",
              flush=True)
        later = train_batch(more)
        ablations.update({r: x for r, x in later.items() if r.recipe in ABLATIONS})
        # 4. modern's own sweep, then the other seeds at its best if that is not 1.
        grid = [m for m in args.modern_multipliers if m != 1]
        for i in range(args.extend + 1):
            if not grid:
                break
            print(f"4. modern's sweep: x{grid} of its default rates", flush=True)
            for run, result in train_batch([modern.run(m) for m in grid]).items():
                modern.results[run.multiplier] = result
            edge = modern.past_edge() if i < args.extend else None
            grid = [edge] if edge else []
        if modern.best() != 1:
            later.update(train_batch([Run(CHALLENGER, modern.best(), s, args.steps)
                                      for s in args.seeds[1:]]))
        results = {**{s.run(m): r for s in sweeps.values() for m, r in s.results.items()},
                   **later}
        # 5. Step time, alternated in this process with the trainer's default threads.
        print(f"5. timing {args.timing_steps} alternated steps per recipe "
              f"({torch.get_num_threads()} threads) ...", flush=True)
        timed = {BASELINE: gpt2.run(gpt2.best()), CHALLENGER: modern.run(1.0)}
        timing = time_steps(args, timed)

    def seeds_of(recipe: str, multiplier: float) -> list[Result]:
        return [results[Run(recipe, multiplier, s, args.steps)] for s in args.seeds]

    rows = {"gpt2": seeds_of(BASELINE, gpt2.best()), "modern": seeds_of(CHALLENGER, 1.0)}
    if modern.best() != 1:
        rows["modern, swept"] = seeds_of(CHALLENGER, modern.best())
    curves = {label: mean_curve(rs) for label, rs in rows.items()}
    target = statistics.fmean(r.final for r in rows["gpt2"])
    base_steps = steps_to_target(curves["gpt2"], target) or float(args.steps)

    sweep_table(sweeps)
    print(f"\ntarget: gpt2's final val loss at max-lr {rate:g}, mean of seeds {args.seeds}: "
          f"{target:.4f} ({', '.join(f'{r.final:.4f}' for r in rows['gpt2'])})")
    print(f"{'recipe':<15}{'rates':>50}{'final val':>11}{'tokens to target':>18}{'x gpt2':>8}"
          f"{'run ms/step':>13}{'x gpt2':>8}")
    run_ms = {label: median_after((r.dt_ms for r in rs), SKIP_STEPS)
              for label, rs in rows.items()}
    for label, rs in rows.items():
        reached = steps_to_target(curves[label], target)
        ratio = "-" if reached is None else f"{reached / base_steps:.2f}"
        per_seed = ", ".join(fmt_tokens(steps_to_target(r.curve, target), tokens_per_step)
                             for r in rs)
        print(f"{label:<15}{lr_text(rs[0].run):>50}"
              f"{statistics.fmean(r.final for r in rs):>11.4f}"
              f"{fmt_tokens(reached, tokens_per_step):>18}{ratio:>8}"
              f"{run_ms[label]:>13.1f}{run_ms[label] / run_ms['gpt2']:>8.2f}"
              f"   (per seed: {per_seed})")
    step_ms = {label: 1000 * statistics.median(v) for label, v in timing.items()}
    print(f"step time, {args.timing_steps} alternated steps each (median): gpt2 "
          f"{step_ms[BASELINE]:.1f} ms, modern at its defaults {step_ms[CHALLENGER]:.1f} ms: "
          f"{step_ms[CHALLENGER] / step_ms[BASELINE]:.2f}x gpt2; run ms/step: median dt_ms "
          f"of the training runs after step {SKIP_STEPS} ({args.jobs} at a time)")

    if ablations:
        default = results[modern.run(1.0)]
        print(f"\nablations (seed {seed0}; modern at its defaults: final "
              f"{default.final:.4f}):")
        print(f"{'variant':<28}{'rates':>50}{'final val':>11}{'vs modern':>11}"
              f"{'tokens to target':>18}{'x gpt2':>8}")
        for run, result in ablations.items():
            reached = steps_to_target(result.curve, target)
            ratio = "-" if reached is None else f"{reached / base_steps:.2f}"
            print(f"{run.recipe:<28}{lr_text(run):>50}{result.final:>11.4f}"
                  f"{result.final - default.final:>+11.4f}"
                  f"{fmt_tokens(reached, tokens_per_step):>18}{ratio:>8}")
        curves.update({run.recipe: result.curve for run, result in ablations.items()})
    plot(args, curves, target, tokens_per_step)
    print(f"\ncurves: {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB); "
          f"wall time {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
