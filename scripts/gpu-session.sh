#!/usr/bin/env bash
# The GPU calls of a working session, each within the device tool's 600 s per call:
#   bash scripts/gpu-session.sh validate   # op and model parity, flash sweep, CUDA graph checks (~5 min)
#   bash scripts/gpu-session.sh report     # mor and PyTorch side by side at 8 x 2048, memory at 16 x 2048 (~9 min;
#                                          # MODELS=vanilla, MODELS=mor-ec3 split it into two calls)
#   bash scripts/gpu-session.sh train-graph  # `mor train` eager vs --cuda-graph, bit-identical losses (~1 min)
# Each writes its logs (report: also the JSON records and the table) under $OUT (the tool returns at most 8 files).
# Binaries and the PTX cache come from .gpu/ (see scripts/gpu-bench.sh for how to build them).
# Environment: MODELS ("vanilla mor-ec3"), FA_EXP_POLY_SWEEP (validate: "" or e.g. "8 4 2"),
# GRAPH ("1": report also times the --cuda-graph steps), SKIP_MEM=1 (report: no 16 x 2048 memory runs).
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
source scripts/gpu-env.sh >"$OUT/env.log" 2>&1
export MOR_PTX_CACHE="${MOR_PTX_CACHE:-.gpu/kernels.ptx}" PYTHONUNBUFFERED=1
MODELS="${MODELS:-vanilla mor-ec3}"
START=$SECONDS
# run LOG TIMEOUT_S CMD...: the command's output appended to $OUT/LOG, its rc and time on stdout.
run() {
  local log="$OUT/$1" t="$2"
  shift 2
  echo "== $* (+$((SECONDS - START))s)" | tee -a "$log"
  timeout "$t" "$@" >>"$log" 2>&1
  echo "== rc=$? (+$((SECONDS - START))s)" | tee -a "$log"
}

case "${1:-}" in
validate)
  run parity.log 200 .gpu/cuda_parity
  grep -E "FAIL|checks|passed|failed" "$OUT/parity.log" | tail -5
  grep -E "gate/up|swiglu|cross_entropy|layer form" "$OUT/parity.log"
  run model_parity.log 120 .gpu/model_parity --bf16
  tail -2 "$OUT/model_parity.log"
  run sweep.log 100 .gpu/cuda_parity --flash-sweep "tmapp,fused,tma;8,fused,4"
  for P in ${FA_EXP_POLY_SWEEP:-}; do
    MOR_NVRTC_DEFINES="FA_EXP_POLY=$P" MOR_PTX_CACHE=".gpu/kernels-poly$P.ptx" \
      run sweep.log 120 .gpu/cuda_parity --flash-sweep "tmapp,fused,tma"
  done
  grep -v PASS "$OUT/sweep.log" | grep -E "^flash|layer form|==" | head -20
  # CUDA graphs: eager and graphed copies on the same batches (bit-identical in deterministic mode).
  run graph.log 90 .gpu/mor bench train tiny-mor-ec3 --device cuda --gemm bf16 --deterministic --graph-check 4 --warmup 2 --steps 2
  run graph.log 90 .gpu/mor bench train tiny-vanilla --device cuda --gemm bf16 --graph-check 4 --warmup 2 --steps 2
  grep -E "graph check|rc=" "$OUT/graph.log"
  ;;
report)
  RES="$OUT/results.jsonl"
  : >"$RES"
  run sdpa.log 60 python3 scripts/reference/sdpa_bench.py
  tail -6 "$OUT/sdpa.log"
  for m in $MODELS; do
    run "bench-$m.log" 130 .gpu/mor bench train "360m-$m" --device cuda --micro-batch 8 --seq-len 2048 --warmup 1 --steps 4 \
      --gemm bf16 --profile-steps 1 --json "$RES"
    if [ "${GRAPH:-1}" = 1 ]; then
      run "bench-$m.log" 130 .gpu/mor bench train "360m-$m" --device cuda --micro-batch 8 --seq-len 2048 --warmup 2 --steps 4 \
        --gemm bf16 --cuda-graph --label "360m-$m cuda graph" --json "$RES"
    fi
    for dt in amp bf16; do
      run "torch-$m.log" 130 python3 scripts/bench/torch_reference.py --model "$m" --batch 8 --seq 2048 --compile --dtype "$dt" --json "$RES"
    done
  done
  # Peak memory at 16 x 2048: mor against the torch.compile reference (AMP, the recipe mor follows).
  [ -n "${SKIP_MEM:-}" ] || {
    run bench-mem.log 130 .gpu/mor bench train 360m-mor-ec3 --device cuda --micro-batch 16 --seq-len 2048 --warmup 1 --steps 2 \
      --gemm bf16 --json "$RES"
    run torch-mem.log 150 python3 scripts/bench/torch_reference.py --model mor-ec3 --batch 16 --seq 2048 --compile --dtype amp \
      --warmup 2 --steps 3 --json "$RES"
    grep -h "peak memory\|median step" "$OUT/bench-mem.log" "$OUT/torch-mem.log"
  }
  python3 scripts/bench/make_table.py "$RES" | tee "$OUT/table.md"
  ;;
train-graph)
  # `mor train` itself, eager and with --cuda-graph on the same synthetic tokens in deterministic
  # mode: the two loss curves must be bit-identical.
  for m in tiny-mor-ec3 tiny-vanilla; do
    for g in "" --cuda-graph; do
      run train.log 120 .gpu/mor train "$m" --device cuda --gemm bf16 --deterministic --data synthetic --steps 12 \
        --out "$OUT/train-$m${g:+-graph}" $g
    done
    python3 - "$OUT/train-$m/metrics.jsonl" "$OUT/train-$m-graph/metrics.jsonl" <<'PY' | tee -a "$OUT/train.log"
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(p) if '"loss"' in l] for p in sys.argv[1:3])
same = len(a) == len(b) > 0 and all(x == y for x, y in zip(a, b))
print(f"{sys.argv[1]}: {len(a)} steps, eager vs --cuda-graph losses {'bit-identical' if same else 'DIFFER'}: {a[-1:]} {b[-1:]}")
PY
  done
  grep -h "CUDA graphs" "$OUT/train.log"
  ;;
*)
  echo "usage: $0 validate|report|train-graph" >&2
  exit 2
  ;;
esac
echo "== done in $((SECONDS - START))s"
