"""Storage, layer 1: an index directory's SQLite catalog, vector file and FAISS index behind one door.

:class:`IndexStore` is the only code that writes any of them; everything above it (indexing,
search, clustering, the command line) plans and reads, and asks the store to write. Modules:
``catalog`` (SQLite metadata rows, description, clusters), ``vector_file`` (the exact vectors,
float16 by slot, memory-mapped), ``vector_index`` (the FAISS wrapper), ``index_store`` (the three
kept in agreement, generations and checksums, crash repair, migration, the write lock),
``location`` (the default index directory) and ``info`` (the summary ``simsearch info`` shows);
``layouts`` (the FAISS layout: chosen, built from the stored vectors, tuned, switched),
``tombstones`` (deletes for HNSW), ``exact`` (chunked brute force), ``importing`` (vectors computed
elsewhere) and ``thumbnails`` (the HTML pages' cached pictures). Torch-free.
"""

from __future__ import annotations

from .catalog import (
    CATALOG_FILE,
    IDENTITY_KEYS,
    SCHEMA_VERSION,
    Catalog,
    Clustering,
    ImageRow,
    display_path,
    real_path,
    storable_path,
    utc_now,
)
from .index_store import LOCK_FILE, Consistency, IndexStore, describe_identity, storage_errors
from .info import index_info
from .location import DEFAULT_INDEX_DIR, INDEX_ENV_VAR, default_index_dir
from .vector_file import VECTOR_FILE, VectorFile
from .vector_index import DEFAULT_FACTORY, FAISS_FILE, VectorIndex, clamp_k, write_atomic

__all__ = [
    "CATALOG_FILE",
    "DEFAULT_FACTORY",
    "DEFAULT_INDEX_DIR",
    "FAISS_FILE",
    "IDENTITY_KEYS",
    "INDEX_ENV_VAR",
    "LOCK_FILE",
    "SCHEMA_VERSION",
    "Catalog",
    "Clustering",
    "Consistency",
    "ImageRow",
    "IndexStore",
    "VECTOR_FILE",
    "VectorFile",
    "VectorIndex",
    "clamp_k",
    "default_index_dir",
    "describe_identity",
    "index_info",
    "storable_path",
    "real_path",
    "display_path",
    "storage_errors",
    "utc_now",
    "write_atomic",
]
