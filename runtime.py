"""Device, precision, seeding and distributed-run policy shared by every script."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name}: unknown device; use auto, cuda, cuda:N, mps "
                         "or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device={name}: CUDA is not available on this machine; use "
                             "--device=cpu or --device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device={name}: only {torch.cuda.device_count()} CUDA "
                             "device(s) present")
    elif device.type == "mps":
        if not _mps_available():
            raise ValueError(f"--device={name}: MPS is not available; use --device=cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device={name}: unsupported device type; use auto, cuda, mps "
                         "or cpu")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


@dataclass(frozen=True)
class Precision:
    """How a device runs the model: autocast dtype (None = plain fp32) and loss scaling."""

    name: str
    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def resolve_precision(device: torch.device, dtype: str = "auto") -> Precision:
    """bf16 autocast where supported, fp16 + GradScaler on pre-Ampere GPUs, fp32 on CPU."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype={dtype}: choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype == "auto" and device.type == "cuda":
        dtype = "bf16" if bf16_supported(device) else "fp16"
    elif dtype == "auto":
        dtype = "bf16" if device.type == "mps" else "fp32"
    if dtype == "fp32":
        return Precision("fp32", None, False)
    if dtype == "bf16":
        if device.type == "cuda" and not bf16_supported(device):
            raise ValueError("--dtype=bf16: this GPU has no bf16 support; use --dtype=fp16")
        return Precision("bf16", torch.bfloat16, False)
    # fp16 gradients underflow without loss scaling. torch's GradScaler runs on CUDA and
    # CPU; MPS autocast in fp16 goes without it.
    return Precision("fp16", torch.float16, device.type in ("cuda", "cpu"))


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: every CPU and MPS device here, and CUDA GPUs
    from Ampere (compute capability 8) on. Asked of `device` itself, not of the current
    CUDA device, which a single-process --device=cuda:N run never changes."""
    if device.type != "cuda":
        return True
    if torch.version.hip is not None:  # every ROCm GPU torch supports has bf16
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def make_grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is a no-op unless fp16 needs it."""
    return torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on CUDA: ~free speed, fp32 accumulate."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_distributed() -> DistEnv:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    try:
        return DistEnv(rank=int(os.environ["RANK"]),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                       world_size=int(os.environ["WORLD_SIZE"]))
    except ValueError:
        raise ValueError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (set by "
                         "torchrun)") from None


def distributed_device(env: DistEnv, device: torch.device) -> torch.device:
    """Under torchrun each process drives the GPU of its LOCAL_RANK."""
    if env.is_distributed and device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """Join the process group: NCCL for CUDA, gloo otherwise."""
    if not env.is_distributed or torch.distributed.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                         rank=env.rank, world_size=env.world_size)


def destroy_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed(env: DistEnv, device: torch.device) -> Iterator[None]:
    init_distributed(env, device)
    try:
        yield
    finally:
        destroy_distributed()


# ------------------------------------------------------------------- --batch-size=auto

# Where running out of memory cannot be caught (CPU, MPS: the process is killed or the
# system swaps): a micro-batch that fits any machine these scripts run on.
DEFAULT_AUTO_MICRO_BATCH = 8
# Device types whose allocator raises torch.OutOfMemoryError, so a micro-batch can be tried.
OOM_SEARCH_DEVICES = ("cuda",)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the device ran out of memory: torch.OutOfMemoryError from the
    caching allocator, or a plain RuntimeError from memory taken outside it (cuBLAS's handle:
    CUBLAS_STATUS_ALLOC_FAILED; NCCL's buffers; a raw "CUDA error: out of memory")."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(
        words in str(exc) for words in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                                        "can't allocate memory"))  # the last: CPU's allocator


def release_device_memory(device: torch.device) -> None:
    """Hand the blocks PyTorch caches on `device` back to the driver (after the trials, for
    NCCL, cuBLAS and the compiled step, which allocate outside the cache)."""
    gc.collect()  # a failed trial's traceback can keep its tensors alive through a cycle
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trial_micro_step(model: torch.nn.Module, batch_size: int, seq_len: int,
                     precision: Precision, device: torch.device,
                     held_shapes: Sequence[torch.Size] = ()) -> None:
    """Forward and backward of one micro-batch, leaving no gradient, optimizer or RNG state
    behind. The tokens are all zero: a step's cost does not depend on their values. An fp32
    tensor of each of `held_shapes` stays allocated through the trial: the state a real step
    keeps beside its activations."""
    release_device_memory(device)  # the blocks a failed larger trial left cached
    held: list[torch.Tensor] = []
    try:
        # Inside the try: if even these do not fit, that is this trial's out-of-memory.
        held = [torch.empty(shape, dtype=torch.float32, device=device) for shape in held_shapes]
        idx = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        with precision.autocast(device):
            _, loss = model(idx, idx)
        loss.backward()
    finally:
        del held
        model.zero_grad(set_to_none=True)


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: its shard under --fsdp (a DTensor), else itself."""
    to_local = getattr(param, "to_local", None)
    return to_local() if callable(to_local) else param


def auto_micro_batch(model: torch.nn.Module, samples: int, seq_len: int, precision: Precision,
                     device: torch.device, env: DistEnv) -> tuple[int, str]:
    """--batch-size=auto for `samples` per rank and step, and how it was chosen. On a GPU:
    the largest that fits, trying `samples`, then halving, each size a divisor of `samples`
    so that gradient accumulation makes up exactly the total batch. The trials run the eager
    model, the already sharded one under --fsdp (every rank tries the same sizes in step,
    since its collectives run inside the trial)."""
    if device.type not in OOM_SEARCH_DEVICES:
        size = max(d for d in range(1, DEFAULT_AUTO_MICRO_BATCH + 1) if samples % d == 0)
        return size, f"the default on {device.type}"
    local = [_local(p).shape for p in model.parameters()]
    full = [p.shape for p in model.parameters()]  # a DTensor's shape is the whole parameter's
    sharded = local != full
    # State a real step keeps that the trial would not: AdamW's two moments (shards under
    # --fsdp); the gradients accumulated over micro-steps 1..N-1, there through the forward
    # of the next (whole: FSDP2 keeps them unsharded while gradient sync is off); and under
    # DDP its gradient buckets.
    held_shapes = [*local, *local, *full, *(full if env.is_distributed and not sharded else [])]
    size = samples
    while size > 0:
        try:
            trial_micro_step(model, size, seq_len, precision, device, held_shapes)
            break
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(exc):
                raise
        # Out of the except block: the exception no longer holds the trial's frames.
        size = max((d for d in range(1, size // 2 + 1) if samples % d == 0), default=0)
    release_device_memory(device)  # before NCCL's first collective and the first real step
    if env.is_distributed:  # every rank takes the smallest size any rank found
        packed = torch.tensor(size, device=device)
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MIN)
        size = int(packed)
    if size == 0:
        raise RuntimeError(f"--batch-size=auto: not even 1 x {seq_len} tokens fit in {device} "
                           "memory\nhint: try --activation-checkpointing, a shorter --seq-len "
                           "or a smaller --model")
    return size, "the largest that fits in GPU memory" + (" on every rank"
                                                          if env.is_distributed else "")


def time_micro_step(model: torch.nn.Module, batch_size: int, seq_len: int,
                    precision: Precision, device: torch.device) -> float:
    """Seconds of one forward and backward of a micro-batch on this machine, now."""
    for _ in range(2):  # the first call pays one-time allocations; the second is timed
        synchronize(device)
        start = time.perf_counter()
        trial_micro_step(model, batch_size, seq_len, precision, device)
        synchronize(device)  # a GPU's kernels are only queued when the call returns
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait until `device` has run all the work queued so far (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ------------------------------------------------------------------------------ MFU peaks

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' spec sheets; a
# device name is matched against the longest key it contains ("L40S" before "L4").
GPU_BF16_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L4": 121e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores; V100 has no bf16
    "T4": 65e12,  # fp16 tensor cores
}


def gpu_peak_flops(device: torch.device) -> float | None:
    """bf16 (or fp16 on pre-Ampere) peak of the GPU `device`, or None if unknown."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(gpu_name: str) -> float | None:
    """The table's peak for a GPU's name as its driver reports it, or None if unknown."""
    keys = sorted((key for key in GPU_BF16_PEAK_FLOPS if key in gpu_name), key=len)
    return GPU_BF16_PEAK_FLOPS[keys[-1]] if keys else None


def model_flops_utilization(flops_per_token: float, tok_per_s: float,
                            peak_flops: float | None, world_size: int) -> float | None:
    return None if peak_flops is None else flops_per_token * tok_per_s / (peak_flops * world_size)


class StopFlag:
    """SIGTERM/SIGINT ask a training loop to finish the current step, checkpoint and exit 0."""

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


def print0(*args: object, env: DistEnv | None = None) -> None:
    """Print from rank 0 only (of `env`, or of the torchrun job this process is in)."""
    if (env or detect_distributed()).is_main:
        print(*args, flush=True)
