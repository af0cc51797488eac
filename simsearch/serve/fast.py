"""The hottest route, ``GET /api/search`` (by id or indexed path), answered in front of FastAPI.

Why: under 16 clients a query by id spent more of the event loop's time in the framework (the
middleware stack, routing, the request object, a chain of wrapped ``send`` calls) than in its own
work. This plain ASGI layer takes that one route off the stack: it parses the query string as
Starlette does, calls the very function the FastAPI route calls
(:func:`simsearch.serve.routes.search.indexed_search`), and writes the JSON itself. Everything
else, and that route's documentation in the OpenAPI schema, stays with FastAPI.

It sits inside the token check (:class:`simsearch.serve.app.TokenAuth` runs first, unchanged),
and its errors are the app's: the same status for each library error and the same JSON body
(:mod:`simsearch.serve.responses`); anything unexpected is logged and answered 500, as the app's
catch-all handler does.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.datastructures import QueryParams

from simsearch.errors import SimsearchError

from .responses import error_response, status_of
from .routes import dumps
from .routes.search import indexed_search

log = logging.getLogger(__name__)

PATH = "/api/search"
_JSON = (b"content-type", b"application/json")


class FastIndexedSearch:
    """ASGI middleware: answers ``GET /api/search`` itself and hands every other request on."""

    def __init__(self, app: Any, index: Any) -> None:
        self.app = app
        self.index = index  # the app's ServeIndex

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # a mounted app (root_path) or any other method goes through FastAPI's routing as before
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "GET" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        try:
            body = dumps(await indexed_search(self.index, QueryParams(scope["query_string"])))
        except SimsearchError as exc:
            await error_response(status_of(exc), str(exc))(scope, receive, send)
            return
        except Exception as exc:  # as the app's catch-all handler: logged, a 500 without a traceback
            log.exception("error serving %s", PATH)
            await error_response(500, f"internal error ({type(exc).__name__}); see the server's log")(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), _JSON]})
        await send({"type": "http.response.body", "body": body})
