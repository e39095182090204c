"""The run folder (--out-dir) that train_gpt2.py and train_jax.py write, sample.py and
eval_hellaswag.py read:

    ckpt_0000040.pt   one torch.save dict: model_config, model, optimizer, scaler, step,
                      loader_states, world_size, config, ...
    ckpt_0000040/     the same under --fsdp: torch.distributed.checkpoint shards (sharding.py
                      writes and reads them) beside train_state.pt with the rest
    log.jsonl         one JSON object per event, appended by rank 0

`ckpt_{s:07d}` holds the weights after s optimizer steps; the fixed width sorts by name.
Every file appears whole or not at all (data.atomic_output, sharding's folder rename); a
kill leaves at most a hidden temp file, which the next run in the folder removes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

import data
import runtime
import sharding
from cli import UsageError
from model import GPT, GPTConfig

LOG_NAME = "log.jsonl"
STATE_NAME = "train_state.pt"
# A checkpoint's model_config holds these; the switches beyond GPT-2 came later (default off).
GPT2_FIELDS = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd"}
GPT_FIELDS = set(GPTConfig.__dataclass_fields__)  # a --fsdp folder's non-tensor state
# What a kill can leave: a checkpoint's or the log's temp file, a --fsdp temp folder.
STALE_GLOBS = (".ckpt_*.tmp", f".{LOG_NAME}.*.tmp")


# -------------------------------------------------------------------------------- finding


def path_for(out_dir: Path, step: int, sharded: bool = False) -> Path:
    """ckpt_0000040.pt, or the folder ckpt_0000040 of a torch.distributed.checkpoint."""
    return out_dir / (f"ckpt_{step:07d}" if sharded else f"ckpt_{step:07d}.pt")


def find(out_dir: Path) -> list[Path]:
    """Both kinds, oldest first."""
    found = [p for p in out_dir.glob("ckpt_*.pt") if p.is_file()]
    found += [p for p in out_dir.glob("ckpt_*") if p.is_dir()]
    return sorted(found, key=lambda p: p.name)


def resume_point(out_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """The --resume / --overwrite policy, checked before anything is written: the checkpoint
    to continue from (None: start afresh)."""
    existing = find(out_dir) if out_dir.is_dir() else []
    if resume:
        return existing[-1] if existing else None
    if existing and not overwrite:
        raise UsageError(f"--out-dir={out_dir} already holds checkpoints (newest "
                         f"{existing[-1].name}): pass --resume to continue, --overwrite to "
                         "start again, or another --out-dir")
    return None


def open_run(out_dir: Path, resumed: Path | None, step: int) -> None:
    """Ready the folder for a run (rank 0 only): afresh, it loses its checkpoints and log;
    resumed from checkpoint `step`, its log is cut back to that step. Temp files a kill left
    go either way."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if resumed is None:
        for old in find(out_dir):
            remove(old)
        (out_dir / LOG_NAME).unlink(missing_ok=True)
    else:
        cut_log(out_dir / LOG_NAME, resumed, step)
    for pattern in STALE_GLOBS:
        for stale in out_dir.glob(pattern):
            remove(stale)


# ------------------------------------------------------------------------- saving, pruning


def save(path: Path, state: dict[str, Any]) -> None:
    """torch.save that never leaves a half-written checkpoint under `path`."""
    with data.atomic_output(path) as f:
        torch.save(state, f)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune(out_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all)."""
    if keep > 0:
        for old in find(out_dir)[:-keep]:
            remove(old)


# ---------------------------------------------------------------------------------- loading


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint of either kind as one dict, on CPU. weights_only loading runs no code
    from the file; anything that is not such a checkpoint is one ValueError naming the file.
    A --fsdp folder's shards come back gathered into full weights (its optimizer state stays
    in the folder: sharding.load_optimizer_state reads it on resume)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found; pass the path of a "
                                "ckpt_*.pt file written by train_gpt2.py")
    state = _load_file(path)
    if (not isinstance(state, dict) or not isinstance(state.get("model"), dict)
            or not isinstance(state.get("model_config"), dict)
            or not GPT2_FIELDS <= set(state["model_config"]) <= set(GPT_FIELDS)):
        raise ValueError(f"{path}: not a train_gpt2.py checkpoint (no model_config/model "
                         "entries); pass a ckpt_*.pt file")
    return state


def _load_file(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling fails in many types
        raise ValueError(f"{path}: not a readable train_gpt2.py checkpoint "
                         f"({type(exc).__name__}); pass a ckpt_*.pt file") from None


def _load_folder(path: Path) -> dict[str, Any]:
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise ValueError(f"{path}: no {STATE_NAME} (not a train_gpt2.py --fsdp "
                         "checkpoint, or one a kill left half-written)")
    state = _load_file(state_file)
    if not isinstance(state, dict) or not isinstance(state.get("model_config"), dict):
        raise ValueError(f"{state_file}: not a train_gpt2.py checkpoint (no model_config)")
    return {**state, "model": sharding.load_full_weights(path, state["model_config"])}


def loader_state_for(state: dict[str, Any], path: Path, rank: int, world_size: int,
                 batch_size: int) -> dict[str, Any]:
    """This rank's loader position in a checkpoint saved by any number of ranks. The loader's
    step counts global batches of world_size x batch_size samples, rank r taking the r-th
    slice, so another world size continues at the same sample (and the same global order)
    when that product, the global micro-batch, is unchanged."""
    saved_world = state.get("world_size", len(state["loader_states"]))
    if saved_world == world_size:
        return dict(state["loader_states"][rank])
    saved = state["loader_states"][0]
    if saved["batch_size"] * saved_world != batch_size * world_size:
        raise ValueError(f"{path}: saved by {saved_world} processes with --batch-size="
                         f"{saved['batch_size']}; with {world_size} processes resume with "
                         f"--batch-size={saved['batch_size'] * saved_world / world_size:g} so "
                         "the global micro-batch, and with it the data order, is the same")
    return {**saved, "rank": rank, "world_size": world_size, "batch_size": batch_size}


# ------------------------------------------------------------------ train_gpt2.py runs


def save_training(out_dir: Path, step: int, config: Any, env: runtime.DistEnv, model: GPT,
                  optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  loader: data.ShardLoader, skipped_steps: int, argv: list[str]) -> Path:
    """Checkpoint `step` (every rank joins: the loader states are gathered, and under --fsdp
    each rank writes its shards), then the oldest beyond --keep-checkpoints go."""
    states: list[Any] = [loader.state_dict()]
    if env.is_distributed:
        states = [None] * env.world_size
        torch.distributed.all_gather_object(states, loader.state_dict())
    # Under --fsdp the weights and optimizer state go into the sharded folder instead.
    tensors = {} if config.fsdp else {"model": model.state_dict(),
                                      "optimizer": optimizer.state_dict()}
    state = {"model_config": dataclasses.asdict(model.config), **tensors,
             "scaler": scaler.state_dict(), "skipped_steps": skipped_steps, "step": step,
             "loader_states": states, "world_size": env.world_size, "args": list(argv),
             "config": dataclasses.asdict(config)}
    path = path_for(out_dir, step, sharded=config.fsdp)
    if config.fsdp:
        sharding.save_checkpoint(path, model, optimizer, state, env)
    elif env.is_main:
        save(path, state)
    if env.is_main:
        prune(out_dir, config.keep_checkpoints)
        print(f"saved {path}", flush=True)
    return path


def restore_training(state: dict[str, Any], path: Path, fsdp: bool, env: runtime.DistEnv,
                     model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     loader: data.ShardLoader) -> tuple[int, int]:
    """Optimizer, loss scaler and loader position of the checkpoint the model was built from
    (its weights are the model's already); returns (step, skipped steps)."""
    sharded = path.is_dir()  # its optimizer state is read from the folder below
    wanted = ("scaler", "loader_states", "step") + (() if sharded else ("optimizer",))
    missing = [k for k in wanted if k not in state]
    if missing:
        raise RuntimeError(f"{path}: no {', '.join(missing)} to resume from (written by "
                           "another trainer?); start a new --out-dir with --init-from=PATH")
    loader_state = loader_state_for(state, path, env.rank, env.world_size, loader.batch_size)
    if sharded:
        sharding.load_optimizer_state(path, model, optimizer)
    elif fsdp:
        raise RuntimeError(f"{path}: a .pt checkpoint cannot resume under --fsdp yet; "
                           "resume it without --fsdp")
    else:
        optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    try:
        loader.load_state_dict(loader_state)
    except ValueError as exc:
        raise RuntimeError(f"{path}: {exc}") from None
    return int(state["step"]), int(state.get("skipped_steps", 0))


# -------------------------------------------------------------------------------------- log


def append_log(out_dir: Path, step: int, **values: Any) -> None:
    """One event in log.jsonl; a line per call, so a kill tears at most the last one."""
    with open(out_dir / LOG_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")


def cut_log(path: Path, checkpoint: Path, resume_step: int) -> None:
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
