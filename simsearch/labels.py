"""Labels of indexed images: importing given labels from a folder of classes or a CSV, listing them.

A label belongs to a catalog row (see the ``labels`` table of the catalog), so it follows the file
through moves and re-embedding and goes when the file's row goes. This module only reads the
sources and resolves their paths to rows; the writes go through :class:`IndexStore`. Given labels
(imported here) and predicted ones (``simsearch classify --write``) are kept apart.

Bad input stops the import before anything is written: a CSV row with a missing column, an empty
label or a path that exists neither on disk nor in the index is an error naming its line. A file
that exists but is not indexed is reported (``not_indexed``), never silently dropped.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .images import iter_image_files
from .store import IndexStore

CSV_SUFFIXES = (".csv", ".tsv", ".txt")
_HEADER_PATHS = ("path", "file", "filename", "image")
_HEADER_LABELS = ("label", "class", "category")


@dataclass
class ImportSummary:
    """What ``labels import`` did."""

    source: str
    imported: int
    classes: int
    not_indexed: list[str] = field(default_factory=list)  # files that exist but have no row in the index
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LabelCount:
    label: str
    given: int = 0
    predicted: int = 0


@dataclass
class LabelListing:
    """Classes of an index with their counts of given and predicted labels."""

    indexed: int
    given: int
    predicted: int
    classes: list[LabelCount] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_label_source(source: str | os.PathLike[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(path, label, where) triples from a folder of class sub-folders or a CSV of path,label; and warnings.

    ``where`` names the origin of each pair for messages (``file.csv:12``, or the class folder).
    Relative CSV paths are relative to the CSV's folder.
    """
    path = Path(source)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        if path.suffix.lower() not in CSV_SUFFIXES:
            raise InputError(f"{path}: give a folder of class sub-folders or a CSV of path,label (.csv, .tsv, .txt)")
        return _read_csv(path), []
    raise InputError(f"label source not found: {path}")


def _read_folder(root: Path) -> tuple[list[tuple[str, str, str]], list[str]]:
    warnings: list[str] = []
    try:
        entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise InputError(f"cannot list {root}: {exc}") from exc
    if any(e.is_file() for e in entries):
        warnings.append(f"files directly in {root} are in no class folder; ignored")
    pairs: list[tuple[str, str, str]] = []
    for entry in entries:
        if entry.is_dir():
            files = [f.path for f in iter_image_files([entry.path])]
            if not files:
                warnings.append(f"class folder {entry.name!r} has no images")
            pairs.extend((f, entry.name, entry.path) for f in files)
    return pairs, warnings


def _read_csv(path: Path) -> list[tuple[str, str, str]]:
    base = path.parent
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    pairs: list[tuple[str, str, str]] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f, delimiter=delimiter), start=1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                where = f"{path}:{n}"
                if len(row) < 2:
                    raise InputError(f"{where}: expected two columns path,label, got {delimiter.join(row)!r}")
                file, label = row[0].strip(), row[1].strip()
                if not pairs and file.lower() in _HEADER_PATHS and label.lower() in _HEADER_LABELS:
                    continue  # a header line
                if not file:
                    raise InputError(f"{where}: empty path")
                if not label:
                    raise InputError(f"{where}: empty label for {file}")
                pairs.append((file if os.path.isabs(file) else str(base / file), label, where))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    return pairs


def import_labels(source: str | os.PathLike[str], index_dir: str | os.PathLike[str]) -> ImportSummary:
    """Record the labels in ``source`` as given labels of the indexed files they name.

    A label replaces what the file had (a given or a predicted label); other files' labels stay.
    Nothing is written when a CSV row is bad.
    """
    pairs, warnings = read_label_source(source)
    if not pairs:
        raise InputError(f"{source}: no labelled images found (a folder of class sub-folders, or a CSV of path,label)")
    with IndexStore.open(index_dir) as store:
        ids = store.catalog.ids_by_paths(os.path.abspath(p) for p, _, _ in pairs)
        found: dict[int, str] = {}
        not_indexed: list[str] = []
        for file, label, where in pairs:
            row_id = ids.get(os.path.abspath(file))
            if row_id is not None:
                if found.get(row_id, label) != label:
                    raise InputError(f"{where}: {file} is labelled both {found[row_id]!r} and {label!r}")
                found[row_id] = label
            elif os.path.exists(file):
                not_indexed.append(os.path.abspath(file))
            else:
                raise InputError(f"{where}: no such file, and not in the index: {file}")
        if found:
            store.import_labels(found)
    return ImportSummary(str(source), len(found), len(set(found.values())), not_indexed, warnings)


def list_labels(index_dir: str | os.PathLike[str]) -> LabelListing:
    """Every class with its numbers of given and predicted labels (of indexed images), largest first."""
    with IndexStore.open(index_dir) as store:
        counts: dict[str, LabelCount] = {}
        for label, source, n in store.catalog.label_counts():
            entry = counts.setdefault(label, LabelCount(label))
            setattr(entry, source, n)
        indexed = store.catalog.counts()["ok"]
    classes = sorted(counts.values(), key=lambda c: (-(c.given + c.predicted), c.label))
    return LabelListing(
        indexed, sum(c.given for c in classes), sum(c.predicted for c in classes), classes
    )


def clear_labels(index_dir: str | os.PathLike[str], source: str | None = None) -> int:
    """Drop the index's labels (``source``: given, predicted, or None for both); returns how many."""
    if source not in (None, "given", "predicted"):
        raise InputError(f"unknown label source {source!r}; use given or predicted")
    with IndexStore.open(index_dir) as store:
        return store.clear_labels(source)
