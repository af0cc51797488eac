"""Search routes: neighbours of an uploaded image, of an indexed image by id, or by its stored path."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Query, UploadFile

from simsearch.errors import InputError

from . import index_of

router = APIRouter(prefix="/api", tags=["search"])

K = Query(10, ge=1, le=1000, description="neighbours to return")
THRESHOLD = Query(None, ge=-1.0, le=1.0, description="only results with cosine similarity at least this")
INCLUDE_SELF = Query(False, description="keep the query image itself in its results")


@router.get("/search", summary="Neighbours of an indexed image, by id or by its indexed path")
def search_indexed(
    id: int | None = Query(None, description="row id of an indexed image"),
    path: str | None = Query(None, description="absolute path of an indexed image, exactly as stored"),
    k: int = K,
    threshold: float | None = THRESHOLD,
    include_self: bool = INCLUDE_SELF,
    index: Any = Depends(index_of),
) -> dict[str, Any]:
    if (id is None) == (path is None):
        raise InputError("give exactly one of id or path (or POST an image to /api/search)")
    if id is not None:
        return index.query_id(id, k=k, threshold=threshold, include_self=include_self)
    return index.query_path(path, k=k, threshold=threshold, include_self=include_self)


@router.post("/search", summary="Neighbours of an uploaded image (multipart field 'image')")
def search_upload(
    image: UploadFile = File(..., description="the query image"),
    k: int = K,
    threshold: float | None = THRESHOLD,
    include_self: bool = INCLUDE_SELF,
    index: Any = Depends(index_of),
) -> dict[str, Any]:
    data = image.file.read(index.max_upload_bytes + 1)
    name = image.filename or "upload"
    return index.query_upload(data, name=name, k=k, threshold=threshold, include_self=include_self)
