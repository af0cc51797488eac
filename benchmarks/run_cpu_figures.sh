#!/usr/bin/env bash
# The CPU figures reported on issues 2 and 4, in one sequential run on an otherwise idle machine:
#     bash benchmarks/run_cpu_figures.sh [CALTECH_DIR] [OUT_DIR]
# Each step prints its table to stdout and writes JSON to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/caltech101}
OUT=${2:-bench_out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/simsearch_bench.XXXX)
trap 'rm -rf "$WORK"' EXIT
step() { echo; echo "=== $*"; }

step "bench_index resnet18, 2000-image sample of $DATA"
$PY benchmarks/bench_index.py --data "$DATA" --model resnet18 --limit 2000 --queries 30 --json-out "$OUT/index_r18.json"
step "bench_index resnet50, 500-image sample"
$PY benchmarks/bench_index.py --data "$DATA" --model resnet50 --limit 500 --queries 20 --model-images 160 --json-out "$OUT/index_r50.json"
step "bench_embed resnet50, 320 synthetic 500x375 JPEGs, CPU"
$PY benchmarks/bench_embed.py --model resnet50 --n 320 --device cpu --workdir "$WORK" --json-out "$OUT/embed_r50.json"
step "bench_embed 12 MP JPEGs, draft vs full decode: resnet50, then resnet18"
$PY benchmarks/bench_embed.py --model resnet50 --big-only --big-n 48 --device cpu --workdir "$WORK" --json-out "$OUT/big_r50.json"
$PY benchmarks/bench_embed.py --model resnet18 --big-only --big-n 48 --device cpu --workdir "$WORK" --json-out "$OUT/big_r18.json"
