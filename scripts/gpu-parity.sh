#!/usr/bin/env bash
# Run the CUDA parity harness on the GPU machine.
#
# Here (no GPU needed):
#   cargo build --release --features cuda -p mor-engine --example cuda_parity
#   mkdir -p .gpu && cp target/release/examples/cuda_parity .gpu/
# There (the `run` tool, carrying .gpu):
#   bash scripts/gpu-parity.sh            # parity table + timings, log in $OUT/parity.txt
# Extra arguments go to the binary (--no-timings, --compile-only).
set -o pipefail
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
BIN="${MOR_PARITY_BIN:-.gpu/cuda_parity}"
LOG="${OUT:-.}/parity.txt"
"$BIN" "$@" 2>&1 | tee "$LOG"
