"""What glibc's default malloc thresholds cost a CPU forward pass, side by side with keep_freed_memory.

    python benchmarks/bench_allocator.py --model efficientnet_lite0 --batch 64 --seconds 20

Each setting runs in a fresh process (malloc thresholds are per process): the model's forward on a
batch of random 224 px images, repeated for ``--seconds``. It prints images/s and, per image, the
user and system CPU time and the minor page faults (from getrusage): CPU time per image is what to
compare on a shared machine, where wall-clock rates move with the other jobs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
keep, model_name, weights, batch, seconds, threads = sys.argv[2] == "1", sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
from simsearch.embed.allocator import keep_freed_memory
applied = keep_freed_memory() if keep else False
import torch
torch.set_num_threads(threads)
from simsearch.models import create_model
m = create_model(model_name, weights, seed=0).eval().to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    m(x)
    r0, t0, n = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        m(x)
        n += batch
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"applied": applied, "images": n, "img_s": n / wall, "user_ms": 1000 * (r1.ru_utime - r0.ru_utime) / n,
                  "sys_ms": 1000 * (r1.ru_stime - r0.ru_stime) / n, "faults": (r1.ru_minflt - r0.ru_minflt) / n}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two settings this many times")
    args = ap.parse_args()
    import os

    print(f"{args.model} ({args.weights}), batch {args.batch}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{'malloc':<28} {'img/s':>7} {'user ms/img':>12} {'sys ms/img':>11} {'faults/img':>11}")
    for _ in range(args.rounds):
        for keep in ("0", "1"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(HERE.parent), keep, args.model, args.weights, str(args.batch), str(args.seconds), str(args.threads)],
                capture_output=True, text=True, check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            name = "keep_freed_memory" if r["applied"] else "glibc defaults"
            print(f"{name:<28} {r['img_s']:7.1f} {r['user_ms']:12.1f} {r['sys_ms']:11.1f} {r['faults']:11.0f}", flush=True)


if __name__ == "__main__":
    main()
