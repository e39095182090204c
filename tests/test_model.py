"""GPT-2 model against transformers' GPT2LMHeadModel on random weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

import optim
from model import GPT, PADDED_VOCAB_SIZE, Block, GPTConfig, KVCache, PretrainedNotFound

SHAPES: dict[str, dict[str, Any]] = {
    "2-layer": dict(n_layer=2, n_head=4, n_embd=64, n_positions=128),
    "124M": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
}


def random_hf_model(shape: str, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, **SHAPES[shape])
    hf = GPT2LMHeadModel(config).eval()
    # Non-zero biases and layer-norm parameters so a mis-mapped tensor cannot hide.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.1 if "bias" in name else 1.0)
    return hf


def save_hub_layout(hf: GPT2LMHeadModel, directory: Path) -> None:
    """The hub's own gpt2 file layout: no `transformer.` prefix, causal-mask buffers kept."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = hf.config
    tensors = {}
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight":
            continue
        tensors[key.removeprefix("transformer.")] = value.contiguous()
    n = cfg.n_positions
    for layer in range(cfg.n_layer):
        tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        tensors[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))


def save_pretrained_layout(hf: GPT2LMHeadModel, directory: Path) -> None:
    hf.save_pretrained(directory)


@pytest.fixture(scope="module", params=list(SHAPES))
def hf_model(request: pytest.FixtureRequest) -> GPT2LMHeadModel:
    return random_hf_model(request.param)


@pytest.mark.parametrize("layout", [save_hub_layout, save_pretrained_layout],
                         ids=["hub-layout", "save_pretrained-layout"])
def test_logits_and_loss_match_transformers(hf_model: GPT2LMHeadModel, layout, tmp_path: Path):
    layout(hf_model, tmp_path / "weights")
    ours = GPT.from_pretrained(str(tmp_path / "weights")).eval()
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(idx, labels=idx)
        # transformers shifts labels internally; ours takes targets already shifted.
        logits = ours(idx[:, :-1])[0]
        loss = ours(idx[:, :-1], idx[:, 1:])[1]
    assert logits is not None and (logits - ref.logits[:, :-1]).abs().max().item() <= 1e-4
    assert loss is not None
    assert abs(loss.item() - ref.loss.item()) <= 1e-4


def test_save_hf_loads_in_transformers(tmp_path: Path):
    torch.manual_seed(3)
    ours = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    ours.save_hf(tmp_path / "export")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 50257, (3, 20))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff <= 1e-5
    assert not list(tmp_path.glob("export/.*tmp"))


def test_save_hf_drops_padding_rows(tmp_path: Path):
    torch.manual_seed(4)
    ours = GPT(GPTConfig(block_size=32, vocab_size=PADDED_VOCAB_SIZE, n_layer=1, n_head=2,
                         n_embd=32)).eval()
    ours.save_hf(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == 50257
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0][..., :50257]).abs().max().item()
    assert diff <= 1e-5


def test_save_hf_failure_is_an_oserror_naming_the_file(tmp_path: Path):
    (tmp_path / "config.json").mkdir()  # a folder where the file goes: the rename fails
    with pytest.raises(OSError, match="config.json: cannot write it"):
        GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)).save_hf(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_from_pretrained_names_a_missing_file(tmp_path: Path):
    GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)).save_hf(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(PretrainedNotFound, match="no config.json in this directory"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_rejects_wrong_shapes(tmp_path: Path):
    hf = random_hf_model("2-layer")
    save_pretrained_layout(hf, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="its sizes call for wte.weight of shape"):
        GPT.from_pretrained(str(tmp_path))


def test_hub_name_offline_fails_with_one_line(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = "import model; model.GPT.from_pretrained('gpt2')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    error, fix = proc.stderr.strip().splitlines()[-2:]
    assert error.startswith("model.PretrainedNotFound") and "'gpt2'" in error
    assert fix.startswith("hint: ") and "local directory" in fix


def test_hub_name_loads_from_the_local_hub_cache_without_network(tmp_path: Path):
    hf = random_hf_model("2-layer")
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    save_pretrained_layout(hf, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    out = tmp_path / "state.pt"
    code = ("import sys, torch, model; "
            "torch.save(model.GPT.from_pretrained('gpt2').state_dict(), sys.argv[1])")
    env = {**os.environ, "HF_HOME": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    expected = GPT.from_pretrained(str(snapshot)).state_dict()
    loaded = torch.load(out, weights_only=True)
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


def test_unknown_name_is_not_sent_to_the_hub():
    with pytest.raises(PretrainedNotFound, match="neither a local directory"):
        GPT.from_pretrained("definitely-not-a-model")


def tiny_model(seed: int = 0, vocab_size: int = 50257) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=4,
                         n_embd=32)).eval()


def test_kv_cache_logits_equal_full_forward_at_every_step():
    model = tiny_model()
    idx = torch.randint(0, 50257, (2, 7))
    steps = 12
    cache = KVCache(model.config, 2, idx.size(1) + steps, idx.device, torch.float32)
    seq, fresh = idx, idx
    with torch.no_grad():
        for _ in range(steps):
            cached = model.lm_head(model.hidden_states(fresh, cache))[:, -1]
            full = model(seq)[0][:, -1]
            assert (cached - full).abs().max().item() <= 1e-5
            fresh = cached.argmax(-1, keepdim=True)
            seq = torch.cat([seq, fresh], dim=1)


def test_kv_cache_multi_token_chunk_after_prefix():
    model = tiny_model(1)
    idx = torch.randint(0, 50257, (1, 20))
    cache = KVCache(model.config, 1, 20, idx.device, torch.float32)
    with torch.no_grad():
        model.hidden_states(idx[:, :8], cache)
        chunk = model.lm_head(model.hidden_states(idx[:, 8:], cache))
        full = model(idx)[0][:, 8:]
    assert (chunk - full).abs().max().item() <= 1e-5


def test_packed_row_with_mask_equals_separate_forwards():
    """Two sequences in one row, each attending only to itself with its own positions."""
    model = tiny_model(4)
    a, b = torch.randint(0, 50257, (1, 9)), torch.randint(0, 50257, (1, 6))
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(9), torch.arange(6)])[None]
    owner = torch.tensor([0] * 9 + [1] * 6)
    mask = (owner[:, None] == owner[None, :]) & torch.ones(15, 15, dtype=torch.bool).tril()
    with torch.no_grad():
        packed = model.hidden_states(row, positions=positions, attn_mask=mask[None, None])
        torch.testing.assert_close(packed[:, :9], model.hidden_states(a), rtol=0, atol=1e-5)
        torch.testing.assert_close(packed[:, 9:], model.hidden_states(b), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="go together"):
        model.hidden_states(row, positions=positions)


def test_generation_never_samples_padding_ids():
    model = tiny_model(3, vocab_size=PADDED_VOCAB_SIZE)
    with torch.no_grad():
        model.lm_head.weight[50257:] = 0.0
        model.lm_head.weight[50257:, 0] = 1e4  # make every padding row overwhelmingly likely
    idx = torch.zeros(4, 1, dtype=torch.long)
    out = model.generate(idx, 10, generator=torch.Generator().manual_seed(0))
    assert int(out.max()) < 50257


def test_init_statistics_and_weight_tying():
    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt2")
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    assert isinstance(block, Block)
    residual_std = 0.02 / (2 * config.n_layer) ** 0.5
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0
    assert torch.equal(block.ln_1.weight, torch.ones_like(block.ln_1.weight))
    # GPT-2 small has 124,439,808 parameters with the 50257-token vocabulary.
    assert model.num_params() == 124_439_808


def test_tied_weights_receive_both_gradients():
    model = tiny_model(5)
    idx = torch.randint(0, 50257, (2, 8))
    _, loss = model(idx, idx)
    assert loss is not None
    loss.backward()
    grad = model.transformer.wte.weight.grad
    assert grad is not None
    # Rows of tokens absent from the input still get gradient through the output head.
    unused = torch.ones(50257, dtype=torch.bool)
    unused[idx.flatten()] = False
    assert grad[unused].abs().sum() > 0


def test_gpt2_optimizer_decays_only_matrices():
    model = tiny_model()
    opt = optim.gpt2_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_for_gpt2_small():
    model = GPT(GPTConfig.from_preset("gpt2"))
    non_embedding = 124_439_808 - 1024 * 768
    assert model.flops_per_token(1024) == 6 * non_embedding + 12 * 12 * 768 * 1024


def test_presets_have_gpt2_shapes():
    shapes = {name: (c.n_layer, c.n_head, c.n_embd) for name, c in
              ((n, GPTConfig.from_preset(n)) for n in ("gpt2", "gpt2-medium", "gpt2-large",
                                                        "gpt2-xl"))}
    assert shapes == {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                      "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
    with pytest.raises(ValueError, match="unknown model preset"):
        GPTConfig.from_preset("gpt3")


def test_loss_ignores_targets_of_minus_one():
    """The loss is the mean cross-entropy over the positions whose target is not -1,
    computed here from log-softmax by hand."""
    model = tiny_model(5)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 50257, (3, 10), generator=gen)
    targets = torch.randint(0, 50257, (3, 10), generator=gen)
    targets[0, :4] = -1
    targets[2, 9] = -1
    logits, loss = model(idx)[0], model(idx, targets)[1]
    assert logits is not None and loss is not None
    keep = targets != -1
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    picked = logprobs[keep].gather(-1, targets[keep][:, None]).squeeze(-1)
    assert abs(loss.item() - (-picked.mean()).item()) <= 1e-5
