"""GPT-2 in one file: the model, its chunked loss, KV-cache generation, HF weights in and out.

Only torch is imported at module level, and no other file of this project at all, so this
file can be pasted into a notebook cell (tests/test_paste.py proves it); `safetensors` and
`huggingface_hub` are imported inside the functions that read or write Hugging Face weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

# ----------------------------------------------------------------------------------- model

GPT2_VOCAB_SIZE = 50257  # real GPT-2 BPE tokens; ids at or above this are padding rows
PADDED_VOCAB_SIZE = 50304  # next multiple of 128: faster matmuls when training from scratch


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset '{name}': choose one of "
                             f"{', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small shapes for CPU work: quick runs, tests, the offline quickstart.
    "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=256),
    "gpt2-mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # type: ignore[assignment]

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.write(layer, k, v)
            attn_mask = cache.mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=attn_mask is None)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        return self.c_proj(self.gelu(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The trunk; its attribute names match Hugging Face's `transformer.*` keys."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # Training keeps only each block's input and recomputes the rest in the backward
        # pass: activation memory of one block instead of all, for about one more forward.
        self.activation_checkpointing = False
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embedding
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                # Each block adds two residual branches; scaling keeps the stream's
                # variance from growing with depth (GPT-2 paper, section 2.3).
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, None) without targets; (None, mean loss) with them, targets of -1 ignored:
        the loss never holds all the logits at once (see linear_cross_entropy)."""
        x = self.hidden_states(idx, cache)
        if targets is None:
            return self.lm_head(x), None
        return None, linear_cross_entropy(x.flatten(0, -2), self.lm_head.weight,
                                          targets.flatten())

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer-norm output for every position of `idx` (B, T): by default position t
        attends to positions <= t and has position id t (after any cached prefix). Several
        sequences can share one row instead: `positions` (B, T) gives each token its position
        id (below block_size), bool `attn_mask` (B, 1, T, T) what it attends to (itself too)."""
        positions = position_ids(idx, self.config.block_size, cache, positions, attn_mask)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        recompute = (self.activation_checkpointing and self.training and cache is None
                     and torch.is_grad_enabled())
        for layer, block in enumerate(self.transformer.h):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, None, layer, attn_mask,
                                                     use_reentrant=False)
            else:
                x = block(x, cache, layer, attn_mask)
        return self.transformer.ln_f(x)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per parameter plus attention's 12*L*C*T (PaLM, app. B)."""
        cfg = self.config
        return (6.0 * self.num_params(non_embedding=True)
                + 12.0 * cfg.n_layer * cfg.n_embd * (seq_len or cfg.block_size))

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` (B, T); temperature 0 is greedy
        (see generate below)."""
        return generate(self, self.config, idx, max_new_tokens, temperature, top_k, top_p,
                        generator, on_token)

    @classmethod
    def from_pretrained(cls, name_or_dir: str) -> GPT:
        """GPT-2 weights from a local HF directory or the hub (`gpt2`, `gpt2-medium`, ...)."""
        directory = resolve_pretrained_dir(name_or_dir)
        from safetensors import safe_open
        from safetensors.torch import load_file
        config = config_from_hf_json(directory / "config.json")
        weights = directory / "model.safetensors"
        try:
            with safe_open(str(weights), framework="pt") as f:  # reads the header only
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
            tensors = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own SafetensorError, among others
            raise ValueError(f"{weights}: not a readable safetensors file ({exc})\nhint: pass a "
                             "folder written by save_pretrained or GPT.save_hf") from None
        # The sizes in config.json are checked against the stored weights before the model
        # is built: a config that asks for far more than the file holds allocates nothing.
        stored = {key.removeprefix("transformer."): shape for key, shape in shapes.items()}
        wanted = {"wte.weight": (config.vocab_size, config.n_embd),
                  "wpe.weight": (config.block_size, config.n_embd)}
        for key, shape in wanted.items():
            if stored.get(key) != shape:
                raise ValueError(f"{directory / 'config.json'}: its sizes call for {key} of shape "
                                 f"{shape}, {weights.name} holds {stored.get(key)}")
        layers = {key.split(".")[1] for key in stored if key.startswith("h.")}
        if len(layers) != config.n_layer:
            raise ValueError(f"{directory / 'config.json'}: n_layer is {config.n_layer}, "
                             f"{weights.name} holds {len(layers)} layers")
        model = cls(config)
        model.load_hf_state_dict(tensors, source=str(weights))
        return model

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> GPT:
        """The model of a checkpoint as checkpoint.load returns it, which checked its config,
        weights' names, shapes and values."""
        model = cls(GPTConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
        return model

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor],
                           source: str = "state dict") -> None:
        ours = self.state_dict()
        expected = {k for k in ours if k != "lm_head.weight"}
        seen: set[str] = set()
        for hf_key, tensor in tensors.items():
            prefixed = hf_key.startswith(("lm_head.", "transformer."))
            key = hf_key if prefixed else "transformer." + hf_key  # the hub's gpt2 has no prefix
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers; the output head is tied to wte
            if key not in expected:
                raise ValueError(f"{source}: unexpected GPT-2 weight '{hf_key}'")
            if key.endswith(_CONV1D_WEIGHTS):
                tensor = tensor.t()
            if tensor.shape != ours[key].shape:
                raise ValueError(f"{source}: '{hf_key}' has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(ours[key].shape)}")
            if not tensor.is_floating_point() or not bool(tensor.isfinite().all()):
                raise ValueError(f"{source}: '{hf_key}' holds NaN, infinite or non-float "
                                 "values\nhint: the weights are damaged; download them again")
            ours[key].copy_(tensor)  # state_dict's tensors are detached views of the weights
            seen.add(key)
        missing = sorted(expected - seen)
        if missing:
            raise ValueError(f"{source}: missing GPT-2 weights, e.g. '{missing[0]}' "
                             f"({len(missing)} in all)")

    def save_hf(self, directory: str | os.PathLike[str]) -> None:
        """Write the model.safetensors and config.json GPT2LMHeadModel loads, each atomically."""
        from safetensors.torch import save
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        vocab = min(self.config.vocab_size, GPT2_VOCAB_SIZE)  # padding rows are never used
        tensors: dict[str, torch.Tensor] = {}
        for key, tensor in self.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied to wte; transformers re-ties it on load
            if key == "transformer.wte.weight":
                tensor = tensor[:vocab]
            if key.endswith(_CONV1D_WEIGHTS):
                tensor = tensor.t()
            tensors[key] = tensor.detach().to("cpu", torch.float32).contiguous()
        _write_atomically(out / "model.safetensors", save(tensors, metadata={"format": "pt"}))
        cfg = self.config
        hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=vocab,
                  n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd,
                  n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                  layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=GPT2_VOCAB_SIZE - 1, eos_token_id=GPT2_VOCAB_SIZE - 1,
                  tie_word_embeddings=True)
        config = json.dumps(hf, indent=2) + "\n"
        _write_atomically(out / "config.json", config.encode())


# ------------------------------------------------------------------------------------ loss

LOSS_CHUNK_ROWS = 4096  # (4096, 50304) fp32 logits: 0.8 GB, against 13 GB for B=64, T=1024


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = LOSS_CHUNK_ROWS, softcap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the logits `x @ weight.T` (rows, vocab) against `targets`
    (rows,), skipping targets of -1; equal to F.cross_entropy over the full logits. With
    `softcap` the logits are softcap * tanh(logits / softcap) first (the modern model's head;
    GPT-2 has none). Under torch.no_grad (validation) only the loss is computed, none of its
    gradients."""
    # Grad mode is always off inside an autograd.Function's forward, so it is read here.
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows, softcap)
    return _chunked_loss(x, weight, targets, chunk_rows, softcap, want_grads=False)[0]


def _chunked_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                  softcap: float, want_grads: bool) -> tuple[torch.Tensor, torch.Tensor | None,
                                             torch.Tensor | None]:
    """The loss, and with `want_grads` its gradients for x and weight, one chunk of rows of
    logits at a time."""
    count = (targets != -1).sum()
    loss_sum = torch.zeros((), device=x.device)
    grad_x = torch.empty_like(x) if want_grads else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grads else None
    every_row = torch.arange(weight.size(0), device=weight.device) if want_grads else None
    for start in range(0, x.size(0), chunk_rows):
        rows, target = x[start:start + chunk_rows], targets[start:start + chunk_rows]
        keep = target != -1
        target = target.clamp_min(0)
        logits = F.linear(rows, weight).float()  # the matmul in the autocast dtype
        slope = None
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
            slope = 1 - (logits / softcap) ** 2  # d(capped)/d(logits), for the chain rule
        logsumexp = logits.logsumexp(dim=-1)
        picked = logits.gather(1, target[:, None]).squeeze(1)
        loss_sum += ((logsumexp - picked) * keep).sum()
        if grad_x is None or grad_weight is None or every_row is None:
            continue
        # d(row loss)/d(logits) = softmax - one_hot, left unscaled by 1/count here so
        # that fp16 matmuls see values as large as the GradScaler's would be.
        grad = logits.sub_(logsumexp[:, None]).exp_()
        grad.scatter_add_(1, target[:, None], torch.full_like(grad[:, :1], -1.0))
        grad *= keep[:, None]
        if slope is not None:
            grad *= slope
        grad_x[start:start + chunk_rows] = (grad @ weight).float() / count
        # Added in place as an index_add_, not `+=`: Inductor fuses a chain of `+=` into one
        # kernel at the end that reads every chunk's (vocab, C) product, all of them alive at
        # once (16 x 77 MB for gpt2 at B=64, T=1024); a scatter is realised chunk by chunk,
        # so one product exists at a time. An fp32 addmm_ would too, at TF32's half speed.
        grad_weight.index_add_(0, every_row, (grad.T @ rows).float())
    return loss_sum / count, grad_x, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """The logits exist one chunk of rows at a time, their gradients made in the forward pass:
    neither pass keeps the (rows, vocab) logits or their gradient, a step's biggest tensors."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_rows: int, softcap: float) -> torch.Tensor:
        loss, grad_x, grad_weight = _chunked_loss(x, weight, targets, chunk_rows, softcap,
                                                  want_grads=True)
        assert grad_x is not None and grad_weight is not None
        count = (targets != -1).sum()
        ctx.save_for_backward(grad_x, (grad_weight / count).to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None


# ------------------------------------------------------------------------------ generation


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions, so shapes never
    change while decoding: each forward writes its tokens' keys and values at their positions
    and attention reads the whole cache, masked to the slots filled so far. The fill level is
    a device tensor, not a Python int, so a step recorded as a CUDA graph advances it on every
    replay. Writing past `max_len` is an index error (a device-side assert on CUDA)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        if max_len > config.block_size:
            raise ValueError(f"KV cache length {max_len} exceeds block_size {config.block_size}")
        # CUDA's memory-efficient attention pads a copy of the mask in every layer unless its
        # length is a multiple of 16 (8 in older torch). Extra slots are only ever masked.
        max_len = min(-(-max_len // 16) * 16, config.block_size)
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        # Zeros, not empty: masked slots are still read, and garbage there could be NaN,
        # which a zero attention weight does not cancel.
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.filled = torch.zeros((), dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)
        # Row p is the additive mask of a query at position p: slot s visible iff s <= p.
        # One row lookup per forward, shared by all layers.
        self.causal_mask = torch.zeros(max_len, max_len, device=device, dtype=dtype).masked_fill_(
            self.slots[None, :] > self.slots[:, None], float("-inf"))
        self.positions = self.slots[:0]  # of the tokens in the forward under way
        self.mask = self.causal_mask[:0]

    def reserve(self, num_tokens: int) -> torch.Tensor:
        """Positions of the next `num_tokens` tokens, which the layers write and attend from;
        the fill level moves past them."""
        self.positions = self.filled + self.slots[:num_tokens]
        self.mask = self.causal_mask.index_select(0, self.positions)
        self.filled.add_(num_tokens)
        return self.positions

    def write(self, layer: int, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the reserved positions' keys and values; the layer's whole cache after it."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, self.positions, k.to(keys.dtype))
        values.index_copy_(2, self.positions, v.to(values.dtype))
        return keys, values


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` (B, V), never a padding id >= 50257: the argmax at
    temperature 0, else a draw from softmax(logits / temperature) restricted to the top_k
    largest and then to the smallest top set holding top_p of the probability."""
    logits = logits[:, :GPT2_VOCAB_SIZE].float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    ids = None
    if top_k is not None or top_p is not None:
        # Only the candidates are sorted and drawn from: on CPU a draw over the whole
        # 50257-wide row costs about as much as a decoding step of the 124M model.
        logits, ids = torch.topk(logits, min(top_k or logits.size(-1), logits.size(-1)))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    # Inverting the cumulative sum (torch.multinomial is several times slower on CPU);
    # float64 keeps a 50257-term sum exact, MPS has none. With u in (0, total] the first
    # cdf >= u always belongs to a token of non-zero probability.
    cdf = probs.to(torch.float32 if probs.device.type == "mps" else torch.float64).cumsum(-1)
    u = (1 - torch.rand(cdf[:, :1].shape, generator=generator, device=cdf.device,
                        dtype=cdf.dtype)) * cdf[:, -1:]
    # NaN logits (weights that overflow) would index past the row; sample.py refuses them.
    choice = torch.searchsorted(cdf, u).clamp_(max=cdf.size(-1) - 1)
    return choice if ids is None else ids.gather(-1, choice)


class CUDAGraphStep:
    """A one-token decoding step `fn(token) -> logits`, run eagerly on its first call, recorded
    as a CUDA graph right after and replayed on every later call: one launch per token, not a
    Python pass issuing some 150 kernels. A raw graph replays exactly the recorded kernels on
    exactly the KV cache; torch.compile(mode="reduce-overhead") may fall back to eager over the
    cache's in-place updates with no more than a log line, recompile per prompt length and
    overwrite outputs a caller still holds. If recording fails, every later call runs `fn`
    eagerly, after one warning line on stderr: slower, the same tokens."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False  # recording failed: no more tries
        self.token = torch.empty(0, dtype=torch.long)  # the recorded input, refilled per step
        self.logits = torch.empty(0)  # the recorded output, overwritten by each replay
        self.side: torch.cuda.Stream | None = None  # the warm-up's and recording's stream

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self.token.copy_(token)
            self.graph.replay()
            return self.logits
        if self.eager:
            return self.fn(token)
        logits = self._warm_up(token)  # the model's own errors surface here, as they are
        try:
            self._record(token.device)
        except Exception as exc:
            # Recording executes nothing, so the cache is as the warm-up left it and eager
            # steps continue from there.
            self.eager = True
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"warning: the decoding step could not be recorded as a CUDA graph "
                  f"({reason}); sampling goes on without it, slower", file=sys.stderr,
                  flush=True)
        return logits

    def _warm_up(self, token: torch.Tensor) -> torch.Tensor:
        """The eager first step, torch.cuda.graph's warm-up (cuBLAS workspaces, the attention
        kernel's choice, lazy init), on a side stream as documented, where recording then
        finds its cuBLAS workspace."""
        self.token = token.clone()
        if not token.is_cuda:  # nothing to warm up; recording will fail and say so
            return self.fn(self.token)
        device = token.device
        with torch.cuda.device(device):  # the graph's device, whichever is current
            self.side = torch.cuda.Stream(device)
            self.side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.side):
                logits = self.fn(self.token)
            torch.cuda.current_stream(device).wait_stream(self.side)
            logits.record_stream(torch.cuda.current_stream(device))  # read there next
        return logits

    def _record(self, device: torch.device) -> None:
        """Record `fn` on the warm-up's stream. capture_begin/end directly, not the
        torch.cuda.graph context, which empties the allocator's cache first: the trainer's
        cached blocks (tens of GB) would go back to the driver at every sample interval."""
        if self.side is None:
            raise RuntimeError(f"{device} tensors cannot be recorded as a CUDA graph")
        graph = torch.cuda.CUDAGraph()
        # The autocast in force minus its cache of weight casts: a cast cached while recording
        # is freed when the caller's autocast exits, while the graph goes on reading it.
        no_cast_cache = (contextlib.nullcontext() if not torch.is_autocast_enabled(device.type)
                         else torch.autocast(device.type, torch.get_autocast_dtype(device.type),
                                             cache_enabled=False))
        with torch.cuda.device(device), torch.cuda.stream(self.side), no_cast_cache:
            graph.capture_begin()
            try:
                self.logits = self.fn(self.token)
            finally:
                graph.capture_end()
        self.graph = graph


def position_ids(idx: torch.Tensor, block_size: int, cache: KVCache | None,
                 positions: torch.Tensor | None, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """The position id of each token of `idx` (B, T) for hidden_states (GPT's and the modern
    model's): the given `positions` (packed rows, with their `attn_mask`), the slots after a
    KV cache's prefix, or 0..T-1."""
    if (positions is None) != (attn_mask is None):
        raise ValueError("positions and attn_mask go together")
    if positions is not None and cache is not None:
        raise ValueError("a KV cache cannot be combined with an explicit attn_mask")
    if cache is not None:
        return cache.reserve(idx.size(1))
    if positions is not None:
        return positions
    if idx.size(1) > block_size:
        raise ValueError(f"sequence of {idx.size(1)} tokens exceeds block_size {block_size}")
    return torch.arange(idx.size(1), dtype=torch.long, device=idx.device)


@torch.no_grad()
def generate(model: Any, config: GPTConfig, idx: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Append `max_new_tokens` sampled tokens to `idx` (B, T) from `model` (its hidden_states
    and lm_head; `config` sizes the KV cache); temperature 0 is greedy. `on_token` gets each
    new (B, 1) token as soon as it is sampled, still on idx's device: nothing here waits for
    the device. The prompt is prefilled in one forward into a KV cache (in the autocast dtype
    if autocast is on, else the weights'); every later step runs the newest token against
    the whole cache, so on CUDA it is one CUDA graph."""
    if idx.size(1) + max_new_tokens > config.block_size:
        raise ValueError(f"prompt ({idx.size(1)}) + new tokens ({max_new_tokens}) exceed "
                         f"block_size {config.block_size}")
    if max_new_tokens < 1:
        return idx.clone()
    autocast = torch.is_autocast_enabled(idx.device.type)
    dtype = (torch.get_autocast_dtype(idx.device.type) if autocast
             else model.transformer.wte.weight.dtype)
    # On CUDA the last call's cache and recorded step are kept and replayed by a call of the
    # same shapes on the same weights (the trainer's samples at every interval): recording
    # costs a warm-up step and the graph's own memory pool.
    shape = (idx.size(0), idx.size(1) + max_new_tokens, dtype, idx.device, autocast,
             tuple(p.data_ptr() for p in model.parameters()))
    kept = getattr(model, "_decode_graph", None)
    if idx.is_cuda and kept is not None and kept[0] == shape:
        _, cache, last_logits, step = kept
        cache.keys.zero_()
        cache.values.zero_()
        cache.filled.zero_()
    else:
        if kept is not None:  # the old graph's memory goes before the new is made
            model._decode_graph = None
        cache = KVCache(config, idx.size(0), idx.size(1) + max_new_tokens, idx.device, dtype)

        def last_logits(tokens: torch.Tensor) -> torch.Tensor:
            return model.lm_head(model.hidden_states(tokens, cache)[:, -1, :])
        step = CUDAGraphStep(last_logits) if idx.is_cuda else last_logits
        if idx.is_cuda:
            model._decode_graph = (shape, cache, last_logits, step)
    logits = last_logits(idx)
    sequence = [idx]
    for i in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_k, top_p, generator)
        sequence.append(token)
        if on_token is not None:
            on_token(token)
        if i + 1 < max_new_tokens:
            logits = step(token)
    return torch.cat(sequence, dim=1)


# ---------------------------------------------------------------------- weights in and out

# HF stores these as Conv1D (in, out) weights, nn.Linear as (out, in): they are transposed
# by name, never by shape (attn.c_proj is square).
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")
HUB_REPOS = {name: f"openai-community/{name}" for name in
             ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


class PretrainedNotFound(RuntimeError):
    """Pretrained weights that can be neither found locally nor downloaded."""


def _write_atomically(path: Path, data: bytes) -> None:
    """`path` appears whole or not at all: written under a temp name beside it, then renamed.
    data.atomic_output does this for every other module; this copy exists because model.py
    imports no other file of the project, so that it pastes alone into a notebook."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # on a read-only disk the cleanup fails too
            tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"{path}: cannot write it ({exc.strerror or exc}); free some "
                                 "space, fix the permissions or write elsewhere") from None


def config_from_hf_json(path: Path) -> GPTConfig:
    """A GPT-2 config.json's shape; bad JSON or a key missing or bad is a ValueError naming it."""
    fix = "pass the config.json of a GPT-2 model (save_pretrained or GPT.save_hf writes it)"
    try:
        hf = json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not JSON ({exc}); {fix}") from None
    keys = dict(block_size="n_positions", vocab_size="vocab_size", n_layer="n_layer",
                n_head="n_head", n_embd="n_embd")
    for key in keys.values():
        value = hf.get(key) if isinstance(hf, dict) else None
        if type(value) is not int or value <= 0:
            raise ValueError(f"{path}: '{key}' is {'missing' if value is None else repr(value)}"
                             f", not a positive integer; {fix}")
    try:
        return GPTConfig(**{ours: hf[theirs] for ours, theirs in keys.items()})
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}; {fix}") from None


def resolve_pretrained_dir(name_or_dir: str) -> Path:
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        for name in ("model.safetensors", "config.json"):
            if not (path / name).is_file():
                what = (f"{path / name}: a directory, not a file" if (path / name).is_dir()
                        else f"{path}: no {name} in this directory")
                raise PretrainedNotFound(f"{what}; pass a folder written by save_pretrained "
                                         "or GPT.save_hf")
        return path
    repo = HUB_REPOS.get(name_or_dir, name_or_dir)
    if repo not in HUB_REPOS.values():
        raise PretrainedNotFound(f"'{name_or_dir}' is neither a local directory nor one of "
                                 f"{', '.join(HUB_REPOS)}")
    # Released weights never change: a cached copy is used without a request to the hub
    # (the client otherwise checks each file's etag online first).
    with contextlib.suppress(Exception):  # not cached yet (LocalEntryNotFoundError), or partly
        return _hub_files(repo, local_files_only=True)
    try:
        return _hub_files(repo, local_files_only=False)
    except Exception as exc:  # the hub raises many types for offline / DNS / HTTP failures
        raise PretrainedNotFound(
            f"could not download '{name_or_dir}' from the Hugging Face hub ({type(exc).__name__}"
            "; no network?)\nhint: pass a local directory with model.safetensors and "
            "config.json instead, e.g. --pretrained=/path/to/gpt2") from exc


def _hub_files(repo: str, local_files_only: bool) -> Path:
    """The snapshot folder holding the repo's config.json and model.safetensors."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    if not local_files_only:  # one quick try first: offline, hf_hub_download retries for 30 s
        get_hf_file_metadata(hf_hub_url(repo, "config.json"), timeout=5)
    paths = [hf_hub_download(repo, filename, local_files_only=local_files_only)
             for filename in ("config.json", "model.safetensors")]
    return Path(paths[-1]).parent
