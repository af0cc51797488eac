"""Background stages joined by bounded queues: the overlap behind :meth:`Embedder.embed_files`.

A :class:`Stage` runs ``fn`` over an iterable in its own thread and hands results on through a
queue of at most ``maxsize`` items, so a fast producer never runs more than ``maxsize + 1`` items
ahead of a slow consumer (bounded memory), and a slow producer never blocks the consumer's own
work. Stages chain (a stage's source can be another stage), keep order, re-raise a stage's
exception in the consumer, and shut down cleanly when the consumer stops early: closing the
last stage stops every thread upstream of it.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Stage(Generic[U]):
    """Iterate ``source`` in a daemon thread, apply ``fn``, and queue the results in order.

    ``setup`` (optional) runs first inside the thread, for per-thread state such as a CUDA stream
    context; it returns a context manager or None.
    """

    def __init__(
        self,
        source: Iterable[Any],
        fn: Callable[[Any], U] | None = None,
        maxsize: int = 2,
        name: str = "stage",
        setup: Callable[[], Any] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.source = source
        self.fn = fn
        self.name = name
        self.setup = setup
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self._done = False
        self.produced = 0
        self.thread = threading.Thread(target=self._run, name=f"simsearch-{name}", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        ctx = None
        try:
            if self.setup is not None:
                ctx = self.setup()
                if ctx is not None:
                    ctx.__enter__()
            for item in self.source:
                if self._stop.is_set():
                    break
                out = self.fn(item) if self.fn is not None else item
                if not self._put(out):
                    break
                self.produced += 1
            else:
                self._put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(_Raised(exc))
        finally:
            if ctx is not None:
                try:
                    ctx.__exit__(None, None, None)
                except Exception:  # pragma: no cover - best effort
                    log.debug("stage %s: context exit failed", self.name, exc_info=True)
            _close_source(self.source)

    def __iter__(self) -> Iterator[U]:
        return self

    def __next__(self) -> U:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self.queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    self._done = True
                    raise StopIteration from None
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            self.close()
            raise item.exc
        return item

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread (and, through it, every stage upstream) and drop queued items."""
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)
            if self.thread.is_alive():  # pragma: no cover - a stuck fn; the thread is a daemon
                log.warning("stage %s did not stop within %.0f s", self.name, timeout)
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> "Stage[U]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_source(source: Any) -> None:
    close = getattr(source, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # pragma: no cover - best effort
            log.debug("closing a stage source failed", exc_info=True)
