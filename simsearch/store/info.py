"""A read-only summary of an index directory (what ``simsearch info`` shows).

Cheap by default: it reads the description and counts rows, never the vectors or the FAISS file
(whose vector count the last save recorded). ``check=True`` adds the full verification: FAISS
against the catalog, every checksum, and SQLite's integrity check.
"""

from __future__ import annotations

import os
from typing import Any

from .index_store import IndexStore


def index_info(index_dir: str | os.PathLike[str], check: bool = False) -> dict[str, Any]:
    """Location, model, dim, counts, size on disk, last update and last clustering of an index.

    ``searchable``: the vectors the last saved FAISS file holds (what a query searches now);
    ``consistent``: nothing committed since that save, and the file is the size it was saved at.
    ``check``: also verify everything (``check`` in the result: what is wrong, if anything).
    """
    with IndexStore.open(index_dir) as store:
        meta = store.meta
        counts = store.catalog.counts()
        saved = store.saved or {}
        clustering = meta.get("clustering")
        faiss_size = store.ann_path.stat().st_size if store.ann_path.exists() else None
        if saved:
            faiss_vectors = int(saved.get("ntotal", 0))
            consistent = not store.catalog.has_pending() and faiss_size == saved.get("size")
        else:  # never saved with checksums (nothing indexed yet): look at the file itself
            faiss_vectors = len(store.ann) if store.ann is not None else 0
            consistent = not store.catalog.has_pending() and (counts["ok"] == 0 or faiss_size is not None)
        data = {
            "index": str(store.path.resolve()),
            "schema_version": meta.get("schema_version"),
            "model": meta.get("model"),
            "weights": meta.get("weights"),
            "dim": meta.get("dim"),
            "preprocessing": meta.get("preprocessing"),
            "faiss_factory": meta.get("faiss_factory"),
            "precisions": meta.get("precisions", []),
            "indexed": counts["ok"],
            "failed": counts["failed"],
            "faiss_vectors": faiss_vectors,
            "searchable": faiss_vectors,
            "consistent": consistent,
            "generation": store.catalog.generation,
            "saved_generation": store.saved_generation,
            "read_only": store.readonly,
            "vector_dtype": "float16",
            "size_bytes": store.size_on_disk(),
            "created_at": meta.get("created_at"),
            "updated_at": meta.get("updated_at"),
            "roots": meta.get("roots", []),
            "shard": meta.get("shard"),  # "I/N" when the last index run took part I of N of the files
            "last_clustering": clustering,
            "ann_layout": meta.get("ann_layout"),  # layout, factory, tuned parameters, measured recall@10
        }
        if check:
            found = store.check(verify_vectors=True, verify_catalog=True)
            data["check"] = found.to_dict()
            data["consistent"] = found.ok
        return data
