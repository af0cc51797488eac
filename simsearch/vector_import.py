"""The ``import-vectors`` job: add vectors computed elsewhere (files on disk) to an index.

Reads an ``.npz`` (arrays ``vectors`` and ``paths``, optional ``sizes``, ``mtimes_ns``, ``hashes``,
``widths``, ``heights`` and ``identity``, a JSON string of the model description; -1 or ""
for an unknown value, as ``export-vectors`` writes them) or an ``.npy`` of vectors with a CSV of
``path,size,mtime_ns`` (optional ``hash,width,height`` columns) (one line per vector, in order), works out the vectors' model identity, and
hands everything to :meth:`simsearch.store.IndexStore.import_vectors`; then saves and lets the
index's layout follow the new size (:func:`simsearch.store.layouts.maintain_layout`). Torch is
imported only when the identity has to be read from a model named on the command line.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InputError
from .store import IndexStore
from .store.layouts import AnnRequest, maintain_layout


@dataclass
class ImportSummary:
    index: str
    imported: int
    total_indexed: int
    seconds: float
    layout: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_vector_file(vectors_file: str | os.PathLike[str], paths_csv: str | os.PathLike[str] | None = None) -> tuple[list[dict[str, Any]], np.ndarray, dict[str, Any] | None]:
    """(records, vectors, identity or None) from an ``.npz``, or an ``.npy`` and its CSV."""
    path = Path(vectors_file)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    identity = None
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "vectors" not in data or "paths" not in data:
                    raise InputError(f"{path} needs arrays 'vectors' and 'paths'")
                vectors = data["vectors"]
                n = len(vectors)
                column = lambda key: [_known(v) for v in data[key].tolist()] if key in data else [None] * n  # noqa: E731
                records = [
                    {"path": str(p), "size": s, "mtime_ns": m, "hash": h, "width": w, "height": hh}
                    for p, s, m, h, w, hh in zip(
                        data["paths"].tolist(), column("sizes"), column("mtimes_ns"), column("hashes"),
                        column("widths"), column("heights"),
                    )
                ]
                if "identity" in data:
                    identity = json.loads(str(data["identity"]))
        else:
            vectors = np.load(path, allow_pickle=False)
            if paths_csv is None:
                raise InputError("an .npy of vectors needs --paths CSV (path,size,mtime_ns per vector)")
            with open(paths_csv, newline="") as f:
                records = [
                    dict(
                        {k: int(row[k]) if row.get(k) else None for k in ("size", "mtime_ns", "width", "height")},
                        path=row["path"],
                        hash=row.get("hash") or None,
                    )
                    for row in csv.DictReader(f)
                ]
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"cannot read vectors from {path}: {exc}") from exc
    return records, vectors, identity


def _known(value: Any) -> Any:
    """None for the marks of an unknown value in an ``.npz`` (which holds no None): -1 for a size,
    mtime, width or height, an empty hash (what ``export-vectors`` writes)."""
    return None if value == "" or value == -1 else value


def parse_rewrite(rule: str) -> tuple[str, str]:
    """``OLD=NEW`` as a (prefix, replacement) pair of absolute paths."""
    old, sep, new = rule.partition("=")
    if not sep or not old or not new:
        raise InputError(f"a rewrite is OLD=NEW (two folders), not {rule!r}")
    return old, new


def rewrite_path(path: str, rules: Sequence[tuple[str, str]]) -> str:
    """``path`` with the first rule whose folder holds it applied: ``/mnt/a/x.jpg`` under
    ``("/mnt/a", "/data")`` is ``/data/x.jpg``; ``/mnt/ab/x.jpg`` is not under ``/mnt/a``."""
    for old, new in rules:
        prefix = old.rstrip("/")
        if path == prefix or path.startswith(prefix + "/"):
            return new.rstrip("/") + path[len(prefix):] if path != prefix else new
    return path


def model_identity(model: str, weights: str = "imagenet", seed: int = 0) -> dict[str, Any]:
    """The identity of vectors made by a named model (builds the model, so imports torch)."""
    from .models import create_model

    description = create_model(model, weights, seed=seed).describe()
    return dict(description, weights_source=weights if weights in ("imagenet", "random") else str(Path(weights).resolve()), seed=seed)


def import_vector_file(
    index_dir: str | os.PathLike[str],
    vectors_file: str | os.PathLike[str],
    paths_csv: str | os.PathLike[str] | None = None,
    model: str | None = None,
    weights: str = "imagenet",
    seed: int = 0,
    ann: AnnRequest | None = None,
    rewrite: Sequence[tuple[str, str]] = (),
) -> ImportSummary:
    """Add the vectors of ``vectors_file`` to the index at ``index_dir`` (created if need be).

    Their identity: the file's own (``.npz`` ``identity``), else ``model``/``weights``/``seed``'s,
    else (no model named) the existing index's: then only their dim is checked. ``rewrite``:
    (old folder, new folder) pairs for paths that name the files where they were indexed, not
    where this index sees them (another machine's mount point); the first that holds a path applies.
    """
    t0 = time.perf_counter()
    records, vectors, identity = read_vector_file(vectors_file, paths_csv)
    if rewrite:
        for record in records:
            record["path"] = rewrite_path(str(record["path"]), rewrite)
    if identity is None and model is not None:
        identity = model_identity(model, weights, seed)
    with IndexStore.open(index_dir, create=True) as store:
        store.lock_for_writing()
        if identity is None:
            identity = store.catalog.identity()
            if identity is None:
                raise InputError("a new index needs the vectors' model: give --model (and --weights, --seed)")
            identity = dict(identity, **{k: store.meta[k] for k in ("weights_source", "seed") if k in store.meta})
        store.repair(full=False)  # what a crash left, at the cost of what changed (see IndexStore.quick_check)
        store.import_vectors(records, vectors, identity)
        imported = len(records)
        del records, vectors  # the file's arrays: not held while the layout below is rebuilt
        extra = {k: identity[k] for k in ("weights_source", "seed") if k in identity}
        if identity.get("precisions"):  # what the vectors were computed in (an export says; informational)
            extra["precisions"] = sorted(set(store.meta.get("precisions", [])) | set(identity["precisions"]))
        if extra:
            store.set_meta(extra)
        store.save()
        layout = maintain_layout(store, ann)
        return ImportSummary(str(index_dir), imported, store.catalog.counts()["ok"], time.perf_counter() - t0, layout)
