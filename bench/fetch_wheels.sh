#!/usr/bin/env bash
# Download the wheels bench/gpu.sh installs on a GPU machine that has no network, into .whl/ (git-ignored).
# Run here, where PyPI is reachable; then carry .whl to the GPU machine (bench/README.md, "gpu.sh").
# The GPU image has Python 3.12, torch, triton, transformers, jinja2, safetensors, tokenizers, rich, pytest,
# hypothesis and typing-extensions, but not what is below. Pinned, one version of each, no dependencies pulled
# (--no-deps): every Requires-Dist of these wheels is either in this list or in the image (liger-kernel's torch
# and triton are the image's own; no torch wheel is downloaded).
#   bash bench/fetch_wheels.sh          # idempotent: a wheel already in .whl/ is not fetched again
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
WHEELS=(
    lark==1.3.1                # dslc's parser
    pydantic==2.13.4           # dslc's config validation; needs the next four
    pydantic-core==2.46.4      # (pydantic pins this exact version)
    annotated-types==0.7.0
    typing-inspection==0.4.2
    typing-extensions==4.16.0  # pydantic needs >= 4.14.1; the image's may be older
    ruff==0.17.6               # dslc build formats the generated code with it (a binary, lands in <target>/bin)
    liger-kernel==0.8.5        # the HF + Liger baseline (Requires-Dist: torch, triton: the image's)
)
mkdir -p .whl
for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"
    version="${spec##*==}"
    stem="$(echo "$name" | tr '-' '_')-${version}-"
    if compgen -G ".whl/${stem}*.whl" >/dev/null; then
        continue
    fi
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
# one version of each: a stale wheel of another version would make the install refuse both
for spec in "${WHEELS[@]}"; do
    stem="$(echo "${spec%%==*}" | tr '-' '_')-"
    n=$(compgen -G ".whl/${stem}[0-9]*.whl" | wc -l)
    if [ "$n" != 1 ]; then
        echo "fetch_wheels: $n wheels for ${spec%%==*} in .whl/ (want 1): remove the stale ones" >&2
        exit 1
    fi
done
ls -l .whl
du -sh .whl
