"""Export a checkpoint to a Hugging Face folder that transformers loads and the hub accepts.

    python export.py --checkpoint=out/ckpt_0000075.pt --out=hf/    # or: nano-gpt export ...

model.safetensors and config.json (GPT.save_hf), and GPT-2's tokenizer files rebuilt offline
from the tiktoken ranks in assets/. What GPT-2's format cannot hold is refused, unwritten.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import cli
import data

if TYPE_CHECKING:
    import tiktoken

EOT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: vocab.json and merges.txt spell tokens in
    these characters so that no byte is whitespace or a control code."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def bpe_split(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """`token` merged by the BPE of the tokens ranked below it alone: what is left is the
    pair whose merge made it, since ranks are the merges' order."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        pairs = [(ranks.get(a + b, sys.maxsize), i)
                 for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs, default=(sys.maxsize, 0))
        if rank >= ranks[token]:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def tokenizer_files(enc: tiktoken.Encoding, block_size: int) -> dict[str, str]:
    """The text of GPT-2's tokenizer files, from its tiktoken encoding (ranks are ids)."""
    pairs = ((token, enc.encode_single_token(token)) for token in enc.token_byte_values())
    ranks = dict(sorted(pairs, key=lambda pair: pair[1]))
    spell = bytes_to_unicode()
    text = {token: "".join(spell[b] for b in token) for token in ranks}
    # Unpacking into (a, b) fails loudly if a token does not split in two, as BPE's must.
    merges = [f"{text[a]} {text[b]}" for a, b in
              (bpe_split(ranks, token) for token in ranks if len(token) > 1)]
    specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, **specials}  # decode gives tiktoken's text
    vocab = {**{text[token]: rank for token, rank in ranks.items()}, EOT: data.EOT_TOKEN}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(specials, indent=2) + "\n"}


def export(checkpoint_path: str, out: Path, overwrite: bool = False) -> None:
    """After every check, the files are written into a temp folder beside `out` that is then
    renamed to `out`: a refusal, a full disk or a kill leaves no half-written export."""
    import checkpoint
    from model import GPT, GPT2_VOCAB_SIZE

    if out.exists() and not out.is_dir():
        raise cli.UsageError(f"--out={out}: is a file\nhint: pass a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise cli.UsageError(f"--out={out}: already holds {', '.join(held[:3])}"
                             f"{' ...' if len(held) > 3 else ''}\nhint: pass --overwrite to "
                             "replace that folder, or another --out")
    state = checkpoint.load(checkpoint_path)
    if state["model_kind"] != "gpt2":
        raise ValueError(f"{checkpoint_path}: a {state['model_kind']} model's checkpoint, which "
                         "GPT-2's Hugging Face format cannot hold\nhint: export a checkpoint of "
                         "--recipe=gpt2")
    model = GPT.from_checkpoint(state)
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f"{checkpoint_path}: vocab_size {model.config.vocab_size} is below "
                         f"GPT-2's {GPT2_VOCAB_SIZE}; only GPT-2-tokenized models export")
    enc = data.get_tokenizer()  # checks the ranks file before anything is written
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed export left
    try:
        model.save_hf(tmp)  # refuses (ValueError) before writing a model GPT-2 cannot hold
        for name, content in tokenizer_files(enc, model.config.block_size).items():
            with data.atomic_output(tmp / name) as f:
                f.write(content.encode())
        data.replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out} (GPT2LMHeadModel.from_pretrained and AutoTokenizer load it)")


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a train_gpt2.py or train_jax.py "
                        "checkpoint (.pt file or --fsdp folder)")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it holds files already")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    return cli.run_script(lambda: export(args.checkpoint, args.out, args.overwrite), args.debug)


if __name__ == "__main__":
    sys.exit(main())
