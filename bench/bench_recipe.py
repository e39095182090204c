"""Recipes side by side: the tokens each needs to reach the GPT-2 recipe's validation loss.

Three recipes train the same model on the offline stdlib corpus (the Python standard
library in GPT-2 tokens) for the same token budget, batch, sequence length and warmup:

- gpt2: the 2019 recipe: AdamW, cosine decay, learned positions, GELU, tied head.
- muon: --optimizer=muon alone (Muon on the blocks' matrices), GPT-2 architecture, cosine.
- modern: --recipe=modern: rotary, QK-norm, ReLU^2, untied head, zero-init projections,
  Muon and the warmup-stable-decay schedule.

Learning rates, one rule for all: each multiplier of --multipliers scales a recipe's base
rates together (AdamW --max-lr 3e-3, the quickstart's tuned value, and Muon --muon-lr 0.02,
torch's default); seed 0's final validation loss picks the multiplier (where the best sits
at an edge of the grid, the one past it is tried too: --extend), then every seed of --seeds
trains there. The target is the gpt2 recipe's final validation loss (mean over seeds);
tokens to target is where a recipe's mean-over-seeds curve first reaches it (linear between
evaluations), as a ratio to gpt2's, which is the whole budget by construction.
--short also trains the challengers on their own shorter schedule (by default the issue's
target fraction of the budget: muon 0.5, modern 0.3) to see whether they reach the target
when their learning rate has decayed by then, as it has for gpt2 at its end.

Step time: the recipes' steps (the trainer's train_step, one batch of the corpus) alternate
step by step in this process, in forward and reversed order, so the load of a shared
machine hits all alike; ratios to gpt2. The training runs' own dt_ms is printed as well.

    python bench/bench_recipe.py --quick          # smoke test: gpt2-tiny, ~2-4 minutes
    python bench/bench_recipe.py --jobs=2         # the full comparison: 18 runs of gpt2-mini,
                                                  # ~1 h on an idle 2-core CPU, 2 h loaded
    python bench/bench_recipe.py --steps=400 --multipliers=0.5,1,2,4 --seeds=0,1,2
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
import runtime  # noqa: E402
import train_gpt2  # noqa: E402
from model import GPT  # noqa: E402

BASELINE = "gpt2"
RECIPE_FLAGS = {"gpt2": [], "muon": ["--optimizer=muon"], "modern": ["--recipe=modern"]}
BASE_MAX_LR = 3e-3  # AdamW's, tuned for the quickstart (train_gpt2.QUICKSTART_FLAGS)
BASE_MUON_LR = 0.02  # train_gpt2's --muon-lr default
SKIP_STEPS = 3  # first steps of a training run left out of its dt_ms median (allocator warmup)

# Defaults of the full comparison and of --quick; any flag given wins over both.
FULL = dict(model="gpt2-mini", batch_size=8, seq_len=256, steps=100, warmup=10,
            eval_interval=10, val_steps=4, multipliers="0.5,1,2", seeds="0,1",
            timing_steps=10, timing_warmup=2)
QUICK = dict(model="gpt2-tiny", batch_size=4, seq_len=128, steps=24, warmup=4,
             eval_interval=6, val_steps=2, multipliers="1,2", seeds="0,1",
             timing_steps=3, timing_warmup=1)


@dataclass(frozen=True)
class Run:
    recipe: str
    multiplier: float
    seed: int
    steps: int  # the length of its own schedule

    @property
    def name(self) -> str:
        return f"{self.recipe}-x{self.multiplier:g}-seed{self.seed}-{self.steps}steps"


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


def fractions(text: str) -> dict[str, float]:
    """--short: `recipe=fraction,...`; empty: none."""
    pairs = [item.split("=") for item in text.split(",") if item]
    return {name: float(frac) for name, frac in pairs}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a small smoke test (gpt2-tiny, 24 steps of 4 x 128, two multipliers)")
    p.add_argument("--recipes", default="gpt2,muon,modern",
                   help=f"comma list of {', '.join(RECIPE_FLAGS)}; gpt2 is the baseline")
    p.add_argument("--model", default=None, help=f"preset (default {FULL['model']})")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (256)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps: the token budget (default {FULL['steps']})")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps, every recipe (10)")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between evals (10)")
    p.add_argument("--val-steps", type=int, default=None, help="val batches per eval (4)")
    p.add_argument("--multipliers", default=None,
                   help="LR multipliers swept on seed 0 (default 0.5,1,2)")
    p.add_argument("--seeds", default=None, help="seeds at the chosen LR (default 0,1)")
    p.add_argument("--extend", type=int, default=1,
                   help="where a recipe's best multiplier is at an edge of the grid, try the "
                   "next one past it (x0.5 or x2), up to this many times per recipe")
    p.add_argument("--short", default="muon=0.5,modern=0.3",
                   help="challengers also trained on a schedule of this fraction of the "
                   "budget (empty: none)")
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
    args.recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in args.recipes if r not in RECIPE_FLAGS]
    if unknown or BASELINE not in args.recipes:
        p.error(f"--recipes: choose from {', '.join(RECIPE_FLAGS)}, gpt2 included")
    args.multipliers, args.seeds = floats(args.multipliers), ints(args.seeds)
    args.short = {k: v for k, v in fractions(args.short).items() if k in args.recipes}
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "recipe_curves_quick.png" if args.quick
                    else ROOT / "bench" / "recipe_curves.png")
    return args


def train_flags(args: argparse.Namespace, run: Run, out_dir: Path) -> list[str]:
    """train_gpt2 flags of one run: only the recipe's own flags and the LR differ."""
    return [
        "--dataset=stdlib", f"--data-root={args.data_root}", *RECIPE_FLAGS[run.recipe],
        f"--model={args.model}", f"--batch-size={args.batch_size}", f"--seq-len={args.seq_len}",
        f"--total-batch-size={args.batch_size * args.seq_len}", f"--max-steps={run.steps}",
        f"--warmup-steps={args.warmup}", f"--max-lr={BASE_MAX_LR * run.multiplier:g}",
        f"--muon-lr={BASE_MUON_LR * run.multiplier:g}",  # gpt2 (AdamW only) ignores it
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


def time_steps(args: argparse.Namespace, chosen: dict[str, float]) -> dict[str, list[float]]:
    """Seconds per training step of each recipe at its chosen LR, the recipes alternated step
    by step (forward, then reversed order) on one resident batch of the corpus."""
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision(device, "auto")
    files = data.find_shards(Path(args.data_root) / "stdlib", "train")
    steps: dict[str, Callable[[], None]] = {}
    with data.ShardLoader(files, args.batch_size, args.seq_len, device=device) as loader:
        x, y = loader.next_batch()
    for recipe in args.recipes:
        argv = train_flags(args, Run(recipe, chosen[recipe], 0, args.steps), Path("unused"))
        config = train_gpt2.configure(train_gpt2.parse_args(argv), argv)
        torch.manual_seed(0)
        model = GPT(train_gpt2.model_config(config)).to(device)
        optimizer = train_gpt2.build_optimizer(model, config, device)
        scaler = runtime.make_grad_scaler(precision, device)

        def step(model: GPT = model, optimizer: torch.optim.Optimizer = optimizer,
                 scaler: torch.amp.GradScaler = scaler,
                 config: train_gpt2.TrainConfig = config) -> None:
            result = train_gpt2.train_step(model, optimizer, scaler, lambda: (x, y), 1,
                                           precision, device, config.max_lr,
                                           config.grad_clip)
            result.loss.item()  # waits for the device, as the trainer's read_step does
        steps[recipe] = step
    seconds: dict[str, list[float]] = {r: [] for r in args.recipes}
    for i in range(args.timing_warmup + args.timing_steps):
        order = args.recipes if i % 2 == 0 else args.recipes[::-1]
        for recipe in order:
            t0 = time.perf_counter()
            steps[recipe]()
            if i >= args.timing_warmup:
                seconds[recipe].append(time.perf_counter() - t0)
    return seconds


def plot(args: argparse.Namespace, curves: dict[str, list[tuple[int, float]]],
         spread: dict[str, list[tuple[int, float, float]]],
         short_curves: dict[str, list[tuple[int, float]]], target: float,
         tokens_per_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    colors = {"gpt2": "tab:blue", "muon": "tab:orange", "modern": "tab:green"}
    for recipe, curve in curves.items():
        tokens = [s * tokens_per_step / 1e3 for s, _ in curve]
        ax.plot(tokens, [v for _, v in curve], color=colors[recipe], label=recipe)
        low = [lo for _, lo, _ in spread[recipe]]
        high = [hi for _, _, hi in spread[recipe]]
        ax.fill_between(tokens, low, high, color=colors[recipe], alpha=0.15, linewidth=0)
    for recipe, curve in short_curves.items():
        ax.plot([s * tokens_per_step / 1e3 for s, _ in curve], [v for _, v in curve],
                color=colors[recipe], linestyle="--", label=f"{recipe}, short schedule")
    ax.axhline(target, color="gray", linestyle=":", label=f"target {target:.3f} (gpt2 final)")
    lowest = min(v for c in [*curves.values(), *short_curves.values()] for _, v in c)
    ax.set_ylim(lowest - 0.1, target + 2.5)  # the first evaluations (~10.9) would flatten it
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{args.model}, {args.batch_size} x {args.seq_len} tokens/step, mean of "
                 f"{len(args.seeds)} seeds (band: min-max)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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


def lr_text(recipe: str, multiplier: float) -> str:
    adamw = f"{BASE_MAX_LR * multiplier:g}"
    uses_muon = recipe != "gpt2"
    return f"{adamw} / {BASE_MUON_LR * multiplier:g}" if uses_muon else adamw


def median_after(values: Iterable[list[float]], skip: int) -> float:
    return statistics.median(v for run in values for v in run[skip:])


def tried(sweep: dict[Run, Result], recipe: str) -> list[float]:
    return sorted(run.multiplier for run in sweep if run.recipe == recipe)


def best_multiplier(sweep: dict[Run, Result], recipe: str, args: argparse.Namespace) -> float:
    """The multiplier of the lowest final val loss on seed 0 (the smaller of a tie)."""
    return min(tried(sweep, recipe),
               key=lambda m: sweep[Run(recipe, m, args.seeds[0], args.steps)].final)


def past_edge(sweep: dict[Run, Result], recipe: str, args: argparse.Namespace) -> float | None:
    """The next multiplier beyond the grid's edge when the recipe's best sits on it, so no
    recipe, the baseline included, is judged at a learning rate the grid cut short."""
    grid, best = tried(sweep, recipe), best_multiplier(sweep, recipe, args)
    if len(grid) < 2:
        return None
    if best == grid[0]:
        return best / 2
    if best == grid[-1]:
        return best * 2
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    tokens_per_step = args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        prepare_data(args, Path(tmp))
        work = Path(args.keep_runs) if args.keep_runs else Path(tmp) / "runs"
        print(f"model {args.model}, {args.batch_size} x {args.seq_len} = {tokens_per_step} "
              f"tokens/step, {args.steps} steps = {args.steps * tokens_per_step:,} tokens, "
              f"warmup {args.warmup}, eval every {args.eval_interval} steps on "
              f"{args.val_steps} batches; device {args.device}, torch {torch.__version__}, "
              f"{args.jobs} job(s) at a time", flush=True)
        done: list[Result] = []
        # 1. The sweep, on seed 0; recipes interleaved so load drifts spread over all.
        print(f"LR sweep on seed {args.seeds[0]}: multipliers {args.multipliers} of AdamW "
              f"{BASE_MAX_LR:g} / Muon {BASE_MUON_LR:g}", flush=True)
        sweep_runs = [Run(r, m, args.seeds[0], args.steps)
                      for m in args.multipliers for r in args.recipes]
        sweep = dict(zip(sweep_runs, train_all(args, sweep_runs, work, done), strict=True))
        for _ in range(args.extend):
            extra = [Run(r, m, args.seeds[0], args.steps) for r in args.recipes
                     if (m := past_edge(sweep, r, args)) is not None]
            if not extra:
                break
            print(f"best at an edge of the grid: also {', '.join(x.name for x in extra)}",
                  flush=True)
            sweep.update(zip(extra, train_all(args, extra, work, done), strict=True))
        chosen = {r: best_multiplier(sweep, r, args) for r in args.recipes}
        # 2. The other seeds at the chosen LR and the short schedules, reversed recipe order.
        more = [Run(r, chosen[r], s, args.steps) for s in args.seeds[1:]
                for r in args.recipes[::-1]]
        shorts = [Run(r, chosen[r], s, max(1, round(args.steps * f)))
                  for s in args.seeds for r, f in args.short.items()]
        print(f"chosen multipliers: {chosen}; {len(more)} more seeds, {len(shorts)} short "
              f"schedule runs", flush=True)
        later = dict(zip(more + shorts, train_all(args, more + shorts, work, done),
                         strict=True))
        results = {**sweep, **later}
        # 3. Step time, alternated in this process with the trainer's default threads.
        print(f"timing {args.timing_steps} alternated steps per recipe "
              f"({torch.get_num_threads()} threads) ...", flush=True)
        timing = time_steps(args, chosen)

    def at_choice(recipe: str, steps: int) -> list[Result]:
        return [results[Run(recipe, chosen[recipe], s, steps)] for s in args.seeds]

    full = {r: at_choice(r, args.steps) for r in args.recipes}
    curves = {r: mean_curve(full[r]) for r in args.recipes}
    spread = {r: [(s, min(v), max(v)) for s, v in losses_by_step(full[r])]
              for r in args.recipes}
    finals = {r: [x.final for x in full[r]] for r in args.recipes}
    target = statistics.fmean(finals[BASELINE])
    to_target = {r: steps_to_target(curves[r], target) for r in args.recipes}
    base_steps = to_target[BASELINE] or float(args.steps)
    step_ms = {r: 1000 * statistics.median(timing[r]) for r in args.recipes}
    run_ms = {r: median_after((x.dt_ms for x in full[r]), SKIP_STEPS) for r in args.recipes}

    print("\nsweep (seed 0, final val loss; * = chosen):")
    grid = sorted({run.multiplier for run in sweep})
    print(f"{'recipe':<8}" + "".join(f"{f'x{m:g}':>10}" for m in grid))
    for r in args.recipes:
        cells = [sweep.get(Run(r, m, args.seeds[0], args.steps)) for m in grid]
        print(f"{r:<8}" + "".join(f"{'-':>9} " if c is None else
                                  f"{c.final:>9.4f}{'*' if m == chosen[r] else ' '}"
                                  for c, m in zip(cells, grid, strict=True)))
        if past_edge(sweep, r, args) is not None:
            print(f"  note: {r}'s best is still at the edge of the grid")
    print(f"\ntarget: gpt2's final val loss, mean of seeds {args.seeds}: {target:.4f} "
          f"(seeds: {', '.join(f'{v:.4f}' for v in finals[BASELINE])})")
    print(f"{'recipe':<8}{'LR AdamW / Muon':>18}{'final val':>11}{'tokens to target':>18}"
          f"{'x gpt2':>8}{'ms/step':>10}{'x gpt2':>8}{'run ms/step':>13}{'x gpt2':>8}")
    for r in args.recipes:
        reached = to_target[r]
        ratio = "-" if reached is None else f"{reached / base_steps:.2f}"
        print(f"{r:<8}{lr_text(r, chosen[r]):>18}{statistics.fmean(finals[r]):>11.4f}"
              f"{fmt_tokens(to_target[r], tokens_per_step):>18}{ratio:>8}"
              f"{step_ms[r]:>10.1f}{step_ms[r] / step_ms[BASELINE]:>8.2f}"
              f"{run_ms[r]:>13.1f}{run_ms[r] / run_ms[BASELINE]:>8.2f}")
    per_seed = {r: [steps_to_target(x.curve, target) for x in full[r]] for r in args.recipes}
    print("per seed, tokens to target: " + "; ".join(
        f"{r} " + ", ".join(fmt_tokens(s, tokens_per_step) for s in v)
        for r, v in per_seed.items()))
    print(f"ms/step: median of {args.timing_steps} alternated steps per recipe; run ms/step: "
          f"median dt_ms of the training runs after step {SKIP_STEPS} ({args.jobs} at a time)")

    short_curves = {}
    if args.short:
        print("\nshort schedules (the chosen LR, the same warmup, decayed by their own end):")
        print(f"{'recipe':<8}{'fraction':>9}{'tokens':>12}{'final val':>11}{'seeds':>22}"
              f"{'reaches target':>16}")
        for r, f in args.short.items():
            steps = max(1, round(args.steps * f))
            runs = at_choice(r, steps)
            short_curves[r] = mean_curve(runs)
            mean_final = statistics.fmean(x.final for x in runs)
            seeds = ", ".join(f"{x.final:.4f}" for x in runs)
            reach = "yes" if mean_final <= target else f"no (+{mean_final - target:.3f})"
            print(f"{r:<8}{f:>9.2f}{steps * tokens_per_step:>12,}{mean_final:>11.4f}"
                  f"{seeds:>22}{reach:>16}")
    plot(args, curves, spread, short_curves, target, tokens_per_step)
    print(f"\ncurves: {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB); "
          f"wall time {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
