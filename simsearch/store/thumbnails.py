"""Small JPEG thumbnails of indexed images, cached in the index directory under ``thumbs/``.

The HTML reports (:mod:`simsearch.report`) show every image as a picture; decoding a 12-megapixel
photo each time a page is written would cost far more than the page. A thumbnail is made once,
at most ``THUMB_SIZE`` pixels on its longer side (JPEG, about 10 KiB), and kept under a name made
of the row id and the file's content hash: a changed file gets a new thumbnail, and
:meth:`ThumbnailCache.prune` drops those whose row left the index or whose hash changed. Part of
the store layer: the index directory's writer (:class:`simsearch.store.IndexStore`) hands it out.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from ..errors import ImageError
from ..images import DEFAULT_MAX_PIXELS, decode_image, read_bytes

log = logging.getLogger(__name__)

THUMB_DIR = "thumbs"
THUMB_SIZE = 256
THUMB_QUALITY = 80


class ThumbnailCache:
    """Thumbnails of one index's rows (``catalog`` gives each row's path and hash)."""

    def __init__(self, index_dir: Path, catalog: Any) -> None:
        self.dir = Path(index_dir) / THUMB_DIR
        self.catalog = catalog

    @staticmethod
    def _name(row_id: int, digest: str | None) -> str:
        return f"{int(row_id)}-{(digest or 'nohash')[:16]}.jpg"

    def get(self, row: Any) -> bytes | None:
        """JPEG bytes of ``row``'s thumbnail (made and cached on first use); None if the file is unreadable."""
        path = self.dir / self._name(row.id, row.hash)
        try:
            return path.read_bytes()
        except OSError:  # not made yet, or the cache cannot be read: make it
            pass
        try:
            data = make_thumbnail(row.real_path)
        except (ImageError, OSError):
            return None
        self._keep(path, data)
        return data

    def _keep(self, path: Path, data: bytes) -> None:
        """Cache ``data`` at ``path`` atomically. A cache that cannot be written (a full disk, a
        ``thumbs`` that is not a folder) only costs the next call the same work: logged, not raised."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # a name of each process's thread: two threads making the same thumbnail never share a
            # file (and, unlike mkstemp's 0600, the thumbnail gets the umask's usual permissions)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("thumbnail not cached in %s: %s", self.dir, exc)

    def drop(self, ids: Iterable[int]) -> None:
        """Delete the thumbnails of these rows (their images left the index)."""
        if not self.dir.is_dir():
            return
        wanted = {str(int(i)) for i in ids}
        for entry in self.dir.iterdir():
            if entry.name.split("-", 1)[0] in wanted:
                entry.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every thumbnail (the index starts over: ``--rebuild``)."""
        if self.dir.is_dir():
            for entry in self.dir.iterdir():
                entry.unlink(missing_ok=True)

    def prune(self) -> int:
        """Delete thumbnails whose row is gone, failed, or now has another hash; returns how many."""
        if not self.dir.is_dir():
            return 0
        keep = {self._name(r.id, r.hash) for r in self.catalog.rows("status = 'ok'")}
        dropped = 0
        for entry in self.dir.iterdir():
            if entry.name not in keep:
                entry.unlink(missing_ok=True)
                dropped += 1
        return dropped


def make_thumbnail(path: str | os.PathLike[str], size: int = THUMB_SIZE) -> bytes:
    """JPEG bytes of the image at ``path``, at most ``size`` pixels on its longer side."""
    return thumbnail_of(read_bytes(path), str(path), size)


def thumbnail_of(data: bytes, name: str, size: int = THUMB_SIZE, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bytes:
    """JPEG bytes of an encoded image, at most ``size`` pixels on its longer side (the one way
    thumbnails are made: the HTML pages' cache and the web app's)."""
    img = decode_image(data, name, max_pixels=max_pixels, draft_size=size)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    return out.getvalue()
