"""The incremental indexing job: compare folders with the catalog, embed what changed, commit in batches.

Files are matched by path, then by size + mtime; a changed size+mtime is confirmed by a content
hash. A file that disappeared from one path and appeared at another with the same content is a
move: its row (and vector) follow it instead of being re-embedded. Each embedded batch commits
through the store (:meth:`simsearch.store.IndexStore.commit`: one SQLite transaction, then FAISS),
which saves FAISS atomically every ``save_interval`` seconds and at the end. This module plans
and counts; it never writes SQLite or FAISS itself. A run killed at any point leaves the catalog
consistent, and the next run first repairs FAISS from stored vectors, then carries on with what
is left.

A run costs what changed, not what is stored: it reads the catalog rows under the folders it was
given (a range of the path index), and its start-of-run check is the store's
:meth:`~simsearch.store.IndexStore.quick_check` (the full scan is ``index --repair``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

from .errors import ImageError, InputError
from .images import DEFAULT_MAX_PIXELS, FileEntry, Shard, hash_file, is_read_error, is_under, iter_image_files
from .store import CATALOG_FILE, ImageRow, IndexStore, storage_errors, utc_now
from .store.layouts import AnnRequest, maintain_layout, prepare_layout

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What long-running library calls report to; the CLI renders it as a progress bar."""

    def start(self, total: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class IndexSummary:
    """What one ``index`` run did."""

    index: str
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    repaired: int = 0
    total_indexed: int = 0
    total_failed: int = 0
    embedded: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # FIFOs, sockets, devices: never opened
    layout: dict[str, Any] | None = None  # the ANN layout this run (re)built, if any

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_second"] = round(self.images_per_second, 2)
        return d


@dataclass
class EmbedOptions:
    """How to embed: which model and how to run it (shared by index and query)."""

    model: str | None = "resnet50"  # None (or weights None): an existing index's own, else resnet50
    weights: str | None = "imagenet"  # None: an existing index's own, else imagenet
    seed: int | None = 0  # None: an existing index's own, else 0
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    draft: bool = True
    decode: str = "auto"  # auto | cpu | gpu (nvJPEG), see simsearch.embed
    compile: bool = False  # torch.compile the model (pays off on long runs)
    precision: str = "auto"  # auto | fp32 | bf16, see simsearch.embed.resolve_precision



def _record(entry: FileEntry, digest: str | None, width: int | None, height: int | None, error: str | None) -> dict[str, Any]:
    return {
        "path": entry.path,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "hash": digest,
        "width": width,
        "height": height,
        "status": "failed" if error else "ok",
        "error": error,
    }


def _weights_source(weights: str) -> str:
    """How to recreate the weights later (an absolute path for files)."""
    if weights in ("imagenet", "random"):
        return weights
    return str(Path(weights).expanduser().resolve())


def repair_index(index_dir: str | os.PathLike[str]) -> IndexSummary:
    """Bring FAISS back in step with the catalog from stored vectors (no re-embedding).

    Checks every stored vector's CRC-32 and the FAISS file's; a damaged FAISS file is rebuilt
    from the vector file. Files whose own stored vector is damaged cannot be recovered here: they
    are listed in ``failures`` and re-embedded by the next index run over their folder.
    """
    with storage_errors(index_dir), IndexStore.open(index_dir) as store:
        store.lock_for_writing()
        found = store.repair(verify_vectors=True)
        counts = store.catalog.counts()
        return IndexSummary(
            index=str(index_dir),
            repaired=found.count,
            total_indexed=counts["ok"],
            total_failed=counts["failed"],
            failures=[{"path": p, "error": "stored vector damaged: re-embed (run simsearch index on its folder)"}
                      for p in found.damaged_paths],
        )


def index_folders(
    roots: Iterable[str | os.PathLike[str]],
    index_dir: str | os.PathLike[str],
    options: EmbedOptions | None = None,
    exclude: Iterable[str] = (),
    rebuild: bool = False,
    progress: Progress | None = None,
    save_interval: float = 30.0,
    ann: AnnRequest | None = None,
    shard: Shard | None = None,
) -> IndexSummary:
    """Index (or bring up to date) every image under ``roots`` into the index at ``index_dir``.

    ``options.model``/``weights``/``seed`` left None mean the existing index's own (so re-running on
    an index needs no ``--model``). ``ann``: the FAISS layout to keep (default: the one recorded,
    else automatic); after the run the layout is rebuilt from the stored vectors if the collection
    has grown past it (see :mod:`simsearch.store.layouts`). ``shard``: only that part of the files
    (:class:`simsearch.images.Shard`); indexed files of the other parts leave the index.
    """
    from .embed import check_embed_options
    from .models import create_model

    options = resolve_model_options(options or EmbedOptions(), index_dir, rebuild=rebuild)
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    root_list = [os.path.abspath(os.fspath(r)) for r in roots]
    for root in root_list:
        if not os.path.exists(root):
            raise InputError(f"no such file or folder: {root}")

    # Before the index directory exists: a bad --device/--decode or a weights error must not
    # leave an empty index behind (and the cheap check goes before loading any weights).
    check_embed_options(options.device, options.decode, options.precision)
    model = create_model(options.model, options.weights, seed=options.seed)
    with storage_errors(index_dir):
        return _index_into(model, root_list, index_dir, options, exclude, rebuild, progress, save_interval, t0, ann, shard)


def _index_into(
    model: Any, root_list: list[str], index_dir: str | os.PathLike[str], options: EmbedOptions,
    exclude: Iterable[str], rebuild: bool, progress: Progress, save_interval: float, t0: float,
    ann: AnnRequest | None, shard: Shard | None = None,
) -> IndexSummary:
    from .embed import Embedder

    store = IndexStore.open(index_dir, create=True)
    try:
        store.lock_for_writing()
        description = dict(model.describe(), weights_source=_weights_source(options.weights), seed=options.seed)
        store.ensure_identity(description, rebuild=rebuild)
        prepare_layout(store)
        store.set_meta({"weights_source": description["weights_source"], "seed": options.seed, "shard": shard and str(shard)})
        summary = IndexSummary(index=str(index_dir))
        found = store.repair(full=False)  # O(changed); the full scan is index --repair
        summary.repaired = found.count

        # Files refused under a lower --max-pixels get another chance when the limit is raised.
        retry_failed = _pixel_limit(options.max_pixels) > _pixel_limit(store.meta.get("max_pixels", DEFAULT_MAX_PIXELS))
        plan = _plan(store, root_list, exclude, summary, retry_failed=retry_failed, shard=shard)
        if plan.to_embed:
            embedder = Embedder(
                model,
                device=options.device,
                batch_size=options.batch_size,
                workers=options.workers,
                max_pixels=options.max_pixels,
                draft=options.draft,
                decode=options.decode,
                compile=options.compile,
                warmup=True,
                precision=options.precision,
            )
            precisions = sorted(set(store.meta.get("precisions", [])) | {embedder.precision})
            store.set_meta({"precisions": precisions})  # informational: vectors of any precision mix
            progress.start(len(plan.to_embed))
            t_embed = time.perf_counter()
            last_save = time.monotonic()
            try:
                paths = [e.path for e in plan.to_embed]
                by_path = {e.path: e for e in plan.to_embed}
                for batch in embedder.embed_files(paths, progress=progress.advance):
                    _commit_batch(store, batch, by_path, plan.existing, summary)
                    if time.monotonic() - last_save > save_interval:
                        store.save()
                        last_save = time.monotonic()
            except BaseException:
                # interrupted (Ctrl-C) or failed: a batch may be committed but not yet mirrored into
                # FAISS. Save what is committed; if that fails too (a full disk), the original error
                # is the one to report, and the next run repairs FAISS from the stored vectors.
                try:
                    store.save(resync=True)
                except Exception as exc:  # noqa: BLE001 - secondary to the error being raised
                    log.debug("could not save the FAISS file after the failure: %s", exc)
                raise
            finally:
                progress.close()
                summary.embed_seconds = time.perf_counter() - t_embed
            store.save()
        else:
            store.save()
        summary.layout = maintain_layout(store, ann)
        counts = store.catalog.counts()
        summary.total_indexed, summary.total_failed = counts["ok"], counts["failed"]
        summary.seconds = time.perf_counter() - t0
        store.set_meta(
            {
                "updated_at": utc_now(),
                "max_pixels": options.max_pixels,
                "roots": sorted(set(store.meta.get("roots", [])) | set(root_list)),
                "last_run": {k: v for k, v in summary.to_dict().items() if k not in ("failures", "skipped")},
            }
        )
        return summary
    finally:
        store.close()


def resolve_model_options(options: EmbedOptions, index_dir: str | os.PathLike[str], rebuild: bool = False) -> EmbedOptions:
    """Fill the model, weights and seed left None from the index's record (or the defaults for a new index).

    An existing index keeps the model it was built with: ``simsearch index FOLDER`` needs ``--model``
    only to create one. With ``rebuild``, an unnamed model is the default one, as for a new index.
    """
    from dataclasses import replace

    if options.model is not None and options.weights is not None and options.seed is not None:
        return options
    meta: dict[str, Any] = {}
    if not rebuild and (Path(index_dir) / CATALOG_FILE).exists():
        with IndexStore.open(index_dir) as store:
            meta = store.meta
    if "model" in meta and options.model in (None, meta["model"]):
        return replace(
            options,
            model=meta["model"],
            weights=options.weights if options.weights is not None else meta.get("weights_source", "imagenet"),
            seed=options.seed if options.seed is not None else int(meta.get("seed", 0)),
        )
    return replace(
        options,
        model=options.model or "resnet50",
        weights=options.weights if options.weights is not None else "imagenet",
        seed=options.seed if options.seed is not None else 0,
    )


@dataclass
class _Plan:
    to_embed: list[FileEntry]
    existing: dict[str, ImageRow]


def _pixel_limit(max_pixels: int | None) -> float:
    return float("inf") if max_pixels is None else float(max_pixels)


def _plan(
    store: IndexStore, roots: list[str], exclude: Iterable[str], summary: IndexSummary, retry_failed: bool = False,
    shard: Shard | None = None,
) -> _Plan:
    """Classify files and apply the cheap changes (moves, touches, removals) before embedding.

    Rows are keyed by the real path (what the walk reports), never by its printable form: two
    names that print alike are still two files. Only the rows under ``roots`` are read (every
    file the walk reports lies under one of them, and only those rows can be gone or moved).
    """
    existing = {row.real_path: row for root in roots for row in store.catalog.rows_under(root)}
    seen: set[str] = set()
    new: list[FileEntry] = []
    to_embed: list[FileEntry] = []
    touched: list[tuple[FileEntry, ImageRow]] = []

    def skipped(path: str, reason: str) -> None:
        summary.skipped.append({"path": path, "reason": reason})
        log.warning("skipped: %s", reason)

    for entry in iter_image_files(roots, exclude, on_skip=skipped, shard=shard):
        key = entry.path
        seen.add(key)
        row = existing.get(key)
        if row is None:
            new.append(entry)
        elif row.size == entry.size and row.mtime_ns == entry.mtime_ns:
            # an OS error (permission, I/O) said nothing about the content: try again
            if not row.ok and (retry_failed or is_read_error(row.error)):
                to_embed.append(entry)
            else:
                summary.unchanged += 1
        elif row.size == entry.size and row.hash:
            touched.append((entry, row))
        else:
            to_embed.append(entry)

    gone = [row for path, row in existing.items() if path not in seen and any(is_under(path, r) for r in roots)]
    gone_by_size: dict[int, list[ImageRow]] = defaultdict(list)
    for row in gone:
        if row.ok and row.hash and row.size is not None:
            gone_by_size[row.size].append(row)

    moves: list[tuple[FileEntry, ImageRow]] = []
    for entry in new:
        candidates = gone_by_size.get(entry.size)
        match = None
        if candidates:
            try:
                digest = hash_file(entry.path)
            except (OSError, ImageError):
                digest = None
            match = next((r for r in candidates if r.hash == digest), None)
        if match is not None:
            candidates.remove(match)  # type: ignore[union-attr]
            moves.append((entry, match))
        else:
            to_embed.append(entry)
    moved_ids = {row.id for _, row in moves}
    removed = [row for row in gone if row.id not in moved_ids]

    touched_only: list[tuple[FileEntry, ImageRow]] = []
    for entry, row in touched:
        try:
            same = hash_file(entry.path) == row.hash
        except (OSError, ImageError):
            same = False
        if same and (row.ok or not retry_failed):
            touched_only.append((entry, row))
        else:
            to_embed.append(entry)

    store.apply_changes(
        moves=[(row.id, {"path": entry.path, "size": entry.size, "mtime_ns": entry.mtime_ns}) for entry, row in moves],
        touches=[(row.id, entry.mtime_ns) for entry, row in touched_only],
        removals=removed,
    )
    for entry, row in moves:
        existing.pop(row.real_path, None)
        log.info("moved: %s -> %s", row.path, entry.path)
    summary.moved = len(moves)
    summary.removed = len(removed)
    summary.unchanged += len(touched_only)
    return _Plan(to_embed=to_embed, existing=existing)


def _commit_batch(store: IndexStore, batch: Any, by_path: dict[str, FileEntry], existing: dict[str, ImageRow], summary: IndexSummary) -> None:
    """Turn one embedded batch into rows, have the store commit them with their vectors, and count.

    A row the catalog refuses (a constraint error) fails that file only: the batch is then
    committed file by file, and the refused file is reported as failed (and not stored).
    """
    records = [_record(by_path[item.path], item.hash, item.width, item.height, item.error) for item in batch.items]
    replacing = [existing.get(item.path) for item in batch.items]
    refused: dict[int, str] = {}
    try:
        store.commit(records, batch.vectors, replacing)
    except sqlite3.IntegrityError:
        vectors = iter(batch.vectors)
        for i, (record, row) in enumerate(zip(records, replacing)):
            vector = batch.vectors[:0] if record["status"] != "ok" else next(vectors)[None]
            try:
                store.commit([record], vector, [row])
            except sqlite3.IntegrityError as exc:
                refused[i] = f"{record['path']}: the catalog refused its row ({exc})"
    for i, (item, row) in enumerate(zip(batch.items, replacing)):
        if i in refused:
            summary.failed += 1
            summary.failures.append({"path": item.path, "error": refused[i]})
            log.warning("skipped: %s", refused[i])
        elif not item.ok:
            summary.failed += 1
            summary.failures.append({"path": item.path, "error": item.error or ""})
            log.warning("skipped: %s", item.error)
        elif row is None:
            summary.added += 1
        else:
            summary.updated += 1
    summary.embedded += len(batch.items)


def failed_files(index_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Files that could not be indexed, with their errors."""
    with IndexStore.open(index_dir) as store:
        return [
            {"path": r.path, "error": r.error, "size": r.size} for r in store.catalog.rows("status = 'failed'")
        ]
