"""Running the app: who may connect (loopback unless told otherwise), and uvicorn in the foreground."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from typing import Any

from simsearch.errors import InputError

log = logging.getLogger(__name__)

LOCAL_HOSTS = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, no_auth: bool) -> None:
    """Refuse to listen beyond this machine with no token, unless ``no_auth`` says so on purpose."""
    if token is not None and not token.strip():
        raise InputError("--token may not be empty")
    if not is_loopback(host) and not token and not no_auth:
        raise InputError(
            f"--host {host} makes the index reachable from other machines: give --token SECRET "
            "(clients send 'Authorization: Bearer SECRET' or ?token=SECRET), or --no-auth to allow anyone"
        )


def serve(
    index_dir: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    no_auth: bool = False,
    log_level: str = "warning",
    **app_options: Any,
) -> None:
    """Serve the index until interrupted (blocks). ``app_options`` go to :func:`create_app`."""
    check_exposure(host, token, no_auth)
    import faiss
    import uvicorn

    # One search thread searches the batched queries of concurrent requests (serve.batching):
    # FAISS's OpenMP team would only add hand-offs (and on a busy CPU, spinning threads), so one
    # thread; and a batch of two or more query vectors goes through BLAS (one pass over the stored
    # vectors for the whole batch) rather than FAISS's default of one pass per query below 20.
    faiss.omp_set_num_threads(1)
    faiss.cvar.distance_compute_blas_threshold = 2

    from .app import create_app

    app = create_app(index_dir, token=token, **app_options)
    shown = f"[{host}]" if ":" in host else host
    suffix = f"?token={token}" if token else ""
    print(f"serving {index_dir} at http://{shown}:{port}/{suffix} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level in ("info", "debug"))
