#!/usr/bin/env bash
# The device engine on a fresh GPU machine (H100 / H200, no internet), in one run of at most
# 8 minutes: record the environment, run the device-engine tests on the GPU (they run in
# process there, not in the simulator) and the PTX checks, then bench/gpu_bench.py.
# Uses the machine's python3 (its image has torch, numba-cuda, safetensors, tokenizers,
# jinja2, pytest); wheels carried in .whl/ are installed first when there are any.
# Writes bench/results/gpu/ (env.txt, tests.txt, gpu_bench.txt, gpu_bench.json) and copies
# it to $OUT when that is set (the device tool's output folder). Exit 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=bench/results/gpu
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset NUMBA_ENABLE_CUDASIM
status=0
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import numba, numba_cuda, torch; from numba import cuda; print('numba', numba.__version__, '| numba-cuda', numba_cuda.__version__, '| torch', torch.__version__, '| gpu', cuda.is_available())"
} 2>&1 | tee "$RESULTS/env.txt" || status=1
timeout 170 "$PY" -m pytest -q -p no:cacheprovider tests/test_device_runner.py tests/test_kernels_ptx.py 2>&1 \
  | tee "$RESULTS/tests.txt" || status=1
timeout 270 "$PY" -m bench.gpu_bench --out "$RESULTS" 2>&1 | tee "$RESULTS/bench_log.txt" || status=1
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/* "$OUT"/; fi
exit $status
