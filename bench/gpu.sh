#!/usr/bin/env bash
# The one-shot GPU run: kernel correctness and speed, then training throughput, in under 8 minutes on one H200.
#
#   bash bench/gpu.sh              # from anywhere; with $OUT set, the logs are also written under $OUT/
#   bash bench/gpu.sh --dry-run    # no GPU: CPU, Triton interpreter, tiny sizes; CI runs it to check the plumbing
#                                  # (IGPT_GPU_DRY_RUN=1 does the same)
#
# What the machine needs: python with torch and triton (a CUDA build), tokenizers, safetensors, numpy, pyyaml, tqdm.
# The training runs also need hydra-core 1.3, omegaconf 2.3 (+ antlr4-python3-runtime 4.9.*) and webdataset
# (+ braceexpand): put their wheels in <repo>/.whl/ (e.g. `pip download --no-deps -d .whl hydra-core==1.3.8
# omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7` and `pip wheel --no-deps -w .whl
# antlr4-python3-runtime==4.9.3`) and this script installs them with `pip install --no-index --no-deps --target` into
# a temporary folder on PYTHONPATH; nothing is installed into the machine's Python. W&B and DeepSpeed are not needed
# (the runs use strategy=fsdp and logger.wandb.mode=disabled). What is still missing is named, and the steps that need
# it are skipped and counted as failures.
#
# Steps, each given a share of the time budget (IGPT_GPU_BUDGET_S, default 460 s):
# 1. environment: versions, GPU, the wheels, the imports; igpt is imported from this checkout through a package shim
#    (igpt/ plus kernels/ as igpt.kernels, which is what setup.py's package_dir does) without installing it;
# 2. bench/kernel_speed.py: correctness at full sizes; attention forward and forward+backward TFLOP/s against torch
#    SDPA-flash, SDPA-cuDNN and the flash-attn package when installed (causal, bf16, S = 1k..16k, D = 128 and 64);
#    linear + cross-entropy time and peak memory against torch eager and torch.compile (V = 32k and 128k, 16k tokens);
# 3. bench/train_gpu.py: gpt2_124m and llama_1b through igpt/train.py (bf16, strategy=fsdp), Triton kernels against
#    sdpa/torch, on synthetic data prepared on the spot: one table of tokens/s, TFLOP/s, MFU and peak memory;
# 4. the kernel tests compiled on CUDA with the time left (not in a dry run: CI runs them under the interpreter).
# Exit status: 0 when every step ran and passed.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
DRY=0
if [[ "${1:-}" == "--dry-run" || "${IGPT_GPU_DRY_RUN:-0}" == "1" ]]; then
    DRY=1
fi
BUDGET="${IGPT_GPU_BUDGET_S:-460}"
LOG_DIR="${OUT:-}"
if [[ -n "$LOG_DIR" ]]; then
    mkdir -p "$LOG_DIR"
fi
TMP="$(mktemp -d "${TMPDIR:-/tmp}/igpt-gpu.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
FAILED=()

log() {  # tee into $OUT/<name> when $OUT is set
    if [[ -n "$LOG_DIR" ]]; then tee -a "$LOG_DIR/$1"; else cat; fi
}
left() { echo $((BUDGET - SECONDS)); }

echo "== environment ($([[ $DRY == 1 ]] && echo "dry run: CPU, tiny sizes" || echo "GPU run"), budget ${BUDGET}s) ==" |
    log gpu.log

# ---- 1. dependencies: wheels from .whl/ into a private --target folder ------------------------------------------------
SITE="$TMP/site"
shopt -s nullglob
WHEELS=("$ROOT"/.whl/*.whl)
shopt -u nullglob
if ((${#WHEELS[@]})); then
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${WHEELS[@]}" \
        >"$TMP/pip.log" 2>&1; then
        # One wheel that does not fit this Python (e.g. a binary built for another version) must not block the rest.
        for whl in "${WHEELS[@]}"; do
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$whl" \
                >>"$TMP/pip.log" 2>&1 || echo "could not install $(basename "$whl") (see pip's message below)"
        done
        tail -n 5 "$TMP/pip.log"
    fi
    echo "installed ${#WHEELS[@]} wheel(s) from .whl/ into $SITE" | log gpu.log
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/ folder with wheels: using what this Python has" | log gpu.log
fi

# igpt from this checkout: igpt/* plus kernels/ as igpt.kernels (setup.py's package_dir), without pip install.
mkdir -p "$TMP/shim/igpt"
for entry in "$ROOT"/igpt/*; do
    ln -s "$entry" "$TMP/shim/igpt/"
done
ln -s "$ROOT/kernels" "$TMP/shim/igpt/kernels"
export PYTHONPATH="$TMP/shim${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 TRITON_DEFAULT_FP_FUSION=1

if [[ $DRY == 1 ]]; then
    export TRITON_INTERPRET=1  # before igpt.kernels is first imported: Triton reads it when the kernels are defined
fi
"$PY" - "$TMP/missing" <<'EOF' 2>&1 | log gpu.log
import importlib, sys
need = {  # module -> (pip name, what needs it)
    "torch": ("torch", "everything"), "triton": ("triton", "everything"),
    "tokenizers": ("tokenizers", "training"), "safetensors": ("safetensors", "training"),
    "numpy": ("numpy", "training"), "yaml": ("pyyaml", "training"), "tqdm": ("tqdm", "training"),
    "hydra": ("hydra-core==1.3.8", "training"), "omegaconf": ("omegaconf==2.3.1", "training"),
    "antlr4": ("antlr4-python3-runtime==4.9.3", "training"), "webdataset": ("webdataset==1.0.2", "training"),
    "braceexpand": ("braceexpand", "training"),
}
optional = {"pytest": "the kernel tests", "flash_attn": "the flash-attn column", "wandb": "nothing here",
            "deepspeed": "nothing here"}
missing = []
for mod, (pip_name, used_by) in need.items():
    try:
        importlib.import_module(mod)
    except Exception as exc:
        missing.append(mod)
        print(f"MISSING {mod} (pip: {pip_name}), needed by {used_by}: {type(exc).__name__}: {exc}")
for mod, used_by in optional.items():
    try:
        importlib.import_module(mod)
    except Exception:
        print(f"optional {mod} is not installed ({used_by})")
with open(sys.argv[1], "w") as f:
    f.write(" ".join(missing))
if "torch" not in missing and "triton" not in missing:
    import torch, triton
    print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda",
          torch.version.cuda)
    print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)")
    import igpt.kernels as k
    print("igpt.kernels from", k.__file__.rsplit("/", 2)[0], "- runnable here:", k.triton_available())
EOF
MISSING="$(cat "$TMP/missing" 2>/dev/null || echo "?")"
if [[ $DRY == 0 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | log gpu.log || true
fi
if [[ " $MISSING " == *" torch "* || " $MISSING " == *" triton "* || "$MISSING" == "?" ]]; then
    echo "cannot run: torch or triton is missing" | log gpu.log
    exit 2
fi
TRAIN_OK=1
if [[ -n "$MISSING" ]]; then
    TRAIN_OK=0
    echo "the training step is skipped: missing $MISSING (put their wheels in .whl/, see the top of this script)" |
        log gpu.log
    FAILED+=("training (missing: $MISSING)")
fi

DRY_ARGS=()
if [[ $DRY == 1 ]]; then
    DRY_ARGS=(--dry-run)
fi

# ---- 2. kernels: correctness, attention speed, cross-entropy speed and memory ----------------------------------------
echo "== bench/kernel_speed.py ($(left)s left) ==" | log gpu.log
# Sections stop starting rows after --budget-s; the training runs get the rest.
KB=$(((BUDGET * 40 / 100) - SECONDS))
if ! timeout --kill-after=10 $((KB + 90)) "$PY" bench/kernel_speed.py --budget-s "$KB" "${DRY_ARGS[@]}" 2>&1 |
    log bench.log; then
    FAILED+=("bench/kernel_speed.py")
fi

# ---- 3. training throughput ------------------------------------------------------------------------------------------
if [[ $TRAIN_OK == 1 ]]; then
    echo "== bench/train_gpu.py ($(left)s left) ==" | log gpu.log
    TB=$(($(left) - 100))  # the last run may start just before this: ~100 s for it
    if ! timeout --kill-after=10 $((TB + 150)) "$PY" bench/train_gpu.py --budget-s "$TB" --work "$TMP/train" \
        "${DRY_ARGS[@]}" 2>&1 | log train.log; then
        FAILED+=("bench/train_gpu.py")
    fi
fi

# ---- 4. kernel tests compiled on CUDA, with the time left ------------------------------------------------------------
if [[ $DRY == 0 ]]; then
    T=$(left)
    echo "== kernel tests compiled on CUDA (${T}s left) ==" | log gpu.log
    if ! "$PY" -c "import pytest" >/dev/null 2>&1; then
        echo "pytest is not installed: kernel tests skipped (bench/kernel_speed.py checked correctness)" | log tests.log
    elif ((T < 30)); then
        echo "no time left for the kernel tests" | log tests.log
    else
        # -p no:cacheprovider: the checkout may be read-only; --noconftest: the suite's conftest needs the data tools.
        if ! IGPT_KERNELS_AUTOTUNE=0 timeout --kill-after=5 "$T" "$PY" -m pytest tests/test_flash_attn.py \
            tests/test_cross_entropy.py -q -x -p no:cacheprovider --noconftest -o "markers=slow: larger matrix" \
            -m "not slow" 2>&1 | log tests.log; then
            FAILED+=("kernel tests (failed or out of time)")
        fi
    fi
fi

echo "== done in ${SECONDS}s ==" | log gpu.log
if ((${#FAILED[@]})); then
    printf 'FAILED: %s\n' "${FAILED[@]}" | log gpu.log
    exit 1
fi
echo "all steps passed" | log gpu.log
