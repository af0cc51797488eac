#!/usr/bin/env bash
# The CPU figures reported on issues 2 and 4 (and the precision comparison), in one sequential run on an otherwise idle machine:
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
step "bench_precision: NCHW fp32 vs channels_last fp32 vs channels_last bf16, resnet18 and resnet50"
$PY benchmarks/bench_precision.py --model resnet18 --json-out "$OUT/precision_r18.json"
$PY benchmarks/bench_precision.py --model resnet50 --json-out "$OUT/precision_r50.json"
step "retrieval quality fp32 vs bf16: efficientnet_lite0 (ImageNet weights) on the Caltech-101 test split"
$PY - "$DATA" "$WORK/caltech_test.csv" <<'PY'
import csv, os, sys
data, out = sys.argv[1], sys.argv[2]
with open(os.path.join(data, "test.txt")) as f, open(out, "w", newline="") as g:
    w = csv.writer(g)
    for line in f:
        rel = line.strip()
        cls = rel.split("/")[0]
        if rel and cls not in ("BACKGROUND_Google", "Faces_easy"):  # clutter, and crops of Faces
            w.writerow([os.path.abspath(os.path.join(data, rel)), cls])
PY
for prec in fp32 bf16; do
  /usr/bin/time -f "eval $prec wall %e s" $PY -m simsearch eval "$WORK/caltech_test.csv" --model efficientnet_lite0 \
    --device cpu --precision $prec --json -q > "$OUT/eval_lite0_$prec.json"
  $PY -c "import json,sys; r=json.load(open(sys.argv[1])); m=r['metrics']; print(sys.argv[2], r['n_images'], 'images', {k: m[k] for k in ('recall@1','map@r','nmi')}, r['seconds'], 's')" "$OUT/eval_lite0_$prec.json" $prec
done
