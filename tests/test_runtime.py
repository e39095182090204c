"""Device, precision and distributed-environment policy."""

from __future__ import annotations

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
