"""Search routes: neighbours of an uploaded image, of an indexed image by id, or by its stored path."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response

from simsearch.errors import InputError
from simsearch.serve.state import MAX_K

from . import index_of, json_response

router = APIRouter(prefix="/api", tags=["search"])

K = Query(10, ge=1, le=MAX_K, description="neighbours to return")
THRESHOLD = Query(None, ge=-1.0, le=1.0, description="only results with cosine similarity at least this")
INCLUDE_SELF = Query(False, description="keep the query image itself in its results")


# the query parameters of GET /api/search, for the schema (the route reads them itself, see below)
_INDEXED_PARAMS = [
    {"name": "id", "in": "query", "required": False, "description": "row id of an indexed image",
     "schema": {"type": "integer"}},
    {"name": "path", "in": "query", "required": False,
     "description": "absolute path of an indexed image, exactly as stored", "schema": {"type": "string"}},
    {"name": "k", "in": "query", "required": False, "description": "neighbours to return",
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}},
    {"name": "threshold", "in": "query", "required": False,
     "description": "only results with cosine similarity at least this",
     "schema": {"type": "number", "minimum": -1.0, "maximum": 1.0}},
    {"name": "include_self", "in": "query", "required": False,
     "description": "keep the query image itself in its results", "schema": {"type": "boolean", "default": False}},
]
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _int(params: Any, name: str, default: int | None = None, low: int | None = None, high: int | None = None) -> int | None:
    text = params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{name}: give a whole number, not {text!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name}: must be between {low} and {high}")
    return value


def _float(params: Any, name: str, low: float, high: float) -> float | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{name}: give a number, not {text!r}") from None
    if not low <= value <= high:  # NaN fails too
        raise InputError(f"{name}: must be between {low} and {high}")
    return value


def _bool(params: Any, name: str) -> bool:
    text = params.get(name)
    if text is None:
        return False
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise InputError(f"{name}: give true or false, not {text!r}")


async def indexed_search(index: Any, params: Any) -> dict[str, Any]:
    """The answer of ``GET /api/search`` for its query parameters ``params`` (a mapping of str to
    str, the last value of a repeated name): shared by the route below and the lean dispatcher in
    front of FastAPI (:mod:`simsearch.serve.fast`), so that both answer alike."""
    image_id = _int(params, "id")
    path = params.get("path")
    if (image_id is None) == (path is None):
        raise InputError("give exactly one of id or path (or POST an image to /api/search)")
    k = _int(params, "k", 10, 1, MAX_K)
    threshold = _float(params, "threshold", -1.0, 1.0)
    include_self = _bool(params, "include_self")
    if image_id is not None:
        return await index.query_id_async(image_id, k=k, threshold=threshold, include_self=include_self)
    return await index.query_path_async(path, k=k, threshold=threshold, include_self=include_self)


@router.get(
    "/search",
    summary="Neighbours of an indexed image, by id or by its indexed path",
    response_model=dict[str, Any],
    openapi_extra={"parameters": _INDEXED_PARAMS},
)
async def search_indexed(request: Request) -> Response:
    """The hot route: ``async`` (the catalog reads are short and run on the event loop; the search
    is awaited on the search thread, batched with other requests', see ServeIndex.query_id_async),
    and it reads its five query parameters itself: FastAPI's per-parameter validation cost more
    than the rest of the request (measured with cProfile under 16 clients). The server answers it
    in front of FastAPI's routing (:mod:`simsearch.serve.fast`); this route documents it in the
    schema and answers when that dispatcher is left out (``create_app(lean_search=False)``)."""
    return json_response(await indexed_search(request.app.state.index, request.query_params))


@router.post("/search", summary="Neighbours of an uploaded image (multipart field 'image')", response_model=dict[str, Any])
def search_upload(
    image: UploadFile = File(..., description="the query image"),
    k: int = K,
    threshold: float | None = THRESHOLD,
    include_self: bool = INCLUDE_SELF,
    index: Any = Depends(index_of),
) -> Response:
    # a plain def: FastAPI runs it in its thread pool, where the decode and the model may take their time
    data = image.file.read(index.max_upload_bytes + 1)
    name = image.filename or "upload"
    return json_response(index.query_upload(data, name=name, k=k, threshold=threshold, include_self=include_self))
