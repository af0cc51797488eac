"""One router per feature of ``simsearch serve``; a new feature adds a module here and
one line in :func:`simsearch.serve.app.create_app`."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response

try:  # orjson (in the serve extra) encodes a page of results several times faster than json
    import orjson

    def dumps(data: Any) -> bytes:
        return orjson.dumps(data)
except ImportError:  # pragma: no cover - the serve extra brings orjson

    def dumps(data: Any) -> bytes:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


async def index_of(request: Request) -> Any:
    """The app's :class:`simsearch.serve.state.ServeIndex` (a FastAPI dependency; async, so that it
    costs no hop through the thread pool)."""
    return request.app.state.index


def json_response(data: dict[str, Any]) -> Response:
    """``data`` (plain dicts, lists, str, int, float, None) as a JSON response, encoded once.

    A route that returns a dict has FastAPI validate and re-encode it against its return type
    (``jsonable_encoder``, then ``json.dumps``); that was a large share of a query's time. The
    routes say what they return with ``response_model`` for the schema and hand back this instead."""
    return Response(dumps(data), media_type="application/json")
