"""--fsdp for train_gpt2.py: torch.distributed.fsdp.fully_shard, and checkpoint folders
written with torch.distributed.checkpoint (each rank its shard) that any number of ranks,
or a single process, reads back.

Reading such a folder runs no code from it. torch.distributed.checkpoint unpickles the
folder's `.metadata` with plain pickle and its byte items (the optimizer's param_groups)
with torch.load(weights_only=False); here the metadata goes through an unpickler that
admits only the types torch.distributed.checkpoint writes, and byte items through
torch.load(weights_only=True). The folder's checksums (checkpoint.py) guard integrity,
not trust: whoever writes a folder can write its checksums too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import data
import runtime


def shard_model(model: Any, precision: runtime.Precision, device: torch.device) -> None:
    """Each block of `model` (GPT-2's or the modern one: both keep theirs in transformer.h)
    its own FSDP unit, so only one block's full weights exist at a time; the root unit holds
    the embeddings and the rest. bf16 compute over fp32 master weights where autocast would
    be bf16 (CUDA), else plain fp32; gradients are reduced in fp32 so the sum over ranks
    loses nothing."""
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


def full_weights_copy(model: Any, device: torch.device) -> Any:
    """A plain copy of the sharded model with its full weights, on every rank (a collective).
    Sampling runs on rank 0 alone and HellaSwag gives ranks different numbers of forward
    passes; the sharded model's forward is a collective that needs every rank in step."""
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    # The copy's own random init is overwritten; it must not move the run's RNG.
    with torch.random.fork_rng(devices=[]):
        copy = type(model)(model.config)
    copy.load_state_dict(weights)
    return copy.to(device).eval()


def write_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 env: runtime.DistEnv) -> dict[str, str]:
    """Every rank writes its shards of the weights and optimizer state into `folder`; rank 0
    gets back the sha256 of every file written there (the other ranks an empty dict)."""
    tensors = {"model": get_model_state_dict(model),
               "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(tensors, checkpoint_id=folder)  # returns on every rank once the metadata is written
    # Each rank hashes the shards it wrote (__RANK_*.distcp); rank 0 adds the metadata.
    sums: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(sums, {p.name: data.file_sha256(p)
                                               for p in folder.glob(f"__{env.rank}_*")})
    if not env.is_main:
        return {}
    sha256 = {name: digest for rank_sums in sums for name, digest in rank_sums.items()}
    return sha256 | {p.name: data.file_sha256(p) for p in folder.iterdir() if p.name not in sha256}


def load_optimizer_state(folder: Path, model: torch.nn.Module,
                         optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state of a sharded checkpoint, resharded to this run: FSDP on any number
    of ranks, DDP or a single process (the state is keyed by parameter name, not by rank)."""
    state = get_optimizer_state_dict(model, optimizer)
    _load({"optimizer": state}, folder, collective=torch.distributed.is_initialized())
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state)


def load_full_weights(folder: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A folder's model weights as one full state dict shaped as `model`'s, in a single
    process whatever number of ranks wrote it: the shards are stored by parameter name and
    offset, not by rank. checkpoint.load checked first that they are `model`'s weights."""
    weights = model.state_dict()
    _load({"model": weights}, folder, collective=False)
    return weights


# What torch.distributed.checkpoint pickles into `.metadata`, and nothing else.
_METADATA_TYPES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by name: torch.strided
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # the folder's path when it was written
    ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_TYPES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a type torch.distributed."
                                     "checkpoint writes into .metadata")


def read_metadata(folder: Path) -> dcp_metadata.Metadata:
    """The folder's `.metadata`, read without running code from it, its every storage entry a
    plain file name inside the folder. Else a ValueError naming the file."""
    path = folder / ".metadata"
    if not path.is_file():
        raise ValueError(f"{path}: missing\nhint: the checkpoint is damaged or was cut short; "
                         "pass another one")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            IndexError) as exc:
        raise ValueError(f"{path}: not the metadata torch.distributed.checkpoint writes "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(
            metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise ValueError(f"{path}: not the metadata torch.distributed.checkpoint writes")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{path}: names {name!r} as a shard file; shards lie in the "
                             "folder itself")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{path}: its shards are stored transformed "
                             f"({info.transform_descriptors}); train_gpt2.py writes them plain")
    return metadata


class _SafeReader(dcp.FileSystemReader):
    """A FileSystemReader whose metadata comes from read_metadata."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = dcp_metadata.StorageMeta(load_id=self.load_id)
        return metadata


class _WeightsOnlyPlanner(dcp.DefaultLoadPlanner):
    """Byte items through torch.load(weights_only=True); the default planner unpickles them
    with weights_only=False. What the safe load returns holds only plain values, so handing
    it on re-serialised to the default planner runs nothing either."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        plain = io.BytesIO()
        torch.save(loaded, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)


def _load(state: dict[str, Any], folder: Path, collective: bool) -> None:
    """dcp.load into `state` in place (by every rank together if `collective`) through the
    safe reader and planner, without the
    warnings it prints (that no process group is initialized, and a traceback logged before
    the exception that says the same)."""
    read_metadata(folder)  # its one-line refusal before torch's own errors
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_SafeReader(folder), planner=_WeightsOnlyPlanner(),
                     no_dist=not collective)
    finally:
        logging.disable(previous)
