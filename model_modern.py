"""The modern model: the architecture that nanochat and modded-nanogpt tuned at GPT-2's size,
beside model.py's GPT-2 (2019) rather than inside it.

What it is, each part with where it comes from (karpathy/nanochat nanochat/gpt.py, 2026-07,
unless said otherwise):

- the token embedding followed by an RMSNorm; RMSNorm without parameters everywhere;
- rotary position embeddings (base 100000) instead of learned positions;
- QK-norm: each head's queries and keys RMS-normalised, then scaled by 1.2 (sharper
  attention than the plain 1/sqrt(d) would give at unit RMS);
- a ReLU-squared MLP, no biases anywhere, and an output head of its own (untied);
- value embeddings (ResFormer): on alternating layers, the last included, a second embedding
  of the tokens is added to the attention values through a gate per head,
  3 * sigmoid(W x[:12]) of the block input's first 12 channels;
- per-layer lambdas: before layer i the stream becomes resid_i * x + x0_i * x0, where x0 is
  the normalised embedding (the embedding shortcut);
- logits soft-capped at 15: 15 * tanh(logits / 15);
- init: embedding std 0.8, head std 0.001, block matrices uniform with the std of
  1/sqrt(width) (c_fc at 0.4 of that), output projections zero, value embeddings like the
  value projection, gates uniform in [0, 0.02], resid lambdas 1.15 down to 1.05 and x0
  lambdas 0.20 down to 0.05 over depth.

Not taken from nanochat: the sliding-window attention pattern (a speed trick for FlashAttention
3), grouped-query attention, "smear" (a gated previous-token embedding, bigram-like) and
"backout" (subtracting a mid-layer residual): the records and nanochat's own log find the
first two neutral for loss and bigram-style inputs not to carry over at this size.

The loss, the KV cache and token sampling are model.py's. The optimizer groups by parameter
kind (each with its own rate) are optim.py's `modern_groups`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from model import (
    PADDED_VOCAB_SIZE,
    GPTConfig,
    KVCache,
    generate,
    linear_cross_entropy,
    position_ids,
)

MODEL_KIND = "modern"  # a checkpoint's "model_kind" entry for this model
ROPE_BASE = 100000.0
QK_SCALE = 1.2  # queries and keys scaled after their RMS norm (nanochat)
GATE_CHANNELS = 12  # the value-embedding gate reads this many channels of its input
GATE_RANGE = 3.0  # the gate is GATE_RANGE * sigmoid(...), in (0, 3)


@dataclass
class ModernConfig:
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # The parts the ablations switch off; the rest (rotary, QK-norm, ReLU^2, untied head, no
    # biases, parameter-free norms) is what this model is. A checkpoint without a switch's key
    # loads with its default, so a switch added later defaults to the model saved before it.
    value_embeddings: bool = True
    lambdas: bool = True  # per-layer residual and x0 (embedding shortcut) scalars
    logit_softcap: float = 15.0  # 0: no cap

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head size {self.n_embd // self.n_head} is odd: rotary "
                             "embeddings turn pairs of channels")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap={self.logit_softcap}: must be 0 (off) or above")

    def kv_cache_shape(self) -> GPTConfig:
        """The sizes model.KVCache reads (layers, heads, width, block size)."""
        return GPTConfig(block_size=self.block_size, vocab_size=self.vocab_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


# The modern model's settings beyond GPT-2's shape; train_gpt2.py has a flag of each name.
SWITCHES = tuple(f.name for f in dataclasses.fields(ModernConfig)
                 if f.name not in {g.name for g in dataclasses.fields(GPTConfig)})


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension, without a learned scale."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(block_size: int, head_size: int,
                  base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, head_size / 2) of each position's angles: channel pair j of
    a head turns by position * base ** (-2j / head_size)."""
    inverse_frequency = base ** -(torch.arange(0, head_size, 2, dtype=torch.float32)
                                  / head_size)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inverse_frequency)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of queries or keys (B, heads, T, d): channels j and j + d/2 turned
    as one pair by their position's angle, so attention scores depend on relative positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Alternating layers, the last one always among them (nanochat's has_ve)."""
    return layer % 2 == (n_layer - 1) % 2


class SoftcappedHead(nn.Linear):
    """The output head; its logits soft-capped, cap * tanh(logits / cap), wherever it is
    called (sampling, HellaSwag). The training loss reads its weight and cap directly."""

    def __init__(self, n_embd: int, vocab_size: int, softcap: float) -> None:
        super().__init__(n_embd, vocab_size, bias=False)
        self.softcap = softcap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.softcap > 0:
            logits = self.softcap * torch.tanh(logits.float() / self.softcap)
        return logits


class Attention(nn.Module):
    def __init__(self, config: ModernConfig, layer: int) -> None:
        super().__init__()
        self.n_head, width = config.n_head, config.n_embd
        self.c_q = nn.Linear(width, width, bias=False)
        self.c_k = nn.Linear(width, width, bias=False)
        self.c_v = nn.Linear(width, width, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)
        self.ve_gate = (nn.Linear(min(GATE_CHANNELS, width), config.n_head, bias=False)
                        if config.value_embeddings and has_value_embedding(layer, config.n_layer)
                        else None)

    def forward(self, x: torch.Tensor, value_embedding: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None,
                layer: int = 0, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        heads = (B, T, self.n_head, C // self.n_head)
        q, k, v = (proj(x).view(heads).transpose(1, 2) for proj in (self.c_q, self.c_k, self.c_v))
        if self.ve_gate is not None and value_embedding is not None:
            gate = GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.transpose(1, 2)[..., None] * value_embedding.view(heads).transpose(1, 2)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            k, v = cache.write(layer, k, v)
            attn_mask = cache.mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=attn_mask is None)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModernConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: ModernConfig, layer: int) -> None:
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, value_embedding: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None,
                layer: int = 0, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(norm(x), value_embedding, rope, cache, layer, attn_mask)
        return x + self.mlp(norm(x))


class Trunk(nn.Module):
    def __init__(self, config: ModernConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])


class ModernGPT(nn.Module):
    """train_gpt2.py, sample.py and eval_hellaswag.py use it as they use model.GPT: forward,
    hidden_states, lm_head, generate, num_params, flops_per_token, from_checkpoint."""

    def __init__(self, config: ModernConfig) -> None:
        super().__init__()
        self.config = config
        # As GPT's: keep each block's input only and recompute the rest in the backward.
        self.activation_checkpointing = False
        self.transformer = Trunk(config)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_embd) for i in range(config.n_layer)
            if config.value_embeddings and has_value_embedding(i, config.n_layer)})
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.lm_head = SoftcappedHead(config.n_embd, config.vocab_size, config.logit_softcap)
        cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)  # not saved with the weights
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init (nanochat/gpt.py init_weights): uniform block matrices have no
        outliers at the same std; zero output projections make every block start as the
        identity, so the stream is the normalised embedding at step 0."""
        cfg = self.config
        nn.init.normal_(self.transformer.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = 3**0.5 * cfg.n_embd**-0.5  # uniform(-b, b) has std b / sqrt(3)
        for block in self.blocks():
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)  # gates a bit open
        for embedding in self.value_tables():
            nn.init.uniform_(embedding.weight, -bound, bound)
        if cfg.lambdas:
            depth = torch.arange(cfg.n_layer, dtype=torch.float32) / max(cfg.n_layer - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth)

    def blocks(self) -> list[Block]:
        return cast(list[Block], list(self.transformer.h))

    def value_tables(self) -> list[nn.Embedding]:
        """The value embeddings, in layer order."""
        return cast(list[nn.Embedding], list(self.value_embeds.values()))

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters; with `non_embedding`, less the lookup tables (token and value
        embeddings), which cost no matmul."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            n -= sum(e.weight.numel() for e in self.value_tables())
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul parameter plus attention's 12*L*C*T
        (PaLM, app. B), as model.GPT counts them."""
        cfg = self.config
        return (6.0 * self.num_params(non_embedding=True)
                + 12.0 * cfg.n_layer * cfg.n_embd * (seq_len or cfg.block_size))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(soft-capped logits, None) without targets; (None, mean loss) with them, targets of
        -1 ignored; the loss never holds all the logits at once."""
        x = self.hidden_states(idx, cache)
        if targets is None:
            return self.lm_head(x), None
        return None, linear_cross_entropy(x.flatten(0, -2), self.lm_head.weight,
                                          targets.flatten(), softcap=self.config.logit_softcap)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm's output for every position of `idx` (B, T), with GPT.hidden_states'
        conventions: causal by default, after any cached prefix; or `positions` (B, T) and a
        bool `attn_mask` (B, 1, T, T) for several sequences packed into one row."""
        positions = position_ids(idx, self.config.block_size, cache, positions, attn_mask)
        cos, sin = self.get_buffer("rope_cos")[positions], self.get_buffer("rope_sin")[positions]
        if positions.dim() == 2:  # (B, T, d/2) -> (B, 1, T, d/2), broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        rope = (cos, sin)
        x = x0 = norm(self.transformer.wte(idx))
        recompute = (self.activation_checkpointing and self.training and cache is None
                     and torch.is_grad_enabled())
        for layer, block in enumerate(self.transformer.h):
            if self.config.lambdas:
                x = self.resid_lambdas[layer] * x + self.x0_lambdas[layer] * x0
            table = self.value_embeds[str(layer)] if str(layer) in self.value_embeds else None
            value_embedding = table(idx) if table is not None else None
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, value_embedding, rope, None,
                                                      layer, attn_mask, use_reentrant=False)
            else:
                x = block(x, value_embedding, rope, cache, layer, attn_mask)
        return norm(x)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """GPT.generate's contract, by model.generate: `max_new_tokens` sampled tokens
        appended to `idx` (B, T) through a KV cache, a CUDA graph per step on CUDA."""
        return generate(self, self.config.kv_cache_shape(), idx, max_new_tokens, temperature,
                        top_k, top_p, generator, on_token)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> ModernGPT:
        """The model of a checkpoint as checkpoint.load returns it, which checked its kind,
        config, weights' names, shapes and values."""
        model = cls(ModernConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
        return model

