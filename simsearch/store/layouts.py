"""The FAISS layout of an index, chosen automatically, built from the stored vectors, tuned to a recall.

Part of :mod:`simsearch.store`. This module owns which FAISS index an index directory uses and how it
is searched; the store (:class:`~simsearch.store.IndexStore`) calls :func:`maintain_layout` after a
run has saved, and the query layer searches through :func:`open_layout_search`.

**Choice** (:func:`choose_layout`), after the FAISS wiki's "Guidelines to choose an index" and
autofaiss: exact ``Flat`` below :data:`FLAT_MAX` vectors; above it HNSW (``HNSW32,Flat``) if its graph
and vectors fit in the memory budget, else IVF-Flat (``IVF{nlist},Flat``, nlist the power of two
nearest sqrt(n)), else IVF-PQ (``IVF{nlist},PQ{dim/4}``) whose candidates are re-ranked with the
exact stored vectors. ``flat``, ``hnsw``, ``ivf``, ``ivfpq`` or any FAISS factory string override it.

**Build and tuning** (:func:`build_layout`): trainable layouts train on a random sample of the
stored vectors; then every stored vector is added, chunk by chunk (no re-embedding). The search
parameter (``nprobe`` for IVF, ``efSearch`` for HNSW, and the re-ranking depth of a PQ layout) is
tuned on the index's own vectors: a random sample of stored vectors is held out of the layout and
searched as new queries, the exact top-10 comes from brute force (:mod:`simsearch.store.exact`),
and the cheapest setting whose recall@10, less its standard error, reaches the target is kept;
then the held-out vectors are added. Layout, factory string, parameters and the measured recall
are recorded in the meta (``ann_layout``), and ``simsearch info`` shows them.

**Rebuilds** happen when the collection has grown (or shrunk) to where another layout is chosen,
when the request changes, or when dead slots of a layout that cannot delete (HNSW, see
:mod:`simsearch.store.tombstones`) pass :data:`TOMBSTONE_REBUILD_FRACTION`. Crash-safe: the new
layout is written under a new file name (fsynced, renamed into place), and one SQLite transaction
switches the meta (``ann_file``, ``faiss_factory``, ``ann_layout``) to it; a crash before that
commit leaves the old layout in use and an orphan file, which the next rebuild deletes.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..errors import InputError
from .exact import exact_search_chunks, rerank, stored_vectors
from .tombstones import TOMBSTONE, tombstone_count
from .vector_index import DEFAULT_FACTORY, VectorIndex, clamp_k

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
FLAT_MAX = 50_000  # below this many vectors exact search is fast enough (a few ms per query)
DEFAULT_MEMORY = 1 << 30  # --ann-memory: 1 GiB
DEFAULT_RECALL = 0.95
TOMBSTONE_REBUILD_FRACTION = 0.2
HYSTERESIS = 0.2  # an automatic layout stays while it would still be chosen at +-20% of the size
HNSW_M = 32
TUNE_QUERIES = 500  # held-out queries: recall's standard error about 0.005 at 0.95
TUNE_K = 10
# settings tried, in steps of 1.5x: 2x steps overshot (nprobe 32 with 16x re-ranking reached 0.974
# at 1M x 512 where 0.95 was asked for)
_NPROBE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
_EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
_RERANK = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# One re-ranked candidate costs a query about as much as comparing this many PQ code bytes: at 1M x
# 512 (IVF1024,PQ128) nprobe 32 scans ~4M code bytes in ~1.9 ms, and 176 candidates take ~3 ms to
# re-rank (their catalog slots, their float16 vectors, the dot products): ~17 us, 35,000 code bytes each.
RERANK_COST = 35_000
_MEMORY_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass
class AnnRequest:
    """What the user asked for: a layout (``auto`` or explicit), a memory budget, a recall target."""

    ann: str = "auto"
    memory: int = DEFAULT_MEMORY
    recall: float = DEFAULT_RECALL

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "AnnRequest":
        return cls(**meta["ann_request"]) if meta.get("ann_request") else cls()

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    def over(self, base: "AnnRequest") -> "AnnRequest":
        """This request's fields that are set (not None), the rest from ``base`` (the recorded one)."""
        return AnnRequest(**{k: v if v is not None else getattr(base, k) for k, v in asdict(self).items()})


def parse_memory(text: str | int) -> int:
    """``"512M"``, ``"2G"``, ``"1.5g"``, ``"1000000"`` -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([bkmgt]?)(?:i?b)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"cannot read memory size {text!r}; use e.g. 512M or 2G")
    return int(float(m.group(1)) * _MEMORY_UNITS[m.group(2)])


def nlist_for(n: int) -> int:
    """IVF lists: the power of two nearest sqrt(n), with at least ~39 training points per list."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return max(1, min(nlist, 65536))


def pq_shape(dim: int, n_train: int) -> tuple[int, int]:
    """(sub-quantizers, bits each) of a PQ code: dim/4 bytes-ish, fewer bits when training data is short.

    4 dims per byte: at 1M x 512 on clusters spread like real embeddings, 64-byte codes (8 dims per
    byte) needed nprobe 256 of 1024 and 704 re-ranked candidates for recall@10 0.95; 128-byte codes
    reach 0.97 at nprobe 32 with 176 candidates (``benchmarks/README.md``, bench_scale)."""
    m = max(1, dim // 4, min(dim // 2, 16))  # 4 dims per byte-code; finer for small dims
    while dim % m:
        m -= 1
    nbits = int(max(1, min(8, math.floor(math.log2(max(2, n_train // 39))))))
    return m, nbits


def train_size(factory: str, n: int) -> int:
    """Vectors to train a layout on: 64 per IVF list (and enough for PQ's 256 centroids)."""
    nlist = int(re.search(r"IVF(\d+)", factory).group(1)) if re.search(r"IVF(\d+)", factory) else 1
    return min(n, max(64 * nlist, 256 * 40 if "PQ" in factory else 0, 1000))


def factory_for(layout: str, n: int, dim: int) -> str:
    """The FAISS factory string of a named layout for ``n`` vectors, or a custom factory string checked and normalised."""
    if layout == "flat":
        return DEFAULT_FACTORY
    if layout == "hnsw":
        return f"IDMap2,HNSW{HNSW_M},Flat"
    if layout == "ivf":
        return f"IVF{nlist_for(n)},Flat"
    if layout == "ivfpq":
        nlist = nlist_for(n)
        m, nbits = pq_shape(dim, train_size(f"IVF{nlist},PQ", n))
        return f"IVF{nlist},PQ{m}x{nbits}"
    factory = layout.strip()
    # ids must be the store's: IVF layouts keep ids themselves; anything else goes under an ID map
    if "IVF" not in factory and not factory.startswith("IDMap"):
        factory = "IDMap2," + factory
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "invalid"
        raise InputError(f"--ann {layout!r} is not a FAISS factory string this FAISS accepts ({first})") from None
    return factory


def estimated_bytes(layout: str, n: int, dim: int) -> int:
    """Rough memory (= file size) of a layout holding ``n`` vectors of ``dim``."""
    vectors = n * dim * 4
    if layout == "flat":
        return vectors + n * 16
    if layout == "hnsw":
        return vectors + n * (HNSW_M * 2 * 4 + 16 + 24)  # level-0 links (2M), upper levels, id maps
    nlist = nlist_for(n)
    if layout == "ivf":
        return vectors + n * 8 + nlist * dim * 4
    m, nbits = pq_shape(dim, train_size("IVF,PQ", n))
    return n * (math.ceil(m * nbits / 8) + 8) + nlist * dim * 4


def choose_layout(n: int, dim: int, request: AnnRequest) -> tuple[str, str, str]:
    """(layout name, FAISS factory string, why) for ``n`` vectors of ``dim`` under ``request``."""
    if request.ann != "auto":
        name = request.ann if request.ann in LAYOUTS else "custom"
        return name, factory_for(request.ann, n, dim), "asked for"
    budget = request.memory
    if n < FLAT_MAX and estimated_bytes("flat", n, dim) <= budget:
        return "flat", DEFAULT_FACTORY, f"{n} vectors < {FLAT_MAX}: exact search"
    for name in ("hnsw", "ivf"):
        need = estimated_bytes(name, n, dim)
        if need <= budget:
            return name, factory_for(name, n, dim), f"{n} vectors; {name} needs ~{need >> 20} MiB <= budget {budget >> 20} MiB"
    return "ivfpq", factory_for("ivfpq", n, dim), f"{n} vectors; hnsw and ivf exceed the {budget >> 20} MiB budget"


def is_lossy(factory: str) -> bool:
    """Whether a layout stores compressed codes (PQ, SQ, ...), so that its candidates are re-ranked exactly."""
    return bool(re.search(r"PQ|SQ|LSH|RQ|LSQ", factory.split(",", 1)[-1] if "OPQ" in factory else factory))


def search_parameter(index: faiss.Index) -> str | None:
    """The knob trading speed for recall: ``nprobe`` (IVF), ``efSearch`` (HNSW), or None (exact)."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    inner = faiss.downcast_index(index)
    while hasattr(inner, "id_map") or isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return "efSearch" if isinstance(inner, faiss.IndexHNSW) else None


def apply_params(index: faiss.Index, params: dict[str, Any]) -> None:
    for key in ("nprobe", "efSearch"):
        if key in params:
            faiss.ParameterSpace().set_index_parameter(index, key, int(params[key]))


class LayoutSearch:
    """Search through any layout: skips dead slots (fetching deeper so k live results come back) and
    re-ranks a lossy layout's candidates with the exact stored vectors."""

    def __init__(self, ann: VectorIndex, store: Any, params: dict[str, Any] | None = None) -> None:
        self.ann = ann
        self.store = store
        self.params = dict(params or {})
        apply_params(ann.index, self.params)
        self.rerank = int(self.params.get("rerank", 0))
        self.dead = tombstone_count(ann.index)
        self._ivf = faiss.try_extract_index_ivf(ann.index)

    def __len__(self) -> int:
        return len(self.ann) - self.dead

    def search(self, queries: np.ndarray, k: int, store: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k), best first. ``store``: the store to re-rank from, when
        not the one this was opened with (a server's per-thread connection)."""
        k = clamp_k(k, len(self))
        total = len(self.ann)
        depth = k * self.rerank if self.rerank > 1 else k
        fetch = min(total, math.ceil(depth * (1 + self.dead / max(1, total - self.dead))) + (8 if self.dead else 0))
        if self._ivf is not None:
            # FAISS splits a batch's queries among its threads; fewer queries than threads (one
            # query from the shell) are faster split by inverted list: 1.8 ms against 4.3 ms for
            # nprobe 32 of IVF1024,PQ128 at 1M on 2 cores
            self._ivf.parallel_mode = 1 if len(queries) < faiss.omp_get_max_threads() else 0
        while True:
            scores, ids = self.ann.index.search(np.ascontiguousarray(queries, dtype=np.float32), max(1, fetch))
            live = ids != TOMBSTONE
            if fetch >= total or not self.dead or int(live.sum(axis=1).min()) >= min(depth, len(self)):
                break
            fetch = min(total, fetch * 2)
        scores, ids = _compact(scores, ids, depth)
        if self.rerank:
            return rerank(store or self.store, queries, ids, k)
        return scores[:, :k], ids[:, :k]


def _compact(scores: np.ndarray, ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's live results first (in order), padded with -1 to ``width``."""
    out_s = np.full((len(ids), width), -np.finfo(np.float32).max, np.float32)
    out_i = np.full((len(ids), width), -1, np.int64)
    for row in range(len(ids)):
        keep = ids[row] >= 0
        s, i = scores[row][keep][:width], ids[row][keep][:width]
        out_s[row, : len(s)] = s
        out_i[row, : len(i)] = i
    return out_s, out_i


def open_layout_search(store: Any) -> Any:
    """What to search a store's vectors with: its FAISS index as is for a flat layout, else a :class:`LayoutSearch`."""
    ann = store.require_vectors()
    info = store.meta.get("ann_layout") or {}
    if ann.is_exact and not tombstone_count(ann.index):
        return ann
    return LayoutSearch(ann, store, info.get("params"))


# -- tuning ------------------------------------------------------------------------------------
def _sample_ids(store: Any, size: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    ids = store.catalog.ok_ids()
    if exclude is not None and len(exclude):
        ids = ids[~np.isin(ids, exclude)]
    if len(ids) <= size:
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, size=size, replace=False))


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` (ids, -1 = none) found in the same row of ``found``."""
    per_query = recalls_at(found, truth)
    return float(per_query.mean()) if len(per_query) else 1.0


def recalls_at(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each row's share of ``truth`` (ids, -1 = none) found in the same row of ``found`` (rows with
    no true neighbour left out)."""
    out = []
    for f, t in zip(found, truth):
        t = set(int(i) for i in t if i >= 0)
        if t:
            out.append(len(t & set(int(i) for i in f)) / len(t))
    return np.asarray(out, np.float64)


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, np.int64)
    for row, (found, me) in enumerate(zip(ids, self_ids)):
        rest = [int(i) for i in found if i != me and i >= 0][:k]
        out[row, : len(rest)] = rest
    return out


def holdout_size(n: int) -> int:
    """Tuning queries held out of a layout while it is tuned: :data:`TUNE_QUERIES`, at most a tenth of it."""
    return min(TUNE_QUERIES, n // 10)


def _knob_values(ann: VectorIndex, knob: str | None) -> list[Any]:
    if knob == "nprobe":
        nlist = faiss.extract_index_ivf(ann.index).nlist
        return [v for v in _NPROBE if v < nlist] + [nlist]
    if knob == "efSearch":
        return list(_EF_SEARCH)
    return [None]


def _scan_cost(ann: VectorIndex, knob: str | None, value: Any) -> float:
    """What a setting of the knob costs a query, in code bytes compared (see :data:`RERANK_COST`)."""
    ivf = faiss.try_extract_index_ivf(ann.index)
    code = float(ivf.code_size) if ivf is not None else float(ann.dim * 4)
    if knob == "nprobe":
        return float(value) * len(ann) / max(1, ivf.nlist) * code
    if knob == "efSearch":
        return float(value) * 2 * HNSW_M * code
    return len(ann) * code


def tune(
    ann: VectorIndex, store: Any, target: float, seed: int = 0, held: np.ndarray | None = None
) -> tuple[dict[str, Any], float, float]:
    """(the cheapest search parameters whose recall@10 clears ``target``, the recall measured with
    them, its standard error).

    Queries: ``held``, stored vectors that are not in ``ann`` (held out of the layout while it is
    tuned; :func:`build_layout` adds them afterwards), searched against the exact top-10 of the
    stored vectors without them, so that they are new images from the collection's own
    distribution. Stored vectors searched for themselves (their own row left out, the fallback when
    nothing is held out) over-predict: a graph layout links each stored vector to its neighbours,
    so its neighbours are found more easily than a new image's (0.955 predicted against 0.938 on
    new queries at 100k x 2048 with HNSW). A setting is kept when its recall, less one standard
    error of the mean over the queries, reaches the target: the estimate has to clear the target,
    not merely touch it. A lossy layout's (nprobe, re-ranking depth) pairs are compared by
    :func:`_scan_cost` plus :data:`RERANK_COST` per re-ranked candidate. If no setting clears the
    target, the best one tried is kept (and its recall recorded).
    """
    knob = search_parameter(ann.index)
    lossy = is_lossy(ann.factory)
    if knob is None and not lossy:
        return {}, 1.0, 0.0
    k = min(TUNE_K, max(1, len(ann) - 1))
    if held is not None and len(held):
        q_ids, queries = store.vectors_of(held)
        chunks = ((i[~np.isin(i, q_ids)], v[~np.isin(i, q_ids)]) for i, v in store.iter_vectors())
        truth = exact_search_chunks(chunks, queries, k)[1]
        extra = 0
    else:
        q_ids, queries = store.vectors_of(_sample_ids(store, TUNE_QUERIES, seed))
        truth = _drop_self(exact_search_chunks(store.iter_vectors(), queries, k + 1)[1], q_ids, k)
        extra = 1  # one more result, for the query's own row

    def measured(found: np.ndarray) -> tuple[float, float]:
        per_query = recalls_at(found if extra == 0 else _drop_self(found, q_ids, k), truth)
        if not len(per_query):
            return 1.0, 0.0
        return float(per_query.mean()), float(per_query.std(ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0

    best: tuple[dict[str, Any], float, float] = ({}, -1.0, 0.0)  # the highest recall, if none clears
    chosen: tuple[dict[str, Any], float, float] | None = None
    chosen_cost = math.inf
    for value in _knob_values(ann, knob):
        params: dict[str, Any] = {} if knob is None else {knob: value}
        scan = _scan_cost(ann, knob, value)
        if scan >= chosen_cost:
            break  # every later setting scans more than the chosen one costs in all
        if not lossy:
            _, found = LayoutSearch(ann, store, params).search(queries, k + extra)
            trials = [(params, found, scan)]
        else:  # one search at the deepest re-ranking depth; shallower depths re-rank a prefix of it
            width = k + extra
            _, deep = LayoutSearch(ann, store, params).search(queries, width * _RERANK[-1])
            vectors = stored_vectors(store, deep)
            trials = [
                (dict(params, rerank=depth), rerank(store, queries, deep[:, : width * depth], width, vectors)[1],
                 scan + width * depth * RERANK_COST)
                for depth in _RERANK
            ]
        for trial, found, cost in trials:
            r, se = measured(found)
            if r > best[1]:
                best = (trial, r, se)
            if r - se >= target:
                if cost < chosen_cost:
                    chosen, chosen_cost = (trial, r, se), cost
                break  # deeper re-ranking of this setting only costs more
        if chosen is not None and not lossy:
            break
    if chosen is not None:
        return chosen
    log.warning("no search setting reached recall@10 %.2f; keeping %s (recall %.3f)", target, best[0], best[1])
    return best


# -- building and switching --------------------------------------------------------------------
def build_layout(store: Any, dim: int, factory: str, target: float, seed: int = 0) -> tuple[VectorIndex, dict[str, Any]]:
    """A new index of ``factory`` holding every stored vector (trained on a sample), tuned to ``target``.

    A layout with a search parameter or lossy codes is built without :func:`holdout_size` randomly
    chosen stored vectors, tuned with them as the queries (:func:`tune`), and then given them.
    """
    t0 = time.perf_counter()
    ann = VectorIndex(dim, factory)
    n = int(store.catalog.counts()["ok"])
    tuned = search_parameter(ann.index) is not None or is_lossy(factory)
    held = _sample_ids(store, holdout_size(n), seed + 1) if tuned else np.zeros(0, np.int64)
    if not ann.is_trained:
        if n == 0:
            raise InputError(f"cannot train a {factory!r} layout on an empty index")
        _, sample = store.vectors_of(_sample_ids(store, train_size(factory, n), seed, exclude=held))
        ivf = faiss.try_extract_index_ivf(ann.index)
        if ivf is not None:
            ivf.cp.seed = seed
            ivf.cp.min_points_per_centroid = 1  # small collections are legitimate: no FAISS warnings
        ann.train(sample)
        del sample
    for ids, vectors in store.iter_vectors():
        keep = ~np.isin(ids, held)
        ann.add(ids[keep], vectors[keep])
    built = time.perf_counter() - t0
    params, recall, se = tune(ann, store, target, seed=seed, held=held)
    t1 = time.perf_counter()
    for ids, vectors in store.iter_vectors(held):
        ann.add(ids, vectors)
    apply_params(ann.index, params)
    return ann, {
        "factory": factory,
        "params": params,
        "recall_at_10": round(float(recall), 4),
        "recall_se": round(float(se), 4),
        "tune_queries": len(held),  # held-out queries (0: stored vectors, self left out: under 10 vectors)
        "recall_target": target,
        "vectors": n,
        "build_seconds": round(built + time.perf_counter() - t1, 2),
        "tune_seconds": round(t1 - t0 - built, 2),
    }


def needs_rebuild(store: Any, request: AnnRequest, hysteresis: bool = True) -> tuple[bool, str, str, str]:
    """(whether the layout must be rebuilt, layout, factory, why) for the store as it is now.

    ``hysteresis``: an ``auto`` layout is kept while it would still be chosen for a collection
    :data:`HYSTERESIS` smaller or larger, so that a collection hovering around a threshold (adding
    and deleting a few files around 50,000) is not rebuilt on every run."""
    meta = store.meta
    n = int(store.catalog.counts()["ok"])
    dim = int(meta["dim"])
    layout, factory, why = choose_layout(n, dim, request)
    current = str(meta.get("faiss_factory", DEFAULT_FACTORY))
    info = meta.get("ann_layout") or {}
    if factory != current and hysteresis and request.ann == "auto" and info:
        near = {choose_layout(max(1, round(n * f)), dim, request) for f in (1 - HYSTERESIS, 1 + HYSTERESIS)}
        kept = next((c for c in near if c[1] == current), None)
        if kept is not None:
            layout, factory, why = kept[0], current, f"{n} vectors: within {HYSTERESIS:.0%} of the threshold, {kept[0]} kept"
    if factory != current:
        return True, layout, factory, why
    if info and info.get("recall_target") != request.recall and (search_parameter(store.ann.index) or is_lossy(factory)):
        return True, layout, factory, f"recall target now {request.recall}"
    dead = tombstone_count(store.ann.index) if store.ann is not None else 0
    if dead and dead > TOMBSTONE_REBUILD_FRACTION * max(1, len(store.ann)):
        return True, layout, factory, f"{dead} dead slots of {len(store.ann)}"
    return False, layout, factory, why


def maintain_layout(store: Any, request: AnnRequest | None = None, force: bool = False) -> dict[str, Any] | None:
    """Rebuild the store's layout from its stored vectors if the collection or the request calls for it.

    Call with the write lock held and the FAISS file saved (nothing pending). Returns the new
    ``ann_layout`` record, or None when the current layout stays.
    """
    meta = store.meta
    if meta.get("dim") is None or store.ann is None:
        return None
    request = (request or AnnRequest(None, None, None)).over(AnnRequest.from_meta(meta))  # type: ignore[arg-type]
    if request.ann not in LAYOUTS:
        factory_for(request.ann, 1000, int(meta["dim"]))  # a bad factory string fails before any work
    remove_orphans(store.path, keep=store.ann_path.name)
    request_changed = meta.get("ann_request") is not None and meta.get("ann_request") != request.to_meta()
    if meta.get("ann_request") != request.to_meta():
        store.set_meta({"ann_request": request.to_meta()})
    if int(store.catalog.counts()["ok"]) == 0:
        return None
    rebuild, layout, factory, why = needs_rebuild(store, request, hysteresis=not request_changed)
    if not (rebuild or force):
        return None
    log.info("building the %s layout (%s): %s", layout, factory, why)
    store.release_ann()  # the old layout is on disk: building the new one need not hold both in memory
    ann, info = build_layout(store, int(meta["dim"]), factory, request.recall)
    info.update(layout=layout, reason=why)
    name = f"vectors-{secrets.token_hex(4)}.faiss"
    old = store.ann_path
    store.switch_layout(ann, name, factory, info)  # a new file, then one commit switches to it
    remove_orphans(store.path, keep=name)
    if old.exists() and old.name != name:
        old.unlink()
    return info


def remove_orphans(index_dir: Path, keep: str) -> None:
    """Delete layout files a crashed rebuild or save left behind (call with the write lock held)."""
    for p in index_dir.iterdir():
        if p.name != keep and re.fullmatch(r"vectors(-[0-9a-f]+)?\.faiss(\.tmp)?", p.name):
            p.unlink(missing_ok=True)


def prepare_layout(store: Any) -> None:
    """Before a run adds vectors: an untrained layout (a fresh index after --rebuild) starts flat."""
    if store.ann is not None and not store.ann.is_trained and len(store.ann) == 0:
        store.ann = VectorIndex(store.ann.dim, DEFAULT_FACTORY)
        store.set_meta({"faiss_factory": DEFAULT_FACTORY, "ann_layout": None})
