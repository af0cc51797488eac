"""Cluster routes: the stored clustering (sizes, representatives) and one cluster's members, paged."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query

from . import index_of

router = APIRouter(prefix="/api/clusters", tags=["clusters"])


@router.get("", summary="Every cluster of the last clustering: size and representatives")
def clusters(
    representatives: int = Query(4, ge=0, le=50, description="images nearest each centroid"),
    index: Any = Depends(index_of),
) -> dict[str, Any]:
    return index.clusters(representatives)


@router.get("/{cluster}", summary="One cluster's members, nearest the centroid first, paged")
def members(
    cluster: int = Path(..., ge=0),
    offset: int = Query(0, ge=0),
    limit: int = Query(60, ge=1, le=500),
    index: Any = Depends(index_of),
) -> dict[str, Any]:
    return index.cluster_members(cluster, offset=offset, limit=limit)
