#!/usr/bin/env bash
# One-shot GPU check: the CUDA tests and the GPU benchmarks, for bench/RESULTS.md.
#
#     bench/gpu_check.sh OUT_DIR
#
# Run from anywhere on a CUDA machine with the project installed (pip install -e .). Each
# step writes OUT_DIR/<step>.txt and echoes it. A step that fails or overruns its time
# limit is reported and the next one still runs; the script exits 1 if any did. The limits
# add up to 7.9 minutes, so step counts are small: enough for steady-state figures on
# an H100, not for a long average.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
failed=()

# step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, its output in OUT/NAME.txt.
step() {
    local name=$1 seconds=$2
    shift 2
    echo "== $name (limit ${seconds}s): $*"
    local start=$SECONDS
    if timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"; then
        echo "== $name: ok in $((SECONDS - start))s"
    else
        echo "== $name: FAILED or timed out after $((SECONDS - start))s" | tee -a "$OUT/$name.txt"
        failed+=("$name")
    fi
}

step environment 10 bash -c 'nvidia-smi; git log -1 --oneline || true; python -c "import torch, \
    transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"'

# Every test with "cuda" in its name: the CPU tests' CUDA runs (test_sample.py's exactness
# tests through the CUDA graph among them) and the CUDA-only tests.
step tests_cuda 75 python -m pytest -q -k cuda tests

# Issue 11's figures: 124M, B=64, T=1024, bf16, compiled: one micro-step (the model's
# chunked loss, the full-logits baseline, the real loader) and the recipe's 524,288 tokens
# per step (Inductor's cache holds the first step's kernels, so its compile is short); then
# gpt2-medium at the largest micro-batch that fits.
step bench_train_1micro 105 python bench/bench_train.py --device=cuda --model=gpt2 \
    --batch-size=64 --seq-len=1024 --compile --dtype=bf16 --steps=8 --warmup=3
step bench_train_accum8 60 python bench/bench_train.py --device=cuda --model=gpt2 \
    --batch-size=64 --seq-len=1024 --compile --dtype=bf16 --grad-accum=8 --steps=3 \
    --warmup=1 --no-baseline
step bench_train_medium 95 python bench/bench_train.py --device=cuda --model=gpt2-medium \
    --batch-size=auto --seq-len=1024 --compile --dtype=bf16 --steps=5 --warmup=2 --no-baseline

# Issue 12's figures: batch 1 against transformers (default and static cache + compile),
# batch 64 alone; 124M, bf16, 256 new tokens, time to first token and the recording cost.
step bench_sample_batch1 75 python bench/bench_sample.py --device=cuda --dtype=bf16 \
    --new-tokens=256 --batch-sizes=1 --uncached-batch-sizes=1 --hf-static-batch-sizes=1
step bench_sample_batch64 30 python bench/bench_sample.py --device=cuda --dtype=bf16 \
    --new-tokens=256 --batch-sizes=64 --uncached-batch-sizes= --hf-static-batch-sizes=

step bench_eval 25 python bench/bench_eval.py --device=cuda --repeats=2

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "gpu_check: failed: ${failed[*]} (outputs in $OUT)"
    exit 1
fi
echo "gpu_check: all steps ok (outputs in $OUT)"
