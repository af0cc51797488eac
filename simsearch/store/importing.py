"""Adding vectors computed elsewhere to an index: the checks and the write, through the store.

Part of :mod:`simsearch.store`; :meth:`simsearch.store.IndexStore.import_vectors` is the public door.
Vectors made by another process or machine (a shard of a distributed indexing run, a benchmark's
synthetic collection) enter an index only when they were made by the index's model: their identity
(model, weights, dim, preprocessing: what :meth:`EmbeddingModel.describe` returns) must equal the
index's, or it becomes the identity of a fresh index. Each vector is L2-normalised (the index
searches by cosine); a zero or non-finite vector is refused. A path already in the index is
replaced (its row keeps its id), a new path gets a new row; commits go in chunks, like an indexing
run's batches, so a crash loses at most the chunk in flight.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .catalog import IDENTITY_KEYS, storable_path

IMPORT_CHUNK = 8192
_RECORD_KEYS = ("path", "size", "mtime_ns", "hash", "width", "height")


def check_import(records: Sequence[dict[str, Any]], vectors: np.ndarray, identity: dict[str, Any]) -> np.ndarray:
    """Each vector's L2 norm (float32), after checking shapes, identity keys and values.

    Chunk by chunk, in float32: the vectors are not copied whole (a million float16 vectors would
    take 2 GB more as float32, and as many again normalised); :func:`import_into` normalises each
    chunk as it writes it."""
    missing = [k for k in IDENTITY_KEYS if k not in identity]
    if missing:
        raise InputError(f"the vectors' identity lacks {', '.join(missing)} (model, weights, dim, preprocessing)")
    vectors = np.asanyarray(vectors)
    if vectors.ndim != 2 or len(vectors) != len(records):
        raise InputError(f"expected one vector per record: {len(records)} records, vectors of shape {vectors.shape}")
    if vectors.shape[1] != int(identity["dim"]):
        raise InputError(f"the vectors are {vectors.shape[1]}-d, their model ({identity['model']}) makes {identity['dim']}-d")
    if not (np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer)):
        raise InputError(f"the vectors are {vectors.dtype}, not numbers")
    norms = np.empty(len(vectors), np.float32)
    for start in range(0, len(vectors), IMPORT_CHUNK):
        norms[start : start + IMPORT_CHUNK] = np.linalg.norm(
            np.asarray(vectors[start : start + IMPORT_CHUNK], dtype=np.float32), axis=1
        )
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise InputError("some vectors are zero or not finite")
    for r in records:
        if not r.get("path"):
            raise InputError("every record needs a path")
    return norms


def import_into(store: Any, records: Sequence[dict[str, Any]], vectors: np.ndarray, identity: dict[str, Any]) -> list[int]:
    """Add (or replace by path) these rows and vectors; returns their ids. See the module's docstring."""
    norms = check_import(records, vectors, identity)
    if store.catalog.identity() is None:
        store.ensure_identity(dict(identity))
    else:
        store.check_model(identity)
    if store.ann is None:
        store._require_ann()
    has_rows = sum(store.catalog.counts().values()) > 0
    ids: list[int] = []
    for start in range(0, len(records), IMPORT_CHUNK):
        part = [
            dict({k: r.get(k) for k in _RECORD_KEYS}, path=storable_path(str(r["path"])), status="ok", error=None)
            for r in records[start : start + IMPORT_CHUNK]
        ]
        replacing = [store.catalog.row_by_path(r["path"]) for r in part] if has_rows else [None] * len(part)
        end = start + len(part)
        unit = np.asarray(vectors[start:end], dtype=np.float32) / norms[start:end, None]
        ids += store.commit(part, unit, replacing)
    return ids
