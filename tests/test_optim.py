"""optim.py: Muon against torch.optim.Muon and a Newton-Schulz written out here, its batching
and its split over two gloo ranks, every group stepping at its own rate, the schedule
multiplier, exact state round trips, and GPT-2's groups unchanged."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.optim._muon as torch_muon

import optim
from model import GPT, GPTConfig
from model_modern import ModernConfig, ModernGPT

A, B, C = 3.4445, -4.7750, 2.0315  # the quintic's coefficients (Keller Jordan's Muon post)
LR, WD, MOMENTUM = 0.02, 0.1, 0.95


def reference_newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One matrix, in `dtype`: scaled to Frobenius norm 1, then X <- aX + (bG + cG^2)X with
    G = XX^T on the wide orientation."""
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(float(torch.linalg.matrix_norm(x)), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


def fp32_torch_newton_schulz(grad: torch.Tensor, ns_coefficients: Any, ns_steps: int,
                             eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation, which casts to bf16 always, made fp32 so that
    the rest of torch's Muon (momentum, scaling, decay) can be compared at fp32 tolerance."""
    assert tuple(ns_coefficients) == (A, B, C) and ns_steps == 5
    return reference_newton_schulz(grad, ns_steps, eps, torch.float32)


def matrices(shapes: list[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


SHAPES = [(6, 10), (10, 6), (6, 10), (8, 8), (6, 10), (10, 6)]  # repeats, tall, square


# ------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_orthogonalize_is_the_written_out_iteration(shape):
    (g,) = matrices([shape], seed=1)
    ours = optim.orthogonalize(g[None])[0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference_newton_schulz(g), rtol=1e-4, atol=1e-5)
    # What it is for: singular values near 1 (the quintic leaves them in about 0.7..1.2).
    singular = torch.linalg.svdvals(ours.double())
    assert singular.min() > 0.6 and singular.max() < 1.25


def test_batched_equals_one_at_a_time():
    stacked = torch.stack(matrices([(6, 10)] * 5, seed=2))
    one_by_one = torch.stack([optim.orthogonalize(m[None])[0] for m in stacked])
    torch.testing.assert_close(optim.orthogonalize(stacked), one_by_one, rtol=1e-6, atol=1e-6)


def test_bf16_iteration_matches_torchs_own():
    for g in matrices([(6, 10), (10, 6)], seed=3):
        theirs = torch_muon._zeropower_via_newtonschulz(g, (A, B, C), 5, 1e-7)
        ours = optim.orthogonalize(g[None], torch.bfloat16)[0]
        assert ours.dtype == theirs.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=0.03)


def test_newton_schulz_runs_in_fp32_on_cpu():
    assert optim.newton_schulz_dtype(torch.device("cpu")) == torch.float32


# ------------------------------------------------------------------------------------ Muon


def run_muon(optimizer_of: Any, params: list[torch.Tensor], steps: int,
             seed: int = 4) -> list[torch.Tensor]:
    """`steps` steps of optimizer_of(params) on gradients drawn from `seed`."""
    params = [p.clone().requires_grad_() for p in params]
    optimizer = optimizer_of(params)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return [p.detach() for p in params]


def ours_muon(params: list[torch.Tensor]) -> optim.MuonAdamW:
    return optim.MuonAdamW([dict(kind="muon", params=params, lr=LR, weight_decay=WD,
                                 momentum=MOMENTUM)])


def ours_normuon(params: list[torch.Tensor]) -> optim.MuonAdamW:
    """The modern recipe's Muon: NorMuon's second moment and cautious decay."""
    return optim.MuonAdamW([dict(kind="muon", params=params, lr=LR, weight_decay=WD,
                                 momentum=MOMENTUM, beta2=0.9, cautious_weight_decay=True)])


MUONS = {"plain": ours_muon, "normuon": ours_normuon}


def test_muon_matches_torch_muon_in_fp32(monkeypatch):
    start = matrices(SHAPES, seed=5)
    ours = run_muon(ours_muon, start, steps=4)
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", fp32_torch_newton_schulz)
    theirs = run_muon(lambda ps: torch.optim.Muon(ps, lr=LR, weight_decay=WD,
                                                  momentum=MOMENTUM), start, steps=4)
    for o, t, s in zip(ours, theirs, start, strict=True):
        assert not torch.equal(o, s)  # it moved
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-6)


def test_muon_in_bf16_matches_unmodified_torch_muon(monkeypatch):
    start = matrices(SHAPES, seed=6)
    theirs = run_muon(lambda ps: torch.optim.Muon(ps, lr=LR, weight_decay=WD,
                                                  momentum=MOMENTUM), start, steps=2)
    monkeypatch.setattr(optim, "newton_schulz_dtype", lambda device: torch.bfloat16)
    ours = run_muon(ours_muon, start, steps=2)
    for o, t, s in zip(ours, theirs, start, strict=True):
        moved = (t - s).abs().max()
        assert (o - t).abs().max() <= 0.03 * moved


def _muon_rank(rank: int, store: str, out: str, muon: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    try:
        counted: list[int] = []
        real = optim.orthogonalize

        def counting(updates: torch.Tensor, *args: Any) -> torch.Tensor:
            counted.append(updates.size(0))
            return real(updates, *args)
        optim.orthogonalize = counting  # type: ignore[assignment]
        params = run_muon(MUONS[muon], matrices(SHAPES, seed=7), steps=3)
        torch.save({"params": params, "counted": counted}, f"{out}/rank{rank}.pt")
        # Both ranks past every collective before either tears gloo down: a rank that left
        # early once aborted the other in CI ("terminate called without an active exception").
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
@pytest.mark.parametrize("muon", MUONS)
def test_two_gloo_ranks_share_the_work_and_equal_one_process(tmp_path: Path, muon: str):
    mp.spawn(_muon_rank, args=(str(tmp_path / "store"), str(tmp_path), muon), nprocs=2)
    single = run_muon(MUONS[muon], matrices(SHAPES, seed=7), steps=3)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        for p, q in zip(result["params"], single, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    # Per step, shapes (6, 10) x3, (10, 6) x2, (8, 8) x1: rank 0 takes the first
    # ceil(K/2) of each batch, rank 1 the rest (none of the single (8, 8)).
    assert ranks[0]["counted"] == [2, 1, 1] * 3
    assert ranks[1]["counted"] == [1, 1] * 3


# ------------------------------------------------------------------ groups of the modern


def tiny_modern(**overrides: Any) -> ModernGPT:
    torch.manual_seed(0)
    return ModernGPT(ModernConfig(**{**dict(block_size=16, vocab_size=50, n_layer=2,
                                            n_head=2, n_embd=16), **overrides}))


def make_grads(model: GPT | ModernGPT, seed: int) -> None:
    """Gradients of the loss on a batch drawn from `seed`, at the model's weights."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
    model.zero_grad()
    _, loss = model(idx, idx.roll(-1, dims=1))
    assert loss is not None
    loss.backward()


class ReferenceNorMuon:
    """The modern recipe's Muon written out one matrix at a time in float64: Nesterov momentum,
    the Newton-Schulz iteration, the update's Frobenius norm set to sqrt(min(rows, cols)),
    each row (each column of a wide matrix) divided by the root of the running mean (beta2)
    of its mean square, the norm restored, then decay where update and weight agree in sign
    and the step lr * sqrt(max(1, rows / cols))."""

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float,
                 momentum: float, beta2: float) -> None:
        self.params, self.weight_decay, self.momentum, self.beta2 = (
            params, weight_decay, momentum, beta2)
        self.param_groups = [{"lr": lr}]
        self.buffers = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        self.seconds: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self) -> None:
        lr = self.param_groups[0]["lr"]
        for i, p in enumerate(self.params):
            assert p.grad is not None
            grad = p.grad.double()
            self.buffers[i] = self.momentum * self.buffers[i] + (1 - self.momentum) * grad
            update = (1 - self.momentum) * grad + self.momentum * self.buffers[i]
            rows, cols = p.shape
            o = reference_newton_schulz(update)
            # The floors keep an all-zero update (a zero-initialised layer's first) at zero.
            o = o * math.sqrt(min(rows, cols)) / torch.linalg.matrix_norm(o).clamp(min=1e-6)
            mean_square = (o ** 2).mean(dim=1 if rows >= cols else 0, keepdim=True)
            previous = self.seconds[i]
            second = (1 - self.beta2) * mean_square + (
                0 if previous is None else self.beta2 * previous)
            self.seconds[i] = second
            n = o / second.clamp(min=1e-10).sqrt()
            n = n * torch.linalg.matrix_norm(o) / torch.linalg.matrix_norm(n).clamp(min=1e-10)
            w = p.double()
            w = w - lr * self.weight_decay * w * (n * w >= 0)
            w = w - lr * math.sqrt(max(1.0, rows / cols)) * n
            p.copy_(w)


def reference_step_by_group(model: ModernGPT, optimizer: optim.MuonAdamW,
                            multipliers: list[float], monkeypatch) -> dict[str, torch.Tensor]:
    """The weights after stepping a copy of `model` group by group with torch's own AdamW and
    Muon (ReferenceNorMuon where the group has NorMuon's beta2), each at the group's
    hyperparameters and the schedule's `multipliers`."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", fp32_torch_newton_schulz)
    ref = copy.deepcopy(model)
    ref_params = dict(ref.named_parameters())
    name_of = {id(p): n for n, p in model.named_parameters()}
    torch_optimizers: list[torch.optim.Optimizer] = []
    for group in optimizer.param_groups:
        params = [ref_params[name_of[id(p)]] for p in group["params"]]
        if group["kind"] == "adamw":
            torch_optimizers.append(torch.optim.AdamW(
                params, lr=group["initial_lr"], betas=group["betas"], eps=group["eps"],
                weight_decay=group["weight_decay"]))
        elif group["beta2"] is not None:
            assert group["cautious_weight_decay"]
            torch_optimizers.append(ReferenceNorMuon(  # type: ignore[arg-type]
                params, group["initial_lr"], group["weight_decay"], group["momentum"],
                group["beta2"]))
        else:
            torch_optimizers.append(torch.optim.Muon(
                params, lr=group["initial_lr"], weight_decay=group["weight_decay"],
                momentum=group["momentum"]))
    for step, multiplier in enumerate(multipliers):
        make_grads(ref, seed=step)
        for torch_optimizer, group in zip(torch_optimizers, optimizer.param_groups,
                                          strict=True):
            for torch_group in torch_optimizer.param_groups:
                torch_group["lr"] = group["initial_lr"] * multiplier
            torch_optimizer.step()
    return {n: p.detach() for n, p in ref.named_parameters()}


def test_every_group_moves_its_parameters_at_its_own_rate(monkeypatch):
    model = tiny_modern()
    optimizer = optim.modern_optimizer(model)
    assert [g["name"] for g in optimizer.param_groups] == [
        "embedding", "value_embedding", "head", "matrix", "resid_lambda", "x0_lambda"]
    rates = [g["initial_lr"] for g in optimizer.param_groups]
    assert len(set(rates)) == len(rates)  # a group stepping at another's rate would show
    multipliers = [1.0, 0.5, 0.25]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = reference_step_by_group(model, optimizer, multipliers, monkeypatch)
    for step, multiplier in enumerate(multipliers):
        make_grads(model, seed=step)
        optim.set_lr_multiplier(optimizer, multiplier)
        optimizer.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p, start[name]), f"{name} never moved"
        # Rounding only: the embeddings' rate is about 1 at this width and eps 1e-10 turns
        # a rounding-level gradient into a whole step; a wrong rate is off by 2x or more.
        assert torch.allclose(p.detach(), expected[name], rtol=1e-4, atol=1e-4), name


def test_modern_rates_are_nanochats_scaled_by_width():
    for width in (16, 768 // 12 * 12):
        model = tiny_modern(n_embd=width, n_head=2 if width == 16 else 12, n_layer=1)
        groups = {g["name"]: g for g in optim.modern_groups(model)}
        scale = math.sqrt(768 / width)
        assert groups["embedding"]["lr"] == pytest.approx(0.3 * scale)
        assert groups["value_embedding"]["lr"] == pytest.approx(0.15 * scale)
        assert groups["head"]["lr"] == pytest.approx(0.008 * scale)
        assert groups["matrix"]["lr"] == 0.02 and groups["matrix"]["kind"] == "muon"
        assert groups["resid_lambda"]["lr"] == pytest.approx(0.005)
        assert groups["x0_lambda"]["lr"] == 0.5 and groups["x0_lambda"]["betas"] == (0.96, 0.95)
        assert all(g["eps"] == 1e-10 for g in groups.values() if g["kind"] == "adamw")


def test_groups_cover_every_parameter_once_whatever_is_switched_off():
    for flags in ({}, {"value_embeddings": False}, {"lambdas": False}):
        model = tiny_modern(**flags)
        grouped = [p for g in optim.modern_groups(model) for p in g["params"]]
        assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    adamw_only = optim.modern_groups(tiny_modern(), matrix_optimizer="adamw")
    assert {g["kind"] for g in adamw_only} == {"adamw"}


def test_lr_multiplier_scales_every_group_and_zero_stops_all():
    model = tiny_modern()
    optimizer = optim.modern_optimizer(model)
    optim.set_lr_multiplier(optimizer, 0.25)
    for group in optimizer.param_groups:
        assert group["lr"] == group["initial_lr"] * 0.25
    optim.set_lr_multiplier(optimizer, 0.0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_grads(model, seed=0)
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, start[name]), name


def test_muon_momentum_warms_up_then_down_with_the_warmdown():
    assert optim.muon_momentum(0, 1000, 500) == 0.85
    assert optim.muon_momentum(200, 1000, 500) == pytest.approx(0.91)
    assert optim.muon_momentum(400, 1000, 500) == 0.97
    assert optim.muon_momentum(750, 1000, 500) == pytest.approx(0.935)
    assert optim.muon_momentum(1000, 1000, 500) == pytest.approx(0.90)
    model = tiny_modern()
    optimizer = optim.modern_optimizer(model)
    optim.set_muon_momentum(optimizer, 0.9)
    assert [g.get("momentum") for g in optimizer.param_groups if g["kind"] == "muon"] == [0.9]


# ------------------------------------------------------------------------- state round trip


def saved_and_loaded(state: dict[str, Any]) -> dict[str, Any]:
    """Through torch.save and a weights_only load, as checkpoints go."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_gives_identical_next_steps():
    model = tiny_modern()
    optimizer = optim.modern_optimizer(model)
    for step in range(2):
        make_grads(model, seed=step)
        optimizer.step()
    resumed = copy.deepcopy(model)
    optimizer_again = optim.modern_optimizer(resumed)
    optimizer_again.load_state_dict(saved_and_loaded(optimizer.state_dict()))
    for step in (2, 3):
        for m, o in ((model, optimizer), (resumed, optimizer_again)):
            make_grads(m, seed=step)
            optim.set_lr_multiplier(o, 0.5)
            o.step()
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_load_state_dict_refuses_another_shape_with_what_differs():
    state = optim.modern_optimizer(tiny_modern()).state_dict()
    model = tiny_modern()
    make_grads(model, seed=0)
    stepped = optim.modern_optimizer(model)
    stepped.step()
    wider = optim.modern_optimizer(tiny_modern(n_embd=32))
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 has shape \(50, 16\), "
                                         r"the parameter \(50, 32\)"):
        wider.load_state_dict(stepped.state_dict())
    with pytest.raises(ValueError, match="5 parameter groups, this optimizer has 6"):
        optim.modern_optimizer(tiny_modern()).load_state_dict(
            optim.modern_optimizer(tiny_modern(value_embeddings=False)).state_dict())
    deeper = optim.modern_optimizer(tiny_modern(n_layer=3))
    with pytest.raises(ValueError, match="group 'value_embedding' holds 1 parameters"):
        deeper.load_state_dict(state)
    with pytest.raises(ValueError, match="not a MuonAdamW state"):
        stepped.load_state_dict({"muon": {}, "adamw": {}})


# ------------------------------------------------------------------------------- GPT-2


def tiny_gpt2() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16))


def test_gpt2_groups_decay_exactly_the_2d_weights():
    model = tiny_gpt2()
    decay, no_decay = optim.gpt2_groups(model, 6e-4, 0.1, (0.9, 0.95), 1e-8)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        n for n, p in model.named_parameters() if n.endswith(".weight") and "ln_" not in n)
    assert all(names[id(p)].endswith(".bias") or ".ln_" in names[id(p)]
               or names[id(p)].startswith("transformer.ln_f") for p in no_decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    for group in (decay, no_decay):
        assert (group["lr"], group["initial_lr"], group["betas"], group["eps"]) == (
            6e-4, 6e-4, (0.9, 0.95), 1e-8)


def test_gpt2_optimizer_resumes_a_state_saved_without_initial_lr():
    model = tiny_gpt2()
    old = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "initial_lr"}
         for g in optim.gpt2_groups(model, 6e-4, 0.1)], fused=False)
    make_grads(model, seed=0)
    old.step()
    ours = optim.gpt2_optimizer(model, 6e-4, 0.1)
    ours.load_state_dict(saved_and_loaded(old.state_dict()))
    optim.set_lr_multiplier(ours, 0.5)
    assert [g["lr"] for g in ours.param_groups] == [3e-4, 3e-4]
    assert all(torch.equal(ours.state[p]["exp_avg"], old.state[p]["exp_avg"])
               for p in model.parameters())


def test_a_state_saved_before_normuon_resumes_as_plain_muon():
    """A modern checkpoint's optimizer state from before NorMuon has Muon groups without
    beta2 and cautious_weight_decay: it loads and steps as the plain Muon it was."""
    start = matrices(SHAPES, seed=3)
    plain = run_muon(ours_muon, start, steps=2)
    params = [p.clone().requires_grad_() for p in start]
    old = ours_muon(params).state_dict()
    for group in old["param_groups"]:
        del group["beta2"], group["cautious_weight_decay"]
    optimizer = ours_normuon(params)
    optimizer.load_state_dict(old)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    for p, q in zip(params, plain, strict=True):
        torch.testing.assert_close(p.detach(), q)
