#!/usr/bin/env bash
# The benchmark suite on one lent GPU (an H200), timed with CUDA events: it decides
# whether impl="fused" stays (its targets, benchmarks/targets.py, are GPU targets,
# checked only here). Prepared for a device session; it has NOT been run yet (no GPU
# was lent when it was written). Run from the repository root:
#
#     bash benchmarks/gpu.sh            # results in $OUT (or benchmarks/results)
#
# Writes gpu_info.txt (nvidia-smi), gpu.txt (the printed tables), gpu.json (the
# result), gpu.md (benchmarks/report.py's tables) and gpu_check.txt (the --check
# verdict); exits with run.py's status, 1 when a target is missed.
#
# Budget: one call under 8 minutes. Triton compiles the fused kernels on the
# first step (a few graphs, each well under a minute); the 355M set needs about
# 8.5 GB of GPU memory; the ResNet-18 step runs 20 timed rounds.
set -uo pipefail

# The lent H200 runs its own image (python3 with torch, torchvision, triton; no
# registry access) and may lack pytorch_optimizer: run.py then leaves its cases out.
# To include them, carry it as a wheel, prepared here with:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       -d .whl pytorch_optimizer==4.1.0
# and name `.whl` in the run's carry list; it is installed below when present.
OUT=${OUT:-benchmarks/results}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$OUT"
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=${PY:-python3}; fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu_info.txt" 2>&1 || true
"$PY" - <<'PY' || exit 2
import importlib, torch
assert torch.cuda.is_available(), "no CUDA device visible"
for mod in ("torchvision", "gradcent"):
    importlib.import_module(mod)  # fail early, not after minutes of timing
print("torch", torch.__version__, "on", torch.cuda.get_device_name())
PY

# 7 minutes at most, so a rerun still fits the session; partial output is kept.
timeout 420 "$PY" benchmarks/run.py --device cuda --repeats 20 --step-repeats 20 \
    --json "$OUT/gpu.json" --check 2>&1 | tee "$OUT/gpu.txt"
status=${PIPESTATUS[0]}
if [[ -s "$OUT/gpu.json" ]]; then
    "$PY" benchmarks/report.py "$OUT/gpu.json" >"$OUT/gpu.md"
    "$PY" benchmarks/report.py --check "$OUT/gpu.json" >/dev/null 2>"$OUT/gpu_check.txt"
fi
echo "run.py --check exit status: $status (0: every target met or not measured;" \
    "1: a target missed, named above; 124: timed out)" | tee -a "$OUT/gpu_check.txt"
exit "$status"
