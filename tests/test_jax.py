"""model_jax.py and train_jax.py against the PyTorch reference: model.py and train_gpt2.py.

The training runs use train_gpt2.py's tiny test shape (2 layers, 32 wide, 256-token vocab)
on random-token shards, and both scripts start from the same train_gpt2.py checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("jax")
pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from test_train import read_log, tiny_args, write_shards  # noqa: E402

import model_jax  # noqa: E402
import sample  # noqa: E402
import train_gpt2  # noqa: E402
import train_jax  # noqa: E402
from checkpoint import load as load_checkpoint  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STEPS = 30


def random_gpt(seed: int = 0) -> GPT:
    """A small GPT whose biases and layer norms are not at their init values either."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def torch_logits(model: GPT, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(idx).long())[0].numpy()


def jax_logits(params: model_jax.Params, n_head: int, idx: np.ndarray) -> np.ndarray:
    return np.asarray(model_jax.forward(params, jnp.asarray(idx), n_head))


# ---------------------------------------------------------------------------------- model


def test_logits_and_loss_equal_pytorch_on_the_same_weights() -> None:
    model = random_gpt()
    params = model_jax.params_from_state_dict(model.state_dict())
    assert {k: v.shape for k, v in params.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    idx = np.random.default_rng(0).integers(0, 300, (3, 64))
    reference = torch_logits(model, idx)
    np.testing.assert_allclose(jax_logits(params, 4, idx), reference, rtol=0, atol=1e-4)
    # Recomputing blocks in the backward pass changes nothing in the forward.
    remat = model_jax.forward(params, jnp.asarray(idx), 4, remat=True)
    np.testing.assert_allclose(np.asarray(remat), reference, rtol=0, atol=1e-4)
    with torch.no_grad():
        _, loss = model(torch.from_numpy(idx[:, :-1]), torch.from_numpy(idx[:, 1:]))
    jax_loss = model_jax.cross_entropy(params, jnp.asarray(idx[:, :-1]),
                                       jnp.asarray(idx[:, 1:]), 4)
    assert loss is not None and abs(float(jax_loss) - float(loss)) < 1e-5


def test_greedy_generation_matches_pytorch() -> None:
    model = random_gpt(seed=1)
    params = model_jax.params_from_state_dict(model.state_dict())
    prompt = np.random.default_rng(1).integers(0, 300, (2, 5))
    expected = model.generate(torch.from_numpy(prompt), 12, temperature=0).numpy()
    got = model_jax.generate(params, 4, prompt, 12, jax.random.key(0), temperature=0)
    np.testing.assert_array_equal(got, expected)
    drawn = model_jax.generate(params, 4, prompt, 12, jax.random.key(0), top_k=5)
    np.testing.assert_array_equal(drawn[:, :5], prompt)
    assert drawn.max() < 300


def test_hugging_face_directory_and_checkpoint_round_trips(tmp_path: Path) -> None:
    model = random_gpt(seed=2)
    idx = np.random.default_rng(2).integers(0, 300, (2, 16))
    model.save_hf(tmp_path / "hf")
    params, n_head = model_jax.from_pretrained(str(tmp_path / "hf"))
    assert n_head == 4
    np.testing.assert_allclose(jax_logits(params, n_head, idx), torch_logits(model, idx),
                               rtol=0, atol=1e-4)
    model_jax.save_checkpoint(tmp_path / "ckpt.pt", params, n_head, step=7)
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert state["model_config"] == {"block_size": 64, "vocab_size": 300, "n_layer": 2,
                                     "n_head": 4, "n_embd": 64}
    assert state["step"] == 7
    reloaded = GPT.from_checkpoint(state).eval()
    np.testing.assert_allclose(torch_logits(reloaded, idx), torch_logits(model, idx),
                               rtol=0, atol=1e-5)
    again, _ = model_jax.from_checkpoint(tmp_path / "ckpt.pt")
    assert all(np.array_equal(again[k], params[k]) for k in params)


# ------------------------------------------------------------------------------- training


def losses(log: list[dict[str, Any]]) -> dict[int, float]:
    return {event["step"]: event["loss"] for event in log if "loss" in event}


def without_timings(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    events = []
    for event in log:
        kept = {k: v for k, v in event.items() if k not in ("dt_ms", "tok_per_s", "mfu")}
        if "checkpoint" in kept:
            kept["checkpoint"] = Path(kept["checkpoint"]).name
        events.append(kept)
    return events


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train_gpt2.py and train_jax.py for 30 steps from one train_gpt2.py checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    shards = write_shards(root / "shards")
    assert train_gpt2.main(tiny_args(shards, root / "start", "--max-steps=1",
                                     "--eval-interval=0")) == 0
    start = root / "start" / "ckpt_0000001.pt"
    common = (f"--init-from={start}", f"--max-steps={STEPS}", "--checkpoint-interval=10",
              "--keep-checkpoints=0")
    assert train_gpt2.main(tiny_args(shards, root / "torch", *common)) == 0
    assert train_jax.main(tiny_args(shards, root / "jax", *common)) == 0
    return {"shards": shards, "torch": root / "torch", "jax": root / "jax", "start": start}


def test_train_jax_logs_the_losses_of_train_gpt2(runs: dict[str, Path]) -> None:
    torch_log, jax_log = read_log(runs["torch"]), read_log(runs["jax"])
    assert [sorted(e) for e in jax_log] == [sorted(e) for e in torch_log]  # same events, keys
    expected, got = losses(torch_log), losses(jax_log)
    assert sorted(got) == list(range(STEPS))
    for step in range(STEPS):
        assert abs(got[step] - expected[step]) < 1e-3, (step, got[step], expected[step])
    for mine, theirs in zip(jax_log, torch_log, strict=True):
        for key in ("lr", "val_loss", "grad_norm"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-4), key


def test_train_jax_checkpoint_samples_in_sample_py(runs: dict[str, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = runs["jax"] / f"ckpt_{STEPS:07d}.pt"
    assert sample.main([f"--checkpoint={checkpoint}", "--device=cpu", "--max-length=12",
                        "--num-samples=2", "--seed=1", "a"]) == 0  # "a" is token 64 < VOCAB
    printed = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(printed) == 2 and all(line.startswith("> a") for line in printed)


def test_resume_continues_exactly(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    shutil.copytree(runs["jax"], out)
    (out / f"ckpt_{STEPS:07d}.pt").unlink()  # the run "stopped" after its step-20 checkpoint
    args = tiny_args(runs["shards"], out, f"--max-steps={STEPS}", "--checkpoint-interval=10",
                     "--keep-checkpoints=0", "--resume")
    assert train_jax.main(args) == 0
    assert without_timings(read_log(out)) == without_timings(read_log(runs["jax"]))


def test_two_devices_take_the_same_steps_as_one(runs: dict[str, Path], tmp_path: Path) -> None:
    """Two CPU devices with micro-batch 2 each read and average what one device with 4 does."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = tiny_args(runs["shards"], tmp_path / "two", f"--init-from={runs['start']}",
                     f"--max-steps={STEPS}", "--batch-size=2", "--eval-interval=0",
                     "--checkpoint-interval=0")
    run = subprocess.run([sys.executable, str(REPO / "train_jax.py"), *args], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "x 2 devices x 2 accumulation" in run.stdout
    got, expected = losses(read_log(tmp_path / "two")), losses(read_log(runs["jax"]))
    assert sorted(got) == sorted(expected)
    assert all(abs(got[s] - expected[s]) < 1e-4 for s in expected)


def test_flags_that_do_not_apply_are_usage_errors(runs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for extra, needle in (("--compile", "--compile"), ("--dtype=fp16", "fp16"),
                          ("--batch-size=auto", "auto"), ("--hellaswag-interval=5", "HellaSwag"),
                          ("--device=mps", "mps")):
        assert train_jax.main(tiny_args(runs["shards"], tmp_path / "out", extra)) == 2
        assert needle in capsys.readouterr().err
    # Its optimizer state is PyTorch's: a train_gpt2.py run does not continue here.
    resume = tiny_args(runs["shards"], runs["torch"], "--resume", f"--max-steps={STEPS + 1}")
    assert train_jax.main(resume) == 1
    assert "train_gpt2.py checkpoint" in capsys.readouterr().err


def test_the_modern_recipe_is_refused(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    shards = write_shards(tmp_path / "shards")
    assert train_jax.main(tiny_args(shards, tmp_path / "a", "--recipe=modern")) == 2
    assert "model_jax.py is GPT-2's model" in capsys.readouterr().err
    assert train_jax.main(tiny_args(shards, tmp_path / "b", "--matrix-lr=0.1")) == 2
    assert "--matrix-lr: not used by train_jax.py" in capsys.readouterr().err


def test_every_train_gpt2_flag_is_used_or_refused_by_train_jax() -> None:
    """train_jax.py is train_gpt2.py's twin: each TrainConfig field is read by it (or by the
    train_gpt2.py functions it calls), or listed as not applicable and then refused when set,
    so no flag is accepted and silently ignored."""
    import dataclasses
    import inspect

    shared = (train_gpt2.configure, train_gpt2.validate, train_gpt2.find_data,
              train_gpt2.prepare_quickstart, train_gpt2.build_model, train_gpt2.model_config,
              train_gpt2.TrainConfig)
    source = inspect.getsource(train_jax) + "".join(inspect.getsource(f) for f in shared)
    refused = set(train_jax.NOT_APPLICABLE)
    for field in dataclasses.fields(train_gpt2.TrainConfig):
        used = f"config.{field.name}" in source or f"self.{field.name}" in source or (
            f'"{field.name}"' in inspect.getsource(train_gpt2.model_config))
        assert used or field.name in refused, f"--{field.name} is neither used nor refused"
    defaults = train_gpt2.TrainConfig()
    for name in refused:
        default = getattr(defaults, name)
        value: Any = not default if isinstance(default, bool) else "x"
        config = dataclasses.replace(defaults, **{name: value})
        with pytest.raises(train_gpt2.UsageError, match=f"--{name.replace('_', '-')}: not used"):
            train_jax.check_applicable(config)
