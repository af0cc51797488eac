"""The query layer: embed example images with the index's own model, search, join metadata."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError
from .images import DEFAULT_MAX_PIXELS, content_hash, not_regular_reason, read_bytes
from .store import ImageRow, IndexStore
from .store.exact import ExactSearch

log = logging.getLogger(__name__)

# query images decoded, embedded and searched together
QUERY_CHUNK = 64


@dataclass
class Hit:
    """One neighbour of a query image."""

    rank: int
    score: float
    path: str
    width: int | None
    height: int | None
    id: int


@dataclass
class QueryResult:
    """The neighbours of one query image, best first."""

    query: str
    results: list[Hit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "results": [{k: v for k, v in asdict(h).items() if k != "id"} for h in self.results],
        }


def load_index_model(
    store: IndexStore,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "auto",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Any:
    """Recreate the model an index was built with and check (through the store) it still is that model."""
    embedder = build_index_model(store.meta, device, batch_size, precision, max_pixels)
    store.check_model(embedder.model.describe(), reloading=True)
    return embedder


def build_index_model(
    meta: dict[str, Any],
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "auto",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Any:
    """The Embedder of the model an index's description names (imports torch); the caller checks it
    against the index (:meth:`IndexStore.check_model`). Touches no store, so it may run on a thread."""
    from .embed import Embedder
    from .models import create_model

    model = create_model(meta["model"], meta.get("weights_source", "imagenet"), seed=int(meta.get("seed", 0)))
    # queries are decoded on the CPU (CropDecoder): a query process never initialises nvJPEG
    return Embedder(
        model, device=device, batch_size=batch_size, workers=0, precision=precision, decode="cpu", max_pixels=max_pixels
    )


class _OnThread:
    """A call running on its own thread; :meth:`result` waits for it and returns its value or raises its error."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name="simsearch-model", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of result()
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _check_k(k: int) -> None:
    if k < 1:
        raise InputError("--top-k must be at least 1")


def _check_query_paths(queries: Sequence[str | os.PathLike[str]]) -> None:
    for q in queries:
        path = Path(q)
        if path.is_dir():
            raise InputError(f"query image {q} is a folder; give image files")
        if not path.is_file():
            try:
                mode = path.stat().st_mode
            except OSError:
                raise InputError(f"query image not found: {q}") from None
            # a FIFO, socket or device: never opened (reading a FIFO would block)
            raise InputError(f"query image {not_regular_reason(str(q), mode)}")


class Searcher:
    """An open index, ready for many queries; its model is built once, on the first query that needs it.

    ``query_images`` makes one per call; a long-lived caller (a service, a notebook, a benchmark)
    keeps one and pays the model's start-up once. A query that is an indexed, unchanged file (same
    size and mtime), or a stored row named by id or path, is answered from its stored vector: no
    model is built and torch is not imported.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike[str],
        device: str = "auto",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        search: str = "auto",
        precision: str = "auto",
        exact: bool = False,
        queries: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        """``device``, ``precision``: where and how the model runs (see :class:`simsearch.embed.Embedder`).

        ``search``: ``auto`` searches a flat index exactly on the model's GPU when there is one,
        ``faiss`` always uses FAISS on the CPU, ``torch`` searches on the model's device (see
        :func:`simsearch.embed.device_search.open_search`). ``exact``: brute force over the stored
        vectors whatever the index's layout (:mod:`simsearch.store.exact`). ``queries``: the images
        about to be queried; when one of them needs the model, it starts building now
        (:meth:`start_model`), while FAISS is imported and the index opened.
        """
        self.store = IndexStore.open(index_dir, map_faiss=True)  # FAISS memory-mapped: opening reads none of it
        # Readers use the last saved FAISS file as it is (no consistency scan: a writer may be
        # running); hits on rows changed or deleted since that save are dropped (_neighbours).
        try:
            self.max_pixels = max_pixels
            self.exact = exact
            self._device, self._precision, self._search = device, precision, search
            self._embedder: Any = None
            self._decoder: Any = None
            self._model_build: _OnThread | None = None
            if self.store.catalog.counts()["ok"] and any(not self._unchanged(str(q)) for q in queries):
                self.start_model()
            self.ann = self.store.require_vectors()
            # imported here, not at the top: importing FAISS overlaps the model's build
            from .store.layouts import open_layout_search

            self.vector_search: Any = ExactSearch(self.store) if exact else open_layout_search(self.store)
        except BaseException:
            self.close()
            raise

    def start_model(self) -> None:
        """Start building the index's model on a thread, torch's import included (about as long as
        the rest of a cold query together), so that the work a query does before its forward pass,
        opening FAISS and reading, hashing and looking up its files, overlaps it."""
        if self._embedder is None and self._model_build is None:
            meta = dict(self.store.meta)
            self._model_build = _OnThread(build_index_model, meta, self._device, None, self._precision, self.max_pixels)

    @property
    def embedder(self) -> Any:
        """The index's own model (built, and torch imported, on first use or by :meth:`start_model`)."""
        if self._embedder is None:
            self.start_model()
            assert self._model_build is not None
            build, self._model_build = self._model_build, None
            embedder = build.result()
            self.store.check_model(embedder.model.describe(), reloading=True)
            self._embedder = embedder
            from .embed.device_search import open_search

            # the one decode path, drafting big JPEGs to the model's resize size
            self._decoder = self._embedder.crop_decoder
            if not self.exact and self.vector_search is self.ann:  # a flat layout: maybe on the model's GPU
                self.vector_search = open_search(self.ann, self._embedder.device, self._search)
        return self._embedder

    @property
    def decoder(self) -> Any:
        self.embedder  # noqa: B018 (builds the decoder with the model)
        return self._decoder

    def close(self) -> None:
        if self._model_build is not None:  # never leave a thread building into a closed searcher
            self._model_build, build = None, self._model_build
            try:
                build.result()
            except BaseException:  # noqa: BLE001, S110 - the error belongs to a query that will not happen
                pass
        self.store.close()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(
        self,
        queries: Sequence[str | os.PathLike[str]],
        k: int = 10,
        threshold: float | None = None,
        include_self: bool = False,
    ) -> list[QueryResult]:
        """Nearest indexed neighbours (cosine similarity) of each query image."""
        _check_k(k)
        _check_query_paths(queries)
        results: list[QueryResult] = []
        for start in range(0, len(queries), QUERY_CHUNK):  # bounded memory for a long list of queries
            chunk = [str(q) for q in queries[start : start + QUERY_CHUNK]]
            vectors: list[np.ndarray | None] = []
            skips: list[set[int]] = []
            to_embed: list[tuple[int, bytes]] = []
            for n, name in enumerate(chunk):
                row, vector = self._stored(name)
                if vector is not None:
                    vectors.append(vector)
                    skips.append(set() if include_self else {row.id})
                    continue
                self.start_model()  # (if not started yet) builds while the files are read and looked up
                data = read_bytes(name)
                to_embed.append((n, data))
                vectors.append(None)
                skips.append(set() if include_self else self._self_ids(name, content_hash(data)))
            if to_embed:
                crops = [self.decoder.decode(data, chunk[n])[0] for n, data in to_embed]
                for (n, _), vector in zip(to_embed, self.embedder.embed_crops(crops)):
                    vectors[n] = vector
            results.extend(self._search_vectors(chunk, np.stack(vectors), skips, k, threshold))
        return results

    def query_stored(
        self, ids: Sequence[int] = (), paths: Sequence[str] = (), *, k: int = 10, **options: Any
    ) -> list[QueryResult]:
        """Neighbours of indexed rows named by id or by path, from their stored vectors (no model).

        ``options``: ``threshold`` and ``include_self``, as for :meth:`query`."""
        threshold, include_self = options.get("threshold"), bool(options.get("include_self", False))
        _check_k(k)
        rows: list[tuple[str, ImageRow]] = []
        for row_id in ids:
            row = self.store.catalog.rows_by_ids([int(row_id)]).get(int(row_id))
            if row is None or not row.ok:
                raise InputError(f"no indexed image with id {row_id} in {self.store.path}")
            rows.append((str(row_id), row))
        for path in paths:
            row = self.store.catalog.row_by_path(str(path)) or self.store.catalog.row_by_path(os.path.abspath(path))
            if row is None or not row.ok:
                raise InputError(f"{path} is not an indexed image of {self.store.path}")
            rows.append((str(path), row))
        results: list[QueryResult] = []
        for start in range(0, len(rows), QUERY_CHUNK):
            chunk = rows[start : start + QUERY_CHUNK]
            stored = self._vectors([row.id for _, row in chunk])
            skips = [set() if include_self else {row.id} for _, row in chunk]
            vectors = np.stack([stored[row.id] for _, row in chunk])
            results.extend(self._search_vectors([name for name, _ in chunk], vectors, skips, k, threshold))
        return results

    def _vectors(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for chunk_ids, chunk in self.store.iter_vectors(ids):
            out.update(zip(chunk_ids.tolist(), chunk))
        return out

    def _stored(self, name: str) -> tuple[ImageRow | None, np.ndarray | None]:
        """The row and stored vector of an indexed file that has not changed since (same size, mtime)."""
        row = self._unchanged(name)
        if row is None:
            return None, None
        return row, self._vectors([row.id]).get(row.id)

    def _unchanged(self, name: str) -> ImageRow | None:
        """The ok row of an indexed file that has not changed since (same size, mtime), else None."""
        row = self.store.catalog.row_by_path(os.path.abspath(name))
        if row is None or not row.ok:
            return None
        st = os.stat(name)
        return row if row.size == st.st_size and row.mtime_ns == st.st_mtime_ns else None

    def _search_vectors(
        self, names: list[str], vectors: np.ndarray, skips: list[set[int]], k: int, threshold: float | None
    ) -> list[QueryResult]:
        # one search for the whole chunk, deep enough to drop each query's own rows
        scores, ids = self.vector_search.search(vectors.astype(np.float32), k + max(len(s) for s in skips))
        return [self._neighbours(name, s, i, skip, k, threshold) for name, s, i, skip in zip(names, scores, ids, skips)]

    def _self_ids(self, name: str, digest: str) -> set[int]:
        """The rows that are the query itself.

        "Self" is the query's own row when the query is an indexed file; other indexed copies of it
        are real results (duplicates). A query from outside the index is "self" to every indexed
        file with the same bytes.
        """
        row = self.store.catalog.row_by_path(os.path.abspath(name))
        if row is not None and row.ok:
            return {row.id}
        return set(self.store.catalog.ok_ids_by_hash(digest))

    def _neighbours(
        self, name: str, scores: np.ndarray, ids: np.ndarray, skip: set[int], k: int, threshold: float | None
    ) -> QueryResult:
        keep = [(float(s), int(i)) for s, i in zip(scores, ids) if i >= 0 and int(i) not in skip]
        if threshold is not None:
            keep = [(s, i) for s, i in keep if s >= threshold]
        rows = self.store.catalog.rows_by_ids(i for _, i in keep)
        keep = [(s, i) for s, i in keep if self.store.searchable_row(rows.get(i))][:k]
        hits = [
            Hit(rank=r + 1, score=round(s, 6), path=rows[i].path, width=rows[i].width, height=rows[i].height, id=i)
            for r, (s, i) in enumerate(keep)
        ]
        return QueryResult(name, hits)


def query_images(
    queries: Sequence[str | os.PathLike[str]],
    index_dir: str | os.PathLike[str],
    k: int = 10,
    threshold: float | None = None,
    include_self: bool = False,
    device: str = "auto",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    search: str = "auto",
    precision: str = "auto",
    exact: bool = False,
    ids: Sequence[int] = (),
    paths: Sequence[str] = (),
) -> list[QueryResult]:
    """Nearest indexed neighbours (cosine similarity) of each query image (one-shot), then of each
    indexed row named by ``ids`` or ``paths``. ``exact``: brute force whatever the layout."""
    _check_k(k)
    if not queries and not ids and not paths:
        raise InputError("give a query image, --id or --path")
    _check_query_paths(queries)  # fail fast, before the model is built
    with Searcher(
        index_dir, device=device, max_pixels=max_pixels, search=search, precision=precision, exact=exact, queries=queries
    ) as searcher:
        results = searcher.query(queries, k=k, threshold=threshold, include_self=include_self) if queries else []
        if ids or paths:
            results += searcher.query_stored(ids, paths, k=k, threshold=threshold, include_self=include_self)
        return results
