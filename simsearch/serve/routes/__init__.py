"""One router per feature of ``simsearch serve``; a new feature (duplicates, labels) adds a module here
and one line in :func:`simsearch.serve.app.create_app`."""

from __future__ import annotations

from typing import Any

from fastapi import Request


async def index_of(request: Request) -> Any:
    """The app's :class:`simsearch.serve.state.ServeIndex` (a FastAPI dependency; async, so that it
    costs no hop through the thread pool)."""
    return request.app.state.index
