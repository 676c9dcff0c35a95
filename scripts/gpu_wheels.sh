#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on the lent GPU machine and cannot fetch there (no network): wheels for
# Python 3.12 manylinux x86_64 of the packages its image lacks, in .whl/, and a tokenizer folder, in .gpu_check/,
# both git-ignored and carried with the tree (64 MiB at most, with the tree; the total is printed).
#
# The image (docs: /work/.library/device/KINDS.md) has torch 2.11 + CUDA, transformers 5.17, peft, pyarrow, rich,
# click, pyyaml, safetensors, sympy, tensorboard, psutil, py-cpuinfo, msgpack, ninja, einops, numpy, tqdm; it lacks
# deepspeed (an sdist on PyPI: built here into a py3-none-any wheel; its ops are JIT-built on use, none at install)
# with hjson and pydantic (+ pydantic-core, annotated-types, typing-inspection), and math-verify with
# latex2sympy2_extended and the antlr4 runtime. Each is pinned to what the development venv runs, one version each.
#
# The tokenizer: no Qwen tokenizer is available offline, so the check uses SmolLM2's (the embedded model's), its
# vocabulary extended with decode-only filler entries (<pad49152> …) to Qwen3's 151,936 rows, so a random model of
# Qwen3's shape samples ids the tokenizer can decode and score accepts (no merge produces them: encoding is unchanged).
#
# Usage: scripts/gpu_wheels.sh [--python PY]   (PY: a python with pip and antisd importable, default .venv/bin/python)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=${PYTHON:-$REPO/.venv/bin/python}
[[ ${1:-} == --python ]] && PY=$2
cd "$REPO"
mkdir -p .whl .gpu_check
PINS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2)
DEEPSPEED=deepspeed==0.19.8
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PINS[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl "$DEEPSPEED"
"$PY" scripts/gpu_check.py prepare-tokenizer --out .gpu_check/tokenizer
ls -l .whl
# What travels: tracked and untracked-not-ignored files, plus the carried .whl and .gpu_check
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null \
        | awk '{s += $1} END {print s + 0}')
carried=$(du -sb .whl .gpu_check | awk '{s += $1} END {print s}')
total=$((tree + carried))
echo "tree $((tree / 1024)) KiB + carried (.whl, .gpu_check) $((carried / 1024)) KiB = $((total / 1024 / 1024)) MiB of 64"
(( total < 64 * 1024 * 1024 )) || { echo "gpu_wheels.sh: over the 64 MiB a device call carries" >&2; exit 1; }
