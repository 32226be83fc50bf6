#!/usr/bin/env bash
# Whole-model GPU parity, then training throughput of mor and of PyTorch side by side, in one run
# on the GPU machine; writes $OUT/bench.log, $OUT/results.jsonl and $OUT/table.md.
#
# Here (no GPU needed):
#   cargo build --release --features cuda -p mor-cli
#   cargo build --release --features cuda -p mor-train --example model_parity
#   cargo build --release --features cuda -p mor-engine --example cuda_parity
#   mkdir -p .gpu && cp target/release/mor target/release/examples/{model_parity,cuda_parity} .gpu/ && strip .gpu/*
# Optional, saves one NVRTC compilation there (needs libnvrtc 13.0 here, e.g. the nvidia-cuda-nvrtc
# wheel; a cache the driver rejects is recompiled):
#   cargo build --release --features cuda -p mor-engine --example cuda_parity
#   MOR_PTX_CACHE=.gpu/kernels.ptx target/release/examples/cuda_parity --compile-only
# There (the `run` tool, carrying .gpu):
#   bash scripts/gpu-bench.sh
#
# Environment: MICRO_BATCH (8), SEQ_LEN (2048), STEPS (4 timed steps for mor, 10 for PyTorch),
# MEM_BATCH (16: the MoR-E3 peak-memory comparison; SKIP_MEM=1 skips it), MOR_OPS_BIN (.gpu/cuda_parity,
# op-level parity and kernel timings, run when present),
# BUDGET_S (200: the optional steps — torch.compile runs, then the --deterministic runs — are skipped once the script has run this long),
# FA_EXP_POLY_SWEEP ("": e.g. "8 4 2" sweeps the forward's polynomial exp2 share, see flash_attention.cu),
# SKIP_GRAPH=1 (the CUDA graph checks and runs), SKIP_PARITY=1, SKIP_TRAIN=1, SKIP_COMPILE=1, MODELS ("vanilla mor-ec3"), GEMMS ("f32,bf16"), SIZE (360m),
# DEVICE (cuda), TORCH_EXTRA (more torch_reference.py arguments). A CPU smoke test of the script:
#   DEVICE=cpu SIZE=tiny GEMMS=f32 SKIP_PARITY=1 SKIP_COMPILE=1 MICRO_BATCH=2 SEQ_LEN=64 \
#   TORCH_EXTRA="--tiny --device cpu" MOR_BIN=target/release/mor bash scripts/gpu-bench.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/bench.log"
RES="$OUT/results.jsonl"
: >"$RES"
exec > >(tee -a "$LOG") 2>&1
source scripts/gpu-env.sh
B="${MICRO_BATCH:-8}"
L="${SEQ_LEN:-2048}"
STEPS="${STEPS:-4}"
BUDGET="${BUDGET_S:-200}"
GEMMS="${GEMMS:-f32,bf16}"
SIZE="${SIZE:-360m}"
DEVICE="${DEVICE:-cuda}"
read -r -a TX <<<"${TORCH_EXTRA:-}"
MODELS="${MODELS:-vanilla mor-ec3}"
BIN="${MOR_BIN:-.gpu/mor}"
PARITY="${MOR_PARITY_BIN:-.gpu/model_parity}"
OPS="${MOR_OPS_BIN:-.gpu/cuda_parity}"
MEM_BATCH="${MEM_BATCH:-16}"
START=$SECONDS
export PYTHONUNBUFFERED=1
# Kernels compiled once (here or by the first process), loaded by every later process.
export MOR_PTX_CACHE="${MOR_PTX_CACHE:-.gpu/kernels.ptx}"

# step NAME TIMEOUT_S [optional] -- CMD...: runs CMD under a timeout, logs rc and elapsed time;
# optional steps are skipped once BUDGET seconds have passed.
step() {
  local name="$1" t="$2" opt="$3"
  shift 3
  [ "$1" = "--" ] && shift
  if [ "$opt" = optional ] && ((SECONDS - START > BUDGET)); then
    echo "== SKIP $name (past the ${BUDGET}s budget)"
    return
  fi
  echo "== $name (+$((SECONDS - START))s)"
  timeout "$t" "$@"
  echo "== $name: rc=$? (+$((SECONDS - START))s)"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

if [ -z "${SKIP_PARITY:-}" ]; then
  if [ -x "$OPS" ]; then
    step "op-level parity + kernel timings (cuda_parity)" 150 required -- "$OPS"
    # Every tensor-core attention path (fused backward default, two-pass deterministic, wgmma opt-in): checks and timings.
    step "flash-attention configurations (cuda_parity --flash-sweep)" 90 required -- "$OPS" --flash-sweep "tmapp,fused,tma;8,fused,4;8,4,4;8g,4g,4g"
    # The forward's softmax with every FA_EXP_POLY-th group of key columns on the FMA pipe instead
    # of the SFU (an experiment, default off): checks and timings per share, kernels compiled here.
    for P in ${FA_EXP_POLY_SWEEP:-}; do
      MOR_NVRTC_DEFINES="FA_EXP_POLY=$P" MOR_PTX_CACHE=".gpu/kernels-poly$P.ptx" \
        step "flash attention, exp2 polynomial share 1/$P (FA_EXP_POLY=$P)" 120 required -- "$OPS" --flash-sweep "tmapp,fused,tma"
    done
    # The Hopper building blocks (TMA with 128-byte swizzle, shared-memory wgmma operands).
    step "TMA / wgmma building blocks (cuda_parity --tma-probe)" 30 required -- "$OPS" --tma-probe
  fi
  step "whole-model parity fp32" 150 required -- "$PARITY"
  step "whole-model parity bf16 GEMMs" 120 required -- "$PARITY" --bf16
fi
if [ "$DEVICE" = cuda ]; then
  step "PyTorch SDPA attention, same shapes as cuda_parity's attention timing" 60 required -- \
    python3 scripts/reference/sdpa_bench.py
fi

if [ -z "${SKIP_TRAIN:-}" ]; then
  # The trainer end to end (checkpoint, metrics) on the GPU and on the CPU: same loss curve.
  T="${TMPDIR:-/tmp}/mor-train-check"
  rm -rf "$T"
  step "mor train tiny-mor-ec3 on $DEVICE" 45 required -- "$BIN" train tiny-mor-ec3 --device "$DEVICE" --steps 20 --data synthetic --out "$T/gpu" --quiet
  step "mor train tiny-mor-ec3 on cpu" 45 required -- "$BIN" train tiny-mor-ec3 --device cpu --steps 20 --data synthetic --out "$T/cpu" --quiet
  python3 - "$T" <<'PYEOF'
import json, sys
t = sys.argv[1]
try:
    g = [json.loads(l) for l in open(f"{t}/gpu/metrics.jsonl")]
    c = [json.loads(l) for l in open(f"{t}/cpu/metrics.jsonl")]
    errs = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(g, c)]
    print(f"trainer GPU vs CPU, tiny-mor-ec3, {len(errs)} steps: loss step 1 {g[0]['loss']:.6f} / {c[0]['loss']:.6f}, "
          f"step {len(errs)} {g[-1]['loss']:.6f} / {c[-1]['loss']:.6f}; max relative loss difference {max(errs):.2e}")
except Exception as e:
    print("trainer comparison failed:", e)
PYEOF
fi

if [ "$DEVICE" = cuda ] && [ -z "${SKIP_GRAPH:-}" ]; then
  # CUDA graphs: eager and graphed copies of a model on the same batches (bit-identical losses in
  # deterministic mode), then the step time with the graph.
  step "CUDA graph check, tiny-mor-ec3, deterministic" 60 required -- "$BIN" bench train tiny-mor-ec3 --device cuda --gemm bf16 \
    --deterministic --graph-check 4 --warmup 2 --steps 2
  step "CUDA graph check, tiny-vanilla" 60 required -- "$BIN" bench train tiny-vanilla --device cuda --gemm bf16 --graph-check 4 --warmup 2 --steps 2
  for m in $MODELS; do
    step "mor bench $SIZE-$m --cuda-graph" 150 required -- "$BIN" bench train "$SIZE-$m" --device cuda --micro-batch "$B" \
      --seq-len "$L" --warmup 2 --steps "$STEPS" --gemm bf16 --cuda-graph --label "$SIZE-$m cuda graph" --json "$RES"
  done
fi
for m in $MODELS; do
  step "mor bench $SIZE-$m" 150 required -- "$BIN" bench train "$SIZE-$m" --device "$DEVICE" --micro-batch "$B" --seq-len "$L" \
    --warmup 1 --steps "$STEPS" --gemm "$GEMMS" --profile-steps 1 --json "$RES"
  step "torch $m eager" 75 required -- python3 scripts/bench/torch_reference.py --model "$m" --batch "$B" --seq "$L" \
    --warmup 3 --steps 10 --json "$RES" "${TX[@]}"
done
# Peak memory of MoR-E3 at the larger micro-batch, mor and PyTorch (the issue's memory bar).
if [ -z "${SKIP_MEM:-}" ]; then
  step "mor bench $SIZE-mor-ec3 micro-batch $MEM_BATCH" 150 required -- "$BIN" bench train "$SIZE-mor-ec3" --device "$DEVICE" \
    --micro-batch "$MEM_BATCH" --seq-len "$L" --warmup 1 --steps 2 --gemm bf16 --json "$RES"
  step "torch mor-ec3 micro-batch $MEM_BATCH" 100 required -- python3 scripts/bench/torch_reference.py --model mor-ec3 \
    --batch "$MEM_BATCH" --seq "$L" --warmup 2 --steps 3 --json "$RES" "${TX[@]}"
fi
if [ -z "${SKIP_COMPILE:-}" ]; then
  for m in $MODELS; do
    step "torch $m torch.compile" 150 optional -- python3 scripts/bench/torch_reference.py --model "$m" --batch "$B" --seq "$L" \
      --warmup 3 --steps 10 --compile --json "$RES" "${TX[@]}"
  done
fi

# mor's bit-reproducible mode (two-pass attention backward, heuristic GEMM algorithms): its cost.
for m in $MODELS; do
  step "mor bench $SIZE-$m --deterministic" 150 optional -- "$BIN" bench train "$SIZE-$m" --device "$DEVICE" --micro-batch "$B" \
    --seq-len "$L" --warmup 1 --steps "$STEPS" --gemm "$GEMMS" --deterministic --label "$SIZE-$m deterministic" --json "$RES"
done

python3 scripts/bench/make_table.py "$RES" | tee "$OUT/table.md"
echo "== done in $((SECONDS - START))s"
