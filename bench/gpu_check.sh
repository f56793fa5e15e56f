#!/usr/bin/env bash
# The GPU check: the `gpu` tests and the GPU figures on one CUDA machine (a few minutes),
# its report as Markdown in REPORT_DIR/gpu_check.md.
#
#   bash bench/gpu_check.sh REPORT_DIR [ARGS]     after `make setup` with a CUDA torch; ARGS go to
#        bench/gpu_throughput.py (e.g. `--seconds 2 --per-gpu 1,4` to fit a short lease)
#   bash bench/gpu_check.sh --prepare DIR         here, with a package index: DIR holds the
#        wheels for Python 3.12 (every dependency but torch) and a slice of the real data,
#        for a GPU machine without an index
#   bash bench/gpu_check.sh --from DIR REPORT_DIR [ARGS]  on that machine: installs from DIR into
#        its python3 (its torch kept), then runs the check
#
# Without a CUDA device it says so in one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

if [ "${1:-}" = "--prepare" ]; then
  dir=${2:?usage: bench/gpu_check.sh --prepare DIR}
  mkdir -p "$dir/wheels" "$dir/data"
  # antlr4 (Hydra's parser) ships as source only: built here into a wheel.
  "$PY" -m pip wheel -q --no-deps "antlr4-python3-runtime==4.9.3" -w "$dir/wheels"
  "$PY" -m pip download -q --python-version 3.12 --only-binary=:all: --find-links "$dir/wheels" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dir/wheels" $("$PY" bench/gpu_carry.py requirements)
  "$PY" bench/gpu_carry.py prune "$dir/wheels"  # what the machine's image has stays out
  "$PY" bench/gpu_carry.py data "$dir/data"
  size=$(du -sm "$dir" | cut -f1)
  echo "carry folder $dir: ${size} MiB"
  if [ "$size" -gt 60 ]; then
    echo "over the 64 MiB a working tree may carry to the device machine (with what travels beside it)" >&2
    exit 1
  fi
  exit 0
fi
if [ "${1:-}" = "--from" ]; then
  dir=${2:?usage: bench/gpu_check.sh --from DIR REPORT_DIR}
  shift 2
  # The carried wheels beside the image's own packages (its torch kept), in a folder of
  # their own; this package runs from the checkout.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$dir"/wheels/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
  export FMNIST_DATA_DIR="$(cd "$dir/data" && pwd)" FMNIST_REAL_DATA="$(cd "$dir/data" && pwd)"
  PY=python3
fi

out=${1:?usage: bench/gpu_check.sh REPORT_DIR [gpu_throughput.py ARGS]}
shift
mkdir -p "$out"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device here: the GPU check did nothing"
  exit 0
fi
report="$out/gpu_check.md"
{
  echo "# GPU check, $(date -u +%Y-%m-%d)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  echo '```'
  echo
  echo "## pytest -m gpu"
  echo
  echo '```'
  # capped, so that a hung test still leaves the figures below their time
  timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py > "$out/pytest_gpu.log" 2>&1 || true
  tail -15 "$out/pytest_gpu.log"
  echo '```'
  echo
  echo "## Throughput and packing (bench/gpu_throughput.py)"
  echo
  "$PY" bench/gpu_throughput.py "$@" 2>&1 || true
} | tee "$report"
echo "report: $report"
