#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs on the GPU machine, made here on the CPU machine beforehand so
# that a short lease starts measuring at once. The GPU machine has its own Python 3.12 and torch and
# no network: what it lacks travels in the working tree (64 MiB in all; both parts together about
# 58 MB), in ignored folders that each run names in `carry`.
#   wheels:  .whl/, the packages of requirements.lock that the GPU image lacks, at the lock's
#            versions, for CPython 3.12 on manylinux: deepspeed (built here from its source, no ops
#            compiled), hjson, pydantic with pydantic_core, annotated-types and typing-inspection,
#            timm, and faiss-cpu (the token file's reader imports it). About 26 MB, a minute.
#   fashion: .gpu/, the whole Fashion-MNIST (its four .gz files) and its tokens for the larger-budget
#            comparison (`gpu_check.sh compare`), made by the demo's tokenizer settings on all 70,000
#            images. About 32 MB, 3 minutes on 2 cores.
#
#   bash benchmarks/gpu_prepare.sh            # both
#   bash benchmarks/gpu_prepare.sh wheels     # enough for gpu_check.sh step loop profile ceiling
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${*:-wheels fashion}
PYTHON=${PYTHON:-.venv/bin/python}
for part in $PARTS; do
  [[ $part == wheels || $part == fashion ]] || { echo "gpu_prepare.sh: unknown part '$part' (wheels, fashion)" >&2; exit 2; }
done

# pinned NAME...: each NAME==VERSION as requirements.lock pins it (its spelling of - and _ aside).
pinned() {
  local name
  for name; do
    grep -i -E "^${name//-/[-_]}==" requirements.lock \
      || { echo "gpu_prepare.sh: requirements.lock pins no $name" >&2; return 1; }
  done
}

if [[ " $PARTS " == *" wheels "* ]]; then
  binaries=$(pinned hjson pydantic pydantic-core annotated-types typing-inspection timm faiss-cpu)
  deepspeed=$(pinned deepspeed)                                   # a source distribution: built here
  rm -rf .whl.partial && mkdir .whl.partial
  # shellcheck disable=SC2086 # one requirement per word
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl.partial $binaries
  "$PYTHON" -m pip wheel -q --no-deps -w .whl.partial "$deepspeed"
  rm -rf .whl && mv .whl.partial .whl
  du -sh .whl
fi

if [[ " $PARTS " == *" fashion "* ]]; then
  source=$("$PYTHON" -c "from mapet.params import load_params, param; print(param(load_params(), 'data.source'))")
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  rm -rf .gpu.partial && mkdir -p .gpu.partial/fashion-mnist
  cp "$source"/*.gz .gpu.partial/fashion-mnist/
  "$PYTHON" -m mapet params --set 'data.max_per_split={}' --set "data.dir=$work/data" \
    --set "tokenizer.out_dir=$work/tokenizer" --set tokenize.out_dir=.gpu.partial/fm-tokens --out "$work/params.yaml"
  for command in "data import" "tokenizer build" tokenize; do
    # shellcheck disable=SC2086 # the command is two words
    "$PYTHON" -m mapet $command --params "$work/params.yaml"
  done
  rm -rf .gpu && mv .gpu.partial .gpu
  du -sh .gpu
fi
