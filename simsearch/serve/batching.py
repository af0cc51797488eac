"""Micro-batching: the work of concurrent requests runs as one call on one thread of its own.

Why, for vector searches: an exact search reads every stored vector once per call, so on a CPU
its cost is set by memory traffic, not by the number of query vectors. Sixteen one-vector
searches read the vectors sixteen times; one sixteen-vector search reads them once (FAISS then
multiplies the matrices with BLAS). Under concurrency that is most of a query by indexed id.
For the model: one forward pass over a batch of crops costs far less than a pass per crop on a
CPU, and one pass at a time keeps torch's threads from fighting each other (what a lock gave).

How: a :class:`Batcher`'s thread takes whatever items are waiting, groups them by what they go to
(the same loaded snapshot and depth; the same model), makes one call per group and hands each
caller its own result. Nothing waits for a batch to fill: an item that arrives while the thread is
idle runs at once, alone; those that arrive while a call runs go together in the next one. So one
client sees no added latency, and many clients share each call.

Callers get a :class:`concurrent.futures.Future`: a thread waits on ``result()``, a coroutine on
``asyncio.wrap_future`` (the event loop stays free meanwhile).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

MAX_BATCH = 64  # items per call; more waiting items go in the next call

# (target, key, items) -> one result per item, in order
RunFn = Callable[[Any, Hashable, list[Any]], Sequence[Any]]


class Batcher:
    """Runs the items submitted from any thread in batches, on one thread of its own."""

    def __init__(
        self, run: RunFn, name: str, max_batch: int = MAX_BATCH, on_start: Callable[[], None] | None = None
    ) -> None:
        """``on_start``: called first on the batcher's thread (settings that belong to a thread,
        such as OpenMP's thread count)."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run_group = run
        self._on_start = on_start
        self.name = name
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Any, Hashable, Any, Future] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.calls = 0  # calls made, and the items they held (for the server's info and the tests)
        self.items = 0

    def submit(self, target: Any, item: Any, key: Hashable = None) -> Future:
        """Queue ``item`` for a call on ``target`` (grouped with others of the same target, by
        identity, and the same ``key``); the future's result is this item's part of the call."""
        if self._closed:
            raise RuntimeError(f"the {self.name} batcher is closed")
        future: Future = Future()
        self._queue.put((target, key, item, future))
        if self._thread is None:
            self._start()
        return future

    def close(self) -> None:
        """Stop the thread once the items already submitted are done."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name=f"simsearch-{self.name}", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception:  # a setting that could not be applied is no reason to stop
                log.exception("setting up the %s thread", self.name)
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    waiting = self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stop = True
                    break
                batch.append(waiting)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[tuple[Any, Hashable, Any, Future]]) -> None:
        groups: dict[tuple[int, Hashable], list[tuple[Any, Hashable, Any, Future]]] = {}
        for entry in batch:
            if entry[3].set_running_or_notify_cancel():
                groups.setdefault((id(entry[0]), entry[1]), []).append(entry)
        for entries in groups.values():
            target, key = entries[0][0], entries[0][1]
            try:
                results = self._run_group(target, key, [e[2] for e in entries])
                if len(results) != len(entries):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(entries)} items")
            except Exception as exc:  # noqa: BLE001 - each caller sees the error of its own call
                for e in entries:
                    e[3].set_exception(exc)
                continue
            self.calls += 1
            self.items += len(entries)
            for e, result in zip(entries, results):
                e[3].set_result(result)
