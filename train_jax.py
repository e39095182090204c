"""Train GPT-2 in JAX: train_gpt2.py's recipe, flags, shards and log, with model_jax.py.

    pip install -e ".[jax]"                   # CPU; on NVIDIA GPUs add "jax[cuda12]"
    python train_jax.py --device=cuda         # 124M on prepared finewebedu, every local GPU

train_gpt2.py's, unchanged: the flags and their checks, the data (data.ShardLoader as NumPy
arrays), the LR schedule, AdamW with decay on 2-D weights, clipping, step numbering,
log.jsonl's keys, checkpoints that checkpoint.load reads (so sample.py and eval take them),
and the init (the same --seed or --init-from), so from one start both log the same losses.
Several local devices split the batch axis (jax.sharding; the gradient mean is XLA's
all-reduce), --batch-size per device as per torchrun rank. Matmuls run in bf16 on GPU
(fp32 weights, optimizer and layer norms), fp32 on CPU.

Not here: HellaSwag in training (eval_hellaswag.py --checkpoint), --batch-size=auto, fp16,
--compile, --recipe=modern (model_modern.py and its optimizer), several hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import checkpoint
import cli
import data
import model_jax
import model_modern
import runtime
import sample
from cli import UsageError
from model import GPT
from train_gpt2 import (
    TrainConfig,
    build_model,
    configure,
    due,
    find_data,
    format_step,
    lr_multiplier,
    parse_args,
)

# train_gpt2.py flags with nothing to act on here; giving one is a usage error (a test walks
# every TrainConfig field: each is used here or listed here).
NOT_APPLICABLE = {
    "compile": "JAX compiles every step function",
    "hellaswag_data": "train_jax.py runs no HellaSwag evaluation",
    "hellaswag_limit": "train_jax.py runs no HellaSwag evaluation",
    "core_interval": "train_jax.py runs no CORE evaluation",
    "core_limit": "train_jax.py runs no CORE evaluation",
    "core_bundle": "train_jax.py runs no CORE evaluation",
    "fsdp": "train_jax.py replicates the weights on its local devices",
    **{name: "model_jax.py is GPT-2's model, trained with AdamW (optax)" for name in (
        *model_modern.SWITCHES, "embedding_lr", "head_lr", "matrix_lr", "scalar_lr",
        "matrix_weight_decay", "matrix_optimizer")},
    "wandb_project": "train_jax.py writes log.jsonl only",
    "wandb_run_name": "train_jax.py writes log.jsonl only",
}
SAMPLE_TOP_K = 50  # sample.py's default
say = functools.partial(print, flush=True)


def check_applicable(config: TrainConfig) -> None:
    for name, reason in NOT_APPLICABLE.items():
        if getattr(config, name) != getattr(TrainConfig(), name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: not used by train_jax.py ({reason}); drop it")
    if config.recipe == "modern":
        raise UsageError("--recipe=modern: model_jax.py is GPT-2's model\nhint: train the "
                         "modern model with train_gpt2.py")
    if config.hellaswag_interval:
        raise UsageError("--hellaswag-interval: train_jax.py runs no HellaSwag evaluation\n"
                         "hint: pass 0, and run eval_hellaswag.py --checkpoint=CKPT on a "
                         "checkpoint")
    if config.batch_size == "auto":
        raise UsageError("--batch-size=auto: train_jax.py needs a number\nhint: the search "
                         "for the largest micro-batch is train_gpt2.py's")
    if config.dtype == "fp16":
        raise UsageError("--dtype=fp16: train_jax.py has no loss scaling\nhint: pass "
                         "--dtype=bf16 or fp32")


def resolve_devices(name: str) -> list[jax.Device]:
    """auto: every local device of the default backend; cuda: every GPU; cuda:N; cpu."""
    if name == "auto":
        return jax.local_devices()
    kind, _, index = name.partition(":")
    backend = {"cpu": "cpu", "cuda": "gpu"}.get(kind)
    if backend is None or (index and not index.isdigit()):
        raise UsageError(f"--device={name}: train_jax.py runs on auto, cpu, cuda or cuda:N")
    try:
        devices = jax.local_devices(backend=backend)
    except RuntimeError:
        raise UsageError(f"--device={name}: JAX has no {backend} backend here\nhint: install "
                         "jax[cuda12] for NVIDIA GPUs, or pass --device=cpu") from None
    if index and int(index) >= len(devices):
        raise UsageError(f"--device={name}: only {len(devices)} device(s) present")
    return [devices[int(index)]] if index else devices


# --------------------------------------------------- the step, evaluations and checkpoints


def build_optimizer(config: TrainConfig, params: model_jax.Params) -> optax.GradientTransformation:
    """torch.optim.AdamW as train_gpt2.py configures it: decay on the 2-D weights only. The
    learning rate is a hyperparameter in the state, set at every step from lr_multiplier."""
    decay = {key: value.ndim >= 2 for key, value in params.items()}
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=config.max_lr, b1=config.beta1, b2=config.beta2, eps=config.adam_eps,
        weight_decay=config.weight_decay, mask=decay)


def make_train_step(optimizer: optax.GradientTransformation, n_head: int, dtype: Any,
                    grad_accum: int, grad_clip: float, remat: bool) -> jax.stages.Wrapped:
    """(params, opt_state, xs, ys, lr) -> (params, opt_state, mean loss, grad norm): one
    update from `grad_accum` stacked micro-batches xs, ys (grad_accum, B, T)."""
    loss_and_grad = jax.value_and_grad(
        lambda params, x, y: model_jax.cross_entropy(params, x, y, n_head, dtype, remat))

    def step(params: model_jax.Params, opt_state: Any, xs: jax.Array, ys: jax.Array,
             lr: np.float32) -> tuple[model_jax.Params, Any, jax.Array, jax.Array]:
        def add(carry: tuple[jax.Array, model_jax.Params], batch: tuple[jax.Array, jax.Array]
                ) -> tuple[tuple[jax.Array, model_jax.Params], None]:
            loss, grads = loss_and_grad(params, *batch)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

        start = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, grad_sum), _ = jax.lax.scan(add, start, (xs, ys))
        grads = jax.tree.map(lambda g: g / grad_accum, grad_sum)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        # torch.nn.utils.clip_grad_norm_'s factor, epsilon included: both scripts step alike.
        if grad_clip > 0:
            factor = jnp.minimum(1.0, grad_clip / (norm + 1e-6))
            grads = jax.tree.map(lambda g: g * factor, grads)
        opt_state.hyperparams["learning_rate"] = lr
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss_sum / grad_accum, norm

    return jax.jit(step, donate_argnums=(0, 1))


def on_devices(array: np.ndarray, mesh: Mesh, *spec: str | None) -> jax.Array:
    """Token ids as int32 on the devices, split along the axis named "data"."""
    return jax.device_put(array.astype(np.int32), NamedSharding(mesh, PartitionSpec(*spec)))


def val_loss(params: model_jax.Params, n_head: int, dtype: Any, loader: data.ShardLoader,
             steps: int, mesh: Mesh) -> float:
    """Mean loss over the first `steps` val batches (the same ones every time)."""
    loader.reset()
    total = 0.0
    for _ in range(steps):
        x, y = (on_devices(array, mesh, "data") for array in loader.next_arrays())
        total += float(model_jax.cross_entropy(params, x, y, n_head, dtype))
    return total / steps


def generate_samples(config: TrainConfig, params: model_jax.Params, n_head: int) -> list[str]:
    """--num-samples continuations of --sample-prompt, top-k as sample.py draws them."""
    prompt = sample.encode_prompt(config.sample_prompt)
    block_size = params["transformer.wpe.weight"].shape[0]
    new_tokens = min(config.sample_length, block_size) - len(prompt)
    if new_tokens < 1 or config.num_samples < 1:
        return []
    tokens = model_jax.generate(params, n_head, np.array([prompt] * config.num_samples),
                                new_tokens, jax.random.key(config.seed), top_k=SAMPLE_TOP_K)
    first = 0 if config.sample_prompt else 1  # a bare <|endoftext|> start is not shown
    return [data.get_tokenizer().decode(row[first:].tolist()) for row in tokens]


def save(out_dir: Path, step: int, config: TrainConfig, argv: list[str], params: model_jax.Params,
         n_head: int, opt_state: Any, loader: data.ShardLoader, devices: int) -> Path:
    """Checkpoint `step`, then the oldest beyond --keep-checkpoints go."""
    path = checkpoint.path_for(out_dir, step)
    leaves = [torch.from_numpy(np.array(leaf)) for leaf in jax.tree.leaves(opt_state)]
    model_jax.save_checkpoint(path, params, n_head, optimizer_leaves=leaves, step=step,
                              loader_states=[loader.state_dict()], devices=devices,
                              args=list(argv), config=dataclasses.asdict(config))
    checkpoint.prune(out_dir, config.keep_checkpoints)
    say(f"saved {path}")
    return path


def restore(state: dict[str, Any], path: Path, opt_state: Any, sharding: NamedSharding,
            loader: data.ShardLoader) -> tuple[Any, int]:
    """(optimizer state, step) of the weights' checkpoint; the loader goes back to its place."""
    leaves = state.get("optimizer_leaves")
    if missing := [key for key in ("step", "loader_states") if key not in state]:
        raise RuntimeError(f"{path}: no {', '.join(missing)} to resume from\nhint: start a "
                           f"new --out-dir with --init-from={path}")
    if leaves is None:
        raise RuntimeError(f"{path}: a train_gpt2.py checkpoint, whose PyTorch optimizer "
                           "state train_jax.py cannot continue\nhint: resume it with "
                           f"train_gpt2.py, or start from its weights with --init-from={path}")
    restored = model_jax.optimizer_state(leaves, opt_state, path)
    try:
        loader.load_state_dict(state["loader_states"][0])
    except ValueError as exc:
        raise RuntimeError(f"{path}: {exc}") from None
    return jax.device_put(restored, sharding), int(state["step"])


# ------------------------------------------------------------------------------ the recipe


def train(config: TrainConfig, argv: list[str]) -> int:
    """Setup, top to bottom, then the loop, as train_gpt2.train runs them."""
    config = configure(config, argv)
    check_applicable(config)
    devices = resolve_devices(config.device)
    bf16 = config.dtype == "bf16" or (config.dtype == "auto" and devices[0].platform == "gpu")
    dtype = jnp.bfloat16 if bf16 else jnp.float32  # of the matmuls
    grad_accum = config.grad_accum(len(devices))
    out_dir = Path(config.out_dir).expanduser()
    with checkpoint.hold(out_dir, runtime.DistEnv()):  # before the first write, to the exit
        resume_path = checkpoint.resume_point(out_dir, config.resume, config.overwrite)
        if config.resume and resume_path is None:
            say(f"--resume: no checkpoint in {out_dir}; starting from scratch")
        resume = checkpoint.load(resume_path) if resume_path else {}
        train_files, val_files, source = find_data(config, runtime.DistEnv())

        torch.manual_seed(config.seed)  # train_gpt2.py's init for the same seed
        start = build_model(config, resume, resume_path)
        if not isinstance(start, GPT):  # --init-from a modern model's checkpoint
            raise UsageError(f"--init-from={config.init_from}: a modern model's checkpoint; "
                             "model_jax.py is GPT-2's architecture\nhint: pass a checkpoint of "
                             "--recipe=gpt2")
        n_head = start.config.n_head
        mesh = Mesh(np.array(devices), ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        params = jax.device_put(model_jax.params_from_state_dict(start.state_dict()), replicated)
        optimizer = build_optimizer(config, params)
        opt_state = jax.device_put(optimizer.init(params), replicated)
        train_step = make_train_step(optimizer, n_head, dtype, grad_accum, config.grad_clip,
                                     config.activation_checkpointing)
        # One loader feeds all local devices: the samples that as many torchrun ranks would take.
        make_loader = functools.partial(
            data.ShardLoader, batch_size=config.micro_batch * len(devices), seq_len=config.seq_len,
            seed=config.seed, backend=config.loader_backend,
            vocab_size=min(start.config.vocab_size, 2**16))
        with (make_loader(train_files, shuffle=config.shuffle) as loader,
              make_loader(val_files, shuffle=False) as val_loader):
            start_step = 0
            if resume_path is not None:
                opt_state, start_step = restore(resume, resume_path, opt_state, replicated, loader)
                say(f"resumed from {resume_path} at step {start_step}")
            checkpoint.open_run(out_dir, resume_path, start_step)
            say(f"data: {source} ({len(train_files)} train, {len(val_files)} val shards)")
            say(f"model: {start.config} ({start.num_params() / 1e6:.1f}M parameters), JAX on "
                f"{len(devices)} x {devices[0].device_kind}, {jnp.dtype(dtype).name} matmuls")
            say(f"batch: {config.micro_batch} x {config.seq_len} tokens x {len(devices)} devices x "
                f"{grad_accum} accumulation = {config.total_batch_size} tokens per step")
            flops_per_token = start.flops_per_token(config.seq_len)
            del start  # the torch copy of the weights is not needed any more
            return training_loop(
                config=config, mesh=mesh, n_head=n_head, dtype=dtype, params=params,
                opt_state=opt_state, train_step=train_step, loader=loader, val_loader=val_loader,
                grad_accum=grad_accum, out_dir=out_dir, argv=argv, start_step=start_step,
                last_checkpoint=resume_path, flops_per_token=flops_per_token)


def training_loop(*, config: TrainConfig, mesh: Mesh, n_head: int, dtype: Any,
                  params: model_jax.Params, opt_state: Any, train_step: jax.stages.Wrapped,
                  loader: data.ShardLoader, val_loader: data.ShardLoader, grad_accum: int,
                  out_dir: Path, argv: list[str], start_step: int, last_checkpoint: Path | None,
                  flops_per_token: float) -> int:
    """Each iteration: the evaluations due at `step`, then (unless it is the last) one
    optimizer step, its log line, and the checkpoint when due or asked for by a signal."""
    log = functools.partial(checkpoint.append_log, out_dir)
    # configure() resolved it from --eval-interval.
    assert config.sample_interval is not None
    if start_step >= config.max_steps:
        say(f"already trained to step {start_step} (--max-steps={config.max_steps})")
        return 0
    device = mesh.devices.flat[0]
    peak = runtime.peak_flops_of(device.device_kind) if device.platform == "gpu" else None
    with runtime.StopFlag().installed() as stop:
        for step in range(start_step, config.max_steps + 1):
            if due(config.eval_interval, step, config.max_steps):
                val = val_loss(params, n_head, dtype, val_loader, config.val_steps, mesh)
                say(f"step {step:6d} | val loss {val:.4f}")
                log(step, val_loss=val)
            # Samples from the untrained weights at step 0 would only show noise.
            if step > 0 and due(config.sample_interval, step, config.max_steps):
                texts = generate_samples(config, params, n_head)
                if texts:
                    say(f"step {step:6d} | samples:", *(f"> {t}" for t in texts), sep="\n")
                    log(step, samples=texts)
            if step == config.max_steps:
                return 0

            t0 = time.perf_counter()
            lr = config.max_lr * lr_multiplier(step, config.final_lr_frac, config.warmup_steps,
                                               config.max_steps, config.cooldown)
            batches = [loader.next_arrays() for _ in range(grad_accum)]
            xs = on_devices(np.stack([x for x, _ in batches]), mesh, None, "data")
            ys = on_devices(np.stack([y for _, y in batches]), mesh, None, "data")
            params, opt_state, *metrics = train_step(params, opt_state, xs, ys, np.float32(lr))
            loss, norm = map(float, metrics)  # float() waits for the devices
            dt = time.perf_counter() - t0
            if step == start_step:
                say(f"first step, with the one-time compilation: {dt:.1f} s")
            if not math.isfinite(loss):
                print(f"error: loss is {loss} at step {step}; stopping. Last good checkpoint: "
                      f"{last_checkpoint or 'none'}", file=sys.stderr, flush=True)
                return 1
            tok_per_s = config.total_batch_size / dt
            mfu = runtime.model_flops_utilization(flops_per_token, tok_per_s, peak, mesh.size)
            say(format_step(step, config.max_steps, loss, lr, norm, dt, tok_per_s, mfu))
            log(step, loss=loss, lr=lr, grad_norm=norm, dt_ms=dt * 1000, tok_per_s=tok_per_s,
                **({} if mfu is None else {"mfu": mfu}))

            stopping = stop.requested  # read once: a signal after this waits for the next step
            if due(config.checkpoint_interval, step + 1, config.max_steps) or stopping:
                last_checkpoint = save(out_dir, step + 1, config, argv, params, n_head,
                                       opt_state, loader, mesh.size)
                log(step + 1, checkpoint=str(last_checkpoint))
            if stopping:
                say(f"stopped at step {step + 1}; continue with --resume")
                return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(argv, f"Train GPT-2 in JAX on token shards, with train_gpt2.py's flags "
                        f"(not used here: --{', --'.join(NOT_APPLICABLE).replace('_', '-')}, "
                        "--batch-size=auto, --dtype=fp16, --hellaswag-interval above 0).")
    return cli.run_script(lambda: train(config, argv), config.debug)


if __name__ == "__main__":
    sys.exit(main())
