"""Sampling speed: tokens/s with the KV cache, without it, and transformers' generate.

    python bench/bench_sample.py --new-tokens=256 --batch-sizes=1,5

All three run the same random 124M-shape weights (ours exported with GPT.save_hf and loaded
by GPT2LMHeadModel.from_pretrained) in fp32, sampling with top-k 50 from the same prompt.
transformers is forced to produce every new token (min_new_tokens), so all sides do the
same work. Without the cache the model re-reads the whole sequence each step, which is
slow: it runs only for the batch sizes in --uncached-batch-sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: E402
from data import get_tokenizer  # noqa: E402
from model import GPT, GPTConfig, sample_next_token  # noqa: E402

PROMPT = "Hello, I'm a language model,"


def best_time(run: Callable[..., torch.Tensor], args: tuple[object, ...], repeats: int,
              expected_len: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(*args)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        best = min(best, time.perf_counter() - start)
        if out.size(1) != expected_len:
            raise RuntimeError(f"generated {out.size(1)} positions, expected {expected_len}")
    return best


def ours(model: GPT, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    generator = torch.Generator(device=idx.device).manual_seed(0)
    return model.generate(idx, new_tokens, top_k=50, generator=generator)


@torch.no_grad()
def ours_uncached(model: GPT, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The baseline the cache must beat: the whole sequence through the model every step."""
    generator = torch.Generator(device=idx.device).manual_seed(0)
    for _ in range(new_tokens):
        logits, _ = model(idx)
        idx = torch.cat([idx, sample_next_token(logits[:, -1], top_k=50, generator=generator)],
                        dim=1)
    return idx


def theirs(hf_model: object, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return hf_model.generate(  # type: ignore[attr-defined]
            idx, attention_mask=torch.ones_like(idx), do_sample=True, top_k=50, top_p=None,
            temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            use_cache=True, pad_token_id=50256)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2", help="model shape (default gpt2, 124M)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,5")
    parser.add_argument("--uncached-batch-sizes", default="1",
                        help="batch sizes that also run without the KV cache")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--device", default="cpu", help="auto, cuda, cuda:N, mps or cpu")
    args = parser.parse_args(argv)
    device = runtime.resolve_device(args.device)
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_hf(tmp)
        hf_model = GPT2LMHeadModel.from_pretrained(tmp).eval().to(device)
    model.to(device)
    prompt = get_tokenizer().encode(PROMPT)
    total = len(prompt) + args.new_tokens
    uncached = {int(b) for b in args.uncached_batch_sizes.split(",") if b}
    print(f"preset {args.preset}, prompt {len(prompt)} tokens + {args.new_tokens} new, top-k 50, "
          f"fp32, {device}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'batch':>5} {'method':<28} {'seconds':>8} {'tokens/s':>9} {'vs uncached':>11} "
          f"{'vs transformers':>15}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        idx = torch.tensor([prompt] * batch, device=device)
        made = batch * args.new_tokens
        new = args.new_tokens
        times: dict[str, float] = {}
        runs: list[tuple[str, Callable[..., torch.Tensor], tuple[object, ...], int]] = [
            ("ours, KV cache", ours, (model, idx, new), args.repeats),
            ("transformers generate", theirs, (hf_model, idx, new), args.repeats)]
        if batch in uncached:
            runs.append(("ours, no cache", ours_uncached, (model, idx, new), 1))
        for name, fn, fn_args, repeats in runs:
            times[name] = best_time(fn, fn_args, repeats, total)
            print(f"  measured {name}, batch {batch}: {times[name]:.2f} s", flush=True)
        for name, seconds in times.items():
            vs_uncached = (f"{times['ours, no cache'] / seconds:.2f}x"
                           if "ours, no cache" in times else "-")
            vs_hf = f"{times['transformers generate'] / seconds:.2f}x"
            print(f"{batch:>5} {name:<28} {seconds:>8.2f} {made / seconds:>9.1f} "
                  f"{vs_uncached:>11} {vs_hf:>15}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
