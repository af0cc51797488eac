"""Model-only throughput by memory layout and precision, side by side in one run.

    python benchmarks/bench_precision.py --model resnet50 --device cpu

Times the forward pass on random uint8 crops three ways: NCHW float32 (the plain torchvision
layout, what simsearch ran before channels_last), channels_last float32 (``--precision fp32``) and
channels_last bf16 (``--precision bf16``; on a CPU, autocast), and the cosine between the fp32 and
bf16 embeddings of the same crops. The rounds alternate so that a machine's drift hits all three alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0, help="per variant per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json-out", default=None)
    a = p.parse_args()

    import torch

    from simsearch.embed import Embedder, cpu_has_native_bf16
    from simsearch.models import create_model

    base = create_model(a.model, "random", seed=0)
    plain = copy.deepcopy(base).to(a.device).eval()  # NCHW float32, no Embedder
    fp32 = Embedder(copy.deepcopy(base), device=a.device, batch_size=a.batch_size, workers=0, precision="fp32")
    bf16 = Embedder(copy.deepcopy(base), device=a.device, batch_size=a.batch_size, workers=0, precision="bf16")
    c = fp32.prep.crop_size
    crops = torch.randint(0, 256, (a.batch_size, 3, c, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def run_plain() -> None:
        from simsearch.embed import normalize_batch

        plain(normalize_batch(crops.to(a.device), fp32.prep).contiguous())

    variants = {
        "nchw_fp32": run_plain,
        "channels_last_fp32": lambda: fp32.embed_uint8(crops),
        "channels_last_bf16": lambda: bf16.embed_uint8(crops),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(a.rounds):
            for name, fn in variants.items():
                n, t = 0, time.perf_counter()
                while time.perf_counter() - t < a.seconds:
                    fn()
                    if a.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    n += a.batch_size
                rates[name].append(n / (time.perf_counter() - t))
    v32, v16 = fp32.embed_uint8(crops), bf16.embed_uint8(crops)
    cos = (v32 * v16).sum(1)
    res = {
        "model": a.model, "device": a.device, "batch_size": a.batch_size, "cpus": os.cpu_count(),
        "cpu_has_native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
        "images_per_s": {k: round(sum(v) / len(v), 1) for k, v in rates.items()},
        "cosine_fp32_vs_bf16_min": round(float(cos.min()), 6),
    }
    r = res["images_per_s"]
    print(f"{a.model} on {a.device} ({os.cpu_count()} CPUs, native bf16: {res['cpu_has_native_bf16']}), batch {a.batch_size}")
    for k, v in r.items():
        print(f"  {k:<20}{v:>8.1f} img/s   x{v / r['nchw_fp32']:.2f}")
    print(f"  cosine(fp32, bf16 embedding) min {res['cosine_fp32_vs_bf16_min']}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
