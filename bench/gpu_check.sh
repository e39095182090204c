#!/usr/bin/env bash
# One command on a bare GPU machine with a fresh clone: installs what is missing, then checks
# what a user runs first on a GPU and takes every GPU figure bench/RESULTS.md asks for.
#
#     bash bench/gpu_check.sh [OUT_DIR]               # default: $OUT, else ./gpu_check_out
#     GPU_CHECK_STEPS="train_bf16 sample" bash bench/gpu_check.sh OUT_DIR   # rerun just these
#     GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh OUT_DIR    # print the steps, run nothing
#
# Install line it runs when `import torch, transformers, pytest` fails (documented in the
# README): `pip install torch` (only if torch is missing), then `pip install -e ".[dev]"`
# (the dev extra: transformers and pytest, which four steps need). Offline, an installed
# environment is used as it is, and the C++ loader is built into it if it is missing
# (`pip install --no-build-isolation --no-deps -e .`, with the image's scikit-build-core,
# pybind11 and cmake).
#
# Each step writes OUT_DIR/<step>.txt and has a time limit of twice its estimate on an H100
# (the estimates, beside each step and not yet measured, add up to 8.1 minutes). No step
# starts, or runs, past GPU_CHECK_BUDGET seconds (default 540) from the start, so the whole
# run stays within 9 minutes and a 15-minute spell leaves room to rerun one step; a step
# cut by the budget is listed as such. A step that fails or overruns is reported and the
# next one runs. Every figure, the GPU and the git hash go to
# OUT_DIR/gpu_summary.txt. Without a CUDA GPU the GPU steps say so and are skipped.
set -uo pipefail

OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
SUMMARY=$OUT_DIR/gpu_summary.txt
DATA=$OUT_DIR/data
BUDGET=${GPU_CHECK_BUDGET:-540}
ONLY=" ${GPU_CHECK_STEPS:-} "
DRY=${GPU_CHECK_DRY_RUN:-0}
PY=${PYTHON:-python}
export NANO_GPT_DATA_ROOT=$DATA PYTHONUNBUFFERED=1 OUT_DIR PY
failed=()
started=$SECONDS

gpu=no
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null &&
    gpu=yes

# step NAME ESTIMATE_S NEEDS(gpu|any) PATTERN COMMAND...: COMMAND within 2 x ESTIMATE_S
# seconds, its output in OUT_DIR/NAME.txt; its lines matching PATTERN (the figures) go to
# the summary.
step() {
    local name=$1 estimate=$2 needs=$3 pattern=$4
    shift 4
    if [[ "$ONLY" != "  " && "$ONLY" != *" $name "* ]]; then
        return
    fi
    local limit=$((2 * estimate)) left=$((BUDGET - (SECONDS - started)))
    if ((left < estimate)); then
        echo "== $name: not run, ${left}s left of the ${BUDGET}s budget" | tee -a "$SUMMARY"
        failed+=("$name(budget)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (estimate ${estimate}s, limit ${limit}s): $*"
    if [[ "$DRY" == 1 ]]; then
        return
    fi
    if [[ "$needs" == gpu && "$gpu" == no ]]; then
        echo "== $name: skipped, no CUDA GPU on this machine" | tee -a "$SUMMARY"
        return
    fi
    local begin=$SECONDS status
    # Through bash, so that COMMAND may be one of the functions below (exported).
    timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" >"$OUT_DIR/$name.txt" 2>&1
    status=$?
    tail -n 40 "$OUT_DIR/$name.txt"
    if ((status == 0)); then
        echo "== $name: ok in $((SECONDS - begin))s (estimate ${estimate}s)" | tee -a "$SUMMARY"
    else
        echo "== $name: FAILED (exit $status$( ((status == 124)) && echo ", timed out")) after" \
            "$((SECONDS - begin))s (estimate ${estimate}s); see $name.txt" | tee -a "$SUMMARY"
        failed+=("$name")
    fi
    grep -E "$pattern" "$OUT_DIR/$name.txt" | sed "s/^/  $name | /" >>"$SUMMARY" || true
}

# A small HellaSwag file in the real format (ctx, endings, label), written here: no network.
write_hellaswag() {
    "$PY" - "$OUT_DIR/hellaswag_local.jsonl" <<'EOF'
import json, sys
rows = [("The cat sat on the", ["mat.", "sky of blue rockets.", "quantum fields.", "tax."], 0),
        ("She opened the door and", ["walked in.", "the door.", "seven.", "purple."], 0),
        ("To boil water, you", ["heat it.", "freeze it.", "paint it.", "sing."], 0),
        ("The sun rises in the", ["east.", "fridge.", "soup.", "pocket."], 0)] * 8
with open(sys.argv[1], "w") as f:
    for i, (ctx, endings, label) in enumerate(rows):
        f.write(json.dumps({"ind": i, "ctx": ctx, "endings": endings, "label": label,
                            "activity_label": "check", "split": "val"}) + "\n")
EOF
}

# The losses of two runs' log.jsonl over the steps both logged after the first's resume.
compare_losses() {
    "$PY" - "$@" <<'EOF'
import json, sys
def losses(path):
    return {e["step"]: e["loss"] for e in map(json.loads, open(path)) if "loss" in e}
ref, resumed = losses(sys.argv[1]), losses(sys.argv[2])
first = int(sys.argv[3])
common = sorted(s for s in resumed if s >= first and s in ref)
diff = max((abs(ref[s] - resumed[s]) for s in common), default=float("nan"))
same = sum(ref[s] == resumed[s] for s in common)
print(f"FIGURE resume: steps {common[0] if common else '-'}..{common[-1] if common else '-'} "
      f"after --resume: {same}/{len(common)} losses bit-equal, max |diff| {diff:.2e}")
sys.exit(0 if common and diff <= 1e-2 else 1)
EOF
}

# Training end to end as a user runs it: stdlib shards, compile (the CUDA default),
# validation, HellaSwag on the local file, samples, checkpoints; then the same run stopped
# by SIGTERM and continued with --resume, its losses against the uninterrupted run's.
train_end_to_end() {
    local dtype=$1 out=$OUT_DIR/train_$1 steps=60
    local common=(--device=cuda --dataset=stdlib --model=gpt2-mini --seq-len=256 --batch-size=16
        --total-batch-size=8192 --max-steps="$steps" --eval-interval=20 --val-steps=4
        --hellaswag-interval=20 --hellaswag-data="$OUT_DIR/hellaswag_local.jsonl"
        --sample-interval=20 --num-samples=2 --sample-length=32 --checkpoint-interval=20
        --dtype="$dtype" --compile)
    rm -rf "$out"
    "$PY" train_gpt2.py "${common[@]}" --out-dir="$out/full" || return 1
    "$PY" train_gpt2.py "${common[@]}" --out-dir="$out/stopped" &
    local pid=$! waited=0
    # A GPU runs a gpt2-mini step in tens of ms: the signal goes at step 5 of 60.
    until grep -q '"step": 5, "loss"' "$out/stopped/log.jsonl" 2>/dev/null; do
        sleep 0.1
        waited=$((waited + 1))
        if ((waited > 2400)) || ! kill -0 "$pid" 2>/dev/null; then
            echo "the run to stop ended or never reached step 5"
            return 1
        fi
    done
    kill -TERM "$pid"
    wait "$pid" || return 1
    grep -q "stopped at step" "$out/stopped/log.jsonl" "$OUT_DIR/train_$dtype.txt" 2>/dev/null ||
        { echo "the run finished before SIGTERM stopped it"; return 1; }
    local saved=("$out"/stopped/ckpt_*.pt)  # fixed-width names: the last is the newest
    local resumed_at=${saved[-1]##*ckpt_}
    "$PY" train_gpt2.py "${common[@]}" --out-dir="$out/stopped" --resume || return 1
    compare_losses "$out/full/log.jsonl" "$out/stopped/log.jsonl" "$((10#${resumed_at%.pt}))"
}

# Tokens/s of the 124M model at B=64, T=1024, bf16, compiled, one micro-step per step: the
# median step of a short train_gpt2.py run (steps 3.. after the compile), per recipe.
tokens_per_second() {
    local name=$1
    shift
    local out=$OUT_DIR/speed_$name
    rm -rf "$out"
    "$PY" train_gpt2.py --device=cuda --dataset=stdlib --model=gpt2 --batch-size=64 \
        --seq-len=1024 --total-batch-size=65536 --max-steps=10 --eval-interval=0 \
        --hellaswag-interval=0 --sample-interval=0 --checkpoint-interval=0 --dtype=bf16 \
        --compile --out-dir="$out" "$@" || return 1
    "$PY" - "$out/log.jsonl" "$name" <<'EOF'
import json, statistics, sys
steps = [e for e in map(json.loads, open(sys.argv[1])) if "tok_per_s" in e][3:]
mfu = [e["mfu"] for e in steps if "mfu" in e]
print(f"FIGURE tokens/s {sys.argv[2]}: {statistics.median(e['tok_per_s'] for e in steps):,.0f}"
      f" (median of {len(steps)} steps; MFU {statistics.median(mfu) * 100 if mfu else 0:.1f}%)")
EOF
}

# Batch-1 sampling from the trained checkpoint: the CUDA graph's tokens against eager
# steps', tokens/s and time to first token; then the two command lines.
sample_checks() {
    local saved=("$OUT_DIR"/train_bf16/full/ckpt_*.pt)
    local ckpt=${saved[-1]}
    if [[ ! -f "$ckpt" ]]; then
        echo "no checkpoint from train_bf16; run that step first"
        return 1
    fi
    "$PY" - "$ckpt" <<'EOF' || return 1
import sys, time, torch
import checkpoint, model as model_module
from model import GPT
state = checkpoint.load(sys.argv[1])
gpt = GPT.from_checkpoint(state).to("cuda", torch.bfloat16).eval()
prompt = torch.tensor([[50256]], device="cuda")
def timed(new_tokens):
    torch.cuda.synchronize(); start = time.perf_counter()
    out = gpt.generate(prompt, new_tokens, temperature=0)
    torch.cuda.synchronize(); return out, time.perf_counter() - start
graphed, _ = timed(200)                      # records the graph
graphed, seconds = timed(200)                # replays it
ttft = min(timed(1)[1] for _ in range(3))
real = model_module.CUDAGraphStep
model_module.CUDAGraphStep = lambda step: step
gpt._decode_graph = None
eager, eager_seconds = timed(200)
model_module.CUDAGraphStep = real
same = torch.equal(graphed, eager)
print(f"FIGURE sample batch 1: CUDA graph {199 / seconds:,.0f} tokens/s, eager "
      f"{199 / eager_seconds:,.0f} tokens/s, time to first token {ttft * 1e3:.1f} ms, "
      f"tokens identical: {same}")
sys.exit(0 if same else 1)
EOF
    "$PY" sample.py --checkpoint="$ckpt" --device=cuda --num-samples=1 --max-length=40 \
        --stream "The" || return 1
    "$PY" eval_hellaswag.py --checkpoint="$ckpt" --device=cuda \
        --data="$OUT_DIR/hellaswag_local.jsonl" | sed 's/^/FIGURE hellaswag cli: /'
}

export -f compare_losses train_end_to_end tokens_per_second sample_checks

: >"$SUMMARY"
{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) git $(git rev-parse --short HEAD 2>/dev/null)" \
        "$(git diff --quiet 2>/dev/null || echo '(with uncommitted changes)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
        echo "no nvidia-smi"
} | tee -a "$SUMMARY"

# Installs (about 5 s when already installed; up to 90 s for the dev extra and the C++
# loader's build, torch's wheel not counted). An image that already holds torch, the test
# packages and the build tools (scikit-build-core, pybind11, cmake), offline, gets the C++
# loader alone, built against what it has.
step install 45 any "^FIGURE" bash -c '
    '"$PY"' -c "import torch, transformers, pytest" 2>/dev/null || {
        '"$PY"' -c "import torch" 2>/dev/null || pip install torch
        pip install -e ".[dev]"
    }
    '"$PY"' -c "import _loader" 2>/dev/null ||
        '"$PY"' -m pip install --no-build-isolation --no-deps -e .
    '"$PY"' -c "import torch, transformers, data; print(\"FIGURE versions: torch\",
        torch.__version__, \"cuda\", torch.version.cuda, \"transformers\",
        transformers.__version__, \"loader\", \"native\" if data.NATIVE_MODULE else \"numpy\",
        \"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)"'
# The stdlib shards, offline (about 15 s on 16 cores; kept across reruns).
step prepare_data 20 any "shards|tokens" bash -c "[[ -f '$DATA/stdlib/manifest.json' ]] &&
    echo 'stdlib shards already in $DATA' || $PY prepare_dataset.py --dataset=stdlib --no-progress"
write_hellaswag
# (a) bf16 end to end: three runs of gpt2-mini, 60 steps, each compiling (cold about 25 s,
# then Inductor's cache); validation, HellaSwag, samples, checkpoints, SIGTERM + --resume.
step train_bf16 60 gpu "^FIGURE|val loss|HellaSwag|first step|stopped at|resumed from" \
    train_end_to_end bf16
# (b) fp16 + GradScaler, as on a T4 or V100: the loss scale and skipped steps on each line.
step train_fp16 60 gpu "^FIGURE|val loss|scale|stopped at|resumed from" train_end_to_end fp16
# (c) tokens/s at 124M, B=64, T=1024, bf16, compiled: cold compile about 40 s each, the
# modern model without Muon reusing the modern run's graph; target 530K tok/s for gpt2 (1.03x
# llm.c + cuDNN), modern >= 0.9x gpt2's; Muon's cost is modern against modern_adamw.
step speed_gpt2 50 gpu "^FIGURE|first step" tokens_per_second gpt2
step speed_modern 50 gpu "^FIGURE|first step" tokens_per_second modern --recipe=modern
step speed_modern_adamw 30 gpu "^FIGURE|first step" tokens_per_second modern_adamw \
    --recipe=modern --matrix-optimizer=adamw
# (d) the chunked loss against full logits: time and peak memory of a compiled 124M step
# (two cold compiles, about 45 s), then the eager validation step, three ways (about 10 s).
step loss_train 55 gpu "x |ms|peak|GiB|tok/s" "$PY" bench/bench_train.py --device=cuda \
    --model=gpt2 --batch-size=64 --seq-len=1024 --compile --dtype=bf16 --steps=6 --warmup=2
step loss_validation 10 gpu "x |validation" "$PY" bench/bench_loss.py --device=cuda \
    --model=gpt2 --batch-size=64 --seq-len=1024 --dtype=bf16 --steps=5
# (e) sampling at batch 1 from (a)'s checkpoint, the sample.py and eval_hellaswag.py
# command lines (about 15 s).
step sample 15 gpu "^FIGURE|acc" sample_checks
# (f) --batch-size=auto for gpt2-medium: the search, then two compiled steps at the size
# found (trials about 10 s, compile about 35 s).
step auto_medium 45 gpu "batch-size=auto|batch:|first step|tok/s" "$PY" train_gpt2.py \
    --device=cuda --dataset=stdlib --model=gpt2-medium --batch-size=auto --seq-len=1024 \
    --total-batch-size=524288 --max-steps=2 --eval-interval=0 --hellaswag-interval=0 \
    --sample-interval=0 --checkpoint-interval=0 --dtype=bf16 --out-dir="$OUT_DIR/auto_medium"
# The CUDA tests (every test with "cuda" in its name: the CUDA graph, the loader's copies, the
# fallbacks), last: about 45 s.
step tests_cuda 45 gpu "passed|failed|error" "$PY" -m pytest -q -p no:cacheprovider -k cuda tests

echo "total $((SECONDS - started))s of the ${BUDGET}s budget" | tee -a "$SUMMARY"
if ((${#failed[@]} > 0)); then
    echo "gpu_check: failed or not run: ${failed[*]} (rerun one: GPU_CHECK_STEPS=NAME;" \
        "outputs in $OUT_DIR)" | tee -a "$SUMMARY"
    exit 1
fi
echo "gpu_check: all steps ok or skipped (summary: $SUMMARY)"
