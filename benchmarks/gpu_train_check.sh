#!/usr/bin/env bash
# CUDA check of simsearch train/eval (issue 3), on the lent GPU machine, from the repo root:
#     bash benchmarks/gpu_train_check.sh      # carry .whl and .whl_train (faiss, sqlite-utils, pml, lite0)
# Runs the train/eval/lite0 tests with device "auto" = CUDA (AMP bf16, channels_last, GPU feature
# cache and validation), then times one image-level fine-tuning epoch of EfficientNet-Lite0 at 224 px
# on 2,000 generated images. Log and figures in $OUT.
set -u
OUT=${OUT:-/tmp/gpu_train_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_train/*.whl || echo "WHEELS FAILED"
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_lite0.py tests/test_evaluate.py 2>&1 | tee "$OUT/tests.log" | tail -25
timeout ${BENCH_TIMEOUT:-200} python3 - <<'PY' 2>&1 | tee "$OUT/bench.log"
import random, time, json, os, sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import make_image, SHAPES
from simsearch.train.loop import TrainConfig, train
root = Path("/tmp/gen"); rnd = random.Random(0)
t = time.time()
for c in range(20):
    for i in range(100):
        make_image(root / f"c{c:02d}" / f"{i:03d}.jpg", size=(320, 256), shape=SHAPES[c % 4],
                   color=(rnd.randint(40, 255), 40 + 10 * c, rnd.randint(40, 255)), seed=c * 1000 + i)
print(f"generated 2000 images in {time.time() - t:.0f}s", flush=True)
for cache in (False, True):
    cfg = TrainConfig(model="efficientnet_lite0", dim=512, epochs=2, head_epochs=3, batch_size=128, lr_head=1e-4,
                      lr_backbone=1e-5, unfreeze=2, val_classes="4", cache_trunk=cache, device="cuda", workers=8)
    s = train(root, f"/tmp/m{int(cache)}.pt", cfg)
    print(json.dumps({"cache_trunk": cache, "phase_seconds": s.phase_seconds, "total": s.seconds, "device": s.device,
                      "val_r1": {r.phase + str(r.epoch): r.recall_at_1 for r in s.history}, "warnings": s.warnings}), flush=True)
PY
