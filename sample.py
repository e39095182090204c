"""Generate text from pretrained GPT-2 or a nano-gpt checkpoint.

    python sample.py --pretrained=gpt2 --seed=42 --max-length=30 --num-samples=5 \
        "Hello, I'm a language model,"

All samples are drawn in one batch with a KV cache (on CUDA the decoding step is a CUDA
graph, see GPT.generate). `--max-length` counts the prompt plus the new tokens. The same
seed on the same device gives the same text: sampling draws from a `torch.Generator` seeded
with `--seed` on the model's device. With `--stream`, sample 0 is printed as it is generated
(from a GPU in chunks of STREAM_CHUNK tokens) and the other samples follow once it is done
(they are the same texts a run without `--stream` prints). The weights are kept in the
precision's dtype (bf16 on GPUs that have it, fp32 on CPU unless --dtype says so).
"""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Callable
from typing import TextIO

import torch

import checkpoint
import cli
import runtime
from cli import UsageError
from data import EOT_TOKEN, get_tokenizer
from model import GPT
from model_modern import ModernGPT

DEFAULT_PROMPT = "Hello, I'm a language model,"
STREAM_CHUNK = 8  # new tokens per copy to the host while a GPU generates


def encode_prompt(prompt: str) -> list[int]:
    """Prompt tokens; an empty prompt starts from <|endoftext|>, as a fresh document."""
    tokens = get_tokenizer().encode_ordinary(prompt)
    return tokens if tokens else [EOT_TOKEN]


def new_token_count(model: GPT | ModernGPT, prompt: list[int], max_length: int,
                    flags: tuple[str, str] = ("the prompt", "--max-length")) -> int:
    """`max_length` less the prompt's tokens, checked against the model's context and
    vocabulary; `flags` name the prompt and the length in the error."""
    block, vocab, name, length = model.config.block_size, model.config.vocab_size, *flags
    if max(prompt) >= vocab:
        raise UsageError(f"{name} holds token id {max(prompt)}, beyond this model's "
                         f"{vocab}-token vocabulary\nhint: pass a prompt of tokens below "
                         f"{vocab}")
    if len(prompt) >= block:
        raise UsageError(f"{name} has {len(prompt)} tokens and the model's context is {block} "
                         f"(prompt plus new tokens)\nhint: pass a prompt of under {block} "
                         "tokens")
    if not len(prompt) < max_length <= block:
        raise UsageError(f"{length}={max_length}: out of range\nhint: pass {len(prompt) + 1} "
                         f"to {block} (it counts the prompt's {len(prompt)} tokens plus the "
                         f"new ones, within the model's context of {block})")
    return max_length - len(prompt)


def generate_text(model: GPT | ModernGPT, prompt: list[int], new_tokens: int,
                  num_samples: int, top_k: int | None = 50, top_p: float | None = None,
                  temperature: float = 1.0, seed: int = 42, device: torch.device | str = "cpu",
                  precision: runtime.Precision | None = None,
                  stream: TextIO | None = None, source: str = "the model") -> list[str]:
    """Prompt plus `new_tokens` sampled tokens for each of `num_samples` samples (one batch),
    the prompt as encode_prompt gives it and new_tokens as new_token_count checked it.

    With `stream` (a text file such as sys.stdout), sample 0's new text is also written
    there while it is generated: from CPU token by token, from a GPU STREAM_CHUNK tokens at
    a time. Weights whose logits on the prompt are not finite (`source` names them) are
    refused: every draw from them would be noise."""
    device = torch.device(device)
    precision = precision or runtime.Precision("fp32", None, False)
    idx = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    with torch.no_grad(), precision.autocast(device):
        logits, _ = model(idx[:1])
    if not bool(logits.isfinite().all()):
        raise ValueError(f"{source}: its logits on the prompt are NaN or infinite\nhint: its "
                         "weights overflow or are damaged; pass another checkpoint")
    generator = torch.Generator(device=device).manual_seed(seed)
    on_token = None
    if stream is not None:
        on_token = text_writer(stream, new_tokens, 1 if device.type == "cpu" else STREAM_CHUNK)
    with precision.autocast(device):
        out = model.generate(idx, new_tokens, temperature, top_k, top_p, generator, on_token)
    start = 1 if prompt == [EOT_TOKEN] else 0  # the empty prompt's <|endoftext|> is not shown
    return [get_tokenizer().decode(row[start:]) for row in out.tolist()]


def text_writer(stream: TextIO, new_tokens: int, chunk: int) -> Callable[[torch.Tensor], None]:
    """A GPT.generate `on_token` callback that writes sample 0's text to `stream`.

    Tokens reach the host `chunk` steps at a time: a copy waits for the device, and one per
    step would leave a GPU idle while Python queues the next step. A UTF-8 character split
    across tokens is held back until whole; the last of the `new_tokens` flushes it all."""
    enc = get_tokenizer()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending: list[torch.Tensor] = []
    left = new_tokens

    def on_token(token: torch.Tensor) -> None:
        nonlocal left
        pending.append(token[0])
        left -= 1
        if len(pending) == chunk or left == 0:
            ids = torch.cat(pending).tolist()
            pending.clear()
            text = b"".join(enc.decode_single_token_bytes(i) for i in ids)
            stream.write(decoder.decode(text, final=left == 0))
            stream.flush()

    return on_token


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    cli.add_model_arguments(parser)
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT,
                        help="text to continue")
    parser.add_argument("--num-samples", type=int, default=5, help="samples, drawn in one batch")
    parser.add_argument("--max-length", type=int, default=30,
                        help="tokens per sample, prompt included")
    parser.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens "
                        "(0 disables)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: keep the smallest set reaching this "
                             "probability (default: off)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature: 0 (greedy) or at least 1e-6")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    parser.add_argument("--stream", action="store_true",
                        help="print sample 0 token by token as it is generated")
    cli.add_runtime_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    cli.check_range("--num-samples", args.num_samples, minimum=1)
    cli.check_range("--max-length", args.max_length, minimum=1)
    cli.check_range("--top-k", args.top_k, minimum=0)
    cli.check_range("--top-p", args.top_p, above=0, maximum=1)
    if args.temperature != 0:  # 0 is greedy; below 1e-6, logits / temperature can overflow
        cli.check_range("--temperature", args.temperature, minimum=1e-6)
    cli.check_range("--seed", args.seed, *cli.SEED_RANGE)
    device, precision = cli.resolve_runtime(args.device, args.dtype)
    model = checkpoint.load_model(None if args.checkpoint else args.pretrained, args.checkpoint,
                                  device)
    if precision.autocast_dtype is not None:
        # This model only samples: weights kept in the compute dtype are read at half the
        # bytes per token and are not re-cast by autocast in every step.
        model = model.to(precision.autocast_dtype)
    prompt = encode_prompt(args.prompt)
    new_tokens = new_token_count(model, prompt, args.max_length)
    if args.stream:
        print("> " + args.prompt, end="", flush=True)
    try:
        texts = generate_text(model, prompt, new_tokens, args.num_samples, args.top_k or None,
                              args.top_p, args.temperature, args.seed, device, precision,
                              stream=sys.stdout if args.stream else None,
                              source=args.checkpoint or args.pretrained)
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and not runtime.is_out_of_memory(exc):
            raise
        raise UsageError(f"--num-samples={args.num_samples}: not enough memory for that many "
                         f"samples of {args.max_length} tokens\nhint: pass fewer "
                         "--num-samples or a shorter --max-length") from None
    if args.stream:
        print("\n")
        texts = texts[1:]  # sample 0 is on the screen already
    for text in texts:
        print("> " + text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_script(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
