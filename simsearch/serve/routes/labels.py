"""Label routes: the classes with their given and predicted counts, and one class's images, paged."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from . import index_of

router = APIRouter(prefix="/api/labels", tags=["labels"])


@router.get("", summary="Every class: given and predicted label counts, and one image to show it by")
def labels(index: Any = Depends(index_of)) -> dict[str, Any]:
    return index.labels()


@router.get("/images", summary="The images carrying one label: given first, then predictions by confidence; paged")
def label_images(
    label: str = Query(..., min_length=1, description="the class"),
    source: str | None = Query(None, pattern="^(given|predicted)$", description="only given or only predicted labels"),
    offset: int = Query(0, ge=0),
    limit: int = Query(60, ge=1, le=500),
    index: Any = Depends(index_of),
) -> dict[str, Any]:
    return index.label_members(label, source=source, offset=offset, limit=limit)
