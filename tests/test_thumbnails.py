"""The thumbnail cache under an index's ``thumbs/``: safe when threads make the same thumbnail at
once, and a cache that cannot be written still answers."""

from __future__ import annotations

import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from conftest import make_image
from simsearch.store import thumbnails
from simsearch.store.thumbnails import THUMB_DIR, ThumbnailCache


def _row(path: Path, row_id: int = 7) -> SimpleNamespace:
    return SimpleNamespace(id=row_id, hash="0123456789abcdef0123", real_path=str(path))


def test_threads_making_the_same_thumbnail_at_once_all_get_it(tmp_path: Path, monkeypatch) -> None:
    photo = make_image(tmp_path / "photo.jpg", size=(900, 600))
    threads = 8
    arrive = threading.Barrier(threads)
    made = thumbnails.make_thumbnail

    def in_step(path, size=thumbnails.THUMB_SIZE):
        data = made(path, size)
        arrive.wait(timeout=30)  # every thread writes the cache at the same moment
        return data

    monkeypatch.setattr(thumbnails, "make_thumbnail", in_step)
    for attempt in range(5):
        cache = ThumbnailCache(tmp_path / f"index{attempt}", catalog=None)
        with ThreadPoolExecutor(threads) as pool:
            got = list(pool.map(cache.get, [_row(photo)] * threads))
        assert all(g is not None and g == got[0] for g in got)
        [kept] = (tmp_path / f"index{attempt}" / THUMB_DIR).iterdir()  # one thumbnail, no temporary left
        assert kept.read_bytes() == got[0]
        assert max(Image.open(io.BytesIO(got[0])).size) == thumbnails.THUMB_SIZE


def test_a_cache_that_cannot_be_written_still_answers(tmp_path: Path, caplog) -> None:
    photo = make_image(tmp_path / "photo.jpg")
    index = tmp_path / "index"
    index.mkdir()
    (index / THUMB_DIR).write_text("not a folder")  # mkdir fails, as on a read-only or full disk
    cache = ThumbnailCache(index, catalog=None)
    with caplog.at_level(logging.WARNING, logger="simsearch.store.thumbnails"):
        data = cache.get(_row(photo))
    assert data is not None and Image.open(io.BytesIO(data)).format == "JPEG"
    assert "thumbnail not cached" in caplog.text
    assert (index / THUMB_DIR).read_text() == "not a folder"
