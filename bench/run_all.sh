#!/usr/bin/env bash
# Every benchmark scenario, side by side against Hugging Face on the same weights, then the chart.
# Results: bench/results/*.json and docs/benchmarks.png (numbers are copied into docs/benchmarks.md by hand).
#   bash bench/run_all.sh            # CPU here; on a CUDA machine the scripts switch to the GPU configs
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install -q -e ".[bench]" >/dev/null
mkdir -p bench/results
"$PY" bench/cpu_qwen2.py --json bench/results/cpu_qwen2.json   # forward, fwd+bwd, load memory, compiler time
"$PY" bench/train.py --json bench/results/train.json           # train step vs HF eager / + compile / + Liger; build vs compile warm-up
"$PY" bench/decode.py --json bench/results/decode.json         # prefill and decode tokens/s, roofline fraction
"$PY" bench/chart.py --cpu-qwen2 bench/results/cpu_qwen2.json --train bench/results/train.json \
    --decode bench/results/decode.json -o docs/benchmarks.png
