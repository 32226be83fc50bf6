#!/usr/bin/env bash
# A ~10-minute training run of 135M MoR (expert-choice, 3 recursions, scripts/gpu-train-135m.toml)
# on the registry corpus (scripts/build-corpus.sh) on one H200, in one call of the `run` tool:
# training with a validation curve, the loss plot, and a summary; the small results land in $OUT.
#
# Here (no GPU needed), once:
#   scripts/fetch-test-assets.sh        # .assets/smollm2/*.gguf: the SmolLM2 tokenizer (vocab 49152)
#   scripts/build-corpus.sh             # .assets/corpus/corpus.jsonl (33 MB of text)
#   echo /.gpu-data/ >> .git/info/exclude
#   mor tokenizer from-gguf -o .gpu-data/smollm2-tokenizer.json .assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   mor data prepare -t .gpu-data/smollm2-tokenizer.json -o .gpu-data/corpus135m --val-fraction 0.02 .assets/corpus/corpus.jsonl
#   cargo build --release --features cuda -p mor-cli && mkdir -p .gpu && cp target/release/mor .gpu/ && strip .gpu/mor
# There (the `run` tool with carry [".gpu", ".gpu-data/corpus135m"] and timeout_s 600):
#   bash scripts/gpu-train-135m.sh
#
# The run directory (with the ~0.8 GB checkpoint) stays in RUN_DIR on that machine; $OUT gets
# train.log, metrics.jsonl, loss.png (train and validation loss), val.json, config.toml and
# summary.txt. Exit status: that of `mor train`.
#
# Environment: MINUTES (9: training wall time, counted from the start of `mor train`; the rest of
# a 600 s call covers start-up, the final validation, checkpoint and sample), CONFIG
# (scripts/gpu-train-135m.toml), DATA (.gpu-data/corpus135m), DEVICE (cuda), GEMM (bf16),
# VAL_ROWS (100 rows of 2048 tokens; the split holds 103), VAL_EVERY (50 steps), STEPS (the
# config's, an upper bound the time fit only shortens), PROMPT ("Call me"), RUN_DIR
# (runs/gpu-train-135m-<time>), MOR_BIN (.gpu/mor), OUT (gpu-out).
# CPU smoke test (two 135M steps of 256 tokens, a few minutes on 2 cores):
#   sed -e 's/^micro_batch = .*/micro_batch = 1/' -e 's/^grad_accum = .*/grad_accum = 1/' \
#       -e 's/^seq_len = .*/seq_len = 256/' scripts/gpu-train-135m.toml > /tmp/cpu-135m.toml
#   DEVICE=cpu GEMM=f32 CONFIG=/tmp/cpu-135m.toml STEPS=2 VAL_ROWS=2 VAL_EVERY=1 \
#   MOR_BIN=target/release/mor OUT=/tmp/gpu-out bash scripts/gpu-train-135m.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
MINUTES="${MINUTES:-9}"
CONFIG="${CONFIG:-scripts/gpu-train-135m.toml}"
DATA="${DATA:-.gpu-data/corpus135m}"
DEVICE="${DEVICE:-cuda}"
GEMM="${GEMM:-bf16}"
VAL_ROWS="${VAL_ROWS:-100}"
VAL_EVERY="${VAL_EVERY:-50}"
PROMPT="${PROMPT-Call me}"
RUN_DIR="${RUN_DIR:-runs/gpu-train-135m-$(date +%Y%m%d-%H%M%S)}"
BIN="${MOR_BIN:-.gpu/mor}"
mkdir -p "$OUT"

main() {
  # Fail before the GPU work when an input is missing, naming how to make it.
  [ -x "$BIN" ] || { echo "error: no mor binary at $BIN (build it with --features cuda, see the header of $0)"; return 2; }
  [ -f "$CONFIG" ] || { echo "error: no config $CONFIG"; return 2; }
  [ -f "$DATA/manifest.json" ] || { echo "error: no token shards in $DATA (mor data prepare, see the header of $0; carry the folder)"; return 2; }
  # A hung process must not eat the whole call: stop it 40 s after the training budget (580 s
  # for 9 min, inside a 600 s call) so that the files below still come back.
  local kill_after
  kill_after=$(awk -v m="$MINUTES" 'BEGIN { if (m + 0 <= 0) exit 1; print int(m * 60 + 40) }') || {
    echo "error: MINUTES=$MINUTES is not a positive number"
    return 2
  }
  source scripts/gpu-env.sh
  export MOR_PTX_CACHE="${MOR_PTX_CACHE:-.gpu/kernels.ptx}" # kernels compiled here, if shipped
  echo "== $(date -u +%FT%TZ) mor train $CONFIG on $DATA, $DEVICE ($GEMM GEMMs), $MINUTES min; run directory $RUN_DIR"
  local steps=()
  [ -n "${STEPS:-}" ] && steps=(--steps "$STEPS")
  local t0=$SECONDS rc=0
  timeout "$kill_after" "$BIN" train "$CONFIG" --data "$DATA" --device "$DEVICE" --gemm "$GEMM" \
    --out "$RUN_DIR" --time-limit "$MINUTES" --fit-schedule --val-rows "$VAL_ROWS" --val-every "$VAL_EVERY" \
    --prompt "$PROMPT" "${steps[@]}" || rc=$?
  echo "== mor train: rc=$rc after $((SECONDS - t0)) s"
  for f in metrics.jsonl loss.png val.json; do
    [ -f "$RUN_DIR/$f" ] && cp "$RUN_DIR/$f" "$OUT/"
  done
  cp "$CONFIG" "$OUT/config.toml"
  summary "$RUN_DIR/metrics.jsonl" | tee "$OUT/summary.txt"
  return $rc
}

# Steps, tokens, throughput and the train / validation loss at each evaluation, from the metrics.
summary() {
  [ -f "$1" ] || { echo "no metrics at $1"; return 0; }
  python3 - "$1" "$CONFIG" <<'PYEOF' || tail -n 2 "$1"
import json, re, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cfg = open(sys.argv[2]).read()
num = lambda k: int(re.search(rf"^{k}\s*=\s*(\d+)", cfg, re.M).group(1))
per_step = num("micro_batch") * num("seq_len") * num("grad_accum")
if not recs:
    sys.exit("metrics.jsonl is empty")
last = recs[-1]
tps = statistics.median(r["tokens_per_s"] for r in recs[1:] or recs)
print(f"steps {last['step']} x {per_step:,} tokens = {last['step'] * per_step / 1e6:.1f}M tokens; "
      f"median {tps / 1e3:.1f}K tokens/s")
print(f"train loss: first {recs[0]['loss']:.4f}, last {last['loss']:.4f}, min {min(r['loss'] for r in recs):.4f}; "
      f"final LR {last['lr']:.2e}")
vals = [r for r in recs if "val_loss" in r]
if vals:
    print(" step   train loss  val loss")
    for r in vals:
        print(f"{r['step']:5d}   {r['loss']:10.4f}  {r['val_loss']:8.4f}")
    best = min(vals, key=lambda r: r["val_loss"])
    print(f"final val loss {vals[-1]['val_loss']:.4f} (best {best['val_loss']:.4f} at step {best['step']})")
PYEOF
}

main 2>&1 | tee -a "$OUT/train.log"
