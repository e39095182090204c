"""Train GPT-2 in JAX: train_gpt2.py's recipe, flags, shards and log, with model_jax.py.

    pip install -e ".[jax]"                   # CPU; on NVIDIA GPUs add "jax[cuda12]"
    python train_jax.py --device=cuda         # 124M on prepared finewebedu, every local GPU

What is train_gpt2.py's, unchanged: the flags and their checks (TrainConfig), the data
(data.ShardLoader, as NumPy arrays), the LR schedule, AdamW with weight decay on 2-D
weights, gradient clipping, the step numbering, log.jsonl's keys, and checkpoints that
checkpoint.load reads, so sample.py and eval_hellaswag.py take them. The weights start
where train_gpt2.py's would (its init for the same --seed, or --init-from), so from the same
start both scripts log the same losses.

Data parallel: with several local devices the batch axis is split over them (jax.sharding)
and the gradient mean is XLA's all-reduce. --batch-size is per device, as it is per rank
under torchrun, and the devices together read exactly what as many torchrun ranks would.
The matmuls run in bf16 on GPU (fp32 weights, optimizer and layer norms), fp32 on CPU.

Not here: HellaSwag during training (run eval_hellaswag.py --checkpoint on a checkpoint),
--batch-size=auto, fp16, --compile (JAX compiles every step), several hosts. --resume takes
train_jax.py checkpoints only: a train_gpt2.py one holds PyTorch's optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
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
import runtime
from cli import UsageError
from train_gpt2 import (
    TrainConfig,
    build_model,
    configure,
    due,
    find_data,
    format_step,
    get_lr,
    parse_args,
)

# train_gpt2.py flags with nothing to act on here; giving one is a usage error.
NOT_APPLICABLE = {
    "compile": "JAX compiles every step function",
    "hellaswag_data": "train_jax.py runs no HellaSwag evaluation",
    "hellaswag_limit": "train_jax.py runs no HellaSwag evaluation",
    "fsdp": "train_jax.py replicates the weights on its local devices",
}
SAMPLE_TOP_K = 50  # sample.py's default

StepFn = Callable[[model_jax.Params, Any, jax.Array, jax.Array, np.float32],
                  tuple[model_jax.Params, Any, jax.Array, jax.Array]]


# ---------------------------------------------------------------------------- arguments


def check_applicable(config: TrainConfig) -> None:
    for name, reason in NOT_APPLICABLE.items():
        if getattr(config, name) != getattr(TrainConfig(), name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: not used by train_jax.py ({reason}); drop it")
    if config.hellaswag_interval:
        raise UsageError("--hellaswag-interval: train_jax.py runs no HellaSwag evaluation; "
                         "pass 0, and run eval_hellaswag.py --checkpoint=CKPT on a checkpoint")
    if config.batch_size == "auto":
        raise UsageError("--batch-size=auto: train_jax.py needs a number (the search for the "
                         "largest micro-batch is train_gpt2.py's)")


def resolve_devices(name: str) -> list[jax.Device]:
    """--device as JAX devices: every local device of the default backend (auto) or of the
    GPUs (cuda), one GPU (cuda:N), or the CPU."""
    if name == "auto":
        return jax.local_devices()
    kind, _, index = name.partition(":")
    backend = {"cpu": "cpu", "cuda": "gpu"}.get(kind)
    if backend is None or (index and not index.isdigit()):
        raise UsageError(f"--device={name}: train_jax.py runs on auto, cpu, cuda or cuda:N")
    try:
        devices = jax.local_devices(backend=backend)
    except RuntimeError:
        raise UsageError(f"--device={name}: JAX has no {backend} backend here; install "
                         "jax[cuda12] for NVIDIA GPUs, or pass --device=cpu") from None
    if index:
        if int(index) >= len(devices):
            raise UsageError(f"--device={name}: only {len(devices)} device(s) present")
        return [devices[int(index)]]
    return devices


def compute_dtype(name: str, platform: str) -> Any:
    """The matmul dtype: bf16 on GPU for auto, else fp32."""
    if name == "auto":
        name = "bf16" if platform == "gpu" else "fp32"
    if name == "fp16":
        raise UsageError("--dtype=fp16: train_jax.py has no loss scaling; pass --dtype=bf16 "
                         "or fp32")
    return jnp.bfloat16 if name == "bf16" else jnp.float32


def peak_flops(device: jax.Device) -> float | None:
    """The bf16 peak of a GPU from runtime's table, by name; None elsewhere."""
    if device.platform != "gpu":
        return None
    return next((flops for key, flops in runtime.GPU_BF16_PEAK_FLOPS.items()
                 if key in device.device_kind), None)


# ------------------------------------------------------------------------------ the step


def build_optimizer(config: TrainConfig, params: model_jax.Params
                    ) -> optax.GradientTransformation:
    """torch.optim.AdamW as train_gpt2.py configures it: decay on the 2-D weights only. The
    learning rate is a hyperparameter in the state, set at every step from get_lr."""
    decay = {key: value.ndim >= 2 for key, value in params.items()}
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=config.max_lr, b1=config.beta1, b2=config.beta2, eps=config.adam_eps,
        weight_decay=config.weight_decay, mask=decay)


def make_train_step(optimizer: optax.GradientTransformation, n_head: int, dtype: Any,
                    grad_accum: int, grad_clip: float, remat: bool) -> StepFn:
    """(params, opt_state, xs, ys, lr) -> (params, opt_state, mean loss, grad norm): one
    update from `grad_accum` stacked micro-batches xs, ys (grad_accum, B, T)."""
    loss_and_grad = jax.value_and_grad(
        lambda params, x, y: model_jax.cross_entropy(params, x, y, n_head, dtype, remat))

    def accumulate(params: model_jax.Params, xs: jax.Array, ys: jax.Array
                   ) -> tuple[jax.Array, model_jax.Params]:
        def add(carry: tuple[jax.Array, model_jax.Params], batch: tuple[jax.Array, jax.Array]
                ) -> tuple[tuple[jax.Array, model_jax.Params], None]:
            loss, grads = loss_and_grad(params, *batch)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

        start = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, grad_sum), _ = jax.lax.scan(add, start, (xs, ys))
        return loss_sum / grad_accum, jax.tree.map(lambda g: g / grad_accum, grad_sum)

    def step(params: model_jax.Params, opt_state: Any, xs: jax.Array, ys: jax.Array,
             lr: np.float32) -> tuple[model_jax.Params, Any, jax.Array, jax.Array]:
        loss, grads = accumulate(params, xs, ys)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        if grad_clip > 0:
            # torch.nn.utils.clip_grad_norm_'s factor, epsilon included, so that both
            # scripts take the same steps.
            factor = jnp.minimum(1.0, grad_clip / (norm + 1e-6))
            grads = jax.tree.map(lambda g: g * factor, grads)
        opt_state.hyperparams["learning_rate"] = lr
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, norm

    return jax.jit(step, donate_argnums=(0, 1))


# -------------------------------------------------------------------------------- trainer


@dataclass(kw_only=True)
class JaxTrainer:
    """The run's state and the few things done with it, as train_gpt2.Trainer's."""

    config: TrainConfig
    params: model_jax.Params
    n_head: int
    dtype: Any
    opt_state: Any
    train_step: StepFn
    mesh: Mesh
    train_loader: data.ShardLoader
    val_loader: data.ShardLoader
    grad_accum: int
    out_dir: Path
    argv: list[str]
    last_checkpoint: Path | None = None

    def sharded(self, array: np.ndarray, *spec: str | None) -> jax.Array:
        """Token ids as int32 on the devices, split along the axis named "data"."""
        return jax.device_put(array.astype(np.int32),
                              NamedSharding(self.mesh, PartitionSpec(*spec)))

    def step(self, lr: float) -> tuple[float, float]:
        """One optimizer step at `lr`: (mean loss, gradient norm before clipping)."""
        pairs = [self.train_loader.next_arrays() for _ in range(self.grad_accum)]
        xs = self.sharded(np.stack([x for x, _ in pairs]), None, "data")
        ys = self.sharded(np.stack([y for _, y in pairs]), None, "data")
        self.params, self.opt_state, loss, norm = self.train_step(
            self.params, self.opt_state, xs, ys, np.float32(lr))
        return float(loss), float(norm)

    def val_loss(self) -> float:
        """Mean loss over the first --val-steps val batches (the same ones every time)."""
        self.val_loader.reset()
        total = 0.0
        for _ in range(self.config.val_steps):
            x, y = self.val_loader.next_arrays()
            total += float(model_jax.cross_entropy(self.params, self.sharded(x, "data"),
                                                   self.sharded(y, "data"), self.n_head,
                                                   self.dtype))
        return total / self.config.val_steps

    def write_log(self, step: int, **values: Any) -> None:
        checkpoint.append_log(self.out_dir, step, **values)

    def save(self, step: int) -> None:
        path = checkpoint.path_for(self.out_dir, step)
        leaves = [torch.from_numpy(np.array(leaf)) for leaf in jax.tree.leaves(self.opt_state)]
        model_jax.save_checkpoint(
            path, self.params, self.n_head, optimizer_leaves=leaves, step=step,
            loader_states=[self.train_loader.state_dict()], devices=self.mesh.size,
            args=list(self.argv), config=dataclasses.asdict(self.config))
        checkpoint.prune(self.out_dir, self.config.keep_checkpoints)
        self.last_checkpoint = path
        print(f"saved {path}", flush=True)
        self.write_log(step, checkpoint=str(path))

    def restore(self, state: dict[str, Any], path: Path) -> int:
        """Optimizer state and loader position of the checkpoint the weights came from;
        returns its step."""
        leaves = state.get("optimizer_leaves")
        if leaves is None:
            raise RuntimeError(f"{path}: a train_gpt2.py checkpoint, whose PyTorch optimizer "
                             "state train_jax.py cannot continue; resume it with train_gpt2.py, "
                             f"or start from its weights with --init-from={path}")
        expected = len(jax.tree.leaves(self.opt_state))
        if len(leaves) != expected:
            raise RuntimeError(f"{path}: optimizer state of another shape ({len(leaves)} "
                             f"arrays, expected {expected})")
        restored = jax.tree.unflatten(jax.tree.structure(self.opt_state),
                                      [leaf.numpy() for leaf in leaves])
        self.opt_state = jax.device_put(restored, NamedSharding(self.mesh, PartitionSpec()))
        try:
            self.train_loader.load_state_dict(state["loader_states"][0])
        except ValueError as exc:
            raise RuntimeError(f"{path}: {exc}") from None
        self.last_checkpoint = path
        return int(state["step"])

    def run_evals(self, step: int) -> None:
        cfg = self.config
        if due(cfg.eval_interval, step, cfg.max_steps):
            val = self.val_loss()
            print(f"step {step:6d} | val loss {val:.4f}", flush=True)
            self.write_log(step, val_loss=val)
        # Samples from the untrained weights at step 0 would only show noise.
        if step > 0 and due(cfg.sample_every, step, cfg.max_steps):
            self.print_samples(step)

    def print_samples(self, step: int) -> None:
        import sample

        cfg = self.config
        prompt = sample.encode_prompt(cfg.sample_prompt)
        block_size = self.params["transformer.wpe.weight"].shape[0]
        new_tokens = min(cfg.sample_length, block_size) - len(prompt)
        if new_tokens < 1 or cfg.num_samples < 1:
            return
        tokens = model_jax.generate(self.params, self.n_head,
                                    np.array([prompt] * cfg.num_samples), new_tokens,
                                    jax.random.key(cfg.seed), top_k=SAMPLE_TOP_K)
        first = 0 if cfg.sample_prompt else 1  # a bare <|endoftext|> start is not shown
        texts = [data.get_tokenizer().decode(row[first:].tolist()) for row in tokens]
        print(f"step {step:6d} | samples:", flush=True)
        for text in texts:
            print(f"> {text}", flush=True)
        self.write_log(step, samples=texts)


# ----------------------------------------------------------------------------------- main


def make_loader(files: list[Path], config: TrainConfig, devices: int, shuffle: bool,
                vocab_size: int) -> data.ShardLoader:
    """One loader for all local devices: its batch is their micro-batches side by side,
    the same samples that as many torchrun ranks would take."""
    return data.ShardLoader([str(f) for f in files], config.micro_batch * devices,
                            config.seq_len, shuffle=shuffle, seed=config.seed,
                            backend=config.loader_backend, vocab_size=vocab_size)


def train(config: TrainConfig, argv: list[str]) -> int:
    """The recipe, top to bottom, as train_gpt2.train runs it."""
    say: Callable[[str], None] = lambda msg: print(msg, flush=True)  # noqa: E731
    config = configure(config, argv, say)
    check_applicable(config)
    devices = resolve_devices(config.device)
    dtype = compute_dtype(config.dtype, devices[0].platform)
    grad_accum = config.grad_accum(len(devices))
    out_dir = Path(config.out_dir).expanduser()
    resume_path = checkpoint.resume_point(out_dir, config.resume, config.overwrite)
    if config.resume and resume_path is None:
        say(f"--resume: no checkpoint in {out_dir}; starting from scratch")
    resume = checkpoint.load(resume_path) if resume_path else None
    train_files, val_files, source = find_data(config, runtime.DistEnv(), say)

    torch.manual_seed(config.seed)  # train_gpt2.py's init for the same seed
    start = build_model(config, resume, resume_path)
    mesh = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(model_jax.params_from_state_dict(start.state_dict()), replicated)
    optimizer = build_optimizer(config, params)
    loader_vocab = min(start.config.vocab_size, 2**16)
    trainer = JaxTrainer(
        config=config, params=params, n_head=start.config.n_head, dtype=dtype,
        opt_state=jax.device_put(optimizer.init(params), replicated),
        train_step=make_train_step(optimizer, start.config.n_head, dtype, grad_accum,
                                   config.grad_clip, config.activation_checkpointing),
        mesh=mesh, grad_accum=grad_accum, out_dir=out_dir, argv=argv,
        train_loader=make_loader(train_files, config, len(devices), config.shuffle,
                                 loader_vocab),
        val_loader=make_loader(val_files, config, len(devices), False, loader_vocab))
    try:
        start_step = 0
        if resume is not None and resume_path is not None:
            start_step = trainer.restore(resume, resume_path)
            say(f"resumed from {resume_path} at step {start_step}")
        checkpoint.open_run(out_dir, resume_path, start_step)
        say(f"data: {source} ({len(train_files)} train, {len(val_files)} val shards)")
        say(f"model: {start.config} ({start.num_params() / 1e6:.1f}M parameters), JAX on "
            f"{len(devices)} x {devices[0].device_kind}, {jnp.dtype(dtype).name} matmuls")
        say(f"batch: {config.micro_batch} x {config.seq_len} tokens x {len(devices)} devices x "
            f"{grad_accum} accumulation = {config.total_batch_size} tokens per step")
        flops_per_token = start.flops_per_token(config.seq_len)
        del start  # the torch copy of the weights is not needed any more
        with runtime.StopFlag().installed() as stop:
            return training_loop(trainer, start_step, stop, flops_per_token, devices)
    finally:
        trainer.train_loader.close()
        trainer.val_loader.close()


def training_loop(trainer: JaxTrainer, start_step: int, stop: runtime.StopFlag,
                  flops_per_token: float, devices: list[jax.Device]) -> int:
    cfg = trainer.config
    if start_step >= cfg.max_steps:
        print(f"already trained to step {start_step} (--max-steps={cfg.max_steps})")
        return 0
    peak = peak_flops(devices[0])
    step = start_step
    while True:
        trainer.run_evals(step)
        if step >= cfg.max_steps:
            return 0
        t0 = time.perf_counter()
        lr = get_lr(step, cfg.max_lr, cfg.final_min_lr, cfg.warmup_steps, cfg.max_steps)
        loss, norm = trainer.step(lr)  # float(loss) waits for the devices
        dt = time.perf_counter() - t0
        if step == start_step:
            print(f"first step, with the one-time compilation: {dt:.1f} s", flush=True)
        if not math.isfinite(loss):
            print(f"error: loss is {loss} at step {step}; stopping. Last good checkpoint: "
                  f"{trainer.last_checkpoint or 'none'}", file=sys.stderr, flush=True)
            return 1
        tok_per_s = cfg.total_batch_size / dt
        mfu = runtime.model_flops_utilization(flops_per_token, tok_per_s, peak, len(devices))
        print(format_step(step, cfg.max_steps, loss, lr, norm, dt, tok_per_s, mfu), flush=True)
        record: dict[str, Any] = dict(loss=loss, lr=lr, grad_norm=norm, dt_ms=dt * 1000,
                                      tok_per_s=tok_per_s)
        if mfu is not None:
            record["mfu"] = mfu
        trainer.write_log(step, **record)
        step += 1
        if due(cfg.checkpoint_interval, step, cfg.max_steps) or stop.requested:
            trainer.save(step)
        if stop.requested:
            print(f"stopped at step {step}; continue with --resume", flush=True)
            return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(argv, f"Train GPT-2 in JAX on token shards, with train_gpt2.py's flags "
                        f"(not used here: --{', --'.join(NOT_APPLICABLE).replace('_', '-')}, "
                        "--batch-size=auto, --dtype=fp16, --hellaswag-interval above 0).")
    return cli.run_script(lambda: train(config, argv), config.debug)


if __name__ == "__main__":
    sys.exit(main())
