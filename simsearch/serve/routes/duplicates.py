"""Duplicates route: the groups of near-duplicates ``simsearch duplicates`` finds, read-only and paged."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from . import index_of

router = APIRouter(prefix="/api/duplicates", tags=["duplicates"])


@router.get("", summary="Groups of near-duplicates (keeper first), at the recorded calibrated threshold or a given one")
def duplicates(
    threshold: float | None = Query(None, ge=-1.0, le=1.0, description="cosine similarity; default: the calibrated one"),
    offset: int = Query(0, ge=0, description="groups to skip"),
    limit: int = Query(20, ge=1, le=200, description="groups to return"),
    index: Any = Depends(index_of),
) -> dict[str, Any]:
    # a plain def: the first call for a state of the index builds the neighbour graph (seconds on a
    # large index), in FastAPI's thread pool
    return index.duplicates(threshold=threshold, offset=offset, limit=limit)
