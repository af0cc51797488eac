"""The exact vectors of an index: one memory-mapped file of float16 rows by slot (``vectors.f16``).

Part of :mod:`simsearch.store`; only :class:`~simsearch.store.IndexStore` writes it. The catalog
row of an image records its ``slot`` here and a CRC-32 of the slot's bytes (``vcrc``), so a damaged
row is found row by row. The file is the source from which any FAISS layout is (re)built, without
re-embedding; it holds no ids, only slots, so it is never out of step with the catalog by itself.

Layout: a 64-byte header (magic, format version, dim, dtype) then ``count`` rows of ``dim``
little-endian float16 values; ``count`` follows from the file size. Writes go to the end of the
file or into slots the catalog has freed, and are fsynced before the SQLite commit that references
them, so a crash leaves at worst an unused slot. float16 keeps 11 significant bits: a unit vector
comes back with a cosine of better than 0.99999 to the original (``benchmarks/bench_store.py``).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import IndexCorruptError

VECTOR_FILE = "vectors.f16"
MAGIC = b"SIMVEC16"
FORMAT_VERSION = 1
HEADER_SIZE = 64
DTYPE = np.dtype("<f2")
_HEADER = struct.Struct("<8sII8s")  # magic, format version, dim, dtype string


def to_stored(vectors: np.ndarray) -> np.ndarray:
    """Vectors as stored (float16, C order); readers get them back through :func:`from_stored`."""
    return np.ascontiguousarray(vectors, dtype=DTYPE)


def from_stored(rows16: np.ndarray) -> np.ndarray:
    """Stored rows as float32 unit vectors: widened, then renormalised, so that an image's score
    against itself is 1 and cosines stay cosines (rounding to float16 moves a norm by up to ~1e-4)."""
    rows = np.asarray(rows16, dtype=np.float32)
    # np.linalg.norm(rows, axis=1, keepdims=True) computes exactly this; its checks cost more than
    # the arithmetic for the one row a query by id reads
    norms = np.sqrt(np.add.reduce(rows * rows, axis=1, keepdims=True))
    return rows / np.where(norms > 0, norms, 1)


def row_crcs(rows16: np.ndarray) -> list[int]:
    """CRC-32 of each stored row's bytes (the catalog's ``vcrc``)."""
    rows16 = np.ascontiguousarray(rows16, dtype=DTYPE)
    return [zlib.crc32(r.tobytes()) for r in rows16]


def file_crc(path: Path, block: int = 1 << 22) -> int:
    """CRC-32 of a whole file, read in blocks (memory stays bounded)."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                return crc
            crc = zlib.crc32(data, crc)


class VectorFile:
    """float16 rows of one dim by slot, read through a memory map."""

    def __init__(self, path: Path, dim: int, writable: bool) -> None:
        self.path = path
        self.dim = dim
        self.writable = writable
        self.row_bytes = dim * DTYPE.itemsize
        self._map: np.ndarray | None = None  # a view of a np.memmap (which it keeps open)
        self._map_count = -1

    @classmethod
    def open(cls, path: str | os.PathLike[str], dim: int, *, writable: bool) -> "VectorFile":
        """Open the file (a writer creates it when missing); refuse one of another dim or format."""
        path = Path(path)
        vf = cls(path, int(dim), writable)
        if not path.exists():
            if writable:
                vf._create()
            return vf
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            raise IndexCorruptError(f"{path} is truncated (no header)")
        magic, version, file_dim, dtype = _HEADER.unpack_from(head)
        if magic != MAGIC or version != FORMAT_VERSION or dtype.rstrip(b"\0") != DTYPE.str.encode():
            raise IndexCorruptError(f"{path} is not a simsearch vector file (bad header)")
        if file_dim != vf.dim:
            raise IndexCorruptError(f"{path} holds {file_dim}-d vectors, the catalog says {vf.dim}")
        return vf

    def _create(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, self.dim, DTYPE.str.encode()).ljust(HEADER_SIZE, b"\0")
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)

    @property
    def count(self) -> int:
        """Slots in the file (used or not)."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return 0
        return max(0, (size - HEADER_SIZE) // self.row_bytes)

    def _rows(self, count: int | None = None) -> np.ndarray:
        """The file's rows, mapped (``count``: the slots the file holds, when the caller has it)."""
        count = self.count if count is None else count
        if self._map is None or self._map_count != count:
            self._map = (
                # a plain array over the map: indexing a np.memmap builds memmap objects, slower
                np.memmap(self.path, dtype=DTYPE, mode="r", offset=HEADER_SIZE, shape=(count, self.dim)).view(np.ndarray)
                if count
                else np.zeros((0, self.dim), DTYPE)
            )
            self._map_count = count
        return self._map

    def read16(self, slots: np.ndarray, mapped: bool = True) -> np.ndarray:
        """The stored float16 rows of ``slots`` (a copy). ``mapped=False`` reads with plain file
        reads instead of the memory map: a job scanning the whole file (the duplicates graph) would
        otherwise keep every page it touched resident and counted in its memory (1 GB at a million
        512-d vectors)."""
        slots = np.asarray(slots, dtype=np.int64)
        count = self.count
        if len(slots) and (slots.min() < 0 or slots.max() >= count):
            raise IndexCorruptError(f"{self.path} is shorter than the catalog says (slot {int(slots.max())})")
        if mapped:
            return self._rows(count)[slots]  # fancy indexing copies
        out = np.empty((len(slots), self.dim), DTYPE)
        if not len(slots):
            return out
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1  # runs of consecutive slots: one read each
        with open(self.path, "rb", buffering=0) as f:
            for run in np.split(np.arange(len(ordered)), breaks):
                first, n = int(ordered[run[0]]), len(run)
                data = os.pread(f.fileno(), n * self.row_bytes, HEADER_SIZE + first * self.row_bytes)
                out[order[run]] = np.frombuffer(data, dtype=DTYPE).reshape(n, self.dim)
        return out

    def read(self, slots: np.ndarray, mapped: bool = True) -> np.ndarray:
        """The vectors of ``slots`` as float32."""
        return from_stored(self.read16(slots, mapped))

    def write(self, slots: np.ndarray, rows16: np.ndarray) -> None:
        """Write rows into these slots (reused ones, or new ones at the end) and fsync.

        On failure (a full disk) the file is cut back to its old length, so nothing half-written
        stays at the end; a reused slot is not referenced by any row until the commit that follows.
        """
        if not self.writable:
            raise IndexCorruptError(f"{self.path} is open read-only")
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) == 0:
            return
        rows16 = np.ascontiguousarray(rows16, dtype=DTYPE).reshape(len(slots), self.dim)
        old_count = self.count
        fd = os.open(self.path, os.O_RDWR)
        try:
            # contiguous runs in one write each (a batch of new slots is one run)
            order = np.argsort(slots, kind="stable")
            start = 0
            while start < len(order):
                end = start + 1
                while end < len(order) and slots[order[end]] == slots[order[end - 1]] + 1:
                    end += 1
                data = rows16[order[start:end]].tobytes()
                offset = HEADER_SIZE + int(slots[order[start]]) * self.row_bytes
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], offset + written)
                start = end
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, HEADER_SIZE + old_count * self.row_bytes)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)

    def truncate(self, count: int) -> None:
        """Drop slots from ``count`` on (unreferenced tails left by a crash)."""
        if self.writable and self.count > count:
            self._map = None
            os.truncate(self.path, HEADER_SIZE + count * self.row_bytes)

    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
