#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most about 9 minutes (CI has no GPU): the tests
# marked `cuda` (tests/test_accelerator.py and the solvers' device test), UPGrad's solvers on the
# device, and the training steps of the GPU targets (docs/performance.md), with their peak memory.
# Reports go to $OUT (default gpu-results/): nvidia-smi.txt, cuda-tests.txt, dual-cone.txt,
# steps.txt.
#
# A GPU machine may lack quadprog (a runtime dependency) and the peer the benchmarks compare with;
# fetch their wheels beside the checkout first, into a folder git ignores, and carry it along:
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl quadprog torchjd==0.18.0 qpsolvers
# This script installs whatever .whl/ holds into /tmp/site and runs $PYTHON (default python3).
# JDOPTIM_TEST_DEVICE=cpu QUICK=1 runs the same steps on the CPU, small, to check the script.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
python="${PYTHON:-python3}"
device="${JDOPTIM_TEST_DEVICE:-cuda}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JDOPTIM_TEST_DEVICE="$device"
if [ -n "${QUICK:-}" ]; then
    sizes=(16 48)
    kinds=(random)
    steps=(--cases mlp:8,resnet18-gn:2 --repeats 2 --no-memory)
else
    sizes=(16 128 512 1024)
    kinds=(random rank-deficient)
    steps=(--repeats 10)
fi
failed=0

(nvidia-smi || echo "no nvidia-smi") > "$out/nvidia-smi.txt" 2>&1
"$python" -c "import torch; print(torch.__version__, torch.cuda.is_available())" >> "$out/nvidia-smi.txt"

echo "== tests marked cuda"
timeout 180 "$python" -m pytest -m cuda -p no:cacheprovider tests/test_accelerator.py \
    tests/linalg/test_dual_cone_batched.py 2>&1 | tee "$out/cuda-tests.txt" | tail -3 || failed=1

echo "== UPGrad weights on the device"
timeout 120 "$python" benchmarks/bench_dual_cone.py --device "$device" --sizes "${sizes[@]}" \
    --kinds "${kinds[@]}" --dtypes float32 --without auto-warm --repeats 5 --limit 5 2>&1 \
    | tee "$out/dual-cone.txt" | tail -3 || failed=1

echo "== training steps"
timeout 240 "$python" benchmarks/bench_autogram.py --device "$device" "${steps[@]}" \
    --methods sgd gramian jdsgd-upgrad func-upgrad peer-autogram 2>&1 \
    | tee "$out/steps.txt" | tail -12 || failed=1
exit "$failed"
