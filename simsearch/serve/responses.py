"""How a library error leaves the server: its HTTP status, and the JSON body every error carries.

Shared by the FastAPI exception handlers (:mod:`simsearch.serve.app`) and the lean route in front
of them (:mod:`simsearch.serve.fast`), so that an error reads the same whichever answered it."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from simsearch.errors import (
    EmptyIndexError,
    ImageError,
    IndexBusyError,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    InputError,
    SimsearchError,
)

from .state import NotFound, TooLarge, Unavailable

STATUS = (
    (NotFound, 404),
    (TooLarge, 413),
    ((Unavailable, IndexNotFoundError, EmptyIndexError, IndexMismatchError, IndexCorruptError, IndexBusyError), 503),
    ((InputError, ImageError), 400),
)


def status_of(exc: SimsearchError) -> int:
    for types, status in STATUS:
        if isinstance(exc, types):
            return status
    return 500


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)
