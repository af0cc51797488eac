"""Image routes: metadata, thumbnail and original file of an indexed image, by catalog row id only."""

from __future__ import annotations

import mimetypes
from typing import Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response

from . import index_of

router = APIRouter(prefix="/api/images", tags=["images"])

IMAGE_ID = Path(..., ge=0, description="row id of an indexed image")
CACHE = "private, max-age=3600"


@router.get("/{image_id}", summary="What the index records about one image")
def image_meta(image_id: int = IMAGE_ID, index: Any = Depends(index_of)) -> dict[str, Any]:
    return index.image(image_id)


@router.get("/{image_id}/thumbnail", summary="A JPEG thumbnail of an indexed image", response_class=Response)
def thumbnail(
    image_id: int = IMAGE_ID,
    size: int = Query(256, ge=16, le=1024, description="longer side in pixels"),
    index: Any = Depends(index_of),
) -> Response:
    return Response(index.thumbnail(image_id, size), media_type="image/jpeg", headers={"Cache-Control": CACHE})


@router.get("/{image_id}/file", summary="The original file of an indexed image", response_class=Response)
def original(image_id: int = IMAGE_ID, index: Any = Depends(index_of)) -> Response:
    row, data = index.original(image_id)
    media_type = mimetypes.guess_type(row.path)[0] or "application/octet-stream"
    return Response(
        data,
        media_type=media_type,
        headers={"Cache-Control": CACHE, "X-Content-Type-Options": "nosniff", "Content-Disposition": "inline"},
    )
