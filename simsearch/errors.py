"""The one exception hierarchy of simsearch; the CLI turns these into one-line errors."""

from __future__ import annotations


class SimsearchError(Exception):
    """Base class of every error simsearch raises on purpose."""


class InputError(SimsearchError):
    """A request the library cannot honour as asked (bad option value, k too large, missing file)."""


class ImageError(SimsearchError):
    """A file could not be read or decoded as an image."""


class WeightsError(SimsearchError):
    """Model weights could not be found, downloaded or loaded."""


class IndexNotFoundError(SimsearchError):
    """There is no index at the given location."""


class EmptyIndexError(SimsearchError):
    """The index holds no vectors yet."""


class IndexMismatchError(SimsearchError):
    """The index was built with a different model, weights, dim or preprocessing."""


class IndexCorruptError(SimsearchError):
    """The SQLite catalog and the FAISS file disagree or cannot be read."""


class IndexWriteError(SimsearchError):
    """The index could not be written (a full disk, a read-only folder, no permission); it is left as it was."""


class IndexBusyError(SimsearchError):
    """Another process is writing to the same index."""
