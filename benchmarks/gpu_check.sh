#!/usr/bin/env bash
# GPU checks for lighter-sink, for a machine with a CUDA GPU; finishes in a few minutes (hard limit: 5).
#   1. device-to-host bandwidth, pinned vs pageable host memory
#   2. overlap of PredictionSink with a matmul model on the GPU (vs no writer, a synchronous writer, raw writes)
#   3. every stored prediction read back and compared with the model's output: none may be zeros
#   4. reused output buffers: a model writing every batch into one device buffer, and a Sink loop whose next
#      kernel overwrites the buffer right after put; every stored prediction must be the batch as it was put
# Exit status: 0 all checks passed, 1 a check failed, 2 no CUDA device, 124 ran out of time.
# Usage: bash benchmarks/gpu_check.sh [--items N] [--batch B] [--dir DIR] ...   (see --help)
#        PYTHON=/path/to/python bash benchmarks/gpu_check.sh   (default: .venv/bin/python if present, else python3)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python3
    fi
fi

"$PYTHON" - <<'PY'
import torch

if torch.cuda.is_available():
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
else:
    print(f"torch {torch.__version__}: no CUDA device visible")
PY

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader || true
fi

status=0
timeout --kill-after=10 290 "$PYTHON" -m benchmarks.gpu_check "$@" || status=$?
if [[ $status -eq 124 ]]; then
    echo "gpu_check: timed out after 290 s" >&2
fi
exit "$status"
