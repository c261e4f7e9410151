#!/usr/bin/env bash
# The GPU paths, on a machine with CUDA, in a few minutes:
#   1. every test marked `gpu` (the HBM tier on a CUDA device, the disagg model and
#      the connector loading a CUDA cache from the store); none may be skipped;
#   2. an HBM-tier get into a CUDA tensor, with its GB/s beside a plain pinned
#      host-to-device copy of the same bytes (kvstore.bench.hbm_get).
#
#   bash bench/gpu_check.sh              # from the repository root
#   PYTHON=/path/to/venv/bin/python GPU_CHECK_TOTAL=1GiB bash bench/gpu_check.sh
#
# Exit status: 0 all passed; 1 a check failed; 2 no CUDA device (nothing was run).
set -uo pipefail

PYTHON="${PYTHON:-python3}"
TOTAL="${GPU_CHECK_TOTAL:-512MiB}"
STEP_TIMEOUT_S="${GPU_CHECK_TIMEOUT_S:-300}"
cd "$(dirname "$0")/.."

if ! device=$("$PYTHON" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
print(torch.cuda.get_device_name(0))
' 2>&1); then
    echo "gpu_check: no CUDA here ($device); the GPU checks need a CUDA device. Nothing was run." >&2
    exit 2
fi
echo "gpu_check: on $device"
command -v nvidia-smi >/dev/null && nvidia-smi -L

failed=0
echo "gpu_check: [1/2] tests marked gpu"
log=$(mktemp)
timeout "$STEP_TIMEOUT_S" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
    echo "gpu_check: the gpu tests failed (pytest exit $status)" >&2
    failed=1
elif grep -Eq '[0-9]+ skipped' "$log"; then
    echo "gpu_check: some gpu tests were skipped although CUDA is present (see above)" >&2
    failed=1
fi
rm -f "$log"

echo "gpu_check: [2/2] HBM-tier get into a CUDA tensor, $TOTAL"
if ! timeout "$STEP_TIMEOUT_S" "$PYTHON" -m kvstore.bench.hbm_get --device cuda --total "$TOTAL"; then
    echo "gpu_check: the HBM-tier get failed" >&2
    failed=1
fi

if [ "$failed" -ne 0 ]; then
    echo "gpu_check: FAILED" >&2
    exit 1
fi
echo "gpu_check: all passed"
