"""The loaded vectors packed for the float16 search (:mod:`simsearch.embed.half_search`), on a thread of their own.

Why a thread: packing takes about 30 us a 512-d vector on one core (0.3 s for 10,000, several
seconds for 250,000), too long for a request to wait, and it has to happen again after every
reload of the vectors. So the server searches with FAISS until the packed copy of the vectors it
has loaded is ready. Only the newest loaded vectors are worth packing: a reload while a pack runs
makes the next pack start from them, and the result of the one running is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# the largest float16 copy packed (262,144 vectors of 512 floats): memory beside FAISS's own copy,
# and about 7 s of packing on one core after each reload; bigger collections search with FAISS
# (or an approximate layout, ``simsearch index --ann``)
PACK_LIMIT_BYTES = 256 << 20


class LatestPacker:
    """Runs ``pack(source)`` on a thread of its own for the newest ``source`` asked for, and keeps
    the result for that source alone."""

    def __init__(self, pack: Callable[[Any], Any], name: str = "pack") -> None:
        self._pack = pack
        self.name = name
        self._cond = threading.Condition()
        self._wanted: Any = None
        self._asked = 0  # counts want() and clear() calls: a pack asked for before the last one is not kept
        self._ready: tuple[Any, Any] | None = None  # (source, packed)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.busy = False
        self.failure: str | None = None  # why the pack of the newest source gave nothing (info, tests)
        self._logged: str | None = None  # the last failure logged: the same one is logged once

    def want(self, source: Any) -> None:
        """Pack ``source`` next (the result kept for an older source is dropped now)."""
        with self._cond:
            if self._closed:
                return
            self._wanted = source
            self._asked += 1
            self._ready = None
            self.failure = None
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"simsearch-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()

    def clear(self) -> None:
        """Drop the packed copy kept (the vectors loaded now are not to be packed)."""
        with self._cond:
            self._wanted = None
            self._asked += 1
            self._ready = None
            self.failure = None

    def get(self, source: Any) -> Any:
        """The packed copy of ``source`` (the very object given to :meth:`want`), or None while
        it is being made, or when it could not be."""
        ready = self._ready
        return ready[1] if ready is not None and ready[0] is source else None

    def wait(self, source: Any, timeout: float) -> Any:
        """:meth:`get`, once no pack is waiting or running (or after ``timeout`` seconds)."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (self._wanted is None and not self.busy), timeout)
        return self.get(source)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._ready = None
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._wanted is not None)
                if self._closed:
                    return
                source, self._wanted = self._wanted, None
                asked = self._asked
                self.busy = True
            packed, failure = None, None
            try:
                packed = self._pack(source)
            except Exception as exc:  # noqa: BLE001 - the server keeps searching with FAISS
                failure = str(exc) or type(exc).__name__
                if failure != self._logged:
                    log.warning("searching with FAISS, not a packed float16 copy: %s", failure)
                    self._logged = failure
            with self._cond:
                self.busy = False
                if asked == self._asked and not self._closed:  # no newer vectors (or none to pack) meanwhile
                    self._ready = (source, packed) if packed is not None else None
                    self.failure = failure
                self._cond.notify_all()
