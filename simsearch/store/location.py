"""Where an index directory is when none is named: ``$SIMSEARCH_INDEX``, else ``./index_data``.

Kept apart from the store itself so that the command line can resolve the default location
(and show it in ``--help``) without opening anything.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_INDEX_DIR = "index_data"
INDEX_ENV_VAR = "SIMSEARCH_INDEX"


def default_index_dir() -> Path:
    """``$SIMSEARCH_INDEX`` if set, else ``./index_data`` relative to the working directory."""
    return Path(os.environ.get(INDEX_ENV_VAR) or DEFAULT_INDEX_DIR)
