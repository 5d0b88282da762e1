#!/usr/bin/env bash
# Every GPU check and measurement this project owes, in one command on a GPU host.
#
#   bash scripts/gpu_run.sh [PRESET]        (default preset: medium)
#
# Needs onnxruntime-gpu, polygraphy, optimum (and TensorRT for the engine rows) importable; on
# this workplace's lent H100/H200 they travel as wheels (README, "GPU runs"):
#   here:  ../shared/gpu/stage-wheels onnxruntime-gpu==1.31.1 polygraphy==0.53.6 optimum==2.3.0 transformers==5.24.0
#   there: one `device` run per part (carry .gpu/pI and .gpu-assemble: bash .gpu-assemble I N), back
#          to back, then this script in the next run (it puts .gpu/site on PYTHONPATH itself).
# Writes everything under $OUT (default gpu-out/): environment, test log, benchmark JSON/PNG/table.
set -uo pipefail
preset=${1:-medium}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1
  "$py" - <<'EOF'
import importlib
for name in ("torch", "onnxruntime", "tensorrt", "polygraphy", "optimum", "transformers", "onnx"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, exc)
import onnxruntime, torch
if hasattr(onnxruntime, "preload_dlls"):
    onnxruntime.preload_dlls()
print("providers", onnxruntime.get_available_providers())
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$out/environment.txt"

# Tests: the GPU ones and everything that checks the device code paths on the CPU side too.
"$py" -m pytest -q -p no:cacheprovider -rs tests/runtime/test_gpu.py tests/runtime/test_device_loop.py \
  tests/exporter/test_engines.py 2>&1 | tee "$out/pytest.txt"

# Benchmark: Session (ONNX Runtime CUDA, and TensorRT when importable) vs transformers FP16.
backends="onnxruntime"
"$py" -c "import tensorrt" 2>/dev/null && backends="onnxruntime tensorrt"
"$py" scripts/benchmark.py --device cuda --backends $backends --preset "$preset" --precisions fp16 \
  --batches 1 8 --images 1 4 --positions 64 1024 --tokens 32 --out "$out/bench" 2>&1 | tee "$out/benchmark.txt"
