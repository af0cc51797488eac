"""The query layer: embed example images with the index's own model, search, join metadata."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .catalog import IDENTITY_KEYS
from .errors import IndexMismatchError, InputError
from .images import DEFAULT_MAX_PIXELS, content_hash, decode_image, read_bytes
from .store import IndexStore, describe_identity

log = logging.getLogger(__name__)


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


def load_index_model(store: IndexStore, device: str = "auto", batch_size: int | None = None) -> Any:
    """Recreate the model an index was built with and check it still is that model."""
    from .embed import Embedder
    from .models import create_model

    meta = store.meta
    stored = {k: meta.get(k) for k in IDENTITY_KEYS}
    model = create_model(meta["model"], meta.get("weights_source", "imagenet"), seed=int(meta.get("seed", 0)))
    current = {k: model.describe()[k] for k in IDENTITY_KEYS}
    if current != stored:
        raise IndexMismatchError(
            f"the index at {store.path} was built with {describe_identity(stored)}, but its weights now load "
            f"as {describe_identity(current)} (was the weights file changed?); rebuild with --rebuild"
        )
    return Embedder(model, device=device, batch_size=batch_size, workers=0)


def query_images(
    queries: Sequence[str | os.PathLike[str]],
    index_dir: str | os.PathLike[str],
    k: int = 10,
    threshold: float | None = None,
    include_self: bool = False,
    device: str = "auto",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[QueryResult]:
    """Nearest indexed neighbours (cosine similarity) of each query image."""
    if k < 1:
        raise InputError("--top-k must be at least 1")
    with IndexStore.open(index_dir) as store:
        ann = store.require_vectors()
        store.require_consistent()
        images, digests, names = [], [], []
        for q in queries:
            path = Path(q)
            if path.is_dir():
                raise InputError(f"query image {q} is a folder; give image files")
            if not path.is_file():
                raise InputError(f"query image not found: {q}")
            data = read_bytes(path)
            draft = store.meta["preprocessing"]["resize_size"]
            images.append(decode_image(data, str(q), max_pixels=max_pixels, draft_size=draft))
            digests.append(content_hash(data))
            names.append(str(q))
        embedder = load_index_model(store, device=device)
        vectors = embedder.embed_images(images)
        results = []
        for name, digest, vector in zip(names, digests, vectors):
            skip: set[int] = set()
            if not include_self:
                # "Self" is the query's own row when the query is an indexed file; other indexed
                # copies of it are real results (duplicates). A query from outside the index is
                # "self" to every indexed file with the same bytes.
                row = store.catalog.row_by_path(os.path.abspath(name))
                if row is not None and row.ok:
                    skip.add(row.id)
                else:
                    skip.update(store.catalog.ok_ids_by_hash(digest))
            scores, ids = ann.search(vector[None, :], k + len(skip))
            keep = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0 and int(i) not in skip]
            if threshold is not None:
                keep = [(s, i) for s, i in keep if s >= threshold]
            keep = keep[:k]
            rows = store.catalog.rows_by_ids(i for _, i in keep)
            hits = [
                Hit(rank=r + 1, score=round(s, 6), path=rows[i].path, width=rows[i].width, height=rows[i].height, id=i)
                for r, (s, i) in enumerate(keep)
            ]
            results.append(QueryResult(name, hits))
        return results


def search_vectors(store: IndexStore, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw (scores, ids) search, for callers that already hold query vectors."""
    return store.require_vectors().search(vectors, k)
