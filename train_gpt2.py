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
The run folder (checkpoints, log.jsonl, --resume) is checkpoint.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args, get_type_hints

import torch
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import cli
import data
import eval_core
import eval_hellaswag
import model_modern
import optim
import runtime
import sample
import sharding
from cli import UsageError
from model import GPT, PADDED_VOCAB_SIZE, PRESETS, GPTConfig
from model_modern import ModernConfig, ModernGPT
from runtime import print0

Batch = tuple[torch.Tensor, torch.Tensor]
DEFAULT_DATASET = "finewebedu"
QUICKSTART_DATASET = "stdlib"
AUTO: Final = "auto"

# The built-in quickstart: a falling loss and samples within 3 minutes on a 2-core CPU.
# Tuned there (bench/RESULTS.md): validation loss 3.49 (3.50 since 2026-12-01) on an idle CPU.
# Steps of 2048 tokens learned far more per token than steps of 1024 or 512, and a larger
# learning rate did worse. These flags go before the user's, so any flag given wins.
QUICKSTART_FLAGS = [
    "--model=gpt2-mini", "--batch-size=8", "--seq-len=256", f"--total-batch-size={8 * 256}",
    "--max-steps=75", "--warmup-steps=10", "--max-lr=3e-3", "--eval-interval=25",
    "--val-steps=4", "--hellaswag-interval=0", "--sample-interval=75",
    "--sample-prompt=def ",  # the corpus is Python source
    "--num-samples=2", "--sample-length=64", "--checkpoint-interval=75",
]

# Named recipes: flags placed before the user's (after the quickstart's), so any flag given
# still wins. modern: model_modern.py's model with optim.py's per-kind rates and Muon, on
# nanochat's schedule (a long linear warmdown to 5% of the peak; scripts/base_train.py).
# finetune: GPT-2's weights (its 50257-token vocabulary kept, so the result exports) trained
# briefly on the user's text at a small, nearly constant learning rate, validated often.
RECIPES = {
    "gpt2": [],
    "modern": ["--lr-schedule=wsd", "--cooldown-frac=0.65", "--final-lr-frac=0.05"],
    "finetune": ["--init-from=gpt2", "--max-lr=3e-5", "--lr-schedule=wsd", "--cooldown-frac=0.2",
                 "--warmup-steps=10", "--max-steps=200", "--total-batch-size=32768",
                 "--batch-size=auto", "--eval-interval=20", "--val-steps=10",
                 "--hellaswag-interval=0", "--sample-interval=50", "--checkpoint-interval=50"],
}


# ------------------------------------------------------------------------------ arguments


def option(default: Any, help: str = "", minimum: float | None = None,
           maximum: float | None = None, below: float | None = None,
           **argparse_kwargs: Any) -> Any:
    """A TrainConfig field that is also a flag: its help, its domain (what the code downstream
    takes; validate() checks it) and any other argparse settings (choices), once."""
    domain = {"minimum": minimum, "maximum": maximum, "below": below}
    return field(default=default, metadata={"help": help, "domain": domain, **argparse_kwargs})


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
                                  "(.bin or .npy) instead of --dataset (default: off)")
    data_root: str = option("", "root of prepared datasets (default: "
                            "$NANO_GPT_DATA_ROOT or ~/.cache/nano-gpt/data)")
    loader_backend: str = option("auto", "data.ShardLoader backend (auto: native when built)",
                                 choices=("auto", "native", "numpy"))
    shuffle: bool = option(True, "seeded shuffle of training shards and samples each epoch")
    # model
    recipe: str = option(
        "gpt2", "gpt2: the 2019 recipe; modern: model_modern.py's model, optim.py's per-kind "
        f"rates with Muon, and {', '.join(RECIPES['modern'])}; finetune: "
        f"{', '.join(RECIPES['finetune'])} (any flag given still wins)", choices=tuple(RECIPES))
    model: str = option("gpt2", f"preset: {', '.join(PRESETS)}")
    n_layer: int | None = option(None, "layers (default: the preset's)", minimum=1)
    n_head: int | None = option(None, "attention heads (default: the preset's)", minimum=1)
    n_embd: int | None = option(None, "width (default: the preset's)", minimum=1)
    block_size: int | None = option(None, "context length of the model (default: the "
                                    "preset's)", minimum=1)
    vocab_size: int = option(PADDED_VOCAB_SIZE, "embedding rows; 50304 pads GPT-2's 50257 "
                             "for faster matmuls", minimum=1)
    init_from: str = option("scratch", "scratch, a pretrained name or HF folder (gpt2, "
                            "gpt2-medium, ...), or a checkpoint (.pt file or --fsdp folder; "
                            "weights only, fresh optimizer)")
    value_embeddings: bool = option(True, "modern: value embeddings mixed into attention "
                                    "on alternating layers")
    lambdas: bool = option(True, "modern: per-layer residual and embedding-shortcut scalars")
    logit_softcap: float = option(15.0, "modern: logits capped at C * tanh(logits / C); 0: off",
                                  minimum=0)
    # batch and optimizer
    batch_size: int | Literal["auto"] = option(
        64, "micro-batch per rank, or auto: the largest that fits in GPU memory (on CPU and "
        f"MPS: {runtime.DEFAULT_AUTO_MICRO_BATCH}); accumulation keeps --total-batch-size",
        minimum=1, type=micro_batch_arg)
    seq_len: int = option(1024, "tokens per sample", minimum=1)
    total_batch_size: int = option(524288, "tokens per optimizer step (gradient "
                                   "accumulation makes up the rest)", minimum=1)
    max_steps: int = option(19073, "optimizer steps to train for", minimum=0)
    warmup_steps: int = option(715, "steps of linear LR warmup", minimum=0)
    max_lr: float = option(6e-4, "gpt2: AdamW's peak learning rate, reached after the warmup",
                           minimum=0)
    final_lr_frac: float = option(0.1, "every rate at the end of the schedule, as a fraction "
                                  "of its peak", minimum=0, maximum=1)
    lr_schedule: str = option("cosine", "after the warmup, cosine: a cosine decay to the "
                              "final rate; wsd: constant, then linear to it over the last "
                              "--cooldown-frac of the steps", choices=("cosine", "wsd"))
    cooldown_frac: float = option(0.4, "wsd: the fraction of --max-steps spent decaying",
                                  minimum=0, maximum=1)
    weight_decay: float = option(0.1, "gpt2: AdamW weight decay on the 2-D weights", minimum=0)
    beta1: float = option(0.9, "gpt2: AdamW beta1", minimum=0, below=1)
    beta2: float = option(0.95, "gpt2: AdamW beta2", minimum=0, below=1)
    adam_eps: float = option(1e-8, "AdamW epsilon: at least fp32's smallest normal number "
                             "(0 makes 0/0 updates)", minimum=torch.finfo(torch.float32).tiny)
    embedding_lr: float = option(optim.EMBEDDING_LR, "modern: the token embedding's peak "
                                 "AdamW rate at width 768 (scaled by (width/768)^-0.5; value "
                                 "embeddings at half)", minimum=0)
    head_lr: float = option(optim.HEAD_LR, "modern: the output head's peak AdamW rate at width "
                            "768 (scaled as --embedding-lr)", minimum=0)
    matrix_lr: float = option(optim.MATRIX_LR, "modern: the blocks' matrices' peak rate (Muon's, "
                              "or AdamW's with --matrix-optimizer=adamw)", minimum=0)
    scalar_lr: float = option(optim.SCALAR_LR, "modern: the embedding-shortcut scalars' peak "
                              "AdamW rate (the residual scalars at 1%% of it)", minimum=0)
    matrix_weight_decay: float = option(optim.MATRIX_WEIGHT_DECAY, "modern: the blocks' "
                                        "matrices' weight decay (with Muon: cautious)", minimum=0)
    matrix_optimizer: str = option("muon", "modern: muon, or adamw for the blocks' matrices",
                                   choices=("muon", "adamw"))
    grad_clip: float = option(1.0, "max global grad norm; 0 disables clipping", minimum=0)
    seed: int = option(1337, "seed of the model's init and the data order", *cli.SEED_RANGE)
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
    core_interval: int = option(0, "steps between CORE evaluations (eval_core.py)", minimum=0)
    core_limit: int = option(16, "examples per CORE task during training: the first after its "
                             "seeded shuffle (10-shot tasks need 11)", minimum=1)
    core_bundle: str | None = option(None, "an unpacked CORE eval bundle (default: nanochat's, "
                                     "downloaded once into the data root)")
    sample_interval: int | None = option(None, "steps between printed samples (default: "
                                         "--eval-interval)", minimum=0)
    sample_prompt: str = option("Hello, I'm a language model,", "prompt of the printed samples")
    num_samples: int = option(4, "samples printed each time (--sample-interval=0: none)",
                              minimum=1)
    sample_length: int = option(32, "tokens per sample, prompt included", minimum=2)
    checkpoint_interval: int = option(5000, "steps between checkpoints (the last step is "
                                      "always saved)", minimum=0)
    keep_checkpoints: int = option(3, "keep the newest K checkpoints; 0 keeps all", minimum=0)
    out_dir: str = option("out", "checkpoints and log.jsonl")
    wandb_project: str | None = option(None, "also send every log.jsonl event to this Weights "
                                       "& Biases project (pip install -e '.[wandb]'); "
                                       "offline when there is no network (default: off)")
    wandb_run_name: str | None = option(None, "the W&B run's name (default: W&B's own)")
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
    def quickstart(self) -> bool:
        return self.dataset == QUICKSTART_DATASET and not self.data_dir

    @property
    def cooldown(self) -> float | None:
        """The fraction of the steps the LR falls over at the end: --cooldown-frac under the
        wsd schedule; None under cosine, which falls all the way from the warmup."""
        return self.cooldown_frac if self.lr_schedule == "wsd" else None

    @property
    def micro_batch(self) -> int:
        if not isinstance(self.batch_size, int):
            raise ValueError("--batch-size=auto is resolved before the micro-batch is used")
        return self.batch_size

    def samples_per_rank(self, world_size: int, micro_batch: int = 1) -> int:
        """Samples each rank contributes to one optimizer step, which must split into whole
        micro-batches of `micro_batch` (1 while --batch-size=auto is still unresolved)."""
        per_micro_step = micro_batch * self.seq_len * world_size
        if self.total_batch_size % per_micro_step != 0:
            raise UsageError(
                f"--total-batch-size={self.total_batch_size}: not a multiple of {micro_batch} x "
                f"{self.seq_len} x {world_size} = {per_micro_step}\nhint: pick a multiple of "
                f"{per_micro_step} (batch-size x seq-len x world-size)")
        return self.total_batch_size // (self.seq_len * world_size)

    def grad_accum(self, world_size: int) -> int:
        return self.samples_per_rank(world_size, self.micro_batch) // self.micro_batch


# --help groups: each starts at the named field and runs to the next.
HELP_GROUPS = {"dataset": "data", "model": "model", "batch_size": "batch and optimizer",
               "eval_interval": "evaluation, samples, checkpoints (an interval of 0 disables)",
               "device": "runtime"}


def build_parser(description: str) -> argparse.ArgumentParser:
    """One flag per TrainConfig field, with its help, default and domain."""
    parser = cli.Parser(description=description)
    hints = get_type_hints(TrainConfig)
    group: Any = parser
    for f in dataclasses.fields(TrainConfig):
        if f.name in HELP_GROUPS:
            group = parser.add_argument_group(HELP_GROUPS[f.name])
        text = f.metadata["help"]
        name = "--" + f.name.replace("_", "-")
        kind = next((t for t in get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        if kind is bool:  # --no-X where the default is on
            negatable = f.default is not False
            action = argparse.BooleanOptionalAction if negatable else "store_true"
            group.add_argument(name, action=action, default=f.default, help=text)
        else:
            extra = {k: v for k, v in f.metadata.items() if k not in ("help", "domain")}
            group.add_argument(name, help=text, default=f.default, **{"type": kind, **extra})
    return parser


def validate(config: TrainConfig) -> None:
    """Every value within its option's domain, before any work starts."""
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            cli.check_range("--" + f.name.replace("_", "-"), value, **f.metadata["domain"])
    if config.dataset and config.data_dir:
        raise UsageError("--dataset and --data-dir both given: pass only one")
    if config.recipe == "finetune" and not (config.dataset or config.data_dir):
        raise UsageError("--recipe=finetune: no data given\nhint: pass --dataset=NAME of your "
                         "prepared text (python prepare_dataset.py --dataset=FOLDER "
                         "--name=NAME) or --data-dir=DIR")
    if config.model not in PRESETS:
        raise UsageError(f"--model={config.model}: unknown preset; choose one of "
                         f"{', '.join(PRESETS)}")
    if config.wandb_project:  # before the run folder is touched
        import tracking

        tracking.require_wandb()


def parse_args(argv: list[str], description: str = "Train GPT-2 on token shards (single "
               "process or torchrun DDP).") -> TrainConfig:
    return TrainConfig(**vars(build_parser(description).parse_args(argv)))


def configure(config: TrainConfig, argv: list[str]) -> TrainConfig:
    """The parsed flags `config` of `argv`, checked, with the flags of --recipe placed first.
    With no data flag and no prepared finewebedu, or with --dataset=stdlib, the quickstart:
    its flags go first of all. Settings whose default is another setting's value are
    resolved here (the data root too), so each has one value from now on."""
    validate(config)
    root = Path(config.data_root).expanduser() if config.data_root else data.default_data_root()
    flags, quickstart = RECIPES[config.recipe], config.quickstart
    if config.dataset is None and not config.data_dir:
        if data.find_shards(root / DEFAULT_DATASET, "train"):
            flags = [f"--dataset={DEFAULT_DATASET}", *flags]
        else:
            print0(f"No prepared {DEFAULT_DATASET} shards in "
                   f"{root / DEFAULT_DATASET}; running the built-in quickstart "
                   "instead.")
            print0(f"To train GPT-2 124M, prepare FineWeb-Edu first: "
                   f"{prepare_command(DEFAULT_DATASET, config)}")
            flags, quickstart = [f"--dataset={QUICKSTART_DATASET}", *flags], True
    if quickstart:
        flags = [*QUICKSTART_FLAGS, *flags]
    if flags:
        config = parse_args([*flags, *argv])
        validate(config)
    if config.quickstart:
        print0(f"Quickstart: {config.model} on the {QUICKSTART_DATASET} corpus, "
               f"{config.max_steps} steps of {config.total_batch_size} tokens.")
    return dataclasses.replace(
        config, data_root=str(root),
        hellaswag_interval=(config.eval_interval if config.hellaswag_interval is None
                            else config.hellaswag_interval),
        sample_interval=(config.eval_interval if config.sample_interval is None
                         else config.sample_interval))


# ------------------------------------------------------------------------------------ data


def prepare_command(name: str, config: TrainConfig) -> str:
    """The command that writes dataset `name` (from the user's text if not a built-in)."""
    import prepare_dataset

    given = config.data_root and Path(config.data_root) != data.default_data_root()
    root = f" --data-root={config.data_root}" if given else ""
    source = name if name in prepare_dataset.BUILTIN_NAMES else f"PATH/TO/TEXT --name={name}"
    return f"python prepare_dataset.py --dataset={source}{root}"


def find_data(config: TrainConfig, env: runtime.DistEnv) -> tuple[list[Path], list[Path], Path]:
    """(train shards, val shards, their folder); the quickstart's corpus prepared first."""
    if config.data_dir:
        directory = Path(config.data_dir).expanduser()
        fix = ("pass a folder of *_train_* and *_val_* shards "
               "(python prepare_dataset.py writes them)")
    else:
        assert config.dataset is not None
        root = Path(config.data_root)
        directory = root / config.dataset
        ready = ", ".join(p.name for p in sorted(root.glob("*")) if data.find_shards(p, "train"))
        fix = (f"prepare it first: {prepare_command(config.dataset, config)} (prepared in "
               f"{root}: {ready or 'none yet'})")
    if config.quickstart:
        prepare_quickstart(config, env)
    train, val = data.find_shards(directory, "train"), data.find_shards(directory, "val")
    if not train:
        raise RuntimeError(f"{directory}: no training shards (*_train_*.bin/.npy)\nhint: {fix}")
    if not val:
        raise RuntimeError(f"{directory}: no validation shards (*_val_*.bin/.npy)\nhint: {fix}")
    return train, val, directory


def prepare_quickstart(config: TrainConfig, env: runtime.DistEnv) -> None:
    """Tokenize the offline stdlib corpus once (rank 0) if it is not prepared yet."""
    import prepare_dataset

    root = Path(config.data_root)
    if env.is_main and not prepare_dataset.is_prepared(root, QUICKSTART_DATASET):
        print0(f"Preparing the {QUICKSTART_DATASET} corpus in {root / QUICKSTART_DATASET} "
            "(one time, offline) ...")
        status = prepare_dataset.main([f"--dataset={QUICKSTART_DATASET}",
                                       f"--data-root={root}"])
        if status != 0:
            raise RuntimeError(f"preparing the {QUICKSTART_DATASET} corpus failed (exit "
                               f"{status}); run {prepare_command(QUICKSTART_DATASET, config)}")
    if env.is_distributed:
        torch.distributed.barrier()


# ---------------------------------------------------------------------- model and optimizer


def model_config(config: TrainConfig) -> GPTConfig | ModernConfig:
    """The shape the flags ask for, of GPT-2's model or (--recipe=modern) the modern one."""
    given = [k for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(config, k)]
    shape = {**PRESETS[config.model], "vocab_size": config.vocab_size,
             **{k: getattr(config, k) for k in given}}
    try:
        if config.recipe == "modern":
            switches = {name: getattr(config, name) for name in model_modern.SWITCHES}
            return ModernConfig(**shape, **switches)
        return GPTConfig(**shape)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def build_model(config: TrainConfig, resume: dict[str, Any],
                resume_path: Path | None) -> GPT | ModernGPT:
    """The resumed checkpoint's model, else (--init-from) a fresh model, pretrained GPT-2
    weights or a checkpoint's weights; a checkpoint's model must be the one the flags ask for."""
    source = Path(config.init_from).expanduser()  # a .pt file, or an --fsdp folder
    from_checkpoint = (source.is_file() or source.suffix == ".pt"
                       or source.name.startswith("ckpt_")
                       or (source / checkpoint.STATE_NAME).is_file())
    model: GPT | ModernGPT
    state, path = None, source
    if resume_path is not None:
        state, path = resume, resume_path
        model = checkpoint.model_from_state(state)
    elif from_checkpoint:
        state = checkpoint.load(source)
        model = checkpoint.model_from_state(state)
    elif config.init_from == "scratch":
        shape = model_config(config)
        model = ModernGPT(shape) if isinstance(shape, ModernConfig) else GPT(shape)
    elif config.recipe == "modern":
        raise UsageError(f"--init-from={config.init_from} with --recipe=modern: pretrained "
                         "weights are GPT-2's, not the modern model's\nhint: pass "
                         "--recipe=gpt2 (or finetune) to start from them")
    else:
        model = GPT.from_pretrained(config.init_from)
    if state is not None:
        # When resuming, the checkpoint must also have been trained with this run's
        # optimizer, whose state it holds.
        resuming = resume_path is not None
        ours = model_config(config)
        if type(ours) is not type(model.config):
            diffs = [f"a {state['model_kind']} model (this run: --recipe={config.recipe})"]
        else:
            diffs = [f"{k}={v} (this run: {getattr(ours, k)})"
                     for k, v in dataclasses.asdict(model.config).items()
                     if getattr(ours, k) != v]
        saved: dict[str, Any] = state["config"] if isinstance(state.get("config"), dict) else {}
        if resuming and saved.get("optimizer", "adamw") != "adamw":
            raise RuntimeError(f"{path}: trained with --optimizer={saved['optimizer']}, which "
                               "the recipes no longer have\nhint: start from its weights with "
                               f"--init-from={path} and a new --out-dir")
        matrices = saved.get("matrix_optimizer", config.matrix_optimizer)
        if resuming and isinstance(model, ModernGPT) and matrices != config.matrix_optimizer:
            diffs.append(f"matrix_optimizer={matrices} (this run: {config.matrix_optimizer})")
        if diffs:
            args = state.get("args")
            flags = "unknown: the checkpoint does not record them"
            if isinstance(args, list) and args and all(isinstance(a, str) for a in args):
                flags = " ".join(args)
            raise RuntimeError(f"{path}: checkpoint of another model: {', '.join(diffs)}\nhint: "
                               f"pass the flags it was trained with ({flags}) or another "
                               "--out-dir")
    if config.seq_len > model.config.block_size:
        raise UsageError(f"--seq-len={config.seq_len} exceeds the model's block size "
                         f"{model.config.block_size}\nhint: lower --seq-len or raise "
                         "--block-size")
    return model


def build_optimizer(model: GPT | ModernGPT, config: TrainConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer, each group holding its peak rate as `initial_lr`."""
    if isinstance(model, ModernGPT):
        return optim.modern_optimizer(
            model, device.type, embedding_lr=config.embedding_lr, head_lr=config.head_lr,
            matrix_lr=config.matrix_lr, scalar_lr=config.scalar_lr,
            matrix_weight_decay=config.matrix_weight_decay,
            matrix_optimizer=config.matrix_optimizer)
    return optim.gpt2_optimizer(model, config.max_lr, config.weight_decay,
                                (config.beta1, config.beta2), config.adam_eps, device.type)


def lr_multiplier(step: int, final_frac: float, warmup_steps: int, max_steps: int,
                  cooldown_frac: float | None = None) -> float:
    """The learning-rate schedule as a fraction of the peak rate: a linear warmup to 1 over
    warmup_steps, then a cosine down to final_frac at max_steps. With `cooldown_frac` (wsd)
    it stays 1 until that fraction of max_steps is left, then falls in a straight line to
    final_frac."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return final_frac
    if cooldown_frac is not None:
        decay_start = max(warmup_steps, max_steps * (1 - cooldown_frac))
        progress = max(0.0, step - decay_start) / max(1.0, max_steps - decay_start)
        return 1.0 + progress * (final_frac - 1.0)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return final_frac + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - final_frac)


def check_fsdp(config: TrainConfig, env: runtime.DistEnv, precision: runtime.Precision,
               device: torch.device) -> None:
    if not config.fsdp:
        return
    if not env.is_distributed:
        raise UsageError("--fsdp shards over two or more torchrun ranks\nhint: a single "
                         "process trains (and resumes an --fsdp checkpoint) without it")
    if config.recipe == "modern" and config.matrix_optimizer == "muon":
        raise UsageError("--fsdp with Muon (--recipe=modern): Muon needs whole matrices\nhint: "
                         "train it without --fsdp (DDP), or pass --matrix-optimizer=adamw")
    if precision.use_grad_scaler:
        dtypes = ("--dtype=bf16 or --dtype=fp32" if runtime.bf16_supported(device)
                  else "--dtype=fp32 (this GPU has no bf16)")
        raise UsageError("--fsdp with fp16: the GradScaler does not handle sharded gradients "
                         f"here\nhint: pass {dtypes}")


# ------------------------------------------------------------- micro-batch and run time


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
               precision: runtime.Precision, device: torch.device,
               grad_clip: float) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches, at the rates the schedule set;
    DDP and FSDP reduce gradients only on the last. Nothing is read back to the host (but
    the fp16 GradScaler's scale), so the CPU queues the optimizer step while the GPU still
    runs the backward pass."""
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


def due(interval: int, step: int, max_steps: int) -> bool:
    """Every `interval` steps and at the last step; never with an interval of 0."""
    return interval > 0 and (step % interval == 0 or step == max_steps)


# ------------------------------------------------------------------------------ evaluations


@torch.no_grad()
def evaluate_val_loss(model: torch.nn.Module, loader: data.ShardLoader, steps: int,
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


def load_hellaswag(config: TrainConfig, env: runtime.DistEnv) -> list[dict[str, Any]]:
    """The examples HellaSwag runs on during training; none when it is off or its file cannot
    be had (missing, no network): training goes on without it."""
    if not config.hellaswag_interval:
        return []
    try:
        return eval_hellaswag.load_examples(config.hellaswag_data, limit=config.hellaswag_limit)
    except Exception as exc:
        if env.is_main:
            print(f"warning: HellaSwag eval skipped for this run: {cli.first_line(exc)} (pass "
                  "--hellaswag-data=JSONL, or --hellaswag-interval=0 to silence this)",
                  file=sys.stderr, flush=True)
        return []


def load_core(config: TrainConfig, env: runtime.DistEnv) -> list[eval_core.Task]:
    """The CORE tasks run during training; none when it is off or the bundle cannot be had
    (no network, a bad bundle): training goes on without it, after one warning."""
    if config.core_interval <= 0:
        return []
    bundle = config.core_bundle
    if bundle is None:  # rank 0 downloads (if need be) while the other ranks wait
        bundle = str(Path(config.data_root) / eval_core.BUNDLE_DIR)
        if env.is_main:
            with contextlib.suppress(Exception):  # load_tasks below says why, on every rank
                eval_core.ensure_bundle(config.data_root)
        if env.is_distributed:
            torch.distributed.barrier()
    try:
        return eval_core.load_tasks(bundle, limit=config.core_limit)
    except Exception as exc:
        if env.is_main:
            print(f"warning: CORE eval skipped for this run: {cli.first_line(exc)} (pass "
                  "--core-bundle=DIR, or --core-interval=0 to silence this)", file=sys.stderr,
                  flush=True)
        return []


# ------------------------------------------------------------------------------ the recipe


def train(config: TrainConfig, argv: list[str], env: runtime.DistEnv) -> int:
    """Setup, top to bottom, then the loop. Each iteration: the evaluations due at `step`,
    then (unless it is the last) one optimizer step, its log line, and the checkpoint when
    due or asked for by a signal."""
    device, precision = cli.resolve_runtime(config.device, config.dtype)
    device = runtime.distributed_device(env, device)
    # A total batch that does not split into whole micro-batches is refused before any work
    # (--batch-size=auto is resolved below, to a size that divides it).
    micro_batch = 1 if config.batch_size == AUTO else config.micro_batch
    rank_samples = config.samples_per_rank(env.world_size, micro_batch)
    check_fsdp(config, env, precision, device)
    runtime.init_distributed(env, device)
    with contextlib.ExitStack() as stack:
        # ------------------------------------------------------------------------ data
        train_files, val_files, source = find_data(config, env)  # before any --out-dir clash

        # ------------------------------------------------------------------ run folder
        out_dir = Path(config.out_dir).expanduser()
        stack.enter_context(checkpoint.hold(out_dir, env))  # before the first write, to the exit
        resume_path = checkpoint.resume_point(out_dir, config.resume, config.overwrite)
        if config.resume and resume_path is None:
            print0(f"--resume: no checkpoint in {out_dir}; starting from scratch")
        resume = checkpoint.load(resume_path) if resume_path else {}

        # ----------------------------------------------------------------------- model
        torch.manual_seed(config.seed)  # the model's init is the run's only random draw
        if device.type == "cuda":
            runtime.enable_tf32()
        model = build_model(config, resume, resume_path).to(device)
        # The samples' prompt and length must fit the model: refused now, not mid-run.
        prompt_tokens: list[int] = []
        new_tokens = 0
        if config.sample_interval and config.max_steps > 0:
            prompt_tokens = sample.encode_prompt(config.sample_prompt)
            new_tokens = sample.new_token_count(
                model, prompt_tokens, min(config.sample_length, model.config.block_size),
                ("--sample-prompt", "--sample-length"))
        model.activation_checkpointing = config.activation_checkpointing
        if config.fsdp:
            # Sharded in place: the optimizer built below holds only this rank's shards, and
            # validation runs on the sharded model directly.
            sharding.shard_model(model, precision, device)
        auto_micro_batch = config.batch_size == AUTO
        if auto_micro_batch:
            if resume_path is not None:  # exact resume needs its own
                size = resume["loader_states"][0]["batch_size"]
                chosen = f"the micro-batch of {resume_path.name}"
            else:
                size, chosen = runtime.auto_micro_batch(
                    model, rank_samples, config.seq_len, precision, device, env)
            config = dataclasses.replace(config, batch_size=size)
            print0(f"--batch-size=auto: micro-batch {size} ({chosen})")
        grad_accum = config.grad_accum(env.world_size)
        if config.quickstart and resume_path is None:
            seconds = estimate_run_seconds(config, grad_accum, runtime.time_micro_step(
                model, config.micro_batch, config.seq_len, precision, device))
            print0(f"Quickstart: about {seconds / 60:.1f} minutes of training on this machine "
                   "(estimated from one timed step; other work on the CPU makes it longer)")
        if config.compile is None:
            config = dataclasses.replace(config, compile=device.type == "cuda")
        # The step runs train_model (compiled and/or under DDP); evaluations, samples and
        # checkpoints read the plain model.
        train_model: torch.nn.Module = model
        if config.compile:
            train_model = torch.compile(model)  # type: ignore[assignment]
        if env.is_distributed and not config.fsdp:
            ids = [device.index] if device.type == "cuda" else None
            train_model = DistributedDataParallel(train_model, device_ids=ids)

        # ------------------------------------------------------------------- optimizer
        optimizer = build_optimizer(model, config, device)
        scaler = runtime.make_grad_scaler(precision, device)

        # --------------------------------------------------------------------- loaders
        # Token ids at or above the vocabulary are refused; GPT-2's padding rows never occur.
        vocab = (data.VOCAB_SIZE if model.config.vocab_size == PADDED_VOCAB_SIZE
                 else min(model.config.vocab_size, 2**16))
        shard_loader = functools.partial(
            data.ShardLoader, batch_size=config.micro_batch, seq_len=config.seq_len,
            rank=env.rank, world_size=env.world_size, seed=config.seed, device=device,
            backend=config.loader_backend, vocab_size=vocab)
        loader = stack.enter_context(shard_loader(train_files, shuffle=config.shuffle))
        val_loader = stack.enter_context(shard_loader(val_files, shuffle=False))

        # --------------------------------------------------- resume, and the log opened
        start_step, skipped = 0, 0
        if resume_path is not None:
            start_step, skipped = checkpoint.restore_training(
                resume, resume_path, config.fsdp, env, model, optimizer, scaler, loader)
            print0(f"resumed from {resume_path} at step {start_step}")
        if env.is_main:
            checkpoint.open_run(out_dir, resume_path, start_step)
        if env.is_distributed:
            torch.distributed.barrier()
        # log.jsonl is the record of the run; with --wandb-project W&B gets the same. Rank 0.
        send_to_wandb = None
        if config.wandb_project and env.is_main:
            import tracking

            send_to_wandb = tracking.start_wandb(config.wandb_project, config.wandb_run_name,
                                                 dataclasses.asdict(config), out_dir)

        def log(step: int, **values: Any) -> None:
            if env.is_main:
                checkpoint.append_log(out_dir, step, **values)
            if send_to_wandb is not None:
                send_to_wandb(step, values)

        if auto_micro_batch and resume_path is None:
            log(start_step, micro_batch=config.micro_batch, grad_accum=grad_accum)
        print0(f"data: {source} ({len(train_files)} train, {len(val_files)} val shards)")
        print0(f"model: {model.config} ({model.num_params() / 1e6:.1f}M parameters), "
               f"device {device}, {precision.name}, world size {env.world_size}")
        print0(f"batch: {config.micro_batch} x {config.seq_len} tokens x {env.world_size} "
               f"ranks x {grad_accum} accumulation = {config.total_batch_size} tokens per step")

        # ------------------------------------------------------------------------ loop
        # configure() resolved them from --eval-interval.
        assert config.hellaswag_interval is not None and config.sample_interval is not None
        if start_step >= config.max_steps:
            print0(f"already trained to step {start_step} (--max-steps={config.max_steps})")
            return 0
        hellaswag = load_hellaswag(config, env)
        core_tasks = load_core(config, env)
        flops_per_token = model.flops_per_token(config.seq_len)
        peak = runtime.gpu_peak_flops(device)
        last_checkpoint = resume_path
        # Muon's momentum eases off over the wsd schedule's warmdown.
        warmdown_steps = round(config.max_steps * (config.cooldown or 0.0))
        stop = stack.enter_context(runtime.StopFlag().installed())
        for step in range(start_step, config.max_steps + 1):
            # ---------------------------------------------------------- evaluations
            if due(config.eval_interval, step, config.max_steps):
                val = evaluate_val_loss(model, val_loader, config.val_steps, precision, device,
                                        env)
                print0(f"step {step:6d} | val loss {val:.4f}")
                log(step, val_loss=val)
            run_hellaswag = bool(hellaswag) and due(config.hellaswag_interval, step,
                                                    config.max_steps)
            run_core = bool(core_tasks) and due(config.core_interval, step, config.max_steps)
            # Samples from the untrained weights at step 0 would only show noise.
            run_samples = step > 0 and due(config.sample_interval, step, config.max_steps)
            if run_hellaswag or run_core or run_samples:
                # Under --fsdp a full copy (every rank makes it): sampling runs on rank 0
                # alone, and HellaSwag gives ranks different numbers of forward passes.
                eval_model = model
                if config.fsdp:
                    eval_model = sharding.full_weights_copy(model, device)
                if run_hellaswag:
                    score = eval_hellaswag.evaluate(eval_model, hellaswag, device,
                                                    precision=precision, rank=env.rank,
                                                    world_size=env.world_size)
                    print0(f"step {step:6d} | HellaSwag acc_norm {score.correct_norm}/"
                           f"{score.total} = {score.acc_norm:.4f}")
                    log(step, hellaswag_acc_norm=score.acc_norm, hellaswag_acc=score.acc)
                if run_core:
                    core = eval_core.evaluate(eval_model, core_tasks, device,
                                              precision=precision, rank=env.rank,
                                              world_size=env.world_size)
                    print0(f"step {step:6d} | CORE {core.core:.4f} ({len(core_tasks)} tasks, "
                           f"at most {config.core_limit} examples each)")
                    log(step, core_metric=core.core, core_results=core.results)
                if run_samples and env.is_main:
                    texts = sample.generate_text(
                        eval_model, prompt_tokens, new_tokens, config.num_samples,
                        seed=config.seed, device=device, precision=precision)
                    print(f"step {step:6d} | samples:", *(f"> {t}" for t in texts), sep="\n",
                          flush=True)
                    log(step, samples=texts)
            if step == config.max_steps:
                return 0

            # ------------------------------------------------------------------ step
            t0 = time.perf_counter()
            # One schedule for every group: a multiplier of its peak rate (initial_lr).
            multiplier = lr_multiplier(step, config.final_lr_frac, config.warmup_steps,
                                       config.max_steps, config.cooldown)
            momentum = optim.muon_momentum(step, config.max_steps, warmdown_steps)
            optim.set_lr_multiplier(optimizer, multiplier)
            optim.set_muon_momentum(optimizer, momentum)
            lr = optimizer.param_groups[0]["lr"]  # gpt2: AdamW's; modern: the embedding's
            result = train_step(train_model, optimizer, scaler, loader.next_batch, grad_accum,
                                precision, device, config.grad_clip)
            # One all_reduce and one read back, once the whole step is queued: the mean loss
            # over ranks and whether any rank was asked to stop.
            loss_and_stop = torch.stack([result.loss.float(),
                                         torch.tensor(float(stop.requested), device=device)])
            if env.is_distributed:
                torch.distributed.all_reduce(loss_and_stop)
            loss_sum, stops, grad_norm = torch.cat(
                [loss_and_stop, result.grad_norm.float()[None]]).tolist()
            loss, stop_requested = loss_sum / env.world_size, stops > 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if step == start_step and config.compile:
                print0(f"first step, with the one-time torch.compile: {dt:.1f} s")
            # Without a GradScaler to skip such a step, a non-finite gradient norm means the
            # clipped update was zero or NaN: nothing more would be learned.
            problem = None
            if not math.isfinite(loss):
                problem = f"loss is {loss}"
            elif not scaler.is_enabled() and not math.isfinite(grad_norm):
                problem = f"gradient norm is {grad_norm}"
            if problem is not None:
                print(f"error: {problem} at step {step}; stopping. Last good checkpoint: "
                      f"{last_checkpoint or 'none'}", file=sys.stderr, flush=True)
                return 1

            # ------------------------------------------------------------------- log
            skipped += result.skipped
            tok_per_s = config.total_batch_size / dt
            mfu = runtime.model_flops_utilization(flops_per_token, tok_per_s, peak,
                                                  env.world_size)
            loss_scale = result.loss_scale if scaler.is_enabled() else None
            print0(format_step(step, config.max_steps, loss, lr, grad_norm, dt, tok_per_s, mfu,
                               loss_scale, skipped))
            record = dict(loss=loss, lr=lr, grad_norm=grad_norm, dt_ms=dt * 1000,
                          tok_per_s=tok_per_s, mfu=mfu, loss_scale=loss_scale,
                          skipped_steps=None if loss_scale is None else skipped)
            log(step, **{k: v for k, v in record.items() if v is not None})

            # ------------------------------------------------------------ checkpoint
            if due(config.checkpoint_interval, step + 1, config.max_steps) or stop_requested:
                last_checkpoint = checkpoint.save_training(
                    out_dir, step + 1, config, env, model, optimizer, scaler, loader, skipped,
                    argv)
                log(step + 1, checkpoint=str(last_checkpoint))
            if stop_requested:
                print0(f"stopped at step {step + 1}; continue with --resume")
                return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = runtime.detect_distributed()
    config = parse_args(argv)
    try:
        return cli.run_script(lambda: train(configure(config, argv), argv, env), config.debug)
    finally:
        runtime.destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
