"""GPT-2 in JAX: model.py's parameters as a flat pytree, a jit-compiled forward pass, loading and
saving model.py's checkpoints, and simple sampling. The parameters are a dict keyed and shaped
exactly like model.GPT's state_dict, so weights move between the two by name; linear weights keep
torch's (out, in) layout, and the head is tied to "transformer.wte.weight" ("lm_head.weight" is
written back on save). The config is read off the shapes; only n_head is passed along. Only jax,
numpy and data.py (which needs no torch) are imported at module level: torch and model.py only where
checkpoints are touched.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from data import VOCAB_SIZE

Params = dict[str, jax.Array]
TIED_HEAD = "lm_head.weight"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as GPT-2 was trained


# -------------------------------------------------------------------------------- weights


def params_from_state_dict(state_dict: Mapping[str, Any]) -> Params:
    """model.GPT's state_dict (torch tensors, possibly bf16, which NumPy lacks, or arrays) as
    fp32 JAX arrays, without the tied output head."""
    return {key: jnp.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v,
                             dtype=jnp.float32)
            for key, v in state_dict.items() if key != TIED_HEAD}


def state_dict_arrays(params: Params) -> dict[str, np.ndarray]:
    """The parameters as model.GPT's state_dict holds them: fp32 NumPy copies, head included."""
    arrays = {key: np.array(value, dtype=np.float32) for key, value in params.items()}
    return {**arrays, TIED_HEAD: arrays["transformer.wte.weight"]}


def layer_count(params: Params) -> int:
    return sum(key.endswith(".ln_1.weight") for key in params)


def model_config(params: Params, n_head: int) -> dict[str, int]:
    """model.GPTConfig's fields, as a checkpoint's "model_config" holds them."""
    vocab_size, n_embd = params["transformer.wte.weight"].shape
    return {"block_size": params["transformer.wpe.weight"].shape[0], "vocab_size": vocab_size,
            "n_layer": layer_count(params), "n_head": n_head, "n_embd": n_embd}


def from_pretrained(name_or_dir: str) -> tuple[Params, int]:
    """(params, n_head) of pretrained GPT-2: a hub name or a Hugging Face directory, read by
    model.GPT.from_pretrained (its key layouts and Conv1D transposes are handled there)."""
    from model import GPT

    model = GPT.from_pretrained(name_or_dir)
    return params_from_state_dict(model.state_dict()), model.config.n_head


def from_checkpoint(path: str | os.PathLike[str]) -> tuple[Params, int]:
    """(params, n_head) of a train_gpt2.py or train_jax.py checkpoint."""
    import checkpoint
    from model import GPT

    state = checkpoint.load(path)
    if state["model_kind"] != "gpt2":
        raise ValueError(f"{path}: a {state['model_kind']} model's checkpoint; model_jax.py is "
                         "GPT-2's architecture\nhint: pass a checkpoint of --recipe=gpt2")
    model = GPT.from_checkpoint(state)
    return params_from_state_dict(model.state_dict()), model.config.n_head


def optimizer_state(leaves: list[Any], template: Any, path: str | os.PathLike[str]) -> Any:
    """A train_jax.py checkpoint's optimizer_leaves (checkpoint.load checked that they are
    finite tensors) as the optax state `template` (optimizer.init's) is shaped; a leaf of
    another count or shape is a RuntimeError naming the file."""
    expected = jax.tree.leaves(template)
    if len(leaves) != len(expected):
        raise RuntimeError(f"{path}: optimizer state of another shape ({len(leaves)} "
                           f"arrays, expected {len(expected)})")
    for i, (leaf, like) in enumerate(zip(leaves, expected, strict=True)):
        if tuple(leaf.shape) != tuple(like.shape):
            raise RuntimeError(f"{path}: optimizer_leaves[{i}] has shape {tuple(leaf.shape)}, "
                               f"this run's optimizer {tuple(like.shape)}\nhint: resume with "
                               "the model it was written with, or start a new --out-dir")
    return jax.tree.unflatten(jax.tree.structure(template), [leaf.numpy() for leaf in leaves])


def save_checkpoint(path: str | os.PathLike[str], params: Params, n_head: int,
                    **extra: Any) -> None:
    """A checkpoint in train_gpt2.py's format, which checkpoint.load (sample.py, eval_hellaswag.py)
    reads, written atomically; `extra` entries go beside "model_config" and "model"."""
    import torch

    import checkpoint

    tensors = {key: torch.from_numpy(array) for key, array in state_dict_arrays(params).items()}
    checkpoint.save(Path(path), {"model_config": model_config(params, n_head), "model": tensors,
                                 **extra})


# -------------------------------------------------------------------------------- forward


def layer_norm(x: jax.Array, params: Params, name: str) -> jax.Array:
    """In fp32 whatever the compute dtype, as torch autocast runs layer norms."""
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    normed = (x - mean) * jax.lax.rsqrt(x.var(axis=-1, keepdims=True) + LAYER_NORM_EPS)
    return normed * params[name + ".weight"] + params[name + ".bias"]


def linear(x: jax.Array, params: Params, name: str, dtype: DTypeLike) -> jax.Array:
    weight = params[name + ".weight"].astype(dtype)
    return x.astype(dtype) @ weight.T + params[name + ".bias"].astype(dtype)


def attention(x: jax.Array, params: Params, n_head: int, dtype: DTypeLike) -> jax.Array:
    B, T, C = x.shape
    qkv = linear(x, params, "attn.c_attn", dtype)
    q, k, v = (t.reshape(B, T, n_head, C // n_head) for t in jnp.split(qkv, 3, axis=-1))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return linear(y.reshape(B, T, C), params, "attn.c_proj", dtype)


def mlp(x: jax.Array, params: Params, dtype: DTypeLike) -> jax.Array:
    hidden = jax.nn.gelu(linear(x, params, "mlp.c_fc", dtype), approximate=True)  # gelu_new
    return linear(hidden, params, "mlp.c_proj", dtype)


def block(x: jax.Array, params: Params, n_head: int, dtype: DTypeLike) -> jax.Array:
    """One transformer block; `params` holds its own entries ("ln_1.weight", ...). The
    residual stream stays fp32, as it does under torch autocast."""
    x = x + attention(layer_norm(x, params, "ln_1"), params, n_head, dtype)
    return x + mlp(layer_norm(x, params, "ln_2"), params, dtype)


def layer_params(params: Params, layer: int) -> Params:
    prefix = f"transformer.h.{layer}."
    return {key[len(prefix):]: value for key, value in params.items() if key.startswith(prefix)}


@functools.partial(jax.jit, static_argnames=("n_head", "dtype", "remat"))
def forward(params: Params, idx: jax.Array, n_head: int, dtype: DTypeLike = jnp.float32,
            remat: bool = False) -> jax.Array:
    """fp32 logits (B, T, vocab_size) for token ids `idx` (B, T): position t sees positions
    <= t. Matmuls run in `dtype`; with `remat` each block's activations are recomputed in
    the backward pass instead of kept (less memory, about one more forward)."""
    wte, wpe = params["transformer.wte.weight"], params["transformer.wpe.weight"]
    if idx.shape[1] > wpe.shape[0]:
        raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds block_size {wpe.shape[0]}")
    x = wte[idx] + wpe[: idx.shape[1]]
    run_block = jax.checkpoint(block, static_argnums=(2, 3)) if remat else block
    for layer in range(layer_count(params)):
        x = run_block(x, layer_params(params, layer), n_head, dtype)
    x = layer_norm(x, params, "transformer.ln_f")
    return (x.astype(dtype) @ wte.astype(dtype).T).astype(jnp.float32)


def cross_entropy(params: Params, idx: jax.Array, targets: jax.Array, n_head: int,
                  dtype: DTypeLike = jnp.float32, remat: bool = False) -> jax.Array:
    """Mean next-token loss, as model.GPT's forward computes it."""
    logits = forward(params, idx, n_head, dtype, remat)
    # logsumexp minus the target's logit: no second (B, T, vocab) array of log-probabilities.
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (jax.nn.logsumexp(logits, axis=-1) - target_logits).mean()


# ------------------------------------------------------------------------------ sampling


def sample_token(logits: jax.Array, key: jax.Array, temperature: float = 1.0,
                 top_k: int | None = None) -> jax.Array:
    """One token per row of `logits` (B, V): the argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k largest."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("n_head", "temperature", "top_k"))
def _fill_position(params: Params, tokens: jax.Array, position: jax.Array, key: jax.Array,
                   n_head: int, temperature: float, top_k: int | None) -> jax.Array:
    # Positions from `position` on hold placeholders; causal attention keeps them out of
    # the logits at position - 1. Padding rows (ids >= 50257) are never drawn.
    logits = forward(params, tokens, n_head)[:, position - 1, :VOCAB_SIZE]
    return tokens.at[:, position].set(sample_token(logits, key, temperature, top_k))


def generate(params: Params, n_head: int, idx: np.ndarray, max_new_tokens: int,
             key: jax.Array, temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
    """`idx` (B, T) followed by `max_new_tokens` sampled tokens. No KV cache: each step runs
    the whole fixed-length window again, so one compilation serves every step."""
    batch, prompt_len = idx.shape
    length = prompt_len + max_new_tokens
    block_size = params["transformer.wpe.weight"].shape[0]
    if length > block_size:
        raise ValueError(f"prompt ({prompt_len}) + new tokens ({max_new_tokens}) exceed "
                         f"block_size {block_size}")
    tokens = jnp.zeros((batch, length), dtype=jnp.int32).at[:, :prompt_len].set(idx)
    for position in range(prompt_len, length):
        key, draw = jax.random.split(key)
        tokens = _fill_position(params, tokens, jnp.asarray(position), draw, n_head,
                                temperature, top_k)
    return np.asarray(tokens)
