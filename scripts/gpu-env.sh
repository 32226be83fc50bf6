#!/usr/bin/env bash
# Copy of ../shared/gpu/env.sh (the shared folder does not travel to the GPU machine).
# Source this on the GPU machine before running a cuda build of mor: finds the CUDA 13 libraries
# (system and PyPI wheels under site-packages/nvidia/...), puts them on LD_LIBRARY_PATH, links
# libnccl.so, sets CUDA_INCLUDE_DIR for NVRTC, and prints what it found. Changes no GPU state.
PY="${PYTHON:-python3}"
NV_DIRS=$("$PY" - <<'PYEOF' 2>/dev/null
import os
try:
    import nvidia
    for p in list(nvidia.__path__):
        print(p)
except Exception:
    pass
PYEOF
)
# fallbacks: common site-packages locations
for g in /usr/local/lib/python3*/dist-packages/nvidia /usr/local/lib/python3*/site-packages/nvidia /usr/lib/python3/dist-packages/nvidia /opt/conda/lib/python3*/site-packages/nvidia "$HOME"/.local/lib/python3*/site-packages/nvidia /root/.pyenv/versions/*/lib/python3*/site-packages/nvidia; do
  [ -d "$g" ] && NV_DIRS="$NV_DIRS"$'\n'"$g"
done
NV_DIRS=$(printf '%s\n' $NV_DIRS | awk 'NF && !seen[$0]++')
echo "== nvidia wheel roots:"; printf '   %s\n' $NV_DIRS
LIBDIRS=""
for r in $NV_DIRS; do
  for d in "$r"/*/lib "$r"/*/lib64; do
    [ -d "$d" ] && LIBDIRS="$LIBDIRS:$d"
  done
done
# cudarc (dynamic loading) looks for libnccl.so / libnccl.so.<N> but the nccl wheel ships libnccl.so.2:
SHIM="${TMPDIR:-/tmp}/cuda-shim-$$"; mkdir -p "$SHIM"
for r in $NV_DIRS; do
  for f in "$r"/nccl/lib/libnccl.so.2 "$r"/*/lib/libnccl.so.2; do
    [ -e "$f" ] && [ ! -e "$SHIM/libnccl.so" ] && ln -sf "$f" "$SHIM/libnccl.so"
  done
done
export LD_LIBRARY_PATH="$SHIM${LIBDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# headers for NVRTC (cuda_bf16.h etc.) if a wheel ships them
for r in $NV_DIRS; do
  for inc in "$r"/cu13/include "$r"/cuda_runtime/include; do
    [ -f "$inc/cuda_bf16.h" ] && [ -z "${CUDA_INCLUDE_DIR:-}" ] && export CUDA_INCLUDE_DIR="$inc"
  done
done
[ -z "${CUDA_INCLUDE_DIR:-}" ] && [ -f /usr/local/cuda/include/cuda_bf16.h ] && export CUDA_INCLUDE_DIR=/usr/local/cuda/include
echo "== LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
echo "== CUDA_INCLUDE_DIR=${CUDA_INCLUDE_DIR:-<none>}"
echo "== key libraries found:"
for l in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libnvrtc-builtins.so.13.0 libcurand.so.10 libnccl.so.2 libcudnn.so.9; do
  p=""
  for d in $(echo "$LD_LIBRARY_PATH" | tr ':' ' ') /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/lib64 /usr/local/nvidia/lib64; do
    [ -e "$d/$l" ] && { p="$d/$l"; break; }
  done
  [ -z "$p" ] && p=$(ldconfig -p 2>/dev/null | awk -v l="$l" '$1==l{print $NF; exit}')
  printf '   %-28s %s\n' "$l" "${p:-NOT FOUND}"
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader
