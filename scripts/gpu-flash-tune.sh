#!/usr/bin/env bash
# Attention block shapes on the GPU: op-level parity of every instantiated shape, the attention
# timing of each, then whole-model parity (bf16) and 360M throughput with each forward shape, and
# PyTorch eager side by side. Writes $OUT/flash-tune.log. Build and carry .gpu as for gpu-bench.sh.
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/flash-tune.log") 2>&1
source scripts/gpu-env.sh >/dev/null
export MOR_PTX_CACHE="${MOR_PTX_CACHE:-.gpu/kernels.ptx}" PYTHONUNBUFFERED=1
SHAPES="${SHAPES:-tmapp,fused,tma 8,fused,4 8,4,4}"
RES="$OUT/results.jsonl"
echo "== cuda_parity, default shapes"
timeout 150 .gpu/cuda_parity --no-timings | grep -E "FAIL|checks,"
for s in $SHAPES; do
  echo "== cuda_parity attention, MOR_FLASH_WARPS=$s"
  MOR_FLASH_WARPS=$s timeout 120 .gpu/cuda_parity --only attention | grep -E "FAIL|checks,|attention bf16 tensor-core|fwd .* ms"
done
echo "== model_parity --bf16"
timeout 120 .gpu/model_parity --bf16 | grep -E "FAIL|models,|^135m"
for s in $SHAPES; do
  for m in vanilla mor-ec3; do
    echo "== mor bench 360m-$m, MOR_FLASH_WARPS=$s"
    MOR_FLASH_WARPS=$s timeout 120 .gpu/mor bench train "360m-$m" --device cuda --micro-batch 8 --seq-len 2048 \
      --warmup 1 --steps 4 --gemm bf16 --json "$RES" 2>&1 | grep -E "median step|throughput|MFU|peak memory"
  done
done
for m in vanilla mor-ec3; do
  echo "== torch $m eager"
  timeout 75 python3 scripts/bench/torch_reference.py --model "$m" --batch 8 --seq 2048 --warmup 3 --steps 10 --json "$RES" | tail -1
done
