#!/usr/bin/env bash
# The main job on the bundled default (README's first command): set up, check and build every spec in
# models/, then generate text from the shipped tiny Qwen2 checkpoint with the package built from qwen2.model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
PY="${PYTHON:-python3}"
for spec in models/*.model; do
    "$PY" -m dslc build "$spec" -o build
done
"$PY" -m dslc generate models/qwen2.model --weights models/tiny-qwen2 \
    --prompt "${PROMPT:-def parse_args(}" --max-new-tokens "${MAX_NEW_TOKENS:-80}" --do-sample --temperature 0.7 \
    --top-k 40 --seed 0 --build-dir build/cache
