#!/usr/bin/env bash
# One-shot GPU check for issue 4 (run on the lent H100/H200 machine, from the repo root):
#
#     bash benchmarks/gpu_check.sh            # with $OUT set by the device tool; .whl/ carried
#
# Installs the carried wheels (faiss-cpu, sqlite-utils and the deps the image lacks) into
# /tmp/site, runs the CUDA tests and the CPU-side tests of the GPU path, generates 10,000
# ImageNet-like JPEGs (in the background, while the tests run), then measures model-only /
# decode-only / commit-only / end-to-end throughput for ResNet-50 (eager, then --compile if time
# is left) and k-means on 1M x 512. Every step is time-boxed; figures go to $OUT/*.json as they
# come, the whole log to $OUT/log.txt. Budget: about 7 minutes of wall time.
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${BUDGET:-420}   # seconds for the whole script
N=${N:-10000}
DEVICE=${DEVICE:-cuda}          # (cpu: a dry run of this script's plumbing on a machine without a GPU)
KM_N=${KM_N:-1000000}; KM_K=${KM_K:-1000,100}; KM_FAISS_N=${KM_FAISS_N:-100000}
WORK=${WORK:-/tmp/simsearch_bench}
step() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

main() {
step "machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv || true
nproc; free -g | head -2; df -h /dev/shm /tmp 2>/dev/null | cat
python3 -c "import sys, torch, torchvision, PIL, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| pillow', PIL.__version__, '| numpy', numpy.__version__); print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| bf16', torch.cuda.is_bf16_supported())"

echo "torch hub cache:"; ls "$(python3 -c 'import torch; print(torch.hub.get_dir())')/checkpoints" 2>/dev/null || echo "  (empty)"

step "wheels -> /tmp/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "WHEEL INSTALL FAILED"
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import faiss, sqlite_utils, click, simsearch.cli, simsearch.embed.gpu_decode; print('imports ok: faiss', faiss.__version__, '| sqlite_utils', sqlite_utils.__version__ if hasattr(sqlite_utils, '__version__') else '?', '| click', click.__version__)" \
  || { echo "IMPORTS FAILED"; }

step "generating $N JPEGs in the background (16 processes) -> $WORK"
mkdir -p "$WORK"
( cd benchmarks && timeout 180 python3 -c "
import time, synth_images as s
t = time.time()
p = s.make_folder('$WORK/imagenet_like_$N', $N, (500, 375))
print('generated', len(p), 'JPEGs in %.1fs' % (time.time() - t))
" > "$OUT/gen.txt" 2>&1 ) &
GEN=$!

step "tests: CUDA tests, then the CPU-side GPU-path / embed / draft tests"
# (-k cuda includes the 12 MP chunked-decode check, whose photos take ~30 s to generate)
timeout 240 python3 -m pytest -q -p no:cacheprovider -s -k cuda tests/test_gpu_path.py 2>&1
timeout 100 python3 -m pytest -q -p no:cacheprovider -k "not cuda" tests/test_gpu_path.py tests/test_embed.py tests/test_draft.py 2>&1

step "waiting for the JPEGs"
wait $GEN; cat "$OUT/gen.txt"
du -sh "$WORK/imagenet_like_$N" 2>/dev/null

step "bench_embed: ResNet-50, eager, decoders gpu and cpu end-to-end ($(left)s left)"
timeout $(( $(left) - 150 > 60 ? $(left) - 150 : 60 )) python3 benchmarks/bench_embed.py --model resnet50 --n "$N" \
  --workdir "$WORK" --device "$DEVICE" --decode "$([ "$DEVICE" = cuda ] && echo gpu,cpu || echo cpu)" --model-seconds 5 \
  --json-out "$OUT/bench_eager.json" 2>&1

step "k-means 1M x 512 on the GPU, exact search, FAISS-CPU comparison ($(left)s left)"
timeout 90 python3 benchmarks/bench_kmeans.py --n "$KM_N" --d 512 --k "$KM_K" --niter 25 --device "$DEVICE" \
  --faiss-n "$KM_FAISS_N" --json-out "$OUT/kmeans.json" 2>&1

REM=$(left)
if [ "$REM" -gt 100 ]; then
  step "bench_embed: ResNet-50 with --compile, gpu decode (${REM}s left)"
  timeout $(( REM - 10 )) python3 benchmarks/bench_embed.py --model resnet50 --n "$N" --workdir "$WORK" --device "$DEVICE" \
    --decode "$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)" --compile --skip decode,commit --model-seconds 5 \
    --json-out "$OUT/bench_compile.json" 2>&1
else
  step "skipping --compile: only ${REM}s left"
fi

step "done after $(( $(date +%s) - T0 ))s; files in $OUT:"
ls -la "$OUT"
}

main 2>&1 | tee "$OUT/log.txt"
