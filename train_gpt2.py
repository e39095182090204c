"""Train GPT-2 on token shards: one process or many under torchrun, with exact resume.

The defaults are the GPT-2 124M recipe: 524288 tokens per optimizer step (micro-batch
64 x 1024 plus gradient accumulation), AdamW (0.9, 0.95, eps 1e-8, weight decay 0.1 on 2-D
weights), max LR 6e-4 with 715 warmup steps and a cosine decay to 10% at step 19073,
gradient clipping at 1.0, vocab padded to 50304.

    python train_gpt2.py --device=cuda                     # 124M on prepared finewebedu
    torchrun --nproc_per_node=8 train_gpt2.py              # the same on 8 GPUs
    python train_gpt2.py                                   # fresh machine: the quickstart

Step numbering: `step` counts completed optimizer steps. The training line logged with
step s is the update made from the weights after s updates; validation, HellaSwag and
samples logged at step s measure those same weights; `ckpt_{s:07d}.pt` holds them.
On --resume from step s, log.jsonl is cut back to the lines with step < s plus the line
of checkpoint s, so the log reads as if the run had never stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal, TextIO, get_args, get_type_hints

import torch
from torch.nn.parallel import DistributedDataParallel

import cli
import data
import runtime
import sharding
from cli import UsageError
from model import GPT, PADDED_VOCAB_SIZE, PRESETS, GPTConfig, load_checkpoint

Batch = tuple[torch.Tensor, torch.Tensor]
CHECKPOINT_GLOB = "ckpt_*.pt"
LOG_NAME = "log.jsonl"
DEFAULT_DATASET = "finewebedu"
QUICKSTART_DATASET = "stdlib"
AUTO: Final = "auto"
# --batch-size=auto where running out of memory cannot be caught (CPU, MPS: the process is
# killed or the system swaps): a micro-batch that fits any machine these scripts run on.
DEFAULT_AUTO_MICRO_BATCH = 8
# Device types whose allocator raises torch.OutOfMemoryError, so a micro-batch can be tried.
OOM_SEARCH_DEVICES = ("cuda",)

# The built-in quickstart: a falling loss and samples within 3 minutes on a 2-core CPU.
# Tuned there (bench/RESULTS.md): validation loss 3.49 after 86 s of steps on an idle CPU.
# Steps of 2048 tokens learned far more per token than steps of 1024 or 512, and a larger
# learning rate did worse. Explicit flags still win over these values.
QUICKSTART = dict(
    model="gpt2-mini",
    batch_size=8,
    seq_len=256,
    total_batch_size=8 * 256,
    max_steps=75,
    warmup_steps=10,
    max_lr=3e-3,
    eval_interval=25,
    val_steps=4,
    hellaswag_interval=0,
    sample_interval=75,
    sample_prompt="def ",  # the corpus is Python source
    num_samples=2,
    sample_length=64,
    checkpoint_interval=75,
)


class TrainError(RuntimeError):
    """Missing data or a checkpoint that does not fit this run: exit status 1."""


# ------------------------------------------------------------------------------ arguments


def option(default: Any, help: str = "", minimum: float | None = None,
           maximum: float | None = None, **argparse_kwargs: Any) -> Any:
    """A TrainConfig field that is also a command-line flag: its help, its value's domain
    (checked by validate(), with every float also required to be finite) and any extra
    argparse settings (choices) live here, once."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, **argparse_kwargs}
    return field(default=default, metadata=metadata)


def micro_batch_arg(text: str) -> int | Literal["auto"]:
    """--batch-size: a count, or auto."""
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: pass a positive integer "
                                         "or auto") from None


@dataclass
class TrainConfig:
    # data
    dataset: str | None = option(None, "prepared dataset NAME under the data root (default: "
                                 "finewebedu if prepared, else the built-in stdlib quickstart)")
    data_dir: str | None = option(None, "any folder of *_train_* and *_val_* shards "
                                  "(.bin or .npy)")
    data_root: str | None = option(None, "root of prepared datasets (default: "
                                   "$NANO_GPT_DATA_ROOT or ~/.cache/nano-gpt/data)")
    loader_backend: str = option("auto", "data.ShardLoader backend (auto: native when built)",
                                 choices=("auto", "native", "numpy"))
    shuffle: bool = option(True, "seeded shuffle of training shards and samples each epoch")
    # model
    model: str = option("gpt2", f"preset: {', '.join(PRESETS)}")
    n_layer: int | None = option(None, "override the preset", minimum=1)
    n_head: int | None = option(None, "override the preset", minimum=1)
    n_embd: int | None = option(None, "override the preset", minimum=1)
    block_size: int | None = option(None, "context length of the model (default: the "
                                    "preset's)", minimum=1)
    vocab_size: int = option(PADDED_VOCAB_SIZE, "embedding rows; 50304 pads GPT-2's 50257 "
                             "for faster matmuls", minimum=1)
    init_from: str = option("scratch", "scratch, a pretrained name or HF folder (gpt2, "
                            "gpt2-medium, ...), or a checkpoint .pt file (weights only; "
                            "fresh optimizer)")
    # batch and optimizer
    batch_size: int | Literal["auto"] = option(
        64, "micro-batch per rank, or auto: the largest that fits in GPU memory (on CPU and "
        f"MPS: {DEFAULT_AUTO_MICRO_BATCH}); accumulation keeps --total-batch-size",
        minimum=1, type=micro_batch_arg)
    seq_len: int = option(1024, "tokens per sample", minimum=1)
    total_batch_size: int = option(524288, "tokens per optimizer step (gradient "
                                   "accumulation makes up the rest)", minimum=1)
    max_steps: int = option(19073, minimum=0)
    warmup_steps: int = option(715, minimum=0)
    max_lr: float = option(6e-4, minimum=0)
    min_lr: float | None = option(None, "LR at the end of the cosine (default: 10%% of "
                                  "--max-lr)", minimum=0)
    weight_decay: float = option(0.1, minimum=0)
    beta1: float = option(0.9, minimum=0, maximum=1)
    beta2: float = option(0.95, minimum=0, maximum=1)
    adam_eps: float = option(1e-8, minimum=0)
    grad_clip: float = option(1.0, "max global grad norm; 0 disables clipping", minimum=0)
    seed: int = option(1337)
    # evaluation, samples, checkpoints
    eval_interval: int = option(250, "steps between validation-loss evaluations", minimum=0)
    val_steps: int = option(20, "val batches per evaluation (the same batches every time)",
                            minimum=1)
    hellaswag_interval: int | None = option(None, "steps between HellaSwag evaluations "
                                            "(default: --eval-interval)", minimum=0)
    hellaswag_data: str | None = option(None, "HellaSwag validation jsonl (default: the "
                                        "cached official file)")
    hellaswag_limit: int | None = option(None, "score only the first N HellaSwag examples",
                                         minimum=1)
    sample_interval: int | None = option(None, "steps between printed samples (default: "
                                         "--eval-interval)", minimum=0)
    sample_prompt: str = option("Hello, I'm a language model,")
    num_samples: int = option(4, minimum=0)
    sample_length: int = option(32, "tokens per sample, prompt included", minimum=1)
    checkpoint_interval: int = option(5000, "steps between checkpoints (the last step is "
                                      "always saved)", minimum=0)
    keep_checkpoints: int = option(3, "keep the newest K checkpoints; 0 keeps all", minimum=0)
    out_dir: str = option("out", "checkpoints and log.jsonl")
    resume: bool = option(False, "continue from the newest checkpoint in --out-dir")
    overwrite: bool = option(False, "start afresh in an --out-dir that already holds "
                             "checkpoints")
    # runtime
    device: str = option("auto", "auto, cuda, cuda:N, mps or cpu")
    dtype: str = option("auto", "auto: bf16 where supported, fp16+GradScaler on older GPUs, "
                        "fp32 on CPU", choices=runtime.DTYPE_CHOICES)
    compile: bool | None = option(None, "torch.compile the training forward/backward "
                                  "(default: on for CUDA, off elsewhere)")
    fsdp: bool = option(False, "under torchrun, shard weights, gradients and optimizer state "
                        "over the ranks (torch.distributed.fsdp.fully_shard) instead of DDP; "
                        "checkpoints become torch.distributed.checkpoint folders")
    activation_checkpointing: bool = option(False, "recompute each block's activations in "
                                            "the backward pass: less memory, more compute")
    debug: bool = option(False, "show tracebacks on errors")

    @property
    def final_min_lr(self) -> float:
        return self.max_lr * 0.1 if self.min_lr is None else self.min_lr

    @property
    def quickstart(self) -> bool:
        return self.dataset == QUICKSTART_DATASET and not self.data_dir

    @property
    def micro_batch(self) -> int:
        if not isinstance(self.batch_size, int):
            raise ValueError("--batch-size=auto is resolved before the micro-batch is used")
        return self.batch_size


# --help groups: each starts at the named field and runs to the next.
HELP_GROUPS = {"dataset": "data", "model": "model", "batch_size": "batch and optimizer",
               "eval_interval": "evaluation, samples, checkpoints (an interval of 0 disables)",
               "device": "runtime"}


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field. Defaults are suppressed, so the parsed namespace
    holds exactly the flags the user typed; TrainConfig fills in the rest."""
    parser = cli.Parser(description="Train GPT-2 on token shards (single process or "
                                    "torchrun DDP).", argument_default=argparse.SUPPRESS)
    hints = get_type_hints(TrainConfig)
    group: Any = parser
    for f in dataclasses.fields(TrainConfig):
        if f.name in HELP_GROUPS:
            group = parser.add_argument_group(HELP_GROUPS[f.name])
        extra = {"type": value_type(hints[f.name]),
                 **{k: v for k, v in f.metadata.items()
                    if k not in ("help", "minimum", "maximum")}}
        text = f.metadata["help"]
        if f.default is not None and not isinstance(f.default, bool):
            text = f"{text} (default: {f.default})".lstrip()
        if extra["type"] is bool:
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            group.add_argument(flag(f.name), action=action, help=text)
        else:
            group.add_argument(flag(f.name), help=text, **extra)
    return parser


def value_type(hint: Any) -> Any:
    """int for `int | None`, and so on."""
    return next((t for t in get_args(hint) if t is not type(None)), hint)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """The config, and the names of the options the command line set explicitly."""
    given = vars(build_parser().parse_args(argv))
    return TrainConfig(**given), set(given)


def validate(config: TrainConfig) -> None:
    """Every value within its option's domain, before any work starts."""
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            cli.check_range(flag(f.name), value, f.metadata["minimum"], f.metadata["maximum"])
    if config.dataset and config.data_dir:
        raise UsageError("--dataset and --data-dir both given: pass only one")
    if config.model not in PRESETS:
        raise UsageError(f"--model={config.model}: unknown preset; choose one of "
                         f"{', '.join(PRESETS)}")


def apply_quickstart(config: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The quickstart's small-run values for every option not set on the command line."""
    overrides = {k: v for k, v in QUICKSTART.items() if k not in explicit}
    return dataclasses.replace(config, **overrides)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ data


@dataclass
class DataPlan:
    train_files: list[Path]
    val_files: list[Path]
    source: str  # shown on the console


def data_root(config: TrainConfig) -> Path:
    return Path(config.data_root).expanduser() if config.data_root else data.default_data_root()


def prepare_command(name: str, config: TrainConfig) -> str:
    root = f" --data-root={config.data_root}" if config.data_root else ""
    return f"python prepare_dataset.py --dataset={name}{root}"


def resolve_quickstart(config: TrainConfig, explicit: set[str],
                       log: Callable[[str], None]) -> TrainConfig:
    """With no data flag and no prepared finewebedu, switch to the built-in quickstart."""
    if config.data_dir:
        return config
    if config.dataset is None:
        if data.find_shards(data_root(config) / DEFAULT_DATASET, "train"):
            return dataclasses.replace(config, dataset=DEFAULT_DATASET)
        log(f"No prepared {DEFAULT_DATASET} shards in {data_root(config) / DEFAULT_DATASET}; "
            "running the built-in quickstart instead.")
        log(f"To train GPT-2 124M, prepare FineWeb-Edu first: "
            f"{prepare_command(DEFAULT_DATASET, config)}")
        config = dataclasses.replace(config, dataset=QUICKSTART_DATASET)
    if config.quickstart:
        config = apply_quickstart(config, explicit)
        log(f"Quickstart: {config.model} on the {QUICKSTART_DATASET} corpus, "
            f"{config.max_steps} steps of {config.total_batch_size} tokens.")
    return config


def ensure_quickstart_data(config: TrainConfig, env: runtime.DistEnv,
                           log: Callable[[str], None]) -> None:
    """Tokenize the offline stdlib corpus once (rank 0) if it is not prepared yet."""
    import prepare_dataset

    root = data_root(config)
    if env.is_main and not prepare_dataset.is_prepared(root, QUICKSTART_DATASET):
        log(f"Preparing the {QUICKSTART_DATASET} corpus in {root / QUICKSTART_DATASET} "
            "(one time, offline) ...")
        status = prepare_dataset.main([f"--dataset={QUICKSTART_DATASET}",
                                       f"--data-root={root}"])
        if status != 0:
            raise TrainError(f"preparing the {QUICKSTART_DATASET} corpus failed (exit "
                             f"{status}); run {prepare_command(QUICKSTART_DATASET, config)}")
    if env.is_distributed:
        torch.distributed.barrier()


def plan_data(config: TrainConfig) -> DataPlan:
    if config.data_dir:
        directory = Path(config.data_dir).expanduser()
        fix = ("pass a folder of *_train_* and *_val_* shards "
               "(python prepare_dataset.py writes them)")
    else:
        assert config.dataset is not None
        directory = data_root(config) / config.dataset
        fix = f"prepare it first: {prepare_command(config.dataset, config)}"
    train = data.find_shards(directory, "train")
    val = data.find_shards(directory, "val")
    if not train:
        raise TrainError(f"no training shards (*_train_*.bin/.npy) in {directory}; {fix}")
    if not val:
        raise TrainError(f"no validation shards (*_val_*.bin/.npy) in {directory}; {fix}")
    return DataPlan(train, val, str(directory))


def samples_per_rank(config: TrainConfig, world_size: int, micro_batch: int = 1) -> int:
    """Samples each rank contributes to one optimizer step, which must split into whole
    micro-batches of `micro_batch` (1 while --batch-size=auto is still unresolved)."""
    per_micro_step = micro_batch * config.seq_len * world_size
    if config.total_batch_size % per_micro_step != 0:
        raise UsageError(
            f"--total-batch-size={config.total_batch_size} is not divisible by "
            f"batch-size x seq-len x world-size = {micro_batch} x {config.seq_len} x "
            f"{world_size} = {per_micro_step}; pick a multiple of {per_micro_step}")
    return config.total_batch_size // (config.seq_len * world_size)


def gradient_accumulation(config: TrainConfig, world_size: int) -> int:
    return samples_per_rank(config, world_size, config.micro_batch) // config.micro_batch


def check_fsdp(config: TrainConfig, env: runtime.DistEnv, precision: runtime.Precision) -> None:
    if not config.fsdp:
        return
    if not env.is_distributed:
        raise UsageError("--fsdp shards over two or more torchrun ranks; a single process "
                         "trains (and resumes an --fsdp checkpoint) without it")
    if precision.use_grad_scaler:
        raise UsageError("--fsdp with fp16: the GradScaler does not handle sharded gradients "
                         "here; pass --dtype=bf16 or --dtype=fp32")


def make_loader(files: list[Path], config: TrainConfig, env: runtime.DistEnv,
                device: torch.device, shuffle: bool, vocab_size: int) -> Any:
    return data.ShardLoader([str(f) for f in files], config.micro_batch, config.seq_len,
                            rank=env.rank, world_size=env.world_size, shuffle=shuffle,
                            seed=config.seed, device=str(device),
                            backend=config.loader_backend, vocab_size=vocab_size)


# ----------------------------------------------------------------------------------- model


def model_config(config: TrainConfig) -> GPTConfig:
    overrides: dict[str, int] = {"vocab_size": config.vocab_size}
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        value = getattr(config, name)
        if value is not None:
            overrides[name] = value
    try:
        return GPTConfig.from_preset(config.model, **overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def build_model(config: TrainConfig, resume: Checkpoint | None) -> GPT:
    """The resumed checkpoint's model, else (--init-from) a fresh model, pretrained GPT-2
    weights or a checkpoint's weights."""
    source = config.init_from
    if resume is None and (source.endswith(".pt") or Path(source).is_file()):
        resume = Checkpoint(Path(source), load_checkpoint(source))
    if resume is not None:
        model = GPT.from_checkpoint(resume.state)
        check_same_shape(model.config, model_config(config), resume.path)
    elif source == "scratch":
        model = GPT(model_config(config))
    else:
        model = GPT.from_pretrained(source)
    if config.seq_len > model.config.block_size:
        raise UsageError(f"--seq-len={config.seq_len} exceeds the model's block size "
                         f"{model.config.block_size}; lower --seq-len or raise --block-size")
    return model


def build_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return model.configure_optimizers(weight_decay=config.weight_decay,
                                      learning_rate=config.max_lr,
                                      betas=(config.beta1, config.beta2), eps=config.adam_eps,
                                      device_type=device.type)


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to max_lr over warmup_steps, then a cosine down to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# ------------------------------------------------------------- micro-batch and run time


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def micro_batch_candidates(largest: int) -> list[int]:
    """`largest`, then halved down to 1, each rounded down to a divisor of `largest` so that
    gradient accumulation still makes up exactly the total batch."""
    sizes = [largest]
    while sizes[-1] > 1:
        sizes.append(largest_divisor_at_most(largest, sizes[-1] // 2))
    return sizes


def find_micro_batch(candidates: list[int],
                     try_micro_batch: Callable[[int], None]) -> int | None:
    """The first candidate whose trial step does not run out of memory; None if none fits."""
    for size in candidates:
        try:
            try_micro_batch(size)
        except torch.OutOfMemoryError:
            continue  # leaving the except block frees the failed trial's tensors
        return size
    return None


def trial_micro_step(model: GPT, batch_size: int, seq_len: int, precision: runtime.Precision,
                     device: torch.device) -> None:
    """Forward and backward of one micro-batch, leaving no gradient, optimizer or RNG state
    behind. The tokens are all zero: a step's cost does not depend on their values."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand back the blocks a failed larger trial left cached
    idx = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    try:
        with precision.autocast(device):
            _, loss = model(idx, idx)
        assert loss is not None
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)


def search_micro_batch(model: GPT, config: TrainConfig, precision: runtime.Precision,
                       device: torch.device, world_size: int) -> int | None:
    """The largest micro-batch whose training step fits in this GPU's memory. The trials run
    the eager model: torch.compile's fused kernels need less memory, not more."""
    # AdamW's two moments (and under DDP the gradient buckets) appear only at the first real
    # step; holding their size here keeps room for them beside the micro-batch found.
    copies = 3 if world_size > 1 else 2
    held = [torch.empty_like(p, dtype=torch.float32) for p in model.parameters()
            for _ in range(copies)]
    found = find_micro_batch(
        micro_batch_candidates(samples_per_rank(config, world_size)),
        lambda size: trial_micro_step(model, size, config.seq_len, precision, device))
    del held
    return found


def smallest_over_ranks(value: int, env: runtime.DistEnv, device: torch.device) -> int:
    """Every rank gets the smallest value any rank found (all_reduce MIN)."""
    if not env.is_distributed:
        return value
    packed = torch.tensor(value, device=device)
    torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MIN)
    return int(packed)


def resolve_micro_batch(config: TrainConfig, model: GPT, precision: runtime.Precision,
                        device: torch.device, env: runtime.DistEnv,
                        resume: Checkpoint | None) -> tuple[TrainConfig, str | None]:
    """--batch-size=auto made a number, and how it was chosen (None: it was given)."""
    if config.batch_size != AUTO:
        return config, None
    if resume is not None:
        # Exact resume needs the loader's micro-batch of the interrupted run.
        size = int(resume.state["loader_states"][0]["batch_size"])
        how = f"the micro-batch of {resume.path.name}"
    elif device.type in OOM_SEARCH_DEVICES:
        found = search_micro_batch(model, config, precision, device, env.world_size)
        size = smallest_over_ranks(found or 0, env, device)
        if size == 0:
            raise TrainError(f"--batch-size=auto: not even 1 x {config.seq_len} tokens fit in "
                             f"{device} memory; try --activation-checkpointing, a shorter "
                             "--seq-len or a smaller --model")
        how = "the largest that fits in GPU memory"
        if env.is_distributed:
            how += " on every rank"
    else:
        size = largest_divisor_at_most(samples_per_rank(config, env.world_size),
                                       DEFAULT_AUTO_MICRO_BATCH)
        how = f"the default on {device.type}"
    return dataclasses.replace(config, batch_size=size), how


def time_micro_step(model: GPT, config: TrainConfig, precision: runtime.Precision,
                    device: torch.device) -> float:
    """Seconds of one forward and backward of a micro-batch on this machine, now."""
    for _ in range(2):  # the first call pays one-time allocations; the second is timed
        start = time.perf_counter()
        trial_micro_step(model, config.micro_batch, config.seq_len, precision, device)
    return time.perf_counter() - start


def estimate_run_seconds(config: TrainConfig, grad_accum: int,
                         micro_step_seconds: float) -> float:
    """Wall time of the training steps and validations (a forward pass alone costs about a
    third of a forward and backward)."""
    evaluations = sum(due(config.eval_interval, step, config.max_steps)
                      for step in range(config.max_steps + 1))
    micro_steps = config.max_steps * grad_accum + evaluations * config.val_steps / 3
    return micro_steps * micro_step_seconds


# ------------------------------------------------------------------------------- the step


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss of this rank's micro-batches (0-d, on device)
    grad_norm: torch.Tensor  # before clipping, over all shards (0-d, on device)
    loss_scale: float  # the GradScaler's scale during this step (1.0 when it is off)
    skipped: bool  # the GradScaler found inf/nan gradients and left the weights as they were


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, next_batch: Callable[[], Batch], grad_accum: int,
               precision: runtime.Precision, device: torch.device, lr: float,
               grad_clip: float) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches; DDP and FSDP reduce gradients
    only on the last. Nothing is read back to the host (but the fp16 GradScaler's scale), so
    the CPU queues the optimizer step while the GPU still runs the backward pass."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        x, y = next_batch()
        last = micro_step == grad_accum - 1
        with sharding.gradient_sync(model, enabled=last):
            with precision.autocast(device):
                _, loss = model(x, y)
            assert loss is not None
            # Each micro-batch's mean, scaled so the summed gradient is the full batch's mean.
            loss = loss / grad_accum
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # An infinite max norm measures without clipping (--grad-clip=0).
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    # The scaler lowers its scale exactly when it skipped the update for inf/nan gradients.
    return StepResult(loss_sum, sharding.full_norm(norm), scale, scaler.get_scale() < scale)


@torch.no_grad()
def evaluate_val_loss(model: torch.nn.Module, loader: Any, steps: int,
                      precision: runtime.Precision, device: torch.device,
                      env: runtime.DistEnv) -> float:
    """Mean loss over the first `steps` val batches (the same ones every time), all ranks."""
    loader.reset()
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with precision.autocast(device):
            _, loss = model(x, y)
        assert loss is not None
        total += loss.float()
    model.train()
    total /= steps
    if env.is_distributed:
        torch.distributed.all_reduce(total)
        total /= env.world_size
    return float(total)


def read_step(result: StepResult, stop: bool, env: runtime.DistEnv) -> tuple[float, float, bool]:
    """(mean loss over ranks, gradient norm, whether any rank was asked to stop): one
    all_reduce and one read back, once the whole step is queued."""
    loss = result.loss.float()
    loss_and_stop = torch.stack([loss, torch.tensor(float(stop), device=loss.device)])
    if env.is_distributed:
        torch.distributed.all_reduce(loss_and_stop)
    loss_sum, stops, norm = torch.cat([loss_and_stop, result.grad_norm.float()[None]]).tolist()
    return loss_sum / env.world_size, norm, stops > 0


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_path(out_dir: Path, step: int, sharded: bool = False) -> Path:
    """ckpt_0000040.pt, or the folder ckpt_0000040 of a torch.distributed.checkpoint."""
    return out_dir / (f"ckpt_{step:07d}" if sharded else f"ckpt_{step:07d}.pt")


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Both kinds, oldest first (the step's fixed width sorts them by name)."""
    found = [p for p in out_dir.glob(CHECKPOINT_GLOB) if p.is_file()]
    found += [p for p in out_dir.glob("ckpt_*") if p.is_dir()]
    return sorted(found, key=lambda p: p.name)


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save that never leaves a half-written checkpoint under `path`."""
    with data.atomic_output(path) as f:
        torch.save(state, f)


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(out_dir)[:-keep]:
        remove_checkpoint(old)


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]


def check_same_shape(saved: GPTConfig, ours: GPTConfig, path: Path) -> None:
    diffs = [f"{k}={v} (this run: {getattr(ours, k)})"
             for k, v in dataclasses.asdict(saved).items() if getattr(ours, k) != v]
    if diffs:
        raise TrainError(f"{path}: checkpoint of another model shape: {', '.join(diffs)}; pass "
                         "the matching --model/--n-layer/--n-head/--n-embd/--vocab-size or "
                         "another --out-dir")


# ---------------------------------------------------------------------------------- logging


class JsonlLog:
    """out_dir/log.jsonl, written by rank 0: one JSON object per event, flushed per line."""

    def __init__(self, path: Path) -> None:
        self.file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 - see close()

    def write(self, step: int, **values: Any) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def truncate_log(path: Path, checkpoint: Path, resume_step: int) -> None:
    """Cut the log back to the checkpoint a run resumes from (atomically): the lines with
    step < resume_step, then that checkpoint's line, written anew because a kill can land
    between the checkpoint's rename and its log line. The resumed run writes the rest, so
    the log reads as if the run had never stopped."""
    kept = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if event.get("step", 0) < resume_step:
                kept.append(line + "\n")
    kept.append(json.dumps({"step": resume_step, "checkpoint": str(checkpoint)}) + "\n")
    with data.atomic_output(path) as f:
        f.write("".join(kept).encode("utf-8"))


def format_step(step: int, max_steps: int, loss: float, lr: float, norm: float, dt: float,
                tok_per_s: float, mfu: float | None, loss_scale: float | None = None,
                skipped_steps: int = 0) -> str:
    """The console line of one step; the loss scale and the skipped steps so far when a
    GradScaler runs (fp16)."""
    line = (f"step {step:6d}/{max_steps} | loss {loss:.4f} | lr {lr:.3e} | norm {norm:.4f} | "
            f"{dt * 1000:8.1f} ms | {tok_per_s:10,.0f} tok/s")
    if mfu is not None:
        line += f" | MFU {100 * mfu:5.1f}%"
    if loss_scale is not None:
        line += f" | scale {loss_scale:g} | skipped {skipped_steps}"
    return line


def model_flops_utilization(flops_per_token: float, tok_per_s: float,
                            peak_flops: float | None, world_size: int) -> float | None:
    if peak_flops is None:
        return None
    return flops_per_token * tok_per_s / (peak_flops * world_size)


# ------------------------------------------------------------------------------------ signals


class StopFlag:
    """SIGTERM/SIGINT ask the loop to finish the current step, checkpoint and exit 0."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.requested = True
        print(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint",
              file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self)
        try:
            yield self
        finally:
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)


# ------------------------------------------------------------------------------------ main


def due(interval: int, step: int, max_steps: int) -> bool:
    """Every `interval` steps and at the last step; never with an interval of 0."""
    return interval > 0 and (step % interval == 0 or step == max_steps)


@dataclass(kw_only=True)
class Trainer:
    """Everything the loop touches, so checkpointing and evaluation are small functions."""

    config: TrainConfig
    env: runtime.DistEnv
    device: torch.device
    precision: runtime.Precision
    raw_model: GPT
    train_model: torch.nn.Module
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    train_loader: data.ShardLoader
    val_loader: data.ShardLoader
    grad_accum: int
    out_dir: Path
    argv: list[str]
    log: JsonlLog | None = None
    last_checkpoint: Path | None = None
    hellaswag_examples: list[dict[str, Any]] | None = None
    hellaswag_disabled: bool = False
    skipped_steps: int = 0  # updates the GradScaler skipped for inf/nan gradients

    def write_log(self, step: int, **values: Any) -> None:
        if self.log is not None:
            self.log.write(step, **values)

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        loader_state = self.train_loader.state_dict()
        if self.env.is_distributed:
            states: list[Any] = [None] * self.env.world_size
            torch.distributed.all_gather_object(states, loader_state)
        else:
            states = [loader_state]
        # Under --fsdp the weights and optimizer state go into the sharded folder instead.
        tensors = {} if self.config.fsdp else {"model": self.raw_model.state_dict(),
                                               "optimizer": self.optimizer.state_dict()}
        return {
            "model_config": dataclasses.asdict(self.raw_model.config),
            **tensors,
            "scaler": self.scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "step": step,
            "loader_states": states,
            "world_size": self.env.world_size,
            "args": list(self.argv),
            "config": dataclasses.asdict(self.config),
        }

    def save(self, step: int) -> None:
        state = self.checkpoint_state(step)  # every rank joins the loader-state gather
        path = checkpoint_path(self.out_dir, step, sharded=self.config.fsdp)
        if self.config.fsdp:
            sharding.save_checkpoint(path, self.raw_model, self.optimizer, state, self.env)
        elif self.env.is_main:
            save_checkpoint(path, state)
        if self.env.is_main:
            prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
            self.last_checkpoint = path
            runtime.print0(f"saved {path}")
            self.write_log(step, checkpoint=str(path))

    def restore(self, checkpoint: Checkpoint) -> int:
        """Optimizer, loss scaler and loader position of the checkpoint the model was built
        from; returns its step. (The model's weights came with GPT.from_checkpoint.)"""
        state, path = checkpoint.state, checkpoint.path
        sharded = path.is_dir()  # its optimizer state is read from the folder below
        wanted = ("scaler", "loader_states", "step") + (() if sharded else ("optimizer",))
        missing = [k for k in wanted if k not in state]
        if missing:
            raise TrainError(f"{path}: no {', '.join(missing)} to resume from (written by "
                             "another trainer?); start a new --out-dir with --init-from=PATH")
        loader_state = self.loader_state_from(state, path)
        if sharded:
            sharding.load_optimizer_state(path, self.raw_model, self.optimizer)
        elif self.config.fsdp:
            raise TrainError(f"{path}: a .pt checkpoint cannot resume under --fsdp yet; "
                             "resume it without --fsdp")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        try:
            self.train_loader.load_state_dict(loader_state)
        except ValueError as exc:
            raise TrainError(f"{path}: {exc}") from None
        self.last_checkpoint = path
        return int(state["step"])

    def loader_state_from(self, state: dict[str, Any], path: Path) -> dict[str, Any]:
        """This rank's loader position in a checkpoint saved by any number of ranks. The
        loader's step counts global batches of world_size x batch_size samples, rank r taking
        the r-th slice, so another world size continues at the same sample (and the same
        global order) when that product, the global micro-batch, is unchanged."""
        saved_world = state.get("world_size", len(state["loader_states"]))
        if saved_world == self.env.world_size:
            return dict(state["loader_states"][self.env.rank])
        saved = state["loader_states"][0]
        loader = self.train_loader
        if saved["batch_size"] * saved_world != loader.batch_size * loader.world_size:
            raise TrainError(f"{path}: saved by {saved_world} processes with --batch-size="
                             f"{saved['batch_size']}; with {loader.world_size} processes "
                             "resume with --batch-size="
                             f"{saved['batch_size'] * saved_world / loader.world_size:g} so "
                             "the global micro-batch, and with it the data order, is the same")
        return {**saved, "rank": loader.rank, "world_size": loader.world_size,
                "batch_size": loader.batch_size}

    def eval_model(self) -> GPT:
        """The model HellaSwag and samples run on: under --fsdp a full copy (every rank must
        call this), as those do not run every rank through the same forward passes."""
        if self.config.fsdp:
            return sharding.full_weights_copy(self.raw_model, self.device)
        return self.raw_model

    def run_evals(self, step: int) -> None:
        cfg = self.config
        if due(cfg.eval_interval, step, cfg.max_steps):
            val = evaluate_val_loss(self.raw_model, self.val_loader, cfg.val_steps,
                                    self.precision, self.device, self.env)
            runtime.print0(f"step {step:6d} | val loss {val:.4f}", env=self.env)
            self.write_log(step, val_loss=val)
        hellaswag = due(interval_or_eval(cfg.hellaswag_interval, cfg), step, cfg.max_steps)
        # Samples from the untrained weights at step 0 would only show noise.
        samples = step > 0 and due(interval_or_eval(cfg.sample_interval, cfg), step,
                                   cfg.max_steps)
        if not (hellaswag or samples):
            return
        model = self.eval_model()
        if hellaswag:
            self.run_hellaswag(step, model)
        if samples and self.env.is_main:
            self.print_samples(step, model)
        model.train()

    def run_hellaswag(self, step: int, model: GPT) -> None:
        if self.hellaswag_disabled:
            return
        import eval_hellaswag

        if self.hellaswag_examples is None:
            try:
                self.hellaswag_examples = eval_hellaswag.load_examples(
                    self.config.hellaswag_data, limit=self.config.hellaswag_limit)
            except Exception as exc:  # missing file, no network: training goes on
                self.hellaswag_disabled = True
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if self.env.is_main:
                    print(f"warning: HellaSwag eval skipped for this run: {reason} (pass "
                          "--hellaswag-data=JSONL, or --hellaswag-interval=0 to silence this)",
                          file=sys.stderr, flush=True)
                return
        score = eval_hellaswag.evaluate(model, self.hellaswag_examples, self.device,
                                        precision=self.precision, rank=self.env.rank,
                                        world_size=self.env.world_size)
        runtime.print0(f"step {step:6d} | HellaSwag acc_norm {score.correct_norm}/"
                       f"{score.total} = {score.acc_norm:.4f}", env=self.env)
        self.write_log(step, hellaswag_acc_norm=score.acc_norm, hellaswag_acc=score.acc)

    def print_samples(self, step: int, model: GPT) -> None:
        import sample

        cfg = self.config
        length = min(cfg.sample_length, model.config.block_size)
        texts = sample.generate_text(model, cfg.sample_prompt, cfg.num_samples,
                                     length, seed=cfg.seed, device=self.device,
                                     precision=self.precision)
        print(f"step {step:6d} | samples:", flush=True)
        for text in texts:
            print(f"> {text}", flush=True)
        self.write_log(step, samples=texts)


def interval_or_eval(interval: int | None, config: TrainConfig) -> int:
    return config.eval_interval if interval is None else interval


def prepare_out_dir(config: TrainConfig) -> tuple[Path, Path | None]:
    """Check --out-dir against --resume/--overwrite before anything is written."""
    out_dir = Path(config.out_dir).expanduser()
    existing = list_checkpoints(out_dir) if out_dir.is_dir() else []
    if config.resume:
        return out_dir, existing[-1] if existing else None
    if existing and not config.overwrite:
        raise UsageError(f"--out-dir={out_dir} already holds checkpoints (newest "
                         f"{existing[-1].name}): pass --resume to continue, --overwrite to "
                         "start again, or another --out-dir")
    return out_dir, None


def start_fresh_out_dir(out_dir: Path, env: runtime.DistEnv) -> None:
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in list_checkpoints(out_dir):
            remove_checkpoint(old)
        (out_dir / LOG_NAME).unlink(missing_ok=True)


def remove_stale_temp_files(out_dir: Path) -> None:
    """Temp files of a checkpoint or log rewrite that a kill interrupted."""
    for pattern in (".ckpt_*.pt.*.tmp", f".{LOG_NAME}.*.tmp", sharding.STALE_GLOB):
        for stale in out_dir.glob(pattern):
            remove_checkpoint(stale)


def train(config: TrainConfig, explicit: set[str], argv: list[str]) -> int:
    """The recipe, top to bottom."""
    env = runtime.detect_distributed()
    say: Callable[[str], None] = lambda msg: runtime.print0(msg, env=env)  # noqa: E731
    validate(config)
    device, precision = cli.resolve_runtime(config.device, config.dtype)
    device = runtime.distributed_device(env, device)

    config = resolve_quickstart(config, explicit, say)
    validate(config)
    samples_per_rank(config, env.world_size,
                     1 if config.batch_size == AUTO else config.micro_batch)
    check_fsdp(config, env, precision)
    out_dir, resume_from = prepare_out_dir(config)
    if config.resume and resume_from is None:
        say(f"--resume: no checkpoint in {out_dir}; starting from scratch")
    resume = Checkpoint(resume_from, load_checkpoint(resume_from)) if resume_from else None

    runtime.init_distributed(env, device)
    if config.quickstart:
        ensure_quickstart_data(config, env, say)
    plan = plan_data(config)
    torch.manual_seed(config.seed)  # the model's init is the run's only random draw
    if device.type == "cuda":
        runtime.enable_tf32()

    raw_model = build_model(config, resume).to(device)
    raw_model.activation_checkpointing = config.activation_checkpointing
    config, chosen = resolve_micro_batch(config, raw_model, precision, device, env, resume)
    grad_accum = gradient_accumulation(config, env.world_size)
    if chosen:
        say(f"--batch-size=auto: micro-batch {config.micro_batch} ({chosen})")
    if config.quickstart and resume is None:
        seconds = estimate_run_seconds(config, grad_accum, time_micro_step(
            raw_model, config, precision, device))
        say(f"Quickstart: about {seconds / 60:.1f} minutes of training on this machine "
            "(estimated from one timed step; other work on the CPU makes it longer)")
    loader_vocab = min(raw_model.config.vocab_size, 2**16)
    train_model: torch.nn.Module = raw_model
    if config.compile is None:
        config = dataclasses.replace(config, compile=device.type == "cuda")
    if config.fsdp:
        # Sharded in place: raw_model is the sharded module, so the optimizer built below
        # holds only this rank's shards and validation runs on it directly.
        sharding.shard_model(raw_model, precision, device)
    if config.compile:
        train_model = torch.compile(raw_model)  # type: ignore[assignment]
    if env.is_distributed and not config.fsdp:
        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=ids)
    trainer = Trainer(
        config=config, env=env, device=device, precision=precision, raw_model=raw_model,
        train_model=train_model, optimizer=build_optimizer(raw_model, config, device),
        scaler=runtime.make_grad_scaler(precision, device),
        train_loader=make_loader(plan.train_files, config, env, device, config.shuffle,
                                 loader_vocab),
        val_loader=make_loader(plan.val_files, config, env, device, False, loader_vocab),
        grad_accum=grad_accum, out_dir=out_dir, argv=argv)
    try:
        start_step = 0
        if resume is not None:
            start_step = trainer.restore(resume)
            say(f"resumed from {resume.path} at step {start_step}")
            if env.is_main:
                truncate_log(out_dir / LOG_NAME, resume.path, start_step)
        else:
            start_fresh_out_dir(out_dir, env)
        if env.is_main:
            remove_stale_temp_files(out_dir)
        if env.is_distributed:
            torch.distributed.barrier()
        if env.is_main:
            trainer.log = JsonlLog(out_dir / LOG_NAME)
        if chosen and resume is None:
            trainer.write_log(start_step, micro_batch=config.micro_batch, grad_accum=grad_accum)

        say(f"data: {plan.source} ({len(plan.train_files)} train, {len(plan.val_files)} val "
            "shards)")
        say(f"model: {raw_model.config} ({raw_model.num_params() / 1e6:.1f}M parameters), "
            f"device {device}, {precision.name}, world size {env.world_size}")
        say(f"batch: {config.micro_batch} x {config.seq_len} tokens x {env.world_size} ranks x "
            f"{grad_accum} accumulation = {config.total_batch_size} tokens per step")
        with StopFlag().installed() as stop:
            return training_loop(trainer, start_step, stop)
    finally:
        if trainer.log is not None:
            trainer.log.close()
        trainer.train_loader.close()
        trainer.val_loader.close()


def training_loop(trainer: Trainer, start_step: int, stop: StopFlag) -> int:
    cfg, env = trainer.config, trainer.env
    if start_step >= cfg.max_steps:
        runtime.print0(f"already trained to step {start_step} (--max-steps={cfg.max_steps})",
                       env=env)
        return 0
    flops_per_token = trainer.raw_model.flops_per_token(cfg.seq_len)
    peak = runtime.gpu_peak_flops(trainer.device)
    step = start_step
    while True:
        trainer.run_evals(step)
        if step >= cfg.max_steps:
            return 0
        t0 = time.perf_counter()
        lr = get_lr(step, cfg.max_lr, cfg.final_min_lr, cfg.warmup_steps, cfg.max_steps)
        result = train_step(trainer.train_model, trainer.optimizer, trainer.scaler,
                            trainer.train_loader.next_batch, trainer.grad_accum,
                            trainer.precision, trainer.device, lr, cfg.grad_clip)
        loss, grad_norm, stop_requested = read_step(result, stop.requested, env)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        dt = time.perf_counter() - t0
        if step == start_step and cfg.compile:
            runtime.print0(f"first step, with the one-time torch.compile: {dt:.1f} s", env=env)
        if not math.isfinite(loss):
            last = trainer.last_checkpoint or "none"
            print(f"error: loss is {loss} at step {step}; stopping. Last good checkpoint: "
                  f"{last}", file=sys.stderr, flush=True)
            return 1
        trainer.skipped_steps += result.skipped
        tok_per_s = cfg.total_batch_size / dt
        mfu = model_flops_utilization(flops_per_token, tok_per_s, peak, env.world_size)
        loss_scale = result.loss_scale if trainer.scaler.is_enabled() else None
        runtime.print0(format_step(step, cfg.max_steps, loss, lr, grad_norm, dt,
                                   tok_per_s, mfu, loss_scale, trainer.skipped_steps), env=env)
        record: dict[str, Any] = dict(loss=loss, lr=lr, grad_norm=grad_norm,
                                      dt_ms=dt * 1000, tok_per_s=tok_per_s)
        if mfu is not None:
            record["mfu"] = mfu
        if loss_scale is not None:
            record.update(loss_scale=loss_scale, skipped_steps=trainer.skipped_steps)
        trainer.write_log(step, **record)
        step += 1
        if due(cfg.checkpoint_interval, step, cfg.max_steps) or stop_requested:
            trainer.save(step)
        if stop_requested:
            runtime.print0(f"stopped at step {step}; continue with --resume", env=env)
            return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config, explicit = parse_args(argv)
    try:
        return cli.run_script(lambda: train(config, explicit, argv), config.debug)
    finally:
        runtime.destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
