"""The warm state behind ``simsearch serve``: one index's model, vectors and catalog, shared by threads.

What it owns and why:

- **The model, built once** (on the first upload query) and run on one thread of its own
  (:mod:`simsearch.serve.batching`): uploads are decoded in the request threads side by side, and
  the crops waiting when the model is free go through it as one batch. One forward pass at a time
  keeps torch's threads from fighting each other (what a lock around the model gave), and a batch
  costs far less per image than one pass each. ``model_batch=1`` is one image per pass.
- **Searches batched across requests** (the same module): the vector searches of
  concurrent queries run as one call on one search thread, so many clients share each pass
  over the vectors; a query by indexed id never waits for the model or a thread of the pool.
- **A flat index searched through a float16 copy** (``vector_search="auto"``): the loaded vectors are
  packed on a thread of their own (:mod:`simsearch.serve.packing`) for the exact float16 search
  of :mod:`simsearch.embed.half_search`, about twice as fast as FAISS's for the few queries of a
  server's batch; FAISS searches until the copy is ready, and for other layouts, collections over
  :data:`~simsearch.serve.packing.PACK_LIMIT_BYTES` or CPUs without FBGEMM.
- **The vectors, reloaded when a writer saves.** Each request stats the FAISS file (inode, mtime,
  size; the writer always replaces it by an atomic rename). When that changed, the file is loaded
  again and swapped in as a whole: a request uses one loaded index from start to end, so it never
  sees a half-written state. Rows a writer deleted after the last save are dropped from results.
  No vectors file (an index being built or rebuilt) is a :class:`Unavailable` error (HTTP 503).
- **SQLite connections per thread** (sqlite3 connections must stay in the thread that made them):
  the event loop's thread (queries by id run there, see :meth:`ServeIndex.query_id_async`), each
  thread of the web framework's pool and the search thread get their own read connection.
- **What a thread read of the catalog, kept while nothing was committed since**: each request
  asks its connection's ``PRAGMA data_version`` (it changes when any other connection commits);
  while it holds, the FAISS file's name, what the last save recorded (``faiss_saved``) and the
  rows (with their vector slots) already read are used again, and a query by id needs one
  statement for its own row besides that. A commit anywhere drops them all (:class:`CatalogView`).
- **Which files may be read**: only a catalog row's own file, found by row id, lexically under a
  root the index recorded, a regular file whose bytes still hash to the catalog's hash. A client
  never names a file to open; a path given in a query is only a key looked up in the catalog.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simsearch.errors import ImageError, InputError, SimsearchError
from simsearch.images import DEFAULT_MAX_PIXELS, content_hash, is_under
from simsearch.store import IndexStore, index_info
from simsearch.store.catalog import identity_of
from simsearch.store.index_store import searchable
from simsearch.store.layouts import LayoutSearch, open_layout_search
from simsearch.store.thumbnails import thumbnail_of

from .batching import MAX_BATCH, Batcher
from .packing import PACK_LIMIT_BYTES, LatestPacker

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
THUMBNAIL_CACHE = 4096  # thumbnails kept in memory (about 10 kB each at 256 px)
ROW_CACHE = 16384  # catalog rows a thread keeps between commits (about 0.5 kB each)
MAX_K = 1000
SEARCH_CHOICES = ("auto", "faiss")


class NotFound(SimsearchError):
    """No indexed image (or cluster) answers to that id or path (HTTP 404)."""


class TooLarge(SimsearchError):
    """An upload over the size limit (HTTP 413)."""


class Unavailable(SimsearchError):
    """The index has no usable vectors right now, e.g. while it is being rebuilt (HTTP 503)."""


@dataclass(frozen=True)
class Snapshot:
    """One loaded state of the vectors; replaced as a whole, never changed in place."""

    key: tuple[int, int, int]  # (inode, mtime_ns, size) of the FAISS file it was loaded from
    generation: int
    ann: Any  # a simsearch VectorIndex
    meta: dict[str, Any]
    search: Any = None  # what to search it with: the index itself, or a LayoutSearch (tombstones, re-ranking)

    @property
    def saved_generation(self) -> int | None:
        """The catalog generation the loaded FAISS file was saved at, as recorded with it."""
        saved = self.meta.get("faiss_saved")
        return int(saved["generation"]) if saved else None

    @property
    def identity(self) -> dict[str, Any]:
        return identity_of(self.meta)

    @property
    def saved(self) -> Any:
        """What the catalog recorded of the FAISS save this was loaded after (``faiss_saved``)."""
        return self.meta.get("faiss_saved")


@dataclass
class CatalogView:
    """What one thread read of the catalog at one ``data_version`` of its connection: valid until
    another connection commits (then it is dropped as a whole, never patched)."""

    version: int
    ann_path: Path  # the FAISS file the index records (a layout rebuild switches to a new name)
    saved: Any  # faiss_saved: changes with every FAISS save, even one that reuses the file's inode
    rows: dict[int, tuple[Any, int | None]]  # id -> (ImageRow, vector slot), as read at this version


class ServeIndex:
    """An index held open for many concurrent requests."""

    def __init__(
        self,
        index_dir: str | os.PathLike[str],
        device: str = "auto",
        precision: str = "auto",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        model_batch: int = 8,
        vector_search: str = "auto",
        pack_limit: int = PACK_LIMIT_BYTES,
    ) -> None:
        """``vector_search``: ``auto`` searches a flat index through a packed float16 copy of its vectors
        once it is ready (exact; see the module's text), ``faiss`` with FAISS alone. ``pack_limit``:
        the largest such copy, in bytes."""
        if model_batch < 1:
            raise InputError("the model batch must be at least 1")
        if vector_search not in SEARCH_CHOICES:
            raise InputError(f"unknown vector search {vector_search!r}; use {' or '.join(SEARCH_CHOICES)}")
        self.vector_search = vector_search
        self.pack_limit = pack_limit
        self._why_faiss: str | None = None  # why the loaded vectors are not packed (info)
        self.path = Path(index_dir)
        self.device = device
        self.precision = precision
        self.max_pixels = max_pixels
        self.max_upload_bytes = max_upload_bytes
        with IndexStore.open(self.path):  # no index at all: fail now, not on the first request
            pass
        self._local = threading.local()
        self._stores: list[IndexStore] = []
        self._stores_lock = threading.Lock()  # not _swap_lock: a reload (holding that) opens its thread's store
        self._swap_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._generation = 0
        self._embedder: Any = None
        self._embedder_identity: dict[str, Any] | None = None
        self._thumbs: OrderedDict[tuple[int, str, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._dups: dict[tuple[Any, ...], dict[str, Any]] = {}  # the groups of the last state asked for
        self._dups_lock = threading.Lock()
        self.searches = Batcher(self._search_group, "search", max_batch=MAX_BATCH, on_start=_one_openmp_thread)
        self.model_runs = Batcher(self._embed_group, "model", max_batch=model_batch)
        self.packer = LatestPacker(_pack)

    def close(self) -> None:
        self.packer.close()
        self.model_runs.close()
        self.searches.close()
        for store in self._stores:
            try:
                store.close()
            except Exception:  # a connection made in another thread; the process is ending anyway
                pass
        self._stores.clear()

    # -- shared state ----------------------------------------------------------------------
    @property
    def store(self) -> IndexStore:
        """This thread's read-side handle on the index (catalog rows and stored vectors)."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = IndexStore.open(self.path)
            self._local.store = store
            with self._stores_lock:
                self._stores.append(store)
        return store

    @property
    def catalog(self) -> Any:
        """This thread's read connection to the catalog."""
        return self.store.catalog

    def view(self) -> CatalogView:
        """This thread's :class:`CatalogView`, read again when another connection has committed
        since (one ``PRAGMA data_version`` when nothing changed)."""
        catalog = self.catalog
        version = catalog.data_version()
        view = getattr(self._local, "view", None)
        if view is None or view.version != version:
            # read after the version: whatever they show is at least that new
            view = CatalogView(version, self.store.ann_path, catalog.meta_value("faiss_saved"), {})
            self._local.view = view
        return view

    @property
    def ann_path(self) -> Path:
        """The FAISS file the index records now (its name changes when a writer rebuilds the layout)."""
        return self.view().ann_path

    def _file_key(self, view: CatalogView | None = None) -> tuple[int, int, int] | None:
        try:
            # the current layout's file: a layout rebuild switches to a new one
            st = os.stat((view or self.view()).ann_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current_snapshot(self, view: CatalogView | None = None) -> Snapshot | None:
        """The loaded vectors if the file is still the one they came from and the catalog records
        no save since, else None (cheap: a stat and, unless something was committed, one pragma,
        so it may run on the event loop; loading is :meth:`snapshot`'s job).

        Why both: a save renames a new file over the old one, and may get the old one's inode
        back with the same size and a timestamp within the clock's tick; and a load that falls
        between the rename and the commit recording it holds an older ``faiss_saved`` (hiding the
        rows changed since it) until the next save. The recorded save tells both apart."""
        snap = self._snapshot
        if snap is None:
            return None
        view = view or self.view()
        return snap if snap.saved == view.saved and snap.key == self._file_key(view) else None

    def snapshot(self) -> Snapshot:
        """The vectors as last saved by a writer (loaded again when the file changed)."""
        snap = self.current_snapshot()
        if snap is not None:
            return snap
        with self._swap_lock:
            view = self.view()
            key = self._file_key(view)  # stat before loading: what is loaded is at least this new
            snap = self._snapshot
            if snap is not None and snap.key == key and snap.saved == view.saved:
                return snap
            if key is None:
                raise Unavailable(f"the index at {self.path} has no vectors file yet (being built or rebuilt); try again shortly")
            try:
                with IndexStore.open(self.path, map_faiss=True) as store:  # a read-only map: no full read
                    meta, ann = store.meta, store.ann
                    search = open_layout_search(store) if ann is not None and len(ann) else None
            except SimsearchError as exc:
                raise Unavailable(f"the index at {self.path} cannot be read right now: {exc}") from exc
            if ann is None or len(ann) == 0:
                raise Unavailable(f"the index at {self.path} holds no vectors yet; try again when indexing has saved")
            self._generation += 1
            snap = Snapshot(key, self._generation, ann, meta, search)
            if self._snapshot is not None:
                log.info("index %s changed on disk: loaded %d vectors (generation %d)", self.path, len(ann), snap.generation)
            self._snapshot = snap
            self._pack_later(snap)
            return snap

    def _pack_later(self, snap: Snapshot) -> None:
        """Have the packer make the float16 copy of ``snap``'s vectors, when they are to have one."""
        size = 2 * len(snap.ann) * snap.ann.dim  # float16
        if self.vector_search != "auto":
            self._why_faiss = "asked for (--search faiss)"
        elif snap.search is not snap.ann:
            self._why_faiss = f"the layout ({snap.ann.factory}) is not flat"
        elif size > self.pack_limit:
            self._why_faiss = f"a float16 copy would take {size / 2**20:,.0f} MiB, over the limit of {self.pack_limit / 2**20:,.0f} MiB"
        else:
            self._why_faiss = None
            self.packer.want(snap)
            return
        self.packer.clear()

    def _embedder_for(self, snap: Snapshot) -> Any:
        """The index's model, built on first use (and again only if the index was rebuilt with another)."""
        if self._embedder is not None and self._embedder_identity == snap.identity:
            return self._embedder
        from simsearch.search import load_index_model

        with IndexStore.open(self.path) as store:
            if store.catalog.identity() != snap.identity:
                raise Unavailable(f"the index at {self.path} is being rebuilt with another model; try again shortly")
            self._embedder = load_index_model(
                store, device=self.device, precision=self.precision, max_pixels=self.max_pixels
            )
        self._embedder_identity = snap.identity
        return self._embedder

    def warm_up(self) -> None:
        """Load the vectors and build the model now rather than on the first request."""
        snap = self.snapshot()
        with self._model_lock:
            self._embedder_for(snap)

    # -- queries ---------------------------------------------------------------------------
    def query_upload(
        self, data: bytes, name: str = "upload", k: int = 10, threshold: float | None = None, include_self: bool = False
    ) -> dict[str, Any]:
        """Neighbours of an uploaded image (its own indexed copies excluded unless ``include_self``)."""
        _check_k(k)
        if len(data) > self.max_upload_bytes:
            raise TooLarge(f"the upload is {len(data):,} bytes, over the limit of {self.max_upload_bytes:,}")
        if not data:
            raise ImageError("the upload is empty (0 bytes)")
        snap = self.snapshot()
        with self._model_lock:  # builds the model once; the forward passes are the model thread's
            embedder = self._embedder_for(snap)
        crop, _ = embedder.crop_decoder.decode(data, name)  # the one decode-to-crop path, as indexing and queries
        vector = self.model_runs.submit(embedder, crop).result()
        skip = set() if include_self else set(self.catalog.ok_ids_by_hash(content_hash(data)))
        return {"query": {"upload": name}, "results": self._search(snap, vector, k, threshold, skip)}

    def query_id(self, image_id: int, k: int = 10, threshold: float | None = None, include_self: bool = False) -> dict[str, Any]:
        """Neighbours of an indexed image, from its stored vector (no decoding, no model)."""
        _check_k(k)
        snap = self.snapshot()
        view = self.view()
        row, vector, skip = self._query_of(image_id, include_self, view)
        return {"query": _row_dict(row), "results": self._search(snap, vector, k, threshold, skip, view)}

    async def query_id_async(
        self, image_id: int, k: int = 10, threshold: float | None = None, include_self: bool = False
    ) -> dict[str, Any]:
        """:meth:`query_id` for the event loop: the catalog reads run inline (each well under a
        millisecond), the search is awaited on the search thread, and only a (re)load of the
        vectors goes to a worker thread. No hop through the thread pool for a warm query."""
        _check_k(k)
        view = self.view()  # one look at the catalog for the whole request
        snap = self.current_snapshot(view)
        if snap is None:
            snap = await asyncio.to_thread(self.snapshot)
            view = self.view()
        row, vector, skip = self._query_of(image_id, include_self, view)
        steps = self._search_steps(snap, k, threshold, skip, view)
        depth = next(steps)
        while True:
            found = await asyncio.wrap_future(self.searches.submit(snap, vector, key=depth))
            try:
                depth = steps.send(found)
            except StopIteration as done:
                return {"query": _row_dict(row), "results": done.value}

    def query_path(self, path: str, k: int = 10, threshold: float | None = None, include_self: bool = False) -> dict[str, Any]:
        """Neighbours of the indexed image stored under ``path`` (a catalog key, never opened)."""
        return self.query_id(self.row_by_path(path).id, k=k, threshold=threshold, include_self=include_self)

    async def query_path_async(
        self, path: str, k: int = 10, threshold: float | None = None, include_self: bool = False
    ) -> dict[str, Any]:
        return await self.query_id_async(self.row_by_path(path).id, k=k, threshold=threshold, include_self=include_self)

    def _query_of(
        self, image_id: int, include_self: bool, view: CatalogView | None = None
    ) -> tuple[Any, np.ndarray, set[int]]:
        """(row, stored vector, ids to leave out) of an indexed image used as a query."""
        row, slot = self._row_and_slot(image_id, view)
        vectors = self.store.vectors
        if slot is None or vectors is None:
            raise NotFound(f"image {image_id} has no stored vector")
        # a slot an ok row holds is never written while it does (a new vector goes to a free slot)
        return row, vectors.read(np.array([slot], dtype=np.int64))[0], (set() if include_self else {row.id})

    def rows(self, ids: Any, view: CatalogView | None = None) -> dict[int, tuple[Any, int | None]]:
        """(row, vector slot) of each of ``ids`` that has a row: from this thread's view (``view``:
        one the request already took), the ones it does not hold yet read in one statement (and
        kept until the next commit)."""
        cached = (view or self.view()).rows
        out: dict[int, tuple[Any, int | None]] = {}
        missing = []
        for i in ids:
            found = cached.get(i)
            if found is None:
                missing.append(i)
            else:
                out[i] = found
        if missing:
            read = self.catalog.rows_and_slots(missing)
            out.update(read)
            if len(cached) + len(read) > ROW_CACHE:
                cached.clear()  # bounded; the next requests read again what they need
            cached.update(read)
        return out

    def _row_and_slot(self, image_id: int, view: CatalogView | None = None) -> tuple[Any, int | None]:
        found = self.rows((image_id,), view).get(image_id)
        if found is None or not found[0].ok:
            raise NotFound(f"no indexed image with id {image_id}")
        return found

    def _search(
        self, snap: Snapshot, vector: np.ndarray, k: int, threshold: float | None, skip: set[int],
        view: CatalogView | None = None,
    ) -> list[dict[str, Any]]:
        """Results of one query vector, waiting in this thread for the batched searches it needs."""
        steps = self._search_steps(snap, k, threshold, skip, view)
        depth = next(steps)
        while True:
            found = self.searches.submit(snap, vector, key=depth).result()
            try:
                depth = steps.send(found)
            except StopIteration as done:
                return done.value

    def _search_steps(
        self, snap: Snapshot, k: int, threshold: float | None, skip: set[int], view: CatalogView | None = None
    ) -> Generator[int, tuple[np.ndarray, np.ndarray], list[dict[str, Any]]]:
        """The search of one query as steps: yields the depth to search to, is sent that search's
        (scores, ids), and returns the results; it asks for more depth only when hits were left
        out (the query itself, rows deleted or changed since the save, a threshold) and fewer
        than ``k`` remain. Whoever drives it runs the searches (waiting in a thread, or awaiting).
        ``view``: the catalog as the request found it (rows then, as the snapshot it searches)."""
        total = len(snap.search)
        depth = k + len(skip)
        while True:
            scores, ids = yield depth
            found = [(float(s), int(i)) for s, i in zip(scores[0].tolist(), ids[0].tolist()) if i >= 0 and i not in skip]
            rows = {i: r for i, (r, _) in self.rows([i for _, i in found], view).items()}
            # a row the writer deleted, marked failed or changed since the vectors were saved is not a result
            found = [(s, i) for s, i in found if searchable(rows.get(i), snap.saved_generation)]
            if threshold is not None:
                found = [(s, i) for s, i in found if s >= threshold]
            short = len(found) < k and (threshold is None or (len(scores[0]) and scores[0][-1] >= threshold))
            if not short or depth >= total:
                break
            depth = min(total, depth * 2)
        return [dict(_row_dict(rows[i]), rank=r + 1, score=round(s, 6)) for r, (s, i) in enumerate(found[:k])]

    def _search_group(self, snap: Snapshot, depth: Any, vectors: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One search of the query vectors waiting for ``snap`` at ``depth`` (on the search
        thread; see :class:`Batcher`): through the packed float16 copy when it is ready, else
        FAISS; each query's (scores, ids), of shape (1, depth)."""
        queries = np.ascontiguousarray(np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in vectors]))
        packed = self.packer.get(snap)
        if packed is not None:
            scores, ids = packed.search(queries, int(depth))
        elif isinstance(snap.search, LayoutSearch):  # re-ranks from this thread's stored vectors
            scores, ids = snap.search.search(queries, int(depth), store=self.store)
        else:
            scores, ids = snap.search.search(queries, int(depth))
        return [(scores[r : r + 1], ids[r : r + 1]) for r in range(len(vectors))]

    def _embed_group(self, embedder: Any, _key: Any, crops: list[Any]) -> list[np.ndarray]:
        """One forward pass over the crops of the uploads waiting (on the model thread)."""
        vectors = embedder.embed_crops(crops)
        return [vectors[r : r + 1] for r in range(len(crops))]

    # -- images ----------------------------------------------------------------------------
    def row(self, image_id: int) -> Any:
        return self._row_and_slot(image_id)[0]

    def row_by_path(self, path: str) -> Any:
        if "\x00" in path:
            raise InputError("the path holds a NUL character")
        if not os.path.isabs(path):
            raise InputError(f"give the absolute path of an indexed image (as stored in the index), not {path!r}")
        if ".." in Path(path).parts:
            raise InputError("the path may not hold '..'")
        row = self.catalog.row_by_path(path)
        if row is None or not row.ok:
            raise NotFound(f"no indexed image at {path}")
        return row

    def image(self, image_id: int) -> dict[str, Any]:
        row = self.row(image_id)
        out = _row_dict(row)
        out.update(size=row.size, hash=row.hash, cluster=self._cluster_of(row.id))
        return out

    def _cluster_of(self, image_id: int) -> int | None:
        found = self.catalog.db.execute("SELECT cluster FROM cluster_members WHERE image_id = ?", [image_id]).fetchone()
        return None if found is None else int(found[0])

    def original(self, image_id: int) -> tuple[Any, bytes]:
        """(row, bytes) of an indexed image's file, only if it still holds the bytes that were indexed."""
        row = self.row(image_id)
        roots = self.catalog.get_meta().get("roots") or []
        if roots and not any(is_under(row.path, r) for r in roots):
            raise NotFound(f"image {image_id} is not under a folder of this index")
        gone = NotFound(f"the file of image {image_id} is gone or has changed since it was indexed")
        try:
            if not os.path.isfile(row.path):  # a FIFO or device would block or never end
                raise gone
            with open(row.path, "rb") as f:
                data = f.read((row.size or 0) + 1)
        except OSError:
            raise gone from None
        if len(data) != row.size or content_hash(data) != row.hash:
            raise gone
        return row, data

    def thumbnail(self, image_id: int, size: int = 256) -> bytes:
        """A JPEG at most ``size`` pixels on its longer side (cached)."""
        row = self.row(image_id)
        key = (row.id, row.hash or "", size)
        with self._thumbs_lock:
            cached = self._thumbs.get(key)
            if cached is not None:
                self._thumbs.move_to_end(key)
                return cached
        _, data = self.original(image_id)  # only a file recorded in the index, still as indexed
        out = thumbnail_of(data, f"image {image_id}", size, max_pixels=self.max_pixels)
        with self._thumbs_lock:
            self._thumbs[key] = out
            while len(self._thumbs) > THUMBNAIL_CACHE:
                self._thumbs.popitem(last=False)
        return out

    # -- clusters and info -----------------------------------------------------------------
    def clusters(self, representatives: int = 4) -> dict[str, Any]:
        catalog = self.catalog
        info = catalog.get_meta().get("clustering")
        if not info:
            raise NotFound(f"the index at {self.path} has not been clustered yet (run simsearch cluster -k N)")
        clusters = []
        for c, size in catalog.cluster_sizes().items():
            reps = catalog.cluster_members(c, limit=representatives) if representatives else []
            clusters.append(
                {"cluster": c, "size": size, "representatives": [dict(_row_dict(r), distance=round(d, 6)) for r, d in reps]}
            )
        clusters.sort(key=lambda c: (-c["size"], c["cluster"]))
        return {"clustering": info, "clusters": clusters}

    def cluster_members(self, cluster: int, offset: int = 0, limit: int = 60) -> dict[str, Any]:
        sizes = self.catalog.cluster_sizes()
        if cluster not in sizes:
            raise NotFound(f"no cluster {cluster}" + (f"; clusters are numbered 0 to {max(sizes)}" if sizes else " (not clustered yet)"))
        members = self.catalog.cluster_members(cluster, limit=offset + limit)[offset:]
        return {
            "cluster": cluster,
            "size": sizes[cluster],
            "offset": offset,
            "limit": limit,
            "members": [dict(_row_dict(r), distance=round(d, 6)) for r, d in members],
        }

    # -- labels and duplicates ----------------------------------------------------------------
    def labels(self) -> dict[str, Any]:
        """Every class with its given and predicted counts (as ``simsearch labels``) and one image to show it by."""
        from simsearch.labels import list_labels

        listing = list_labels(self.path).to_dict()
        examples = self.catalog.label_examples()
        for c in listing["classes"]:
            c["example"] = examples.get(c["label"])  # None: every image of the class was deleted meanwhile
        return listing

    def label_members(self, label: str, source: str | None = None, offset: int = 0, limit: int = 60) -> dict[str, Any]:
        """One page of the images carrying ``label`` (given first, then predictions by confidence)."""
        if source not in (None, "given", "predicted"):
            raise InputError(f"source must be given or predicted, not {source!r}")
        total, members = self.catalog.label_members(label, source, limit=limit, offset=offset)
        if total == 0 and offset == 0:
            raise NotFound(f"no indexed image is labelled {label!r}" + (f" ({source})" if source else ""))
        return {
            "label": label,
            "source": source,
            "total": total,
            "offset": offset,
            "limit": limit,
            "members": [
                dict(_row_dict(r), source=src, confidence=None if conf is None else round(float(conf), 6))
                for r, src, conf in members
            ],
        }

    def duplicates(self, threshold: float | None = None, offset: int = 0, limit: int = 20) -> dict[str, Any]:
        """Groups of near-duplicates as ``simsearch duplicates`` finds them (read-only: nothing is moved).

        The threshold is the one ``simsearch duplicates`` calibrated and recorded for this model,
        unless given; the server never calibrates (that embeds a sample of edited images) and does
        not verify candidate pairs with local features (``--verify off``). Groups are found once
        per saved state of the vectors and threshold, then served from memory, page by page."""
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise InputError("threshold must be a cosine similarity between -1 and 1")
        snap = self.snapshot()
        source = "given"
        if threshold is None:
            threshold, source = self._recorded_duplicates_threshold(), "calibrated"
        key = (snap.key, self.catalog.generation, round(float(threshold), 6))
        with self._dups_lock:
            cached = self._dups.get(key)
        if cached is None:
            from simsearch.duplicates import find_duplicates

            result = find_duplicates(self.path, threshold=threshold, verify="off")
            cached = {
                "images": result.images,
                "threshold": result.threshold,
                "threshold_source": source,
                "keep": result.keep,
                "duplicates": result.duplicates,
                "groups": [
                    [dict(_member_dict(g.keeper), keeper=True)] + [dict(_member_dict(m), keeper=False) for m in g.duplicates]
                    for g in result.groups
                ],
            }
            with self._dups_lock:
                self._dups.clear()  # one state at a time: an older one is of no use any more
                self._dups[key] = cached
        groups = cached["groups"]
        return {
            **{k: v for k, v in cached.items() if k != "groups"},
            "total": len(groups),
            "offset": offset,
            "limit": limit,
            "groups": [{"keeper": g[0]["id"], "members": g} for g in groups[offset : offset + limit]],
        }

    def _recorded_duplicates_threshold(self) -> float:
        cal = self.catalog.meta_value("duplicates_calibration")
        if not cal or cal.get("identity") != self.catalog.identity():
            raise NotFound(
                f"no duplicates threshold is recorded for the index at {self.path}: run simsearch duplicates "
                "once (it calibrates one), or give ?threshold="
            )
        return float(cal["threshold"])

    def info(self) -> dict[str, Any]:
        out = index_info(self.path)
        snap = self._snapshot
        out["serve"] = {
            "generation": snap.generation if snap else 0,
            "vectors_loaded": len(snap.ann) if snap else 0,
            "model_loaded": self._embedder is not None,
            "searches": {"calls": self.searches.calls, "queries": self.searches.items},
            "model_runs": {"calls": self.model_runs.calls, "images": self.model_runs.items,
                           "max_batch": self.model_runs.max_batch},
            "vector_search": self._search_info(snap),
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
        }
        return out

    def _search_info(self, snap: Snapshot | None) -> dict[str, Any]:
        """How queries search the loaded vectors: the packed float16 copy or FAISS, and why."""
        packed = self.packer.get(snap) if snap is not None else None
        if packed is not None:
            return {"mode": self.vector_search, "using": "float16", "packed_bytes": packed.nbytes,
                    "widened": packed.widened, "faiss_fallbacks": packed.fallbacks}
        out: dict[str, Any] = {"mode": self.vector_search, "using": "faiss"}
        if snap is not None and self._why_faiss is None:
            if self.packer.busy or not self.packer.failure:
                out["packing"] = True
            else:
                out["why"] = f"not packed: {self.packer.failure}"
        elif self._why_faiss:
            out["why"] = self._why_faiss
        return out


def _pack(snap: Snapshot) -> Any:
    """The float16 copy of a snapshot's flat index (on the packer's thread: torch is imported there)."""
    from simsearch.embed.half_search import MIN_PROVEN_AT_ONCE, HalfPackedIndex

    packed = HalfPackedIndex(snap.ann)
    if packed.proven_at_once < MIN_PROVEN_AT_ONCE:
        raise RuntimeError(
            f"the vectors' scores crowd too close together for the float16 search to prove its results "
            f"({packed.proven_at_once:.0%} of sampled queries at once), so FAISS is faster here"
        )
    return packed


def _one_openmp_thread() -> None:
    """Run this thread's FAISS searches (and the BLAS under them) on itself alone.

    OpenMP's thread count is a per-thread setting: one made on the main thread does not reach the
    search thread. Left at one per core, each search wakes a team that then spins waiting for the
    next one, burning the CPU the event loop needs (several times the search's own time, measured
    with 2 cores); concurrency comes from batching the queries instead."""
    import faiss

    faiss.omp_set_num_threads(1)


def _member_dict(m: Any) -> dict[str, Any]:
    """A duplicates group's member (:class:`simsearch.duplicates.DuplicateMember`) as the API shows it."""
    return {
        "id": m.id, "path": m.path, "name": os.path.basename(m.path), "width": m.width, "height": m.height,
        "size": m.size, "score": round(float(m.score), 6), "identical": m.identical,
    }


def _row_dict(row: Any) -> dict[str, Any]:
    return {"id": row.id, "path": row.path, "name": os.path.basename(row.path), "width": row.width, "height": row.height}


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise InputError(f"k must be between 1 and {MAX_K}")
