"""What the compact store costs and saves: float16 vectors against float32, side by side, in one run.

Builds an index of synthetic vectors that look like embeddings (Gaussian clusters of very
different sizes around random unit centres, L2-normalised) through the public store API
(``IndexStore.commit`` + ``save``), and prints:

- disk per image: the catalog (metadata only), the float16 vector file and the FAISS file, next to
  a catalog in the old layout (schema version 1: each float32 vector a blob in its row), built
  here from the same rows;
- what float16 costs: the cosine between each stored vector and the original, the error of a
  query's scores, and recall@10 of exact search over the float16 vectors against exact search
  over the float32 ones (queries: held-out vectors from the same clusters);
- the cost of opening: ``simsearch info``'s library call (O(1): no vector is read) and the full
  check (``info --check``: every checksum), timed.

Usage: python benchmarks/bench_store.py [--n 50000] [--dim 512] [--queries 500] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from simsearch.store import IndexStore, index_info
from simsearch.store.vector_file import to_stored


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` unit vectors in clusters of Zipf-like sizes (a few big, many small); noise of norm 0.8
    around unit centres (cosine about 0.78 to the centre, like same-class image embeddings)."""
    rng = np.random.default_rng(seed)
    k = max(8, n // 200)
    sizes = rng.zipf(1.6, size=k).astype(np.float64)
    labels = rng.choice(k, size=n, p=sizes / sizes.sum())
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels] + (0.8 / np.sqrt(dim)) * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def record(i: int) -> dict:
    return {"path": f"/photos/2024/album-{i // 500:04d}/IMG_{i:07d}.jpg", "size": 2_000_000 + i,
            "mtime_ns": 1_700_000_000_000_000_000 + i, "hash": f"{i:064x}", "width": 4032, "height": 3024,
            "status": "ok", "error": None}


def build(index_dir: Path, x: np.ndarray, batch: int = 4096) -> float:
    t0 = time.perf_counter()
    with IndexStore.open(index_dir, create=True) as store:
        store.lock_for_writing()
        store.ensure_identity({"model": "synthetic", "weights": "none", "dim": x.shape[1],
                               "preprocessing": {"crop_size": 224}})
        for start in range(0, len(x), batch):
            part = x[start : start + batch]
            store.commit([record(start + i) for i in range(len(part))], part, [None] * len(part))
        store.save()
    return time.perf_counter() - t0


def v1_catalog_bytes(path: Path, x: np.ndarray) -> int:
    """A catalog in the old layout (float32 blobs in the rows), same rows, same page size."""
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, hash TEXT,"
        " width INTEGER, height INTEGER, status TEXT NOT NULL, error TEXT, vector BLOB, indexed_at TEXT)"
    )
    conn.execute("CREATE UNIQUE INDEX idx_path ON images (path)")
    conn.execute("CREATE INDEX idx_hash ON images (hash)")
    conn.execute("CREATE INDEX idx_status ON images (status)")
    with conn:
        conn.executemany(
            "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((i + 1, r["path"], r["size"], r["mtime_ns"], r["hash"], r["width"], r["height"], "ok", None,
              x[i].tobytes(), "2026-01-01T00:00:00+00:00") for i, r in ((i, record(i)) for i in range(len(x)))),
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def float16_cost(x: np.ndarray, q: np.ndarray, k: int = 10) -> dict[str, float]:
    x16 = to_stored(x).astype(np.float32)
    cos = (x16 * x).sum(1) / np.linalg.norm(x16, axis=1)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    half = faiss.IndexFlatIP(x.shape[1])
    half.add(x16)
    s32, i32 = exact.search(q, k)
    s16, i16 = half.search(q, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(i32, i16)])
    # score error: the same (query, neighbour) pairs scored both ways
    pair_err = np.abs((q[:, None, :] * x16[i32]).sum(-1) - s32)
    return {
        "cos_min": float(cos.min()),
        "cos_mean_err": float(np.abs(1 - cos).mean()),
        "score_err_max": float(pair_err.max()),
        "score_err_mean": float(pair_err.mean()),
        "recall_at_10": float(recall),
        "top1_same": float(np.mean(i32[:, 0] == i16[:, 0])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = clustered(args.n + args.queries, args.dim, seed=0)
        x, q = data[: args.n], data[args.n :]
        index_dir = work / "idx"
        shutil.rmtree(index_dir, ignore_errors=True)
        build_s = build(index_dir, x)
        sizes = {p.name: p.stat().st_size for p in index_dir.iterdir() if p.is_file()}
        catalog = sum(v for k, v in sizes.items() if k.startswith("catalog.db"))
        v1 = v1_catalog_bytes(work / "v1-catalog.db", x)
        n, d = args.n, args.dim
        print(f"store at N={n:,} x dim {d} (clustered synthetic vectors; built in {build_s:.1f} s through IndexStore.commit)")
        print(f"{'bytes per image':<34}{'schema 2 (this)':>18}{'schema 1 (before)':>20}")
        print(f"{'  catalog.db (SQLite)':<34}{catalog / n:>18.0f}{v1 / n:>20.0f}")
        print(f"{'  vectors.f16 (float16 by slot)':<34}{sizes.get('vectors.f16', 0) / n:>18.0f}{'-':>20}")
        print(f"{'  vectors.faiss (IDMap2,Flat)':<34}{sizes.get('vectors.faiss', 0) / n:>18.0f}{sizes.get('vectors.faiss', 0) / n:>20.0f}")
        total2 = catalog + sizes.get("vectors.f16", 0) + sizes.get("vectors.faiss", 0)
        total1 = v1 + sizes.get("vectors.faiss", 0)
        print(f"{'  total':<34}{total2 / n:>18.0f}{total1 / n:>20.0f}")
        target = 1.3 * d * 2 + 300
        print(f"target without the ANN index: <= 1.3 x dim x 2 + 300 = {target:.0f}; "
              f"schema 2 has {(catalog + sizes.get('vectors.f16', 0)) / n:.0f}")

        cost = float16_cost(x, q)
        print(f"float16 against float32 ({args.queries} held-out queries, exact search both ways):")
        print(f"  cosine(stored, original): min {cost['cos_min']:.7f}, mean error {cost['cos_mean_err']:.2e}")
        print(f"  score error of the true top-10: max {cost['score_err_max']:.2e}, mean {cost['score_err_mean']:.2e}")
        print(f"  recall@10 {cost['recall_at_10']:.4f}, same top-1 {cost['top1_same']:.4f}")

        for label, check in (("info (open + counts)", False), ("info --check (every checksum)", True)):
            t0 = time.perf_counter()
            index_info(index_dir, check=check)
            print(f"{label:<34}{(time.perf_counter() - t0) * 1000:>10.1f} ms")
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
