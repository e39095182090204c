"""Every check that refuses a file, each with the smallest change that breaks an input the
same check accepts: one wrong-typed field, one non-finite value among finite ones, one token
id at the vocabulary size, one byte missing; and a gross case beside it.

A case runs the script a user would (sample.py, eval_hellaswag.py, train_gpt2.py) on the
spoiled file and wants exit 1, no traceback and exactly one `error:` line: the file's path,
then what is wrong, word for word (the fix may follow after "; " or on a `hint:` line).
Each family's test of the unspoiled file shows that the one change is what is refused.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import checkpoint
import data
import eval_hellaswag
import prepare_dataset
import sample
import train_gpt2
from model import GPT, GPTConfig

VOCAB, SEQ = 256, 16
CONFIG = GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32)
HELLASWAG = {"ctx": "The cat sat on the", "endings": [" mat.", " moon.", " idea.", " seven."],
             "label": 0}


@dataclass(frozen=True)
class Refusal:
    main: Callable[[list[str]], int]
    build: Callable[[Path], tuple[list[str], str]]  # the bad input: (argv, what the line says)


def assert_refused(case: Refusal, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = case.build(root)
    capsys.readouterr()
    code = case.main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0] == f"error: {expected}" or errors[0].startswith(f"error: {expected}; "), \
        f"\n got:  {errors[0]}\n want: error: {expected}"


# ------------------------------------------------------------------ train_gpt2.py checkpoints


def tiny_state() -> dict[str, Any]:
    """What checkpoint.load needs of a checkpoint: a real model's config and weights."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    return {"model_config": dataclasses.asdict(model.config),
            "model": {k: v.clone() for k, v in model.state_dict().items()}}


def write_checkpoint(root: Path, spoil: Callable[[dict[str, Any]], object]) -> Path:
    state = tiny_state()
    spoil(state)
    path = root / "ckpt_0000001.pt"
    torch.save(state, path)
    return path


def set_config(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda state: state["model_config"].__setitem__(key, value)


def set_value(key: str, index: tuple[int, ...], value: float) -> Callable[[dict[str, Any]], None]:
    def spoil(state: dict[str, Any]) -> None:
        state["model"][key][index] = value
    return spoil


def every_weight_nan(state: dict[str, Any]) -> None:
    for tensor in state["model"].values():
        tensor.fill_(float("nan"))


def one_nan_in_optimizer_state(state: dict[str, Any]) -> None:
    """An AdamW state as train_gpt2.py saves it, one moment entry NaN."""
    moments = {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4),
                   "exp_avg_sq": torch.ones(4)} for i in range(2)}
    moments[1]["exp_avg_sq"][2] = float("nan")
    state["optimizer"] = {"state": moments, "param_groups": []}


def one_batch_size_as_float(state: dict[str, Any]) -> None:
    state["loader_states"] = [{"batch_size": 4, "step": 3}, {"batch_size": 4.0, "step": 3}]


def set_weight(key: str, value: torch.Tensor) -> Callable[[dict[str, Any]], None]:
    return lambda state: state["model"].__setitem__(key, value)


def checkpoint_case(spoil: Callable[[dict[str, Any]], object], what: str) -> Refusal:
    def build(root: Path) -> tuple[list[str], str]:
        path = write_checkpoint(root, spoil)
        return [f"--checkpoint={path}", "--device=cpu", "--max-length=4"], f"{path}: {what}"
    return Refusal(sample.main, build)


C_FC = "transformer.h.0.mlp.c_fc.weight"
CHECKPOINT_CASES = {
    "a switch as the string 'True'": checkpoint_case(
        set_config("rotary", "True"), "model_config['rotary'] is 'True', not True or False"),
    "a switch as the int 1": checkpoint_case(
        set_config("qk_norm", 1), "model_config['qk_norm'] is 1, not True or False"),
    "a switch as None": checkpoint_case(
        set_config("zero_init", None), "model_config['zero_init'] is None, not True or False"),
    # n_head does not change a weight's shape: True (== 1) would load as a 1-head model.
    "n_head as True": checkpoint_case(
        set_config("n_head", True), "model_config['n_head'] is True, not a positive integer"),
    "n_layer as the float 1.0": checkpoint_case(
        set_config("n_layer", 1.0), "model_config['n_layer'] is 1.0, not a positive integer"),
    "n_embd as the string '32'": checkpoint_case(
        set_config("n_embd", "32"), "model_config['n_embd'] is '32', not a positive integer"),
    "vocab_size 0": checkpoint_case(
        set_config("vocab_size", 0), "model_config['vocab_size'] is 0, not a positive integer"),
    "an unknown model_config key": checkpoint_case(
        set_config("n_kv_head", 2), "model_config has an unknown key 'n_kv_head'"),
    "gross: no model_config": checkpoint_case(
        lambda state: state.pop("model_config"), "no model_config entry"),
    "one NaN among a weight's finite values": checkpoint_case(
        set_value(C_FC, (3, 5), float("nan")), f"model[{C_FC!r}] holds NaN or infinite values"),
    "one +inf in a bias": checkpoint_case(
        set_value("transformer.h.0.attn.c_attn.bias", (95,), float("inf")),
        "model['transformer.h.0.attn.c_attn.bias'] holds NaN or infinite values"),
    "one -inf in a layer norm": checkpoint_case(
        set_value("transformer.ln_f.weight", (0,), float("-inf")),
        "model['transformer.ln_f.weight'] holds NaN or infinite values"),
    "gross: every weight NaN": checkpoint_case(
        every_weight_nan, "model['transformer.wte.weight'] holds NaN or infinite values"),
    "one NaN in the optimizer state": checkpoint_case(
        one_nan_in_optimizer_state,
        "optimizer['state'][1]['exp_avg_sq'] holds NaN or infinite values"),
    "one loader state's batch_size as a float": checkpoint_case(
        one_batch_size_as_float, "loader_states is not a list of data loader states"),
    "one weight stored as integers": checkpoint_case(
        set_weight("transformer.ln_f.bias", torch.zeros(32, dtype=torch.int32)),
        "model['transformer.ln_f.bias'] is not float weights"),
    "one weight one row short": checkpoint_case(
        set_weight("transformer.h.0.attn.c_proj.bias", torch.zeros(31)),
        "model['transformer.h.0.attn.c_proj.bias'] has shape (31,), its model_config gives "
        "(32,)"),
}


def test_the_unspoiled_checkpoint_is_accepted(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, lambda state: None)
    model = GPT.from_checkpoint(checkpoint.load(path))
    assert model.config == CONFIG
    # The one-value spoils above are one value: everything else in the file is finite.
    state = tiny_state()
    set_value(C_FC, (3, 5), float("nan"))(state)
    assert (~state["model"][C_FC].isfinite()).sum() == 1


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_a_checkpoint_is_refused(name: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(CHECKPOINT_CASES[name], tmp_path, capsys)


# ------------------------------------------------------------ Hugging Face safetensors folders


def write_hf(root: Path, spoil: Callable[[dict[str, torch.Tensor]], object] = lambda t: None,
             config: dict[str, Any] | None = None) -> Path:
    """GPT.save_hf's folder, its model.safetensors rewritten by the safetensors library after
    `spoil` (the file's metadata kept), its config.json updated with `config`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    folder = root / "hf"
    GPT(CONFIG).save_hf(folder)
    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(weights))
    spoil(tensors)
    save_file(tensors, str(weights), metadata=metadata)
    if config:
        hf = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**hf, **config}))
    return folder


def set_hf_value(key: str, index: tuple[int, ...],
                 value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def spoil(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key][index] = value
    return spoil


def every_hf_weight_inf(tensors: dict[str, torch.Tensor]) -> None:
    for tensor in tensors.values():
        tensor.fill_(float("inf"))


def hf_case(what: str, spoil: Callable[[dict[str, torch.Tensor]], object] = lambda t: None,
            config: dict[str, Any] | None = None, file: str = "model.safetensors") -> Refusal:
    def build(root: Path) -> tuple[list[str], str]:
        folder = write_hf(root, spoil, config)
        named = what.format(first=first_hf_key(folder))
        return [f"--pretrained={folder}", "--device=cpu", "--max-length=4"], \
            f"{folder / file}: {named}"
    return Refusal(sample.main, build)


def first_hf_key(folder: Path) -> str:
    """The weight GPT.from_pretrained reads first: the file's first."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return str(next(iter(f.keys())))


NON_FINITE = "holds NaN, infinite or non-float values"
HF_CASES = {
    "one NaN among a weight's finite values": hf_case(
        f"'transformer.h.0.attn.c_attn.weight' {NON_FINITE}",
        set_hf_value("transformer.h.0.attn.c_attn.weight", (7, 11), float("nan"))),
    "one +inf in the embedding": hf_case(
        f"'transformer.wte.weight' {NON_FINITE}",
        set_hf_value("transformer.wte.weight", (255, 31), float("inf"))),
    "one -inf in a bias": hf_case(
        f"'transformer.h.0.mlp.c_proj.bias' {NON_FINITE}",
        set_hf_value("transformer.h.0.mlp.c_proj.bias", (0,), float("-inf"))),
    "gross: every weight infinite": hf_case("'{first}' " + NON_FINITE, every_hf_weight_inf),
    "one weight stored as integers": hf_case(
        f"'transformer.ln_f.bias' {NON_FINITE}",
        lambda t: t.__setitem__("transformer.ln_f.bias", torch.zeros(32, dtype=torch.int32))),
    "config.json: n_head as true": hf_case(
        "'n_head' is True, not a positive integer", config={"n_head": True},
        file="config.json"),
    "config.json: n_embd as 32.0": hf_case(
        "'n_embd' is 32.0, not a positive integer", config={"n_embd": 32.0}, file="config.json"),
}


def test_the_unspoiled_hugging_face_folder_is_accepted(tmp_path: Path) -> None:
    folder = write_hf(tmp_path)
    torch.manual_seed(0)
    reference = GPT(CONFIG)
    loaded = GPT.from_pretrained(str(folder))
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("name", list(HF_CASES))
def test_a_hugging_face_folder_is_refused(name: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(HF_CASES[name], tmp_path, capsys)


# ----------------------------------------------------------------------------- token shards

BAD_AT = 20  # in the second sample (tokens 16..32) of the first batch, not the first (0..16)


def train_shard_tokens() -> np.ndarray:
    """Every id below VOCAB, the largest (VOCAB - 1) among them."""
    tokens = np.random.default_rng(0).integers(0, VOCAB, 2_000)
    tokens[7] = VOCAB - 1
    return tokens


def shard_run(root: Path, backend: str, tokens: np.ndarray | None = None) -> list[str]:
    shards = root / "shards"
    shards.mkdir(exist_ok=True)
    data.write_shard(shards / "syn_train_000000.bin",
                     train_shard_tokens() if tokens is None else tokens)
    data.write_shard(shards / "syn_val_000000.bin", np.zeros(500, dtype=np.int64))
    return [f"--data-dir={shards}", f"--out-dir={root / 'out'}", "--device=cpu",
            "--model=gpt2-tiny", "--n-layer=1", "--n-head=2", "--n-embd=32",
            f"--vocab-size={VOCAB}", f"--seq-len={SEQ}", "--batch-size=4",
            f"--total-batch-size={4 * SEQ}", "--max-steps=1", "--eval-interval=0",
            "--hellaswag-interval=0", "--sample-interval=0", "--no-shuffle",
            f"--loader-backend={backend}"]


def one_id_at_the_vocabulary_size(backend: str) -> Refusal:
    def build(root: Path) -> tuple[list[str], str]:
        tokens = train_shard_tokens()
        tokens[BAD_AT] = VOCAB
        args = shard_run(root, backend, tokens)
        path = root / "shards" / "syn_train_000000.bin"
        return args, (f"{path}: token id {VOCAB} near token {SEQ} is not below the vocabulary "
                      f"size {VOCAB}")
    return Refusal(train_gpt2.main, build)


def rewrite_shard(edit: Callable[[bytearray], object], what: str) -> Refusal:
    """A good shard's bytes after `edit`; `what` may name {size}, the edited size."""
    def build(root: Path) -> tuple[list[str], str]:
        args = shard_run(root, "auto")
        path = root / "shards" / "syn_train_000000.bin"
        raw = bytearray(path.read_bytes())
        edit(raw)
        path.write_bytes(bytes(raw))
        return args, f"{path}: {what.format(size=len(raw))}"
    return Refusal(train_gpt2.main, build)


def header_int(index: int, delta: int) -> Callable[[bytearray], None]:
    def edit(raw: bytearray) -> None:
        header = np.frombuffer(raw, dtype="<i4", count=3).copy()
        header[index] += delta
        raw[:12] = header.tobytes()
    return edit


def npy_shard_of_int16(root: Path) -> tuple[list[str], str]:
    args = shard_run(root, "auto")
    (root / "shards" / "syn_train_000000.bin").unlink()
    path = root / "shards" / "syn_train_000000.npy"
    np.save(path, train_shard_tokens().astype("<i2"))
    return args, f"{path}: dtype int16, expected uint16 tokens"


HEADER = data.HEADER_BYTES
SHARD_CASES = {
    "one id at the vocabulary size (numpy loader)": one_id_at_the_vocabulary_size("numpy"),
    "one id at the vocabulary size (native loader)": one_id_at_the_vocabulary_size("native"),
    "one byte missing": rewrite_shard(
        lambda raw: raw.pop(), f"file size {{size}} bytes, expected {HEADER + 4000} for 2000 "
        "tokens"),
    "a token count one too high": rewrite_shard(
        header_int(2, 1), f"file size {HEADER + 4000} bytes, expected {HEADER + 4002} for 2001 "
        "tokens"),
    "a magic number one off": rewrite_shard(
        header_int(0, 1), f"magic number {data.SHARD_MAGIC + 1}, expected {data.SHARD_MAGIC}"),
    "a format version one off": rewrite_shard(
        header_int(1, 1), f"format version {data.SHARD_VERSION + 1}, expected "
        f"{data.SHARD_VERSION} (uint16 tokens)"),
    "gross: shorter than the header": rewrite_shard(
        lambda raw: raw.__delitem__(slice(100, None)),
        f"{{size}} bytes, shorter than the {HEADER}-byte shard header"),
    "an .npy shard of int16": Refusal(train_gpt2.main, npy_shard_of_int16),
}


@pytest.mark.parametrize("backend", ["numpy", "native"])
def test_the_largest_id_below_the_vocabulary_size_is_accepted(backend: str,
                                                              tmp_path: Path) -> None:
    if backend == "native" and data.NATIVE_MODULE is None:
        pytest.skip("the compiled loader is not built")
    tokens = train_shard_tokens()
    tokens[BAD_AT] = VOCAB - 1  # where the refused case puts VOCAB
    data.write_shard(tmp_path / "s.bin", tokens)
    with data.ShardLoader(tmp_path / "s.bin", 4, SEQ, backend=backend,
                          vocab_size=VOCAB) as loader:
        x, _ = loader.next_batch()
    assert int(x.max()) == VOCAB - 1 and int(x[1, BAD_AT - SEQ]) == VOCAB - 1


@pytest.mark.parametrize("name", list(SHARD_CASES))
def test_a_shard_is_refused(name: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    if "native" in name and data.NATIVE_MODULE is None:
        pytest.skip("the compiled loader is not built")
    assert_refused(SHARD_CASES[name], tmp_path, capsys)


# ------------------------------------------------------------------------------ HellaSwag rows


def hellaswag_case(what: str, **changes: Any) -> Refusal:
    """A good row, then the same row with `changes` (None drops the field): the error names
    line 2."""
    def build(root: Path) -> tuple[list[str], str]:
        path = root / "hs.jsonl"
        row = {k: v for k, v in {**HELLASWAG, **changes}.items() if v is not None}
        path.write_text(json.dumps(HELLASWAG) + "\n" + json.dumps(row) + "\n")
        model = write_checkpoint(root, lambda state: None)
        return [f"--checkpoint={model}", "--device=cpu", f"--data={path}"], f"{path}:2: {what}"
    return Refusal(eval_hellaswag.main, build)


ENDINGS = f"'endings' must be a list of {eval_hellaswag.NUM_ENDINGS} strings"
HELLASWAG_CASES = {
    "label as the string '0'": hellaswag_case(
        "'label' is '0'; it must be an integer in 0..3", label="0"),
    "label as the float 0.0": hellaswag_case(
        "'label' is 0.0; it must be an integer in 0..3", label=0.0),
    "label one past the last ending": hellaswag_case(
        "'label' is 4; it must be an integer in 0..3", label=4),
    "one ending a number": hellaswag_case(ENDINGS, endings=[" mat.", 2, " idea.", " seven."]),
    "one ending too few": hellaswag_case(ENDINGS, endings=[" mat.", " moon.", " idea."]),
    "an empty ctx": hellaswag_case("'ctx' is ''; it must be a non-empty string", ctx=""),
    "gross: a row without its label": hellaswag_case(
        "a HellaSwag example needs 'ctx', 'endings' and 'label' fields", label=None),
}


def test_the_unspoiled_hellaswag_rows_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "hs.jsonl"
    path.write_text((json.dumps(HELLASWAG) + "\n") * 2)
    examples = eval_hellaswag.load_examples(path)
    assert [{key: e[key] for key in HELLASWAG} for e in examples] == [HELLASWAG, HELLASWAG]


@pytest.mark.parametrize("name", list(HELLASWAG_CASES))
def test_a_hellaswag_row_is_refused(name: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(HELLASWAG_CASES[name], tmp_path, capsys)


# ------------------------------------------------------------------------ dataset manifests


def prepared(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document number {i}. " * 40)
    args = [f"--dataset={corpus}", f"--data-root={root / 'data'}", "--shard-size=2000",
            "--num-proc=1", "--no-progress"]
    assert prepare_dataset.main(args) == 0
    return root / "data" / "corpus"


def one_shard(manifest: dict[str, Any]) -> dict[str, Any]:
    return dict(manifest["splits"]["train"]["shards"][0])


MANIFEST_EDITS: dict[str, Callable[[dict[str, Any]], object]] = {
    "complete as the string 'true'": lambda m: m.__setitem__("complete", "true"),
    "one shard's token count one too high": lambda m: m["splits"]["train"]["shards"][0]
    .__setitem__("tokens", one_shard(m)["tokens"] + 1),
    "one shard's token count as a string": lambda m: m["splits"]["train"]["shards"][0]
    .__setitem__("tokens", str(one_shard(m)["tokens"])),
    "one shard's token count plus a half": lambda m: m["splits"]["train"]["shards"][0]
    .__setitem__("tokens", one_shard(m)["tokens"] + 0.5),
    "one shard's file name another's": lambda m: m["splits"]["train"]["shards"][0]
    .__setitem__("file", one_shard(m)["file"].replace("_train_", "_val_9")),
    "gross: no splits": lambda m: m.pop("splits"),
}


def test_a_manifest_with_one_wrong_value_is_not_taken_as_prepared(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A manifest is not refused: it is the record of a finished run. One that does not
    describe the shards beside it means the dataset is not prepared, and the next run of
    prepare_dataset.py prepares it again rather than trusting it."""
    folder = prepared(tmp_path)
    manifest_path = folder / prepare_dataset.MANIFEST_NAME
    good = manifest_path.read_text()
    assert prepare_dataset.is_prepared(folder.parent, "corpus")
    for name, edit in MANIFEST_EDITS.items():
        manifest = json.loads(good)
        edit(manifest)
        manifest_path.write_text(json.dumps(manifest))
        assert not prepare_dataset.is_prepared(folder.parent, "corpus"), name
    # The last edit in place: the next run writes the dataset again, and its manifest.
    capsys.readouterr()
    assert prepare_dataset.main([f"--dataset={tmp_path / 'corpus'}",
                                 f"--data-root={folder.parent}", "--shard-size=2000",
                                 "--num-proc=1", "--no-progress"]) == 0
    assert "corpus: wrote" in capsys.readouterr().out
    assert prepare_dataset.is_prepared(folder.parent, "corpus")
