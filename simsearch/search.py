"""The query layer: embed example images with the index's own model, search, join metadata."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InputError
from .images import DEFAULT_MAX_PIXELS, content_hash, not_regular_reason, read_bytes
from .store import IndexStore

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
    from .embed import Embedder
    from .models import create_model

    meta = store.meta
    model = create_model(meta["model"], meta.get("weights_source", "imagenet"), seed=int(meta.get("seed", 0)))
    store.check_model(model.describe(), reloading=True)
    # queries are decoded on the CPU (CropDecoder): a query process never initialises nvJPEG
    return Embedder(
        model, device=device, batch_size=batch_size, workers=0, precision=precision, decode="cpu", max_pixels=max_pixels
    )


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
    """An open index and its model, ready for many queries (the model is built once).

    ``query_images`` makes one per call; a long-lived caller (a service, a notebook, a benchmark)
    keeps one and pays the model's start-up once.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike[str],
        device: str = "auto",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        search: str = "auto",
        precision: str = "auto",
    ) -> None:
        """``device``, ``precision``: where and how the model runs (see :class:`simsearch.embed.Embedder`).

        ``search``: ``auto`` searches a flat index exactly on the model's GPU when there is one,
        ``faiss`` always uses FAISS on the CPU, ``torch`` searches on the model's device (see
        :func:`simsearch.embed.device_search.open_search`).
        """
        from .embed.device_search import open_search

        # Readers use the last saved FAISS file as it is (no consistency scan: a writer may be
        # running); hits on rows changed or deleted since that save are dropped (_neighbours).
        self.store = IndexStore.open(index_dir)
        try:
            self.ann = self.store.require_vectors()
            self.max_pixels = max_pixels
            self.embedder = load_index_model(self.store, device=device, precision=precision, max_pixels=max_pixels)
            # the one decode path, drafting big JPEGs to the model's resize size
            self.decoder = self.embedder.crop_decoder
            self.vector_search = open_search(self.ann, self.embedder.device, search)
        except BaseException:
            self.store.close()
            raise

    def close(self) -> None:
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
        if k < 1:
            raise InputError("--top-k must be at least 1")
        _check_query_paths(queries)
        results: list[QueryResult] = []
        for start in range(0, len(queries), QUERY_CHUNK):  # bounded memory for a long list of queries
            chunk = [str(q) for q in queries[start : start + QUERY_CHUNK]]
            crops, skips = [], []
            for name in chunk:
                data = read_bytes(name)
                crops.append(self.decoder.decode(data, name)[0])
                skips.append(set() if include_self else self._self_ids(name, content_hash(data)))
            vectors = self.embedder.embed_crops(crops)
            # one search for the whole chunk, deep enough to drop each query's own rows
            scores, ids = self.vector_search.search(vectors, k + max(len(s) for s in skips))
            results.extend(
                self._neighbours(name, s, i, skip, k, threshold) for name, s, i, skip in zip(chunk, scores, ids, skips)
            )
        return results

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
) -> list[QueryResult]:
    """Nearest indexed neighbours (cosine similarity) of each query image (one-shot)."""
    if k < 1:
        raise InputError("--top-k must be at least 1")
    _check_query_paths(queries)  # fail fast, before the model is built
    with Searcher(index_dir, device=device, max_pixels=max_pixels, search=search, precision=precision) as searcher:
        return searcher.query(queries, k=k, threshold=threshold, include_self=include_self)
