"""The ``export-vectors`` job: an index's vectors and file metadata as one ``.npz``.

The inverse of :mod:`simsearch.vector_import`, in the file format it reads: arrays ``vectors``
(n x dim, L2-normalised, as the index searches them), ``paths``, ``sizes``, ``mtimes_ns``,
``hashes``, ``widths``, ``heights``, ``ids`` (the rows' ids in this index) and ``identity`` (a JSON
string: the model description, weights, seed and the precisions the vectors were computed in). An
unknown size, mtime, width or height is -1 and an unknown hash is "" (an ``.npz`` read without
pickles holds no None). What it is for: merging indexes built on several machines (export each,
``import-vectors`` them into one), a copy of the embeddings for other tools (NumPy, pandas, a
notebook), a backup that needs no re-embedding.

The vectors, most of the file, are never all in memory: the ``.npz`` is a zip of ``.npy`` members,
and ``vectors.npy`` is streamed into it chunk by chunk after its header, whose row count comes from
the same read transaction as the rows (:meth:`simsearch.store.IndexStore.iter_stored`). The
metadata columns are gathered meanwhile and written after. The file appears whole or not at all
(written beside, then renamed).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EmptyIndexError, InputError, SimsearchError
from .store import IndexStore

EXPORT_DTYPES = ("float32", "float16")
_UNKNOWN_INT = -1


@dataclass
class ExportSummary:
    index: str
    out: str
    exported: int
    dim: int
    dtype: str
    bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_vectors(
    index_dir: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "float32", chunk: int = 4096
) -> ExportSummary:
    """Write every searchable image of the index at ``index_dir`` (path, file metadata, vector) to
    the ``.npz`` ``out``, with the index's model identity; see the module's docstring.

    ``dtype``: ``float32`` (what FAISS holds) or ``float16`` (what the index stores: half the size,
    the same values to within float16 rounding)."""
    if dtype not in EXPORT_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype!r}")
    out = Path(out)
    if out.suffix != ".npz":
        raise InputError(f"the export is an .npz file (what import-vectors reads), not {out.name}")
    if out.is_dir():
        raise InputError(f"{out} is a folder")
    t0 = time.perf_counter()
    with IndexStore.open(index_dir) as store:
        identity = store.catalog.identity()
        if identity is None:
            raise EmptyIndexError(f"the index at {store.path} holds no images yet (run simsearch index FOLDER)")
        identity = dict(identity, **{k: store.meta[k] for k in ("weights_source", "seed", "precisions") if k in store.meta})
        dim = int(identity["dim"])
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with store.catalog.snapshot():  # the count in the header and the rows streamed after it agree
                store.require_stored_vectors()  # an empty or damaged index is an error, said as for k-means
                n = store.catalog.count_stored()
                exported = _write_npz(tmp, store, n, dim, np.dtype(dtype).newbyteorder("<"), chunk, identity)
            os.replace(tmp, out)
        except OSError as exc:
            raise SimsearchError(f"cannot export to {out}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
    return ExportSummary(str(index_dir), str(out), exported, dim, dtype, out.stat().st_size, time.perf_counter() - t0)


def _write_npz(
    tmp: Path, store: IndexStore, n: int, dim: int, dtype: np.dtype, chunk: int, identity: dict[str, Any]
) -> int:
    numbers = {k: np.empty(n, np.int64) for k in ("ids", "sizes", "mtimes_ns", "widths", "heights")}
    texts: dict[str, list[str]] = {"paths": [], "hashes": []}
    written = 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("vectors.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, dim)}
            np.lib.format.write_array_header_2_0(f, header)
            for rows, vectors in store.iter_stored(chunk):
                if written + len(rows) > n:
                    raise SimsearchError(f"the rows read from {store.path} are not the {n} counted; nothing was written")
                f.write(np.ascontiguousarray(vectors, dtype=dtype).tobytes())
                part = slice(written, written + len(rows))
                numbers["ids"][part] = [r.id for r in rows]
                numbers["sizes"][part] = [_known(r.size) for r in rows]
                numbers["mtimes_ns"][part] = [_known(r.mtime_ns) for r in rows]
                numbers["widths"][part] = [_known(r.width) for r in rows]
                numbers["heights"][part] = [_known(r.height) for r in rows]
                texts["paths"] += [r.real_path for r in rows]  # a name that is not UTF-8 keeps its bytes
                texts["hashes"] += [r.hash or "" for r in rows]
                written += len(rows)
        if written != n:  # the header's count and the rows come from one read transaction: never
            raise SimsearchError(f"the rows read from {store.path} are not the {n} counted; nothing was written")
        columns = {**numbers, **{k: np.array(v, dtype=str).reshape(n) for k, v in texts.items()}}
        for name, array in columns.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
        with zf.open("identity.npy", "w") as f:
            np.lib.format.write_array(f, np.array(json.dumps(identity, sort_keys=True)), allow_pickle=False)
    return written


def _known(value: int | None) -> int:
    return _UNKNOWN_INT if value is None else int(value)
