"""Optimizers of both recipes: parameter groups by kind, each with its own rate, and Muon.

Every group stores its `initial_lr`; the training loop applies one schedule to all of them
as a multiplier, `set_lr_multiplier(optimizer, m)`: group["lr"] = group["initial_lr"] * m.

- gpt2: `gpt2_optimizer`, torch.optim.AdamW over `gpt2_groups`' two groups (decay on
  2-D weights, none on biases and norms): the 2019 recipe, unchanged.
- modern: `modern_optimizer`, a MuonAdamW over model_modern.ModernGPT's groups by kind
  (`modern_groups`): token embedding, value embeddings, head, residual lambdas, x0 lambdas
  with AdamW, each at its own rate, betas, eps and weight decay; block matrices with Muon.

Muon here is torch.optim.Muon's algorithm (Nesterov momentum, then the update replaced by the
Newton-Schulz quintic's approximate orthogonalisation, scaled by sqrt(max(1, rows/cols)),
decoupled weight decay) with three changes to how it runs: the iteration is in bf16 only on a
GPU that computes bf16 natively and in fp32 elsewhere (torch casts to bf16 always: slow on
CPUs without bf16 instructions); the matrices of one shape go through it as one batch
(torch: one at a time); and under torch.distributed each rank orthogonalises its share of
each batch and the results are all-gathered (torch: every rank repeats all of it). The
modern recipe's group adds nanochat's two refinements, each a group setting: NorMuon
(`beta2`: the orthogonal update's rows, or columns when it is wider, each divided by the
root of its running mean square, the update's norm kept) and cautious weight decay (only
where update and weight agree in sign).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim.adamw import adamw

import runtime

# torch.optim._muon's defaults (from Keller Jordan's Muon): the quintic's coefficients, its
# steps, and the floor of the norm that scales a matrix into the iteration's domain.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7

# The modern recipe's rates, tuned at width 768 by nanochat (scripts/base_train.py flags
# --embedding-lr, --unembedding-lr, --matrix-lr, --scalar-lr; nanochat/gpt.py
# setup_optimizer for each group's betas, eps, weight decay and the ratios below; 2026-07).
EMBEDDING_LR = 0.3
HEAD_LR = 0.008
MATRIX_LR = 0.02
SCALAR_LR = 0.5
REFERENCE_WIDTH = 768  # AdamW rates scale by (width / 768) ** -0.5 (nanochat/gpt.py)
ADAM_EPS = 1e-10
# nanochat's Muon decays weights "cautiously" (only where update and weight agree in sign),
# as the modern recipe's Muon group does here, by 0.28 scaled by batch and horizon and
# cosine-annealed; that scaling is not ported, so the value stays torch.optim.Muon's 0.1.
MATRIX_WEIGHT_DECAY = 0.1
# Muon momentum: 0.85 warmed to 0.97 over 400 steps, down to 0.90 over the LR warmdown
# (nanochat scripts/base_train.py get_muon_momentum).
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_END = 0.85, 0.97, 0.90
MOMENTUM_WARMUP_STEPS = 400

ADAMW_DEFAULTS: dict[str, Any] = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                      fused=False)
# beta2 None and plain decay: torch.optim.Muon's update. The modern recipe's Muon group sets
# both as nanochat's does (NorMuon's per-row second moment, cautious weight decay).
MUON_DEFAULTS: dict[str, Any] = dict(momentum=0.95, nesterov=True, weight_decay=0.1,
                                     ns_coefficients=NS_COEFFICIENTS, ns_steps=NS_STEPS,
                                     eps=NS_EPS, beta2=None, cautious_weight_decay=False)


# ------------------------------------------------------------------------- Newton-Schulz


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a CUDA device that computes it natively, fp32 elsewhere (on CPUs bf16 matmuls
    are emulated on most, several times slower than fp32)."""
    if device.type == "cuda" and runtime.bf16_supported(device):
        return torch.bfloat16
    return torch.float32


def orthogonalize(updates: torch.Tensor, dtype: torch.dtype = torch.float32,
                  steps: int = NS_STEPS,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS) -> torch.Tensor:
    """The Newton-Schulz quintic applied to each matrix of `updates` (K, rows, cols) at once,
    in `dtype`: each scaled to Frobenius norm 1 (so its spectral norm is at most 1), then
    X <- a X + (b X X^T + c (X X^T)^2) X, `steps` times, on the wide orientation (the
    smaller Gram matrix). The singular values go to roughly 1 (0.7 to 1.2), the singular
    vectors stay."""
    a, b, c = coefficients
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def shared_orthogonalize(updates: torch.Tensor, dtype: torch.dtype, steps: int,
                         coefficients: tuple[float, float, float], eps: float) -> torch.Tensor:
    """orthogonalize(updates), under torch.distributed with each rank computing a contiguous
    share of the K matrices and all ranks gathering every result; one process computes all."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return orthogonalize(updates, dtype, steps, coefficients, eps)
    world, rank, count = dist.get_world_size(), dist.get_rank(), updates.size(0)
    share = -(-count // world)
    mine = updates[rank * share:(rank + 1) * share]  # the last ranks' may be short or empty
    padded = updates.new_zeros((share, *updates.shape[1:]), dtype=dtype)
    if mine.size(0):
        padded[:mine.size(0)] = orthogonalize(mine, dtype, steps, coefficients, eps)
    gathered = updates.new_empty((share * world, *updates.shape[1:]), dtype=dtype)
    dist.all_gather_into_tensor(gathered, padded)
    return gathered[:count]


# ----------------------------------------------------------------------------- optimizer


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over groups of two kinds: group["kind"] "adamw" (torch's AdamW, fused
    where the group says so) or "muon" (see the module's docstring). Each group also has a
    "name" (its kind of parameter) and an "initial_lr" for set_lr_multiplier.

    Under DDP every rank holds the same averaged gradients and steps every parameter the same
    way; only the Newton-Schulz work is split between the ranks. Its state is per parameter
    (AdamW's step, exp_avg, exp_avg_sq; Muon's momentum_buffer and, with beta2, NorMuon's
    second_moment per row or column), as torch's optimizers keep
    it, so state_dict and torch.distributed.checkpoint treat it as theirs."""

    def __init__(self, groups: Iterable[dict[str, Any]]) -> None:
        filled = []
        for group in groups:
            kind = group.get("kind")
            if kind not in ("adamw", "muon"):
                raise ValueError(f"optimizer group {group.get('name')!r}: kind is {kind!r}, "
                                 "not 'adamw' or 'muon'")
            defaults = ADAMW_DEFAULTS if kind == "adamw" else MUON_DEFAULTS
            filled.append({**defaults, "name": kind, **group,
                           "initial_lr": group.get("initial_lr", group["lr"])})
        super().__init__(filled, defaults={})
        for group in self.param_groups:
            if group["kind"] == "muon" and any(p.dim() != 2 for p in group["params"]):
                raise ValueError(f"optimizer group {group['name']!r}: Muon takes 2-D "
                                 "matrices only")

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw_step(group)
            else:
                self._muon_step(group)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if not state:  # torch.optim.AdamW's layout, the step on the device only if fused
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device)
                                 if group["fused"] else torch.tensor(0.0))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        adamw(params, [p.grad for p in params],  # type: ignore[misc]
              [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], foreach=None, fused=group["fused"], amsgrad=False,
              beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _muon_step(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        momentum, lr = group["momentum"], group["lr"]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)  # type: ignore[arg-type]
        updates = (torch._foreach_lerp(grads, buffers, momentum)  # type: ignore[arg-type]
                   if group["nesterov"] else buffers)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        dtype = newton_schulz_dtype(params[0].device)
        for (rows, cols), indices in by_shape.items():
            same = [params[i] for i in indices]
            orthogonal = shared_orthogonalize(
                torch.stack([updates[i] for i in indices]), dtype, group["ns_steps"],
                group["ns_coefficients"], group["eps"])
            update = orthogonal.to(same[0].dtype)
            # .get: a state saved before these settings existed loads groups without them.
            if group.get("beta2") is not None:
                # NorMuon (nanochat's Muon): the update's Frobenius norm set to
                # sqrt(min(rows, cols)), then each row (or column: along the longer side)
                # divided by the root of its running mean square, the total norm kept.
                update = update * (min(rows, cols) ** 0.5 / update.norm(
                    dim=(-2, -1), keepdim=True).clamp(min=1e-6))
                mean_square = update.square().mean(dim=-1 if rows >= cols else -2, keepdim=True)
                for p, square in zip(same, mean_square, strict=True):
                    self.state[p].setdefault("second_moment", torch.zeros_like(square))
                seconds = torch.stack([self.state[p]["second_moment"] for p in same])
                seconds.lerp_(mean_square, 1 - group["beta2"])
                for p, second in zip(same, seconds, strict=True):
                    self.state[p]["second_moment"].copy_(second)
                normalized = update * seconds.clamp(min=1e-10).rsqrt()
                update = normalized * (update.norm(dim=(-2, -1), keepdim=True) / normalized.norm(
                    dim=(-2, -1), keepdim=True).clamp(min=1e-10))
            decay = lr * group["weight_decay"]
            if group.get("cautious_weight_decay", False):
                # Decay only where the update and the weight agree in sign (nanochat's Muon).
                for p, u in zip(same, update.unbind(0), strict=True):
                    p.sub_(p * (u * p >= 0), alpha=decay)
            else:
                torch._foreach_mul_(same, 1 - decay)
            torch._foreach_add_(same, list(update.unbind(0)),
                                alpha=-lr * math.sqrt(max(1.0, rows / cols)))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, after checking that `state_dict` is this optimizer's: the same
        groups (kind, name, number of parameters) and state tensors of its parameters'
        shapes; else a ValueError naming the first difference."""
        if not isinstance(state_dict, dict) or not isinstance(
                state_dict.get("param_groups"), list) or "state" not in state_dict:
            keys = ", ".join(map(repr, state_dict)) if isinstance(state_dict, dict) else "none"
            raise ValueError(f"optimizer state: not a MuonAdamW state (its keys: {keys})")
        saved, ours = state_dict["param_groups"], self.param_groups
        if len(saved) != len(ours):
            raise ValueError(f"optimizer state: {len(saved)} parameter groups, this optimizer "
                             f"has {len(ours)} ({', '.join(g['name'] for g in ours)})")
        for i, (theirs, group) in enumerate(zip(saved, ours, strict=True)):
            if (theirs.get("kind"), theirs.get("name")) != (group["kind"], group["name"]):
                raise ValueError(f"optimizer state: group {i} is {theirs.get('name')!r} "
                                 f"({theirs.get('kind')}), this optimizer's is "
                                 f"{group['name']!r} ({group['kind']})")
            if len(theirs["params"]) != len(group["params"]):
                raise ValueError(f"optimizer state: group {group['name']!r} holds "
                                 f"{len(theirs['params'])} parameters, this optimizer's "
                                 f"{len(group['params'])}")
        check_moment_shapes(self, state_dict)
        super().load_state_dict(state_dict)


# ------------------------------------------------------------------------------ schedule


def set_lr_multiplier(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Every group's rate to its initial rate times `multiplier` (the schedule's value)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier


def set_muon_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    for group in optimizer.param_groups:
        if group.get("kind") == "muon":
            group["momentum"] = momentum


def muon_momentum(step: int, max_steps: int, warmdown_steps: int,
                  warmup_steps: int = MOMENTUM_WARMUP_STEPS) -> float:
    """Muon's momentum at `step`: 0.85 rising linearly to 0.97 over `warmup_steps`, then
    0.97, falling linearly to 0.90 over the last `warmdown_steps` (the LR's warmdown)."""
    decay_start = max_steps - warmdown_steps
    if step < warmup_steps:
        frac = step / warmup_steps
        return (1 - frac) * MOMENTUM_START + frac * MOMENTUM_PEAK
    if warmdown_steps > 0 and step >= decay_start:
        frac = min(1.0, (step - decay_start) / warmdown_steps)
        return (1 - frac) * MOMENTUM_PEAK + frac * MOMENTUM_END
    return MOMENTUM_PEAK


# -------------------------------------------------------------------------------- groups


def gpt2_groups(model: nn.Module, lr: float, weight_decay: float,
                betas: tuple[float, float] = (0.9, 0.95),
                eps: float = 1e-8) -> list[dict[str, Any]]:
    """GPT-2's AdamW groups: weight decay on the 2-D weights (matmuls, embeddings), none on
    biases and LayerNorms, one rate for all."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    common = dict(lr=lr, initial_lr=lr, betas=betas, eps=eps)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay,
             **common},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **common}]


def gpt2_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                   device_type: str = "cpu") -> torch.optim.AdamW:
    """torch.optim.AdamW over gpt2_groups, fused on CUDA: the 2019 recipe's optimizer, whose
    state today's checkpoints hold. A state saved before groups had an initial_lr gets this
    run's on load."""
    optimizer = torch.optim.AdamW(gpt2_groups(model, lr, weight_decay, betas, eps), lr=lr,
                                  betas=betas, eps=eps, fused=device_type == "cuda")
    optimizer.register_load_state_dict_pre_hook(_keep_initial_lrs)
    optimizer.register_load_state_dict_pre_hook(check_moment_shapes)
    return optimizer


def check_moment_shapes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """A ValueError naming the first state tensor of `state_dict` whose shape is not its
    parameter's: torch's load_state_dict does not compare them, and the first step would fail
    naming nothing. NorMuon's second moment holds one value per row (per column when wider).
    Groups that do not pair up are left to torch's load, which refuses them."""
    saved = state_dict.get("param_groups")
    states = state_dict.get("state")
    ours = optimizer.param_groups
    if not (isinstance(saved, list) and isinstance(states, dict) and len(saved) == len(ours)
            and all(isinstance(g, dict) and len(g.get("params", ())) == len(group["params"])
                    for g, group in zip(saved, ours, strict=True))):
        return
    saved_ids = chain.from_iterable(g["params"] for g in saved)
    params = chain.from_iterable(g["params"] for g in ours)
    for index, param in zip(saved_ids, params, strict=True):
        moments = states.get(index, {})
        rows, cols = (param.shape if param.dim() == 2 else (0, 0))
        for key, value in moments.items() if isinstance(moments, dict) else ():
            shape = param.shape
            if key == "second_moment":
                shape = torch.Size((rows, 1) if rows >= cols else (1, cols))
            if key != "step" and isinstance(value, torch.Tensor) and value.shape != shape:
                raise ValueError(f"optimizer state: {key} of parameter {index} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")


def _keep_initial_lrs(optimizer: torch.optim.Optimizer,
                      state_dict: dict[str, Any]) -> dict[str, Any]:
    groups = state_dict.get("param_groups")
    if isinstance(groups, list) and len(groups) == len(optimizer.param_groups):
        for theirs, ours in zip(groups, optimizer.param_groups, strict=True):
            if isinstance(theirs, dict):
                theirs.setdefault("initial_lr", ours["initial_lr"])
    return state_dict


def modern_groups(model: nn.Module, embedding_lr: float = EMBEDDING_LR,
                  head_lr: float = HEAD_LR, matrix_lr: float = MATRIX_LR,
                  scalar_lr: float = SCALAR_LR,
                  matrix_weight_decay: float = MATRIX_WEIGHT_DECAY,
                  matrix_optimizer: str = "muon", fused: bool = False) -> list[dict[str, Any]]:
    """model_modern.ModernGPT's groups by kind, nanochat's recipe: each AdamW group with its
    own betas and weight decay; the embedding, value-embedding and head rates scaled by
    (width / 768) ** -0.5, the value embeddings at half the embedding's rate, the residual
    lambdas at 1% of `scalar_lr`. Block matrices with Muon, or with AdamW at `matrix_lr`
    (matrix_optimizer="adamw", the ablation without Muon). Groups with no parameters (the
    model without value embeddings or lambdas) are left out."""
    named = dict(model.named_parameters())
    width = named["transformer.wte.weight"].size(1)
    scale = (width / REFERENCE_WIDTH) ** -0.5
    by_kind: dict[str, list[nn.Parameter]] = {
        "embedding": [named["transformer.wte.weight"]],
        "value_embedding": [p for n, p in named.items() if n.startswith("value_embeds.")],
        "head": [named["lm_head.weight"]],
        "matrix": [p for n, p in named.items() if n.startswith("transformer.h.")],
        "resid_lambda": [p for n, p in named.items() if n == "resid_lambdas"],
        "x0_lambda": [p for n, p in named.items() if n == "x0_lambdas"],
    }
    grouped = [p for ps in by_kind.values() for p in ps]
    if len(grouped) != len(named):
        left = [n for n, p in named.items() if all(p is not q for q in grouped)]
        raise ValueError(f"modern_groups: parameters of no kind: {', '.join(left)}")
    adam = dict(kind="adamw", eps=ADAM_EPS, fused=fused)
    settings: dict[str, dict[str, Any]] = {
        "embedding": dict(**adam, lr=embedding_lr * scale, betas=(0.8, 0.995),
                          weight_decay=0.001),
        "value_embedding": dict(**adam, lr=embedding_lr * scale * 0.5, betas=(0.8, 0.995),
                                weight_decay=0.01),
        "head": dict(**adam, lr=head_lr * scale, betas=(0.8, 0.96), weight_decay=0.01),
        "matrix": (dict(kind="muon", lr=matrix_lr, momentum=0.95, beta2=0.9,
                        cautious_weight_decay=True, weight_decay=matrix_weight_decay)
                   if matrix_optimizer == "muon" else
                   dict(**adam, lr=matrix_lr, betas=(0.8, 0.95),
                        weight_decay=matrix_weight_decay)),
        "resid_lambda": dict(**adam, lr=scalar_lr * 0.01, betas=(0.8, 0.95),
                             weight_decay=0.05),
        "x0_lambda": dict(**adam, lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0),
    }
    if matrix_optimizer not in ("muon", "adamw"):
        raise ValueError(f"matrix_optimizer={matrix_optimizer!r}: choose muon or adamw")
    return [{"name": kind, "params": params, **settings[kind]}
            for kind, params in by_kind.items() if params]


def modern_optimizer(model: nn.Module, device_type: str = "cpu",
                     **rates: Any) -> MuonAdamW:
    """MuonAdamW over modern_groups(model, **rates), the AdamW groups fused on CUDA."""
    return MuonAdamW(modern_groups(model, fused=device_type == "cuda", **rates))
