"""``simsearch serve`` under load: queries per second and p50/p99 latency with 1, 4 and 16 clients.

Builds an index once (at ``--index``, from ``--data``; ``--synthetic N`` first writes N photo-like
JPEGs there), starts ``simsearch serve`` on a free loopback port in a subprocess, and sends
bounded loops of requests from client threads (one keep-alive connection each):

- **id**: ``GET /api/search?id=N`` (stored vector, no model);
- **upload**: ``POST /api/search`` with an indexed image's bytes (decode + model + search).

In the same run, with the server idle, it times the bare library call the upload path is measured
against: ``Searcher.query([file])`` in this process (decode + model + search, no HTTP). Only
loopback traffic; every loop is bounded by ``--requests`` / ``--uploads``.

    # 9,144 Caltech-101 photos + 856 synthetic = a 10,000-image index, built on the first run
    python benchmarks/bench_serve.py --index /tmp/serve-idx --data path/to/caltech101 \
        --synthetic 856 --synthetic-dir /tmp/serve-synth
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_index import cpu_name, percentile  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, help="index folder (built from --data when it does not exist)")
    p.add_argument("--data", nargs="+", default=[], help="folders of images to index when --index does not exist yet")
    p.add_argument("--synthetic", type=int, default=0, help="also index N synthetic JPEGs (320x240), written to --synthetic-dir")
    p.add_argument("--synthetic-dir", default=None, help="where --synthetic writes its images (kept for the next run)")
    p.add_argument("--model", default="resnet18", help="backbone when building the index [resnet18]")
    p.add_argument("--weights", default="random", help="weights when building the index [random]")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16, for the server and the bare query [auto]")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients [1 4 16]")
    p.add_argument("--requests", type=int, default=400, help="id queries per client count [400]")
    p.add_argument("--uploads", type=int, default=64, help="upload queries per client count [64]")
    p.add_argument("--bare", type=int, default=32, help="timed bare Searcher.query calls [32]")
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP/torch threads for the server and the bare query alike [torch's default]")
    p.add_argument("-k", type=int, default=10, help="neighbours per query [10]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def build_index(args: argparse.Namespace) -> None:
    from simsearch.indexer import EmbedOptions, index_folders

    folders = list(args.data)
    if args.synthetic:
        from synth_images import make_folder

        if not args.synthetic_dir:
            sys.exit("--synthetic needs --synthetic-dir")
        t0 = time.perf_counter()
        make_folder(args.synthetic_dir, args.synthetic, size=(320, 240), seed=args.seed)
        print(f"wrote {args.synthetic} synthetic images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        folders.append(args.synthetic_dir)
    if not folders:
        sys.exit("--index does not exist: give --data (and/or --synthetic) to build it")
    options = EmbedOptions(model=args.model, weights=args.weights, device="cpu", precision=args.precision)
    t0 = time.perf_counter()
    summary = index_folders(folders, args.index, options)
    print(f"indexed {summary.added} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str, port: int, precision: str, threads: int | None) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(
        [sys.executable, "-m", "simsearch", "serve", "--index", index, "--port", str(port), "--device", "cpu",
         "--precision", precision],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as r:
                json.load(r)
            return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"simsearch serve exited: {proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
            time.sleep(0.3)
    proc.kill()
    sys.exit("simsearch serve did not start in 300 s")


def multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = "simsearchbench" + os.urandom(8).hex()
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load(port: int, clients: int, total: int, make_request) -> dict[str, float]:
    """``total`` requests from ``clients`` threads; (qps, p50, p99 in ms, errors)."""
    latencies: list[float] = []
    errors = [0]
    counter = iter(range(total))
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                break
            method, url, body, headers = make_request(n)
            t0 = time.perf_counter()
            try:
                conn.request(method, url, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                ok = resp.status == 200 and b'"results"' in payload
            except OSError:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                errors[0] += not ok
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = [x * 1000 for x in latencies]
    return {"qps": total / wall, "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "errors": errors[0]}


def bare_query(index: str, files: list[str], n: int, k: int, precision: str) -> dict[str, float]:
    """Searcher.query of the same images as the uploads, as files outside the index: an indexed,
    unchanged file would be answered from its stored vector, with no decoding and no model."""
    import shutil
    import tempfile

    from simsearch.search import Searcher

    with tempfile.TemporaryDirectory() as tmp, Searcher(index, device="cpu", precision=precision, search="faiss") as searcher:
        copies = [shutil.copy(f, os.path.join(tmp, f"{i}{os.path.splitext(f)[1]}")) for i, f in enumerate(files)]
        searcher.query(copies[:2], k=k)  # warm
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            searcher.query([copies[i % len(copies)]], k=k)
            times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not (Path(args.index) / "catalog.db").exists():
        build_index(args)
    from simsearch.store import IndexStore

    with IndexStore.open(args.index) as store:
        rows = store.catalog.rows("status = 'ok'")
        meta = store.meta
    rng = random.Random(args.seed)
    ids = [r.id for r in rng.sample(rows, min(len(rows), 500))]
    files = [r.path for r in rng.sample(rows, min(len(rows), 32))]
    blobs = [(Path(f).read_bytes(), os.path.basename(f)) for f in files]
    print(f"{len(rows)} images, {meta['model']} ({meta['weights']}), k={args.k}, CPU: {cpu_name()} x{os.cpu_count()}, "
          f"threads: {args.threads or 'default'}, load average {os.getloadavg()[0]:.1f}")

    port = free_port()
    server = start_server(args.index, port, args.precision, args.threads)
    figures: dict[str, object] = {"images": len(rows), "model": meta["model"], "cpu": cpu_name(), "k": args.k,
                                  "threads": args.threads}
    try:
        # warm the server's model and vectors before timing
        body, ctype = multipart(*blobs[0])
        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        warm.request("POST", f"/api/search?k={args.k}", body=body, headers={"Content-Type": ctype})
        warm.getresponse().read()
        warm.close()

        bare_before = bare_query(args.index, files, args.bare, args.k, args.precision)

        def by_id(n: int):
            return "GET", f"/api/search?id={ids[n % len(ids)]}&k={args.k}", None, {}

        uploads = [multipart(data, name) for data, name in blobs]

        def by_upload(n: int):
            body, ctype = uploads[n % len(uploads)]
            return "POST", f"/api/search?k={args.k}", body, {"Content-Type": ctype}

        rows_out = []
        for kind, fn, total in (("id", by_id, args.requests), ("upload", by_upload, args.uploads)):
            for c in args.clients:
                r = load(port, c, total, fn)
                rows_out.append({"query": kind, "clients": c, "requests": total, **r})
                print(f"  {kind:<7} {c:>3} clients: {r['qps']:8.1f} q/s  p50 {r['p50_ms']:8.1f} ms  "
                      f"p99 {r['p99_ms']:8.1f} ms  errors {r['errors']}", flush=True)
        bare_after = bare_query(args.index, files, args.bare, args.k, args.precision)
    finally:
        server.terminate()
        server.wait(30)
    bare = float(np.mean([bare_before["p50_ms"], bare_after["p50_ms"]]))
    upload1 = next(r for r in rows_out if r["query"] == "upload" and r["clients"] == min(args.clients))
    print(f"bare Searcher.query p50: {bare_before['p50_ms']:.1f} ms before, {bare_after['p50_ms']:.1f} ms after "
          f"(mean {bare:.1f} ms); upload p50 at {upload1['clients']} client(s) = {upload1['p50_ms'] / bare:.2f} x bare")
    figures.update(serve=rows_out, bare_before=bare_before, bare_after=bare_after, upload_over_bare=upload1["p50_ms"] / bare)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
