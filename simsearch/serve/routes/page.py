"""The page: one HTML, one JS and one CSS file shipped in the package (no CDN, no build step)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from simsearch.serve.state import NotFound

router = APIRouter(include_in_schema=False)

# the only files served from the package: a fixed table, so no request path ever reaches the disk
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def _read(name: str) -> str:
    return resources.files("simsearch.serve").joinpath("static", name).read_text(encoding="utf-8")


@router.get("/")
def index_page() -> HTMLResponse:
    return HTMLResponse(_read("index.html"), headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}")
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no asset {name!r}")
    return Response(_read(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico")
def favicon() -> Response:
    return Response(status_code=204)
