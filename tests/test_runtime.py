"""Device, precision and distributed-environment policy."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

import runtime


def test_cpu_and_auto_resolve_here():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and runtime._mps_available():
        expected = "mps"
    assert runtime.resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x"])
def test_unknown_device_is_a_one_line_error(name: str):
    with pytest.raises(ValueError, match=f"--device={name}") as info:
        runtime.resolve_device(name)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.resolve_device("cuda")


def test_precision_policy_on_cpu():
    cpu = torch.device("cpu")
    auto = runtime.resolve_precision(cpu)
    assert auto.autocast_dtype is None and not auto.use_grad_scaler
    bf16 = runtime.resolve_precision(cpu, "bf16")
    with bf16.autocast(cpu):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype=fp8"):
        runtime.resolve_precision(cpu, "fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precision_policy_on_cuda():
    cuda = torch.device("cuda")
    p = runtime.resolve_precision(cuda)
    if torch.cuda.get_device_capability()[0] >= 8:
        assert p.autocast_dtype == torch.bfloat16 and not p.use_grad_scaler
    else:
        assert p.autocast_dtype == torch.float16 and p.use_grad_scaler


def test_detect_distributed_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert runtime.detect_distributed() == runtime.DistEnv(0, 0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    env = runtime.detect_distributed()
    assert (env.rank, env.local_rank, env.world_size) == (3, 1, 4)
    assert env.is_distributed and not env.is_main


# ------------------------------------------------------------------- --batch-size=auto

SEQ = 8


class RoomFor(torch.nn.Module):
    """A model whose forward, like a GPU's, fails with `error` above `room` samples; within
    it, a real forward and backward of a linear layer. It records each fp32 tensor of a
    parameter's shape allocated before its forward (the room held for later state)."""

    def __init__(self, room: int, error: str) -> None:
        super().__init__()
        self.room, self.error = room, error
        self.proj = torch.nn.Linear(4, 4)
        self.tried: list[int] = []

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[None, torch.Tensor]:
        self.tried.append(idx.size(0))
        if idx.size(0) > self.room:
            raise RuntimeError(self.error)
        return None, self.proj(idx[..., None].float().expand(-1, -1, 4)).square().mean()


def search(model: torch.nn.Module, samples: int,
           monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr(runtime, "OOM_SEARCH_DEVICES", ("cpu",))
    cpu = torch.device("cpu")
    return runtime.auto_micro_batch(model, samples, SEQ, runtime.resolve_precision(cpu, "fp32"),
                                    cpu, runtime.DistEnv())


@pytest.mark.parametrize("error", [
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.21.5\n"
    "Last error:\nCuda failure 'out of memory'",
])
def test_search_takes_a_plain_out_of_memory_runtime_error_as_too_big(
        error: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory taken outside PyTorch's caching allocator fails as a plain RuntimeError."""
    model = RoomFor(room=6, error=error)
    size, chosen = search(model, 48, monkeypatch)
    assert (size, model.tried) == (6, [48, 24, 12, 6])
    assert chosen == "the largest that fits in GPU memory"
    assert all(p.grad is None for p in model.parameters())  # the trials leave nothing behind


def test_search_lets_any_other_error_through(monkeypatch: pytest.MonkeyPatch) -> None:
    model = RoomFor(room=6, error="mat1 and mat2 shapes cannot be multiplied (8x3 and 4x4)")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        search(model, 48, monkeypatch)
    assert model.tried == [48]


def test_search_holds_room_for_optimizer_state_and_accumulated_gradients(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each trial runs beside fp32 tensors of every parameter's size: AdamW's two moments
    and the gradients kept over micro-steps 2..N, which a lone forward and backward lacks."""
    model = RoomFor(room=100, error="")
    allocated: list[tuple[tuple[int, ...], torch.dtype]] = []
    real_empty = torch.empty

    def recording_empty(*shape, **kwargs):  # type: ignore[no-untyped-def]
        tensor = real_empty(*shape, **kwargs)
        if not model.tried:  # before the first forward: what the trial holds
            allocated.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    monkeypatch.setattr(torch, "empty", recording_empty)
    search(model, 16, monkeypatch)
    shapes = sorted((tuple(p.shape), torch.float32) for p in model.parameters())
    assert sorted(allocated) == sorted(3 * shapes)


def test_gpu_peaks_match_the_longest_name_and_are_dense_bf16() -> None:
    """An L40S is not an L4 (3x its peak); an H100 PCIe is not an SXM H100."""
    assert runtime.peak_flops_of("NVIDIA L40S") == 362e12
    assert runtime.peak_flops_of("NVIDIA L4") == 121e12
    assert runtime.peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert runtime.peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert runtime.peak_flops_of("NVIDIA GeForce RTX 4090") == 165e12
    assert runtime.peak_flops_of("Tesla T4") == 65e12
    assert runtime.peak_flops_of("NVIDIA B200") is None


def test_bf16_support_is_asked_of_the_named_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with an A100 as cuda:0 and a V100 as cuda:1, --device=cuda:1 gets fp16
    with loss scaling whichever device is current."""
    capability = {0: (8, 0), 1: (7, 0)}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: capability[torch.device(device).index or 0])
    v100, a100 = torch.device("cuda", 1), torch.device("cuda", 0)
    assert runtime.resolve_precision(v100).name == "fp16"
    assert runtime.resolve_precision(v100).use_grad_scaler
    assert runtime.resolve_precision(a100).name == "bf16"
    with pytest.raises(ValueError, match="--dtype=bf16: this GPU has no bf16"):
        runtime.resolve_precision(v100, "bf16")


def search_sharded(rank: int, port: int, out_dir: str) -> None:
    """One gloo rank of two: --batch-size=auto on a GPT already sharded by --fsdp, whose
    forward runs out of memory above 4 samples; writes the size and the shapes held."""
    import sharding
    from model import GPT, GPTConfig

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        precision = runtime.resolve_precision(cpu, "fp32")
        model = GPT(GPTConfig(block_size=SEQ, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
        sharding.shard_model(model, precision, cpu)

        def room_for_four(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if args[0].size(0) > 4:
                raise RuntimeError("CUDA error: out of memory")
        model.register_forward_pre_hook(room_for_four)
        held: list[list[int]] = []
        real = runtime.trial_micro_step

        def trial(*args, **kwargs):  # type: ignore[no-untyped-def]
            held.extend(list(shape) for shape in kwargs.get("held_shapes", args[-1]))
            real(*args, **kwargs)
        runtime.OOM_SEARCH_DEVICES = ("cpu",)
        runtime.trial_micro_step = trial  # type: ignore[assignment]
        size, _ = runtime.auto_micro_batch(model, 16, SEQ, precision, cpu,
                                           runtime.DistEnv(rank, rank, 2))
        full = [list(p.shape) for p in model.parameters()]
        local = [list(p.to_local().shape) for p in model.parameters()]  # type: ignore[attr-defined]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            {"size": size, "held": held[:len(held) // 3], "full": full, "local": local}))
        torch.distributed.barrier()  # no rank tears gloo down under another (test_optim.py)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_search_runs_on_the_sharded_model_and_holds_shards(tmp_path: Path) -> None:
    """Under --fsdp the search runs after sharding: the optimizer's moments are held at
    this rank's shard sizes, the accumulated gradients whole (FSDP2 keeps them unsharded
    between synced micro-steps)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(search_sharded, args=(port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found["size"] == 4
        assert found["local"] != found["full"]  # really sharded: dim 0 split over 2 ranks
        assert found["held"] == found["local"] + found["local"] + found["full"]
