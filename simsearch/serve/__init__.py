"""``simsearch serve``: a local web app and JSON API over one index (layer 5, beside the CLI).

The package owns the HTTP edge: :func:`create_app` builds a FastAPI application over an index
directory, one router per feature (search, images, clusters, duplicates, labels, info), the
static page (HTML, JS and CSS shipped as package data, no CDN, no build step), bearer-token
checking and the mapping of library errors to JSON errors. The warm state (model, vectors,
per-thread SQLite connections, reloading when a writer saves, batching) lives in
:mod:`simsearch.serve.state` and :mod:`simsearch.serve.batching`. FastAPI and uvicorn come from
the ``serve`` extra and are imported only here, never by the rest of the library or by light
commands.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
