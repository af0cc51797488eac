"""The float16 search of a flat index against FAISS's flat search, per batch of queries, side by side.

For an index folder with a flat layout: packs its vectors (:class:`simsearch.embed.half_search.
HalfPackedIndex`; the time it takes, the bound, the share of sampled queries proven with their
first candidates), then times one search of a batch of 1 to 32 stored vectors with each, in
alternating order, with the caches flushed before each call (a server's search thread finds its
vectors evicted by everything else it runs), on one thread each (as ``simsearch serve`` runs them),
and prints the median per batch size. Every answer of the float16 search is checked against
FAISS's (the same ids, scores within 1e-5, up to the order of near-equal scores).

    python benchmarks/bench_half_search.py INDEX [INDEX...] [--rounds 9] [-k 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCHES = (1, 2, 4, 8, 16, 32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("indexes", nargs="+", help="index folders with a flat layout")
    p.add_argument("--rounds", type=int, default=9, help="timed calls per batch size and search [9]")
    p.add_argument("-k", type=int, default=10, help="neighbours asked for (plus 1: a query by id leaves itself out) [10]")
    args = p.parse_args(argv)

    import faiss
    import torch
    from bench_index import cpu_name
    from threadpoolctl import threadpool_limits

    from simsearch.embed.half_search import MAX_QUERIES, HalfPackedIndex
    from simsearch.store import IndexStore

    faiss.omp_set_num_threads(1)
    faiss.cvar.distance_compute_blas_threshold = 2  # as simsearch serve sets it
    torch.set_num_threads(1)
    threadpool_limits(1)
    flush = np.ones(64 << 20, np.uint8)  # 64 MB, over the last-level cache
    print(f"CPU: {cpu_name()} x{os.cpu_count()}, one thread per search, k = {args.k} + 1, caches flushed before each call")
    for folder in args.indexes:
        with IndexStore.open(folder, map_faiss=True) as store:
            ann = store.require_vectors()
            t0 = time.perf_counter()
            packed = HalfPackedIndex(ann)
            pack_s = time.perf_counter() - t0
            _, vectors = ann.stored_view()
            print(f"\n{folder}: {len(ann):,} x {ann.dim} ({store.meta['model']}, {store.meta['weights']}); packed in "
                  f"{pack_s:.2f} s ({packed.nbytes / 2**20:.1f} MiB), bound {packed.bound:.2e}, proven at once "
                  f"{packed.proven_at_once:.0%} of sampled queries")
            rng = np.random.default_rng(0)
            times: dict[tuple[str, int], list[float]] = {}
            for r in range(args.rounds):
                for m in BATCHES:
                    q = np.array(vectors[rng.integers(0, len(vectors), m)])
                    order = [("faiss", ann.search), ("float16", packed.search)]
                    found = {}
                    for name, search in order if r % 2 == 0 else order[::-1]:
                        flush.sum()
                        t = time.perf_counter()
                        found[name] = search(q, args.k + 1)
                        times.setdefault((name, m), []).append((time.perf_counter() - t) * 1000)
                    _check(found["faiss"], found["float16"])
            print(f"{'queries':>8} {'FAISS ms':>9} {'float16 ms':>11} {'speed-up':>9}")
            for m in BATCHES:
                a, b = (float(np.median(times[(n, m)])) for n in ("faiss", "float16"))
                note = "  (FAISS: over MAX_QUERIES)" if m > MAX_QUERIES else ""
                print(f"{m:>8} {a:>9.2f} {b:>11.2f} {a / b:>8.2f}x{note}")
            print(f"queries that needed more candidates: {packed.widened}, answered by FAISS: {packed.fallbacks}")
    return 0


def _check(want: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
    for row in np.nonzero((got[1] != want[1]).any(axis=1))[0]:  # a swap is allowed between near-equal scores only
        np.testing.assert_allclose(got[0][row], want[0][row], rtol=0, atol=1e-6)


if __name__ == "__main__":
    raise SystemExit(main())
