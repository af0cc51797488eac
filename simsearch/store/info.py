"""A read-only summary of an index directory (what ``simsearch info`` shows)."""

from __future__ import annotations

import os
from typing import Any

from .index_store import IndexStore


def index_info(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Location, model, dim, counts, size on disk, last update and last clustering of an index."""
    with IndexStore.open(index_dir) as store:
        meta = store.meta
        counts = store.catalog.counts()
        found = store.check()
        clustering = meta.get("clustering")
        return {
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
            "faiss_vectors": len(store.ann) if store.ann is not None else 0,
            "consistent": found.ok,
            "size_bytes": store.size_on_disk(),
            "created_at": meta.get("created_at"),
            "updated_at": meta.get("updated_at"),
            "roots": meta.get("roots", []),
            "last_clustering": clustering,
            "ann_layout": meta.get("ann_layout"),  # layout, factory, tuned parameters, measured recall@10
        }
