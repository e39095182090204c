"""model_modern.py: each piece of the modern model against its formula written out here on a
tiny input, its init, the KV cache, the loss, torch.compile and checkpoints."""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
from typing import Any

import pytest
import torch
from torch.nn import functional as F

import model_modern as mm
from model import GPT, GPTConfig, KVCache, linear_cross_entropy
from model_modern import ModernConfig, ModernGPT

TINY: dict[str, Any] = dict(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16)


def tiny(seed: int = 0, **overrides: Any) -> ModernGPT:
    torch.manual_seed(seed)
    return ModernGPT(ModernConfig(**{**TINY, **overrides}))


def with_random_outputs(model: ModernGPT, seed: int = 1) -> ModernGPT:
    """The zero-initialised output projections made random, so that every block computes
    something (at init each block is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks():
            for linear in (block.attn.c_proj, block.mlp.c_proj):
                linear.weight.copy_(0.3 * torch.randn(linear.weight.shape, generator=gen))
    return model


def rms_normalised(x: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(x.dtype).eps
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------------ the pieces


def test_rms_norm_has_no_parameters_and_unit_rms():
    x = torch.tensor([[3.0, 4.0], [1.0, -1.0]])
    expected = torch.tensor([[3.0, 4.0], [1.0, -1.0]]) / torch.tensor([[12.5**0.5], [1.0]])
    torch.testing.assert_close(mm.norm(x), expected)
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "ln" in n or "norm" in n or n.endswith(".bias")]


def test_rotary_turns_each_channel_pair_by_its_positions_angle():
    cos, sin = mm.rotary_tables(block_size=4, head_size=4)
    # Pair j of position p turns by p * base ** (-2j / d): pair 0 by p, pair 1 by p / sqrt(base).
    assert torch.allclose(cos[3], torch.tensor([math.cos(3.0), math.cos(3 / 100000**0.5)]))
    assert torch.allclose(sin[3], torch.tensor([math.sin(3.0), math.sin(3 / 100000**0.5)]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)  # pairs (1, 3) and (2, 4)
    angle = 0.5
    c, s = torch.full((1, 2), math.cos(angle)), torch.full((1, 2), math.sin(angle))
    turned = mm.rotate(x, c, s).flatten()
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    expected = [1 * cos_a - 3 * sin_a, 2 * cos_a - 4 * sin_a,
                1 * sin_a + 3 * cos_a, 2 * sin_a + 4 * cos_a]
    torch.testing.assert_close(turned, torch.tensor(expected))


def test_rotary_scores_depend_on_relative_position_only():
    cos, sin = mm.rotary_tables(block_size=12, head_size=8)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)

    def score(m: int, n: int) -> float:
        qm = mm.rotate(q.view(1, 1, 1, 8), cos[m], sin[m])
        kn = mm.rotate(k.view(1, 1, 1, 8), cos[n], sin[n])
        return float((qm * kn).sum())
    assert score(5, 2) == pytest.approx(score(10, 7), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_relu_squared_mlp():
    mlp = mm.MLP(ModernConfig(**{**TINY, "n_embd": 2, "n_head": 1}))
    with torch.no_grad():
        mlp.c_fc.weight.zero_()
        mlp.c_fc.weight[:4] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
        mlp.c_proj.weight.zero_()
        mlp.c_proj.weight[0, :4] = 1.0
        mlp.c_proj.weight[1, 1] = 1.0
    # hidden (-1, 2, 1, -3): ReLU^2 gives (0, 4, 1, 0); the rows sum all and pick the second.
    out = mlp(torch.tensor([[-1.0, 2.0]]))
    torch.testing.assert_close(out, torch.tensor([[5.0, 4.0]]))


def test_attention_is_qk_norm_rotary_and_gated_value_embedding_written_out():
    """Written out: per head q and k RMS-normalised and scaled by 1.2, then rotated; values
    plus 3 * sigmoid(W_gate x[:12]) times the value embedding; causal softmax(q k^T / sqrt(d))."""
    config = ModernConfig(**TINY)
    attn = mm.Attention(config, layer=1)  # layer 1 of 2 has a value embedding
    assert attn.ve_gate is not None
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    B, T, C, H, d = 2, 5, 16, 2, 8
    x = torch.randn(B, T, C, generator=gen)
    ve = torch.randn(B, T, C, generator=gen)
    cos, sin = mm.rotary_tables(16, d)
    out = attn(x, ve, (cos[:T], sin[:T]))

    expected = torch.empty(B, T, C)
    for b in range(B):
        gate = 3 * torch.sigmoid(x[b, :, :12] @ attn.ve_gate.weight.T)  # (T, H)
        heads = []
        for h in range(H):
            cols = slice(h * d, (h + 1) * d)
            q = 1.2 * rms_normalised(x[b] @ attn.c_q.weight[cols].T)
            k = 1.2 * rms_normalised(x[b] @ attn.c_k.weight[cols].T)
            v = x[b] @ attn.c_v.weight[cols].T + gate[:, h:h + 1] * ve[b, :, cols]
            half = d // 2
            q = torch.cat([q[:, :half] * cos[:T] - q[:, half:] * sin[:T],
                           q[:, :half] * sin[:T] + q[:, half:] * cos[:T]], dim=-1)
            k = torch.cat([k[:, :half] * cos[:T] - k[:, half:] * sin[:T],
                           k[:, :half] * sin[:T] + k[:, half:] * cos[:T]], dim=-1)
            scores = (q @ k.T) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            heads.append(scores.softmax(-1) @ v)
        expected[b] = torch.cat(heads, dim=-1) @ attn.c_proj.weight.T
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_value_embeddings_sit_on_alternating_layers_ending_with_the_last():
    for n_layer, layers in ((4, ["1", "3"]), (3, ["0", "2"]), (1, ["0"])):
        model = tiny(n_layer=n_layer)
        assert sorted(model.value_embeds.keys()) == layers
        assert [b.attn.ve_gate is not None for b in model.blocks()] == [
            str(i) in layers for i in range(n_layer)]
    off = tiny(value_embeddings=False)
    assert len(off.value_embeds) == 0 and all(b.attn.ve_gate is None for b in off.blocks())


def test_lambdas_mix_the_stream_and_the_embedding_before_each_block():
    model = tiny(n_layer=3)  # output projections zero at init: every block is the identity
    with torch.no_grad():
        model.resid_lambdas.copy_(torch.tensor([2.0, 0.5, 1.5]))
        model.x0_lambdas.copy_(torch.tensor([0.25, -1.0, 3.0]))
    seen: list[torch.Tensor] = []
    for block in model.blocks():
        block.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    model.hidden_states(idx)
    x0 = rms_normalised(model.transformer.wte.weight[idx]).detach()
    x1 = 2.0 * x0 + 0.25 * x0
    x2 = 0.5 * x1 - 1.0 * x0
    x3 = 1.5 * x2 + 3.0 * x0
    for got, want in zip(seen, (x1, x2, x3), strict=True):
        torch.testing.assert_close(got, want)
    assert not hasattr(tiny(lambdas=False), "resid_lambdas")


def test_untied_head_with_soft_capped_logits():
    model = with_random_outputs(tiny())
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        model.lm_head.weight.mul_(2000)  # logits large enough for the cap to bite
    idx = torch.tensor([[1, 2, 3, 4]])
    logits, _ = model(idx)
    assert logits is not None
    raw = model.hidden_states(idx) @ model.lm_head.weight.T
    assert raw.abs().max() > 15
    torch.testing.assert_close(logits, 15 * torch.tanh(raw / 15))
    assert logits.abs().max() < 15
    _, loss = model(idx, idx)
    assert loss is not None
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.transformer.wte.weight.grad is not None
    assert not torch.equal(model.lm_head.weight.grad[:5], model.transformer.wte.weight.grad[:5])


def test_init_statistics():
    model = tiny(vocab_size=512, n_embd=64, n_head=4, n_layer=3)
    width, bound = 64, 3**0.5 / 8

    def std(t: torch.Tensor) -> float:
        return float(t.detach().std())
    assert std(model.transformer.wte.weight) == pytest.approx(0.8, rel=0.03)
    assert std(model.lm_head.weight) == pytest.approx(0.001, rel=0.03)
    for block in model.blocks():
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            assert linear.weight.abs().max() <= bound
            assert std(linear.weight) == pytest.approx(width**-0.5, rel=0.05)
        assert block.mlp.c_fc.weight.abs().max() <= 0.4 * bound
        assert std(block.mlp.c_fc.weight) == pytest.approx(0.4 * width**-0.5, rel=0.05)
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        if block.attn.ve_gate is not None:
            gate = block.attn.ve_gate.weight
            assert gate.min() >= 0 and gate.max() <= 0.02
    for table in model.value_tables():
        assert table.weight.abs().max() <= bound
        assert std(table.weight) == pytest.approx(width**-0.5, rel=0.03)
    torch.testing.assert_close(model.resid_lambdas.detach(), torch.tensor([1.15, 1.10, 1.05]))
    torch.testing.assert_close(model.x0_lambdas.detach(), torch.tensor([0.20, 0.125, 0.05]))


def test_param_and_flop_counts():
    model = tiny()
    C, L, V = 16, 2, 40
    matrices = L * (4 * C * C + 8 * C * C) + 2 * 12  # q, k, v, proj, fc, proj; one gate (2, 12)
    assert model.num_params() == V * C + V * C * 1 + V * C + matrices + 2 * L  # wte, ve, head
    assert model.num_params(non_embedding=True) == V * C + matrices + 2 * L
    assert model.flops_per_token(8) == 6 * (V * C + matrices + 2 * L) + 12 * L * C * 8


# ------------------------------------------------------------------------ the whole model


def test_loss_equals_full_logits_cross_entropy_and_its_gradients():
    model = with_random_outputs(tiny())
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 40, (3, 7), generator=gen)
    targets = torch.randint(0, 40, (3, 7), generator=gen)
    targets[0, :3] = -1
    x = model.hidden_states(idx).flatten(0, 1)
    chunked = linear_cross_entropy(x, model.lm_head.weight, targets.flatten(), chunk_rows=4,
                                   softcap=15.0)
    grads = torch.autograd.grad(chunked, [*model.parameters()], retain_graph=True)
    logits = 15 * torch.tanh((x @ model.lm_head.weight.T) / 15)
    full = F.cross_entropy(logits, targets.flatten(), ignore_index=-1)
    full_grads = torch.autograd.grad(full, [*model.parameters()])
    torch.testing.assert_close(chunked, full)
    for g, h in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    _, loss = model(idx, targets)
    torch.testing.assert_close(loss, full)
    uncapped = tiny(logit_softcap=0.0)
    _, loss = uncapped(idx, targets)
    reference = F.cross_entropy(uncapped(idx)[0].flatten(0, 1), targets.flatten(),  # type: ignore[union-attr]
                                ignore_index=-1)
    torch.testing.assert_close(loss, reference)


def test_cached_decoding_equals_uncached_logits():
    model = with_random_outputs(tiny()).eval()
    idx = torch.tensor([[5, 3, 8, 1, 9, 2, 7, 4]])
    full, _ = model(idx)
    assert full is not None
    cache = KVCache(model.config.kv_cache_shape(), 1, 8, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        steps = [model.lm_head(model.hidden_states(idx[:, :5], cache))]
        steps += [model.lm_head(model.hidden_states(idx[:, t:t + 1], cache)) for t in (5, 6, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    greedy = model.generate(idx[:, :3], 4, temperature=0)
    expected = idx[:, :3]
    for _ in range(4):
        logits, _ = model(expected)
        assert logits is not None
        expected = torch.cat([expected, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, expected)


def test_packed_rows_equal_the_sequences_alone():
    """eval_hellaswag's path: two sequences in one row, each with its own positions and
    attending only to itself."""
    model = with_random_outputs(tiny()).eval()
    a, b = torch.tensor([[4, 8, 15]]), torch.tensor([[16, 23]])
    row = torch.cat([a, b], dim=1)
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    segment = torch.tensor([0, 0, 0, 1, 1])
    mask = (segment[:, None] == segment[None, :]) & torch.ones(5, 5).tril().bool()
    with torch.no_grad():
        packed = model.hidden_states(row, positions=positions, attn_mask=mask[None, None])
        alone = torch.cat([model.hidden_states(a), model.hidden_states(b)], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    idx = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(4))
    results = []
    for recompute in (False, True):
        model = with_random_outputs(tiny())
        model.activation_checkpointing = recompute
        _, loss = model(idx, idx)
        assert loss is not None
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g, h in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g, h)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile's CPU backend (Inductor) needs a C++ compiler")
def test_torch_compile_forward_and_backward_on_cpu():
    model = with_random_outputs(tiny())
    idx = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(5))
    _, reference = model(idx, idx)
    assert reference is not None
    expected = torch.autograd.grad(reference, [*model.parameters()])
    compiled = torch.compile(model)
    _, loss = compiled(idx, idx)
    grads = torch.autograd.grad(loss, [*model.parameters()])
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for g, h in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_state(model: torch.nn.Module, config: Any, kind: str | None) -> dict[str, Any]:
    state: dict[str, Any] = {"model_config": dataclasses.asdict(config),
                             "model": model.state_dict()}
    if kind is not None:
        state["model_kind"] = kind
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_from_checkpoint_round_trip():
    model = with_random_outputs(tiny(value_embeddings=True, logit_softcap=10.0))
    loaded = ModernGPT.from_checkpoint(checkpoint_state(model, model.config, mm.MODEL_KIND))
    assert loaded.config == model.config
    idx = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_a_checkpoint_names_its_model_and_loads_as_it(tmp_path):
    """checkpoint.load reads the model kind: a modern checkpoint builds a ModernGPT, one
    without a kind (written before there were two) a GPT; a modern weight missing is one
    line naming the file."""
    import checkpoint

    torch.manual_seed(0)
    gpt2 = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16))
    modern = tiny()
    for model, kind, expected in ((gpt2, None, GPT), (modern, mm.MODEL_KIND, ModernGPT)):
        path = tmp_path / f"{expected.__name__}.pt"
        torch.save(checkpoint_state(model, model.config, kind), path)
        loaded = checkpoint.model_from_state(checkpoint.load(path))
        assert type(loaded) is expected and loaded.config == model.config
    state = checkpoint_state(modern, modern.config, mm.MODEL_KIND)
    del state["model"]["x0_lambdas"]
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"ckpt.pt: model\['x0_lambdas'\] is missing"):
        checkpoint.load(tmp_path / "ckpt.pt")
