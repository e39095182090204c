"""Sampling speed in new tokens/s: our KV-cache decoding, the same model without the cache,
and transformers' generate.

    python bench/bench_sample.py --new-tokens=256 --batch-sizes=1,5
    python bench/bench_sample.py --device=cuda --batch-sizes=1,64

All run the same random weights of the --preset shape (ours exported with GPT.save_hf and
loaded by GPT2LMHeadModel.from_pretrained), sampling with top-k 50 from the same prompt,
with the weights in the --dtype (auto: bf16 on GPUs that have it, else fp32), as sample.py
keeps them. transformers is forced to produce every new token (min_new_tokens), so all
sides do the same work. On CUDA our decoding step is a recorded CUDA graph, and
transformers also runs with its static cache, which its generate compiles with
torch.compile there (only there: on CPU it would run the static cache uncompiled), the
strongest alternative a user has; --hf-static-batch-sizes picks where, compiling is slow.

Columns: best time of --repeats runs; new tokens/s; time to first token (best of a run
that makes one token: the prompt's prefill plus one sample); ratios against transformers'
default generate and, where it ran, its static-cache compiled generate. The one-time costs
are printed too: recording our CUDA graph (the recorded step beyond a replayed one), and
transformers' first compiled call beyond its best. Without the cache the model re-reads the
whole sequence at every step, which is slow: it runs only at --uncached-batch-sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: E402
from data import get_tokenizer  # noqa: E402
from model import GPT, GPTConfig, sample_next_token  # noqa: E402

PROMPT = "Hello, I'm a language model,"
TOP_K = 50
Generate = Callable[[torch.Tensor, int], torch.Tensor]  # (prompt, new tokens) -> sequences


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Generate, idx: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    out = run(idx, new_tokens)
    synchronize(idx.device)
    seconds = time.perf_counter() - start
    if out.size(1) != idx.size(1) + new_tokens:
        raise RuntimeError(f"generated {out.size(1) - idx.size(1)} tokens, expected {new_tokens}")
    return seconds


def best_time(run: Generate, idx: torch.Tensor, new_tokens: int, repeats: int) -> float:
    return min(timed(run, idx, new_tokens) for _ in range(repeats))


def ours(model: GPT, precision: runtime.Precision) -> Generate:
    def run(idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
        generator = torch.Generator(device=idx.device).manual_seed(0)
        with precision.autocast(idx.device):
            return model.generate(idx, new_tokens, top_k=TOP_K, generator=generator)
    return run


def ours_uncached(model: GPT, precision: runtime.Precision) -> Generate:
    """The baseline the cache must beat: the whole sequence through the model every step."""
    @torch.no_grad()
    def run(idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
        generator = torch.Generator(device=idx.device).manual_seed(0)
        with precision.autocast(idx.device):
            for _ in range(new_tokens):
                logits, _ = model(idx)
                token = sample_next_token(logits[:, -1], top_k=TOP_K, generator=generator)
                idx = torch.cat([idx, token], dim=1)
        return idx
    return run


def transformers_generate(hf_model: Any, **options: Any) -> Generate:
    @torch.no_grad()
    def run(idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
        torch.manual_seed(0)
        return hf_model.generate(
            idx, attention_mask=torch.ones_like(idx), do_sample=True, top_k=TOP_K, top_p=None,
            temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=50256, **options)
    return run


def graph_recording_cost(model: GPT, precision: runtime.Precision, idx: torch.Tensor,
                         new_tokens: int) -> tuple[float, float]:
    """(seconds the step that records the CUDA graph takes beyond a replayed step, seconds
    of a replayed step), from one generation timed token by token."""
    stamps: list[float] = []

    def stamp(token: torch.Tensor) -> None:
        synchronize(idx.device)
        stamps.append(time.perf_counter())

    generator = torch.Generator(device=idx.device).manual_seed(0)
    with precision.autocast(idx.device):
        model.generate(idx, new_tokens, top_k=TOP_K, generator=generator, on_token=stamp)
    # stamps[0]: prefill and the first token; stamps[1]: the recorded step and its token.
    per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    return stamps[1] - stamps[0] - per_step, per_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2", help="model shape (default gpt2, 124M)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,5")
    parser.add_argument("--uncached-batch-sizes", default="1",
                        help="batch sizes that also run without the KV cache")
    parser.add_argument("--hf-static-batch-sizes", default="1",
                        help="batch sizes that also run transformers with its static cache and "
                        "torch.compile (CUDA only; each compiles anew)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument("--device", default="cpu", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--dtype", default="auto", choices=runtime.DTYPE_CHOICES,
                        help="auto: bf16 on GPUs that have it, else fp32")
    args = parser.parse_args(argv)
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision(device, args.dtype)
    dtype = precision.autocast_dtype or torch.float32
    if device.type == "cuda":
        runtime.enable_tf32()  # the project's policy on CUDA; it matters to fp32 only
    import transformers
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_hf(tmp)
        hf_model = GPT2LMHeadModel.from_pretrained(tmp).eval().to(device, dtype)
    model.to(device, dtype)
    prompt = get_tokenizer().encode(PROMPT)
    uncached = {int(b) for b in args.uncached_batch_sizes.split(",") if b}
    hf_static = {int(b) for b in args.hf_static_batch_sizes.split(",") if b}
    if device.type != "cuda":
        hf_static = set()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{device}, {torch.get_num_threads()} threads"
    print(f"preset {args.preset}, prompt {len(prompt)} tokens + {args.new_tokens} new, "
          f"top-k {TOP_K}, {precision.name} weights, {where}, best of {args.repeats}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    rows: list[str] = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        rows += measure_batch(args, batch, torch.tensor([prompt] * batch, device=device),
                              model, hf_model, precision, batch in uncached, batch in hf_static)
    print(f"{'batch':>5} {'method':<36} {'seconds':>8} {'tokens/s':>9} {'TTFT ms':>8} "
          f"{'vs transformers':>15} {'vs static+compile':>17}")
    print("\n".join(rows))
    return 0


def measure_batch(args: argparse.Namespace, batch: int, idx: torch.Tensor, model: GPT,
                  hf_model: Any, precision: runtime.Precision, with_uncached: bool,
                  with_hf_static: bool) -> list[str]:
    new = args.new_tokens
    runs: dict[str, Generate] = {
        "ours, KV cache" + (" + CUDA graph" if idx.is_cuda else ""): ours(model, precision),
        "transformers generate": transformers_generate(hf_model)}
    if with_hf_static:
        runs["transformers static cache + compile"] = transformers_generate(
            hf_model, cache_implementation="static")
    if with_uncached:
        runs["ours, no cache"] = ours_uncached(model, precision)
    seconds: dict[str, float] = {}
    first_token: dict[str, float] = {}
    for name, run in runs.items():
        repeats = 1 if name == "ours, no cache" else args.repeats
        if name.startswith("transformers static"):
            first = timed(run, idx, new)  # compiles and records CUDA graphs
            seconds[name] = best_time(run, idx, new, repeats)
            print(f"  batch {batch}: transformers static cache + compile, first call "
                  f"{first:.1f} s, {first - seconds[name]:.1f} s of it one-time (compile, "
                  "capture)", flush=True)
        else:
            seconds[name] = best_time(run, idx, new, repeats)
            first_token[name] = best_time(run, idx, 1, repeats)
        print(f"  measured {name}, batch {batch}: {seconds[name]:.3f} s", flush=True)
    if idx.is_cuda and new >= 3:
        recording, per_step = graph_recording_cost(model, precision, idx, new)
        print(f"  batch {batch}: recording our CUDA graph costs {recording * 1e3:.1f} ms once "
              f"(a replayed step takes {per_step * 1e3:.2f} ms)", flush=True)
    return [table_row(batch, name, seconds, first_token.get(name), batch * new)
            for name in seconds]


def table_row(batch: int, name: str, seconds: dict[str, float], first_token: float | None,
              made: int) -> str:
    def ratio(against: str) -> str:
        return f"{seconds[against] / seconds[name]:.2f}x" if against in seconds else "-"

    ttft = f"{first_token * 1e3:.1f}" if first_token is not None else "-"
    return (f"{batch:>5} {name:<36} {seconds[name]:>8.3f} {made / seconds[name]:>9.1f} "
            f"{ttft:>8} {ratio('transformers generate'):>15} "
            f"{ratio('transformers static cache + compile'):>17}")


if __name__ == "__main__":
    sys.exit(main())
