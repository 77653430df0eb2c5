#!/usr/bin/env bash
# Install PyTorch into the given Python's environment before the rest of lora-dpo, so pip's resolver keeps it.
#  - a torch that imports already: kept (a GPU user's CUDA build stays as it is);
#  - an NVIDIA GPU (nvidia-smi present): the default build from the package index (CUDA);
#  - otherwise: the CPU build, pinned to a release known to work (TORCH_CPU_SPEC to change it). On Linux the
#    CPU wheels live on PyTorch's own index; set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to use it,
#    or leave it unset where a CPU wheel is already reachable by pip (as on our CI machines).
set -euo pipefail
PY=${1:-python3}
if "$PY" -c "import torch" 2>/dev/null; then
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: keeping it"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  "$PY" -m pip install "torch>=2.4"
else
  spec=${TORCH_CPU_SPEC:-torch==2.13.0}
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PY" -m pip install "$spec" --index-url "$TORCH_INDEX_URL"
  else
    "$PY" -m pip install "$spec"
  fi
fi
