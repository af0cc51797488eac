#!/usr/bin/env python
"""Indexing throughput (end-to-end vs model-only) and warm query latency, measured in one run.

    python benchmarks/bench_index.py --data ../shared/datasets/caltech101 --model resnet18

1. model-only: images/s of ``Embedder.embed_uint8`` on random uint8 crops (no files, no decoding),
   with the same model, batch size and device as step 2; measured before and after step 2 and averaged,
   so a machine that speeds up or slows down during the run does not skew the ratio.
2. end-to-end: ``index_folders`` into a fresh temporary index (walk, read, hash, decode in DataLoader
   workers, resize/crop, forward, SQLite commits, FAISS save), images/s.
3. the ratio end-to-end / model-only: how well decoding overlaps the forward pass (goal on CPU: >= 0.85).
4. warm query latency: ``Searcher.query`` (index open, model built once) on files of the folder, one
   at a time, after one warm-up call; p50/p95 over ``--queries`` calls: read, decode, embed, search, join
   metadata. Its search part (FAISS top-10 + metadata) is timed alone too, and so is the one-shot
   ``query_images`` call behind ``simsearch query`` (which also opens the index and builds the model).

``--weights random`` is the default: throughput does not depend on the values of the weights, and it needs
no download. Use ``--weights imagenet`` (or a file) to time the real model's loading in step 4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

GOAL_RATIO = 0.85


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of images to index")
    p.add_argument("--model", default="resnet18", help="backbone (see: simsearch models) [resnet18]")
    p.add_argument("--weights", default="random", help="random (default), imagenet, or a state dict path")
    p.add_argument("--limit", type=int, default=None, help="index a seeded random sample of N files, not all")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward [simsearch's default]")
    p.add_argument("--workers", type=int, default=None, help="decoding processes [simsearch's default]")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda [auto]")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16 [auto]")
    p.add_argument("--queries", type=int, default=50, help="timed query calls [50]")
    p.add_argument("--model-images", type=int, default=None,
                   help="images per model-only measurement [as many as indexed, at most 512, at least 3 batches]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --limit and the query files")
    p.add_argument("--json-out", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def model_only(embedder, n_images: int) -> dict[str, float]:
    """images/s of the forward pass alone on random uint8 crops of the model's input size, timed both in
    the main thread and in a separate thread (where simsearch's indexing pipeline runs its forward pass;
    on CPU the two can differ by tens of percent). The ratio is taken against the faster of the two."""
    import threading

    main = _model_only(embedder, n_images)
    box: dict[str, dict[str, float]] = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", _model_only(embedder, n_images)))
    thread.start()
    thread.join()
    other = box["r"]
    return {"main": main["images_per_s"], "thread": other["images_per_s"],
            "images_per_s": max(main["images_per_s"], other["images_per_s"])}


def _model_only(embedder, n_images: int) -> dict[str, float]:
    import torch

    bs = embedder.batch_size
    crop = embedder.prep.crop_size
    n_batches = max(3, -(-n_images // bs))
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (bs, 3, crop, crop), dtype=torch.uint8, generator=gen)
    embedder.embed_uint8(batch)  # warm-up (allocations, cuDNN, first-call costs)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        embedder.embed_uint8(batch)  # returns numpy: includes the device sync and copy back
    seconds = time.perf_counter() - t0
    return {"images": n_batches * bs, "seconds": seconds, "images_per_s": n_batches * bs / seconds}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import faiss
    import torch

    from simsearch.embed import Embedder, resolve_device
    from simsearch.images import iter_image_files
    from simsearch.indexer import EmbedOptions, index_folders
    from simsearch.models import create_model
    from simsearch.search import Searcher, query_images
    from simsearch.store import IndexStore

    data = Path(args.data).resolve()
    files = [e.path for e in iter_image_files([data])]
    if not files:
        print(f"no images under {data}", file=sys.stderr)
        return 1
    rnd = random.Random(args.seed)
    if args.limit is not None and args.limit < len(files):
        files = sorted(rnd.sample(files, args.limit))
        roots: list[str] = files  # single-file roots: index exactly the sample
    else:
        roots = [str(data)]
    device = resolve_device(args.device)
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu_name()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss.__version__}, python {platform.python_version()}",
        file=sys.stderr,
    )
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), file=sys.stderr)
    print(f"data: {data} ({len(files)} files), model {args.model}, weights {args.weights}", file=sys.stderr)

    # 1. model-only, before
    model = create_model(args.model, args.weights, seed=0)
    embedder = Embedder(model, device=args.device, batch_size=args.batch_size, workers=args.workers, precision=args.precision)
    n_model = args.model_images or min(len(files), 512)
    print("model-only forward ...", file=sys.stderr)
    before = model_only(embedder, n_model)

    # 2. end-to-end index, fresh
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        index_dir = Path(tmp) / "index"
        options = EmbedOptions(
            model=args.model, weights=args.weights, seed=0, device=args.device,
            batch_size=embedder.batch_size, workers=args.workers, precision=args.precision,
        )
        print(f"indexing {len(files)} files (batch {embedder.batch_size}, workers {embedder.workers}) ...", file=sys.stderr)
        t0 = time.perf_counter()
        summary = index_folders(roots, index_dir, options)
        wall = time.perf_counter() - t0
        embedded = summary.embedded
        loop_rate = summary.images_per_second  # decode + forward + commit loop
        wall_rate = embedded / wall  # the whole call: walk, model build, hashing, FAISS save included

        # 1'. model-only, after (same embedder, same batch size)
        after = model_only(embedder, n_model)
        model_rate = (before["images_per_s"] + after["images_per_s"]) / 2

        # 4. warm query latency
        ok_files = [r.path for r in _ok_rows(IndexStore, index_dir)]
        if not ok_files:
            print("nothing could be indexed; no queries to time", file=sys.stderr)
            return 1
        picks = [rnd.choice(ok_files) for _ in range(args.queries)]
        print(f"{args.queries} queries ...", file=sys.stderr)
        q_ms, search_ms = [], []
        with Searcher(index_dir, device=args.device, precision=args.precision) as searcher:
            searcher.query([picks[0]], k=10)  # warm-up
            for path in picks:
                t = time.perf_counter()
                searcher.query([path], k=10)
                q_ms.append((time.perf_counter() - t) * 1000)
            vec = searcher.embedder.embed_crops([searcher_crop(picks[0], searcher)])
            for _ in picks:
                t = time.perf_counter()
                _, ids = searcher.ann.search(vec, 11)
                searcher.store.catalog.rows_by_ids(int(i) for i in ids[0] if i >= 0)
                search_ms.append((time.perf_counter() - t) * 1000)
        oneshot_ms = []
        for path in picks[:5]:
            t = time.perf_counter()
            query_images([path], index_dir, k=10, device=args.device, precision=args.precision)
            oneshot_ms.append((time.perf_counter() - t) * 1000)

    results = {
        "machine": {
            "cpus": os.cpu_count(), "cpu": cpu_name(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "faiss": faiss.__version__, "device": str(device),
        },
        "data": str(data), "files": len(files), "model": args.model, "weights": args.weights,
        "batch_size": embedder.batch_size, "workers": embedder.workers, "precision": embedder.precision,
        "model_only_images_per_s": model_rate,
        "model_only_before": before["images_per_s"], "model_only_after": after["images_per_s"],
        "model_only_main_thread": (before["main"] + after["main"]) / 2,
        "model_only_other_thread": (before["thread"] + after["thread"]) / 2,
        "end_to_end_images_per_s": loop_rate, "end_to_end_wall_images_per_s": wall_rate,
        "ratio": loop_rate / model_rate, "ratio_wall": wall_rate / model_rate,
        "indexed": summary.total_indexed, "failed": summary.total_failed, "index_seconds": wall,
        "query_ms_p50": percentile(q_ms, 50), "query_ms_p95": percentile(q_ms, 95),
        "query_search_ms_p50": percentile(search_ms, 50), "query_oneshot_ms_p50": percentile(oneshot_ms, 50),
        "queries": len(q_ms),
    }
    print_table(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


def _ok_rows(IndexStore, index_dir: Path):
    with IndexStore.open(index_dir) as store:
        return store.catalog.rows("status = 'ok'")


def searcher_crop(path: str, searcher):
    return searcher.decoder.decode(Path(path).read_bytes(), path)[0]


def print_table(r: dict) -> None:
    m = r["machine"]
    rows = [
        ("machine", f"{m['cpus']} CPUs, {m['cpu']}"),
        ("torch / faiss", f"{m['torch']} ({m['torch_threads']} threads) / {m['faiss']}"),
        ("device", m["device"]),
        ("data", f"{r['data']} ({r['files']} files; {r['indexed']} indexed, {r['failed']} failed)"),
        ("model", f"{r['model']} ({r['weights']} weights, {r['precision']}), batch {r['batch_size']}, workers {r['workers']}"),
        ("model-only", f"{r['model_only_images_per_s']:8.1f} images/s  "
                       f"(before {r['model_only_before']:.1f}, after {r['model_only_after']:.1f}; faster of "
                       f"main thread {r['model_only_main_thread']:.1f} / other thread {r['model_only_other_thread']:.1f})"),
        ("end-to-end", f"{r['end_to_end_images_per_s']:8.1f} images/s  (decode+forward+commit loop)"),
        ("  whole call", f"{r['end_to_end_wall_images_per_s']:8.1f} images/s  "
                         f"({r['index_seconds']:.1f} s incl. walk, model build, FAISS save)"),
        ("ratio", f"{r['ratio']:8.2f}          end-to-end / model-only  "
                  f"[goal >= {GOAL_RATIO}: {'met' if r['ratio'] >= GOAL_RATIO else 'NOT met'}]"),
        ("  whole call", f"{r['ratio_wall']:8.2f}"),
        ("query", f"p50 {r['query_ms_p50']:7.1f} ms   p95 {r['query_ms_p95']:7.1f} ms  "
                  f"(Searcher.query, {r['queries']} warm calls: read, decode, forward, search, metadata)"),
        ("  search", f"p50 {r['query_search_ms_p50']:7.2f} ms  (FAISS top-10 + metadata alone)"),
        ("  one-shot", f"p50 {r['query_oneshot_ms_p50']:7.1f} ms  (query_images: also opens the index and builds the model)"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())
