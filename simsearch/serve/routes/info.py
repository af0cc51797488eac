"""Info route: what `simsearch info` says, plus what the server holds loaded."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from . import index_of

router = APIRouter(prefix="/api", tags=["info"])


@router.get("/info", summary="The index: location, model, counts, last clustering; the server's loaded state")
def info(index: Any = Depends(index_of)) -> dict[str, Any]:
    return index.info()
