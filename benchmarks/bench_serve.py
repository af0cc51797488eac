"""``simsearch serve`` under load: queries per second and p50/p99 latency with 1, 4 and 16 clients.

Builds an index once (at ``--index``, from ``--data``; ``--synthetic N`` first writes N photo-like
JPEGs there), starts ``simsearch serve`` on a free loopback port in a subprocess, and sends
bounded loops of requests over keep-alive connections, one per client:

- **id**: ``GET /api/search?id=N`` (stored vector, no model);
- **upload**: ``POST /api/search`` with an indexed image's bytes (decode + model + search).

The clients (``--client process``, the default) are asyncio connections in a separate process
that write prepared requests and read the responses by Content-Length: about 0.1 ms of Python per
request, so the server keeps the CPU it would have with real, remote clients. ``--client threads``
is the earlier client: Python threads with ``http.client`` in this process (several times the
client-side work per request, on the same cores as the server).

``--baseline-src DIR`` also starts a server from another checkout of simsearch (e.g. the commit
before a change, ``git worktree add ../before COMMIT``) and runs every load against both, one after
the other, so that before and after are compared in one run on the same machine load.

In the same run, with the server idle, it times the bare library call the upload path is measured
against: ``Searcher.query([file])`` in this process (decode + model + search, no HTTP). Only
loopback traffic; every loop is bounded by ``--requests`` / ``--uploads`` and by time-outs.

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

from bench_index import cpu_name, percentile


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
    p.add_argument("--kinds", nargs="+", default=["id", "upload"], choices=["id", "upload"], help="what to query [id upload]")
    p.add_argument("--client", nargs="+", default=["process"], choices=["process", "threads"],
                   help="load generator(s): asyncio connections in a separate process, or http.client threads here [process]")
    p.add_argument("--baseline-src", default=None,
                   help="also run every load against a server started from this simsearch checkout (before/after in one run)")
    p.add_argument("--baseline-args", default="", help="extra 'simsearch serve' options for the baseline server, e.g. '--model-batch 1'")
    p.add_argument("--src", default=None, help="the simsearch checkout to serve from [this one]")
    p.add_argument("--server-args", default="", help="extra 'simsearch serve' options for the server under test")
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


def start_server(
    index: str, port: int, precision: str, threads: int | None, src: str | None = None, extra: str = ""
) -> subprocess.Popen:
    root = Path(src).resolve() if src else Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(
        [sys.executable, "-m", "simsearch", "serve", "--index", index, "--port", str(port), "--device", "cpu",
         "--precision", precision, *extra.split()],
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


def wait_packed(port: int, timeout: float = 600.0) -> dict[str, object]:
    """The server's vector search once it is no longer packing its float16 copy (``/api/info``);
    a server without that report (an older one) is taken as it is."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=30) as r:
            search = json.load(r)["serve"].get("vector_search", {})
        if not search.get("packing") or time.monotonic() > deadline:
            return search
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, all its threads (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = "simsearchbench" + os.urandom(8).hex()
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def raw_request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request as bytes, ready to write to a keep-alive connection."""
    lines = [f"{method} {url} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def raw_load(port: int, clients: int, requests: list[bytes], check: bytes = b'"results"', timeout: float = 120.0) -> dict[str, float]:
    """Send ``requests`` over ``clients`` keep-alive connections (asyncio, one process), each
    connection taking the next request when its previous answer is in; (qps, p50, p99 in ms, errors).

    Runs in a child process of its own (see :func:`process_load`): the only work per request is
    writing prepared bytes and reading the answer by its Content-Length."""
    import asyncio

    async def main() -> dict[str, float]:
        latencies: list[float] = []
        errors = 0
        todo = iter(requests)

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, limit=1 << 22), timeout)

        async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bool:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                0,
            )
            payload = await reader.readexactly(length)
            return status == 200 and check in payload

        async def client(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
            nonlocal errors
            reader, writer = conn
            for request in todo:  # one shared iterator: the loop is bounded by len(requests)
                t0 = time.perf_counter()
                try:
                    ok = await asyncio.wait_for(exchange(reader, writer, request), timeout)
                except (OSError, EOFError, ValueError, StopIteration, asyncio.TimeoutError, asyncio.IncompleteReadError,
                        asyncio.LimitOverrunError):
                    ok = False
                    writer.close()
                    reader, writer = await connect()
                latencies.append(time.perf_counter() - t0)
                errors += not ok
            writer.close()

        conns = [await connect() for _ in range(clients)]
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in conns))
        wall = time.perf_counter() - t0
        ms = [x * 1000 for x in latencies]
        return {"qps": len(requests) / wall, "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "errors": errors}

    return asyncio.run(main())


def process_load(pool, port: int, clients: int, total: int, make_request) -> dict[str, float]:
    """``total`` requests from ``clients`` connections of the client process ``pool``."""
    requests = [raw_request(*make_request(n)) for n in range(total)]
    return pool.submit(raw_load, port, clients, requests).result()


def thread_load(port: int, clients: int, total: int, make_request) -> dict[str, float]:
    """``total`` requests from ``clients`` threads of this process (http.client); (qps, p50, p99 in ms, errors)."""
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
    # distinct ids for every load of a server (each client count and client kind gets its own; the
    # before and after servers get the same ones): no answer repeats an earlier one, so nothing a
    # server keeps between requests (catalog rows) is found again for the query itself
    loads = len(args.clients) * len(args.client)
    ids = [r.id for r in rng.sample(rows, min(len(rows), max(args.requests * loads, 500)))]
    files = [r.path for r in rng.sample(rows, min(len(rows), 32))]
    blobs = [(Path(f).read_bytes(), os.path.basename(f)) for f in files]
    print(f"{len(rows)} images, {meta['model']} ({meta['weights']}), k={args.k}, CPU: {cpu_name()} x{os.cpu_count()}, "
          f"threads: {args.threads or 'default'}, load average {os.getloadavg()[0]:.1f}")

    # name -> (source tree, extra serve options); "before" runs first in each pair
    servers = {"after": (args.src, args.server_args)}
    if args.baseline_src or args.baseline_args:
        servers = {"before": (args.baseline_src, args.baseline_args), **servers}
    ports = {name: free_port() for name in servers}
    procs = {}
    figures: dict[str, object] = {"images": len(rows), "model": meta["model"], "cpu": cpu_name(), "k": args.k,
                                  "threads": args.threads, "load_average_start": os.getloadavg()[0],
                                  "servers": {n: {"src": s or "this tree", "args": a} for n, (s, a) in servers.items()}}
    uploads = [multipart(data, name) for data, name in blobs]

    def by_id(n: int):
        return "GET", f"/api/search?id={ids[n % len(ids)]}&k={args.k}", None, {}

    def by_id_from(first: int):
        return lambda n: by_id(first + n)

    def by_upload(n: int):
        body, ctype = uploads[n % len(uploads)]
        return "POST", f"/api/search?k={args.k}", body, {"Content-Type": ctype}

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    rows_out = []
    try:
        for name, (src, extra) in servers.items():
            procs[name] = start_server(args.index, ports[name], args.precision, args.threads, src, extra)
            # warm each server's model and vectors before timing
            body, ctype = multipart(*blobs[0])
            warm = http.client.HTTPConnection("127.0.0.1", ports[name], timeout=300)
            warm.request("POST", f"/api/search?k={args.k}", body=body, headers={"Content-Type": ctype})
            warm.getresponse().read()
            warm.close()
            print(f"  {name}: vector search {wait_packed(ports[name])}", flush=True)
        pool.submit(percentile, [1.0], 50).result()  # start the client process before timing

        bare_before = bare_query(args.index, files, args.bare, args.k, args.precision)
        plan = [("id", by_id, args.requests), ("upload", by_upload, args.uploads)]
        for kind, fn, total in [p for p in plan if p[0] in args.kinds]:
            for ki, client in enumerate(args.client):
                for ci, c in enumerate(args.clients):
                    if kind == "id":
                        fn = by_id_from((ki * len(args.clients) + ci) * total)
                    for name in servers:  # before and after back to back, on the same machine load
                        cpu0 = cpu_seconds(procs[name].pid)
                        if client == "process":
                            r = process_load(pool, ports[name], c, total, fn)
                        else:
                            r = thread_load(ports[name], c, total, fn)
                        # the server's CPU time per request: what a query costs, whatever else the machine runs
                        r["server_cpu_ms"] = (cpu_seconds(procs[name].pid) - cpu0) / total * 1000
                        rows_out.append({"server": name, "query": kind, "client": client, "clients": c, "requests": total, **r})
                        print(f"  {name:<6} {kind:<7} {client:<7} {c:>3} clients: {r['qps']:8.1f} q/s  p50 {r['p50_ms']:8.1f} ms  "
                              f"p99 {r['p99_ms']:8.1f} ms  server CPU {r['server_cpu_ms']:6.2f} ms/query  errors {r['errors']}",
                              flush=True)
        bare_after = bare_query(args.index, files, args.bare, args.k, args.precision)
    finally:
        pool.shutdown()
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)
    bare = float(np.mean([bare_before["p50_ms"], bare_after["p50_ms"]]))
    print(f"bare Searcher.query p50: {bare_before['p50_ms']:.1f} ms before, {bare_after['p50_ms']:.1f} ms after "
          f"(mean {bare:.1f} ms); load average at the end {os.getloadavg()[0]:.1f}")
    for r in rows_out:
        if r["query"] == "upload" and r["clients"] == min(args.clients):
            print(f"  {r['server']} upload p50 at {r['clients']} client(s), {r['client']} client = {r['p50_ms'] / bare:.2f} x bare")
    figures.update(serve=rows_out, bare_before=bare_before, bare_after=bare_after, load_average_end=os.getloadavg()[0])
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
