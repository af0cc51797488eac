"""The application factory: the warm index, one router per feature, auth, upload bounds, JSON errors.

Every error leaves as JSON ``{"error": message}`` with its status: bad input 400, unknown id or
path 404, an upload over the limit 413, an index with no usable vectors (being built or rebuilt)
503. A bug is a 500 with a generic message, never a traceback on the wire.
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from simsearch.errors import SimsearchError
from simsearch.images import DEFAULT_MAX_PIXELS

from .fast import FastIndexedSearch
from .responses import error_response, status_of
from .routes import clusters, duplicates, images, info, labels, page, search
from .state import DEFAULT_MAX_UPLOAD_BYTES, ServeIndex

log = logging.getLogger(__name__)

# extra room for the multipart envelope and form fields around an upload's bytes
MULTIPART_OVERHEAD = 64 * 1024
# paths anyone may fetch without the token: the page itself holds no index data
PUBLIC_PATHS = ("/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)

__all__ = ["create_app", "error_response", "status_of"]


def create_app(
    index_dir: str | os.PathLike[str],
    *,
    token: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    warm: bool = False,
    model_batch: int = 8,
    lean_search: bool = True,
    vector_search: str = "auto",
) -> FastAPI:
    """A FastAPI app serving the index at ``index_dir`` (see the README's ``simsearch serve``).

    ``token``: when set, every API request must carry it (``Authorization: Bearer TOKEN`` or
    ``?token=TOKEN``). ``warm``: load the vectors and build the model now, not on first use.
    ``model_batch``: most concurrent uploads embedded in one forward pass. ``lean_search``: answer
    ``GET /api/search`` in front of FastAPI's routing (:mod:`simsearch.serve.fast`; the same
    answers and errors, less time per query); False sends it through the FastAPI route.
    ``vector_search``: ``auto`` searches a flat index through a packed float16 copy of its vectors once
    it is ready (exact, faster), ``faiss`` with FAISS alone (:class:`simsearch.serve.state.ServeIndex`).
    """
    state = ServeIndex(
        index_dir, device=device, precision=precision, max_pixels=max_pixels, max_upload_bytes=max_upload_bytes,
        model_batch=model_batch, vector_search=vector_search,
    )
    if warm:
        state.warm_up()
    app = FastAPI(
        title="simsearch",
        summary="Image similarity search over one simsearch index.",
        docs_url=None,  # FastAPI's docs pages load their scripts from a CDN; the schema is enough
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.index = state
    for feature in (search, images, clusters, duplicates, labels, info, page):
        app.include_router(feature.router)

    @app.exception_handler(SimsearchError)
    async def simsearch_error(request: Request, exc: SimsearchError) -> JSONResponse:
        return error_response(status_of(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(400, "; ".join(parts) or "bad request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such page or API route: {request.url.path}"
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error serving %s", request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server's log")

    app.add_middleware(UploadLimit, limit=max_upload_bytes + MULTIPART_OVERHEAD)
    if lean_search:  # added after UploadLimit, so it runs before it, and after the token check
        app.add_middleware(FastIndexedSearch, index=state)
    if token:
        app.add_middleware(TokenAuth, token=token)
    app.router.on_shutdown.append(state.close)
    return app


class TokenAuth:
    """Require the bearer token (header or ``?token=``) on everything but the page and its assets."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _public(scope["path"]) or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(401, "this server needs a token: send 'Authorization: Bearer TOKEN' or add ?token=TOKEN")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _allowed(self, scope: dict[str, Any]) -> bool:
        from urllib.parse import parse_qs

        given: list[bytes] = []
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given.append(value[7:].strip())
        for value in parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", []):
            given.append(value.encode("latin-1"))
        return any(hmac.compare_digest(g, self.token) for g in given)


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class UploadLimit:
    """Refuse a request body over ``limit`` bytes with 413, by its Content-Length or as it streams in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(413, f"the request body is over the upload limit of {self.limit - MULTIPART_OVERHEAD:,} bytes")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await too_large(scope, receive, send)
                return
        seen = 0
        over = False  # the body went over the limit: whatever the app answers, the client gets 413
        replied = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _BodyTooLarge  # stops the parser (which may turn it into a 400 of its own)
            return message

        async def checked_send(message: dict[str, Any]) -> None:
            nonlocal replied
            if not over:
                await send(message)
            elif not replied:
                replied = True
                await too_large(scope, receive, send)

        try:
            await self.app(scope, counted_receive, checked_send)
        except _BodyTooLarge:
            if not replied:
                await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass
