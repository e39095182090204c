"""--fsdp for train_gpt2.py: torch.distributed.fsdp.fully_shard, and checkpoint folders
written with torch.distributed.checkpoint (each rank its shard) that any number of ranks,
or a single process, reads back (checkpoint.load gathers them into full weights)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import checkpoint
import runtime
from model import GPT, GPTConfig


def shard_model(model: GPT, precision: runtime.Precision, device: torch.device) -> None:
    """Each block its own FSDP unit, so only one block's full weights exist at a time; the
    root unit holds the embeddings (tied to the output head) and the final norm. bf16 compute
    over fp32 master weights where autocast would be bf16 (CUDA), else plain fp32; gradients
    are reduced in fp32 so the sum over ranks loses nothing."""
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and precision.autocast_dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients only when `enabled` (the last micro-step of gradient accumulation);
    the other micro-steps accumulate locally, under DDP and FSDP alike."""
    inner = getattr(model, "_orig_mod", model)  # under torch.compile
    if isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ over DTensor gradients returns a DTensor; the norm over all shards,
    as a plain tensor on the device."""
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if full_tensor is not None else norm


def full_weights_copy(model: GPT, device: torch.device) -> GPT:
    """A plain GPT with the sharded model's full weights, on every rank (a collective).
    Sampling runs on rank 0 alone and HellaSwag gives ranks different numbers of forward
    passes; the sharded model's forward is a collective that needs every rank in step."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    # The copy's own random init is overwritten; it must not move the run's RNG.
    with torch.random.fork_rng(devices=[]):
        copy = GPT(model.config)
    copy.load_state_dict(weights)
    return copy.to(device).eval()


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict[str, Any], env: runtime.DistEnv) -> None:
    """Every rank writes its shards into a temp folder; rank 0 adds the non-tensor state and
    renames the folder into place, so `path` appears only once complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    torch.distributed.barrier()
    tensors = {"model": get_model_state_dict(model),
               "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(tensors, checkpoint_id=tmp)  # returns on every rank once the metadata is written
    # Each rank's checksums of the shards it wrote (__RANK_*.distcp); rank 0 adds the rest.
    sums: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(sums, {p.name: checkpoint.file_sha256(p)
                                               for p in tmp.glob(f"__{env.rank}_*")})
    if env.is_main:
        sha256 = {name: digest for rank_sums in sums for name, digest in rank_sums.items()}
        sha256 |= {p.name: checkpoint.file_sha256(p) for p in tmp.iterdir()
                   if p.name not in sha256}
        checkpoint.save(tmp / checkpoint.STATE_NAME, {**train_state, "sha256": sha256})
        replace_folder(tmp, path)
    torch.distributed.barrier()


def replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target`; an older `target` (a run resumed from an earlier step
    saves the same step again) is moved aside first, as a rename cannot replace a folder."""
    if target.exists():
        old = target.with_name(f".{target.name}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def load_optimizer_state(path: Path, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state of a sharded checkpoint, resharded to this run: FSDP on any number
    of ranks, DDP or a single process (the state is keyed by parameter name, not by rank).
    checkpoint.load(path), where the resumed state came from, checked the files' checksums."""
    state = get_optimizer_state_dict(model, optimizer)
    with reading(path, "optimizer state"):
        dcp.load({"optimizer": state}, checkpoint_id=path,
                 no_dist=not torch.distributed.is_initialized())
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state)


def load_full_weights(path: Path, model_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A folder's model weights as one full state dict, in a single process whatever number
    of ranks wrote it: the shards are stored by parameter name and offset, not by rank."""
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG
        weights = GPT(GPTConfig(**model_config)).state_dict()
    with reading(path, "shards"):
        dcp.load({"model": weights}, checkpoint_id=path, no_dist=True)
    return weights


@contextlib.contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """dcp.load of `what` in the folder `path`: what it raises as one line naming the folder
    (checkpoint.reading), without its warnings (that no process group is initialized, and a
    traceback logged when it cannot read the metadata, before the exception that says so)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), checkpoint.reading(path, what):
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logging.disable(previous)
