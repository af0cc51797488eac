"""Self-contained HTML pages of results: duplicates groups, query results, clusters, classifications.

One file per page, opening in any browser with no server and no internet: the thumbnails are
inline (``data:`` URIs of the JPEGs cached by :mod:`simsearch.store.thumbnails`), the style is inline,
there is no script. Each picture carries its score, pixel size, file size and path; a duplicates
group marks its keeper. The markup names what it shows (``data-path``, ``data-keeper``,
``data-score``) so that tests, and users' scripts, can read a page back.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ImageError
from .store import IndexStore, utc_now
from .store.thumbnails import make_thumbnail

STYLE = """
:root { --bg: #f4f5f7; --card: #fff; --ink: #1d2330; --muted: #667085; --keep: #12a150; --line: #e3e6eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background: var(--bg); color: var(--ink); }
header { padding: 20px 28px 12px; }
header h1 { margin: 0 0 4px; font-size: 20px; }
header p { margin: 0; color: var(--muted); }
main { padding: 8px 28px 40px; display: grid; gap: 18px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
section h2 { margin: 0 0 10px; font-size: 15px; font-weight: 600; }
section h2 small { color: var(--muted); font-weight: 400; }
.row { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 196px; border: 2px solid var(--line); border-radius: 8px; overflow: hidden; background: #fafbfc; position: relative; }
figure.keeper { border-color: var(--keep); box-shadow: 0 0 0 2px rgba(18,161,80,.15); }
figure.query { border-color: #3b6ef5; }
.frame { height: 160px; display: flex; align-items: center; justify-content: center; background: repeating-conic-gradient(#eef0f3 0 25%, #f8f9fb 0 50%) 50% / 16px 16px; }
.frame img { max-width: 100%; max-height: 160px; display: block; }
.frame .missing { color: var(--muted); font-size: 12px; }
figcaption { padding: 6px 8px 8px; font-size: 12px; }
.score { font-weight: 600; font-variant-numeric: tabular-nums; }
.meta { color: var(--muted); }
.path { color: var(--muted); word-break: break-all; font-family: ui-monospace, Menlo, monospace; font-size: 11px; margin-top: 2px; }
.badge { position: absolute; top: 6px; left: 6px; background: var(--keep); color: #fff; font-size: 11px; font-weight: 700; letter-spacing: .04em; padding: 2px 7px; border-radius: 10px; }
.badge.query { background: #3b6ef5; }
.tag { display: inline-block; margin-left: 4px; padding: 0 5px; border-radius: 6px; background: #eef2ff; color: #3847a8; font-size: 11px; }
.empty { color: var(--muted); }
"""


def _human(n: int | None) -> str:
    if not n:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _data_uri(jpeg: bytes | None) -> str | None:
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _figure(
    path: str, thumb: bytes | None, score: str | None, width: int | None, height: int | None, size: int | None,
    keeper: bool = False, badge: str | None = None, tags: Iterable[str] = (), css: str = "",
) -> str:
    uri = _data_uri(thumb)
    name = html.escape(path, quote=True)
    img = f'<img src="{uri}" alt="{html.escape(os.path.basename(path), quote=True)}" loading="eager">' if uri else '<span class="missing">unreadable</span>'
    pixels = f"{width}&times;{height}" if width else "?"
    tag_html = "".join(f'<span class="tag">{html.escape(t)}</span>' for t in tags)
    classes = " ".join(c for c in ("keeper" if keeper else "", css) if c)
    return (
        f'<figure class="{classes}" data-path="{name}" data-keeper="{str(keeper).lower()}"'
        + (f' data-score="{score}"' if score is not None else "")
        + ">"
        + (f'<span class="badge {css}">{html.escape(badge)}</span>' if badge else "")
        + f'<div class="frame">{img}</div><figcaption>'
        + (f'<span class="score">{score}</span> ' if score is not None else "")
        + f'<span class="meta">{pixels} &middot; {_human(size)}</span>{tag_html}'
        + f'<div class="path" title="{name}">{name}</div></figcaption></figure>'
    )


def _page(title: str, summary: str, sections: Sequence[str]) -> str:
    body = "\n".join(sections) if sections else '<section><p class="empty">Nothing to show.</p></section>'
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><header><h1>{html.escape(title)}</h1><p>{summary}</p></header>"
        f"<main>\n{body}\n</main></body></html>\n"
    )


def _write(out: str | os.PathLike[str], text: str) -> Path:
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


class _Thumbs:
    """Thumbnails of indexed rows (cached in the index) and of outside files (made on the fly)."""

    def __init__(self, store: IndexStore) -> None:
        self.store = store
        self.cache = store.thumbnails
        self.cache.prune()

    def of_ids(self, ids: Iterable[int]) -> dict[int, tuple[Any, bytes | None]]:
        rows = self.store.catalog.rows_by_ids(ids)
        return {i: (row, self.cache.get(row)) for i, row in rows.items()}

    def of_path(self, path: str) -> tuple[Any, bytes | None]:
        row = self.store.catalog.row_by_path(os.path.abspath(path))
        if row is not None and row.ok:
            return row, self.cache.get(row)
        try:
            return None, make_thumbnail(path)
        except (ImageError, OSError):
            return None, None


def write_duplicates_html(index_dir: str | os.PathLike[str], result: Any, out: str | os.PathLike[str]) -> Path:
    """The groups of a :class:`simsearch.duplicates.DuplicatesResult`, keeper first and marked."""
    with IndexStore.open(index_dir) as store:
        thumbs = _Thumbs(store)
        sections = []
        for n, group in enumerate(result.groups, 1):
            members = [group.keeper] + list(group.duplicates)
            found = thumbs.of_ids(m.id for m in members)
            figures = []
            for m in members:
                keeper = m is group.keeper
                tags = [t for t, on in (("identical", m.identical and not keeper), ("verified", m.verified)) if on]
                figures.append(_figure(
                    m.path, found.get(m.id, (None, None))[1], None if keeper else f"{m.score:.4f}", m.width, m.height,
                    m.size, keeper=keeper, badge="KEEP" if keeper else None, tags=tags,
                ))
            sections.append(
                f'<section class="group" data-keeper="{html.escape(group.keeper.path, quote=True)}">'
                f"<h2>Group {n} <small>&middot; {len(group.duplicates)} duplicate{'s' if len(group.duplicates) != 1 else ''}"
                f" of {html.escape(os.path.basename(group.keeper.path))}</small></h2>"
                f'<div class="row">{"".join(figures)}</div></section>'
            )
    how = f"threshold {result.threshold:.4f} ({result.threshold_source})"
    if result.verified:
        how += f"; pairs from {result.candidate_threshold:.4f} verified with local features"
    summary = (
        f"{len(result.groups)} groups, {result.duplicates} duplicates among {result.images} images &middot; {how} "
        f"&middot; keeper rule: {html.escape(result.keep)} &middot; {utc_now()}"
    )
    return _write(out, _page("simsearch duplicates", summary, sections))


def write_query_html(index_dir: str | os.PathLike[str], results: Sequence[Any], out: str | os.PathLike[str]) -> Path:
    """Each query image followed by its neighbours (:class:`simsearch.search.QueryResult` list)."""
    with IndexStore.open(index_dir) as store:
        thumbs = _Thumbs(store)
        sections = []
        for result in results:
            row, thumb = thumbs.of_path(result.query)
            width, height = (row.width, row.height) if row is not None else _pixel_size(result.query)
            size = row.size if row is not None else _file_size(result.query)
            figures = [_figure(str(result.query), thumb, None, width, height, size, badge="QUERY", css="query")]
            found = thumbs.of_ids(h.id for h in result.results)
            figures += [
                _figure(h.path, found.get(h.id, (None, None))[1], f"{h.score:.4f}", h.width, h.height,
                        found[h.id][0].size if h.id in found else None)
                for h in result.results
            ]
            sections.append(
                f'<section class="query" data-query="{html.escape(str(result.query), quote=True)}">'
                f"<h2>{html.escape(os.path.basename(str(result.query)))} <small>&middot; {len(result.results)} results</small></h2>"
                f'<div class="row">{"".join(figures)}</div></section>'
            )
    return _write(out, _page("simsearch query", f"{len(results)} queries &middot; {utc_now()}", sections))


def write_cluster_html(index_dir: str | os.PathLike[str], result: Any, out: str | os.PathLike[str]) -> Path:
    """A clustering's clusters (largest first), each with its representatives (nearest the centroid)."""
    with IndexStore.open(index_dir) as store:
        thumbs = _Thumbs(store)
        sections = []
        for c in sorted(result.clusters, key=lambda c: -c.size):
            figures = []
            for m in c.representatives:
                row, thumb = thumbs.of_path(m.path)
                figures.append(_figure(m.path, thumb, f"{m.distance:.4f}", m.width, m.height, row.size if row else None))
            sections.append(
                f'<section class="cluster" data-cluster="{c.cluster}"><h2>Cluster {c.cluster} <small>&middot; {c.size} images'
                f" (distance to the centre shown)</small></h2>"
                f'<div class="row">{"".join(figures)}</div></section>'
            )
    summary = f"{result.k} clusters of {result.n} images (seed {result.seed}, {result.niter} iterations, {html.escape(str(result.created_at))})"
    return _write(out, _page("simsearch clusters", summary, sections))


HTML_PER_CLASS = 100  # images shown per predicted class (the most confident); the page says how many more


def write_classify_html(
    index_dir: str | os.PathLike[str], result: Any, out: str | os.PathLike[str], per_class: int = HTML_PER_CLASS
) -> Path:
    """A :class:`simsearch.classify.ClassifyResult` as thumbnails grouped by predicted class (largest
    class first, most confident first), then the images that abstained, with their best guess."""
    import numpy as np

    confident = result.confidence >= result.min_confidence
    groups: list[tuple[str | None, np.ndarray]] = []
    for c in np.argsort(-np.bincount(result.best[confident], minlength=len(result.classes)), kind="stable"):
        members = np.flatnonzero(confident & (result.best == c))
        if len(members):
            groups.append((result.classes[int(c)], members))
    abstained = np.flatnonzero(~confident)
    if len(abstained):
        groups.append((None, abstained))
    with IndexStore.open(index_dir) as store:
        thumbs = _Thumbs(store)
        sections = []
        for label, members in groups:
            shown = members[np.argsort(-result.confidence[members], kind="stable")][:per_class]
            indexed = thumbs.of_ids(int(result.ids[n]) for n in shown if result.ids[n] >= 0)
            figures = []
            for n in shown:
                row_id = int(result.ids[n])
                if row_id >= 0 and row_id in indexed:
                    row, thumb = indexed[row_id]
                    path, width, height, size = row.path, row.width, row.height, row.size
                else:
                    path = result.paths[n] if result.paths is not None else f"(id {row_id}, gone)"
                    row, thumb = thumbs.of_path(path)
                    width, height = (row.width, row.height) if row is not None else _pixel_size(path)
                    size = row.size if row is not None else _file_size(path)
                guess = [] if label is not None else [f"best guess: {result.classes[int(result.best[n])]}"]
                figures.append(_figure(path, thumb, f"{float(result.confidence[n]):.4f}", width, height, size, tags=guess))
            more = len(members) - len(shown)
            title = html.escape(label) if label is not None else "Abstained"
            note = (
                f"{len(members)} image{'s' if len(members) != 1 else ''} (confidence shown)"
                + (f", the {len(shown)} most confident shown, {more} more" if more else "")
                + ("" if label is not None else f", below the minimum confidence {result.min_confidence}")
            )
            attribute = html.escape(label, quote=True) if label is not None else ""
            sections.append(
                f'<section class="class" data-label="{attribute}" data-abstained="{str(label is None).lower()}">'
                f"<h2>{title} <small>&middot; {note}</small></h2>"
                f'<div class="row">{"".join(figures)}</div></section>'
            )
    cal = result.calibration
    how = (
        f"kNN (k={result.k}, {html.escape(cal.transform)}, T={cal.temperature})" if result.method == "knn"
        else f"the trained head ({html.escape(cal.transform)})"
    )
    summary = (
        f"{len(result.ids)} images: {result.classified} classified into {len(groups) - bool(len(abstained))} classes, "
        f"{result.abstained} abstained &middot; {how} &middot; {utc_now()}"
    )
    return _write(out, _page("simsearch classify", summary, sections))


def _pixel_size(path: Any) -> tuple[int | None, int | None]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError):
        return None, None


def _file_size(path: Any) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
