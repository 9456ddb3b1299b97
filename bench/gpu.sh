#!/usr/bin/env bash
# One-shot GPU check of igpt's Triton kernels (needs only torch + triton on the machine; pytest is optional).
#
#   bash bench/gpu.sh            # from the repository root; with $OUT set, logs are also written under $OUT/
#
# 1. makes `igpt.kernels` importable: `pip install --no-deps -e .` (igpt.kernels maps to kernels/ via setup.py's
#    package_dir, so PYTHONPATH alone is not enough); if pip cannot, a temporary shim package is put on PYTHONPATH;
# 2. runs tests/test_flash_attn.py and tests/test_cross_entropy.py compiled on CUDA (one launch config per kernel,
#    IGPT_KERNELS_AUTOTUNE=0, so new shapes do not pay for a tuning sweep), if pytest is installed;
# 3. runs bench/kernels.py (correctness at full sizes, attention TFLOP/s, cross-entropy time and memory; < 8 min).
# Exit status: non-zero if the tests or the benchmark's correctness checks fail.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python}"
LOG_DIR="${OUT:-}"
if [[ -n "$LOG_DIR" ]]; then
    mkdir -p "$LOG_DIR"
fi

log() {  # tee into $OUT/<name> when $OUT is set
    if [[ -n "$LOG_DIR" ]]; then tee -a "$LOG_DIR/$1"; else cat; fi
}

echo "== environment ==" | log gpu.log
"$PY" - <<'EOF' 2>&1 | log gpu.log
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | log gpu.log || true

echo "== install igpt (no deps) ==" | log gpu.log
if ! "$PY" -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | log gpu.log; then
    echo "pip install -e . failed; continuing with a shim" | log gpu.log
fi
if ! (cd /tmp && "$PY" -c "import igpt.kernels" >/dev/null 2>&1); then
    # Shim: a bare `igpt` package whose `kernels` subpackage is this checkout's kernels/ folder.
    SHIM="$(mktemp -d)"
    mkdir -p "$SHIM/igpt"
    printf '"""Shim for bench/gpu.sh: igpt.kernels only."""\n' >"$SHIM/igpt/__init__.py"
    ln -s "$ROOT/kernels" "$SHIM/igpt/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "using shim package at $SHIM" | log gpu.log
fi
(cd /tmp && "$PY" -c "import igpt.kernels as k; print('igpt.kernels from', k.__file__, k.triton_available())") 2>&1 |
    log gpu.log

status=0
echo "== kernel tests (compiled on CUDA) ==" | log gpu.log
if "$PY" -c "import pytest" >/dev/null 2>&1; then
    # -p no:cacheprovider: the checkout may be read-only; --noconftest: the shared conftest may need hydra etc.
    if ! IGPT_KERNELS_AUTOTUNE=0 "$PY" -m pytest tests/test_flash_attn.py tests/test_cross_entropy.py -q \
        -p no:cacheprovider --noconftest -o "markers=slow: larger matrix" -m "not slow" --durations=5 2>&1 |
        log tests.log; then
        status=1
    fi
else
    echo "pytest is not installed here: skipping the kernel tests (bench/kernels.py still checks correctness)" |
        log tests.log
fi

echo "== bench/kernels.py ==" | log gpu.log
if ! "$PY" bench/kernels.py "$@" 2>&1 | log bench.log; then
    status=1
fi
echo "gpu.sh finished with status $status" | log gpu.log
exit "$status"
