"""Layer 3: turning image files into embeddings on the chosen device.

Modules, each depending only on those above it in this list (and on layers 0-2):

* ``cuda_probe``: is there possibly a GPU? (torch-free)
* ``allocator``: keep freed tensor memory in the process on CPU (``keep_freed_memory``)
* ``device``: device, precision and decoder policy (``resolve_device``, ``resolve_precision``, ...)
* ``decode``: the one decode-to-crop path (:class:`CropDecoder`) and ``normalize_batch``
* ``jpeg``: which JPEGs nvJPEG may decode (torch-free marker scan)
* ``batches``: the worker side: read, hash, route and CPU-decode a batch of files
* ``gpu_decode``: the nvJPEG side, with the CPU path as its fallback
* ``loader``: the one DataLoader builder, worker set-up, clean shutdown
* ``pipeline``: bounded background stages
* ``embedder``: :class:`Embedder`, which runs all of the above
* ``gpu_ops``, ``device_search``: k-means and exact search on a torch device
* ``half_search``: exact search of a flat index on the CPU through a float16 copy (FBGEMM)

The names below are re-exported lazily (PEP 562), so importing the package, or a torch-free
module in it such as ``cuda_probe``, does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "cuda_maybe_present": "cuda_probe",
    "keep_freed_memory": "allocator",
    "DECODE_CHOICES": "device",
    "PRECISION_CHOICES": "device",
    "PRECISION_NAMES": "device",
    "autocast_dtype": "device",
    "check_embed_options": "device",
    "cpu_has_native_bf16": "device",
    "nvjpeg_unavailable_reason": "device",
    "resolve_decode": "device",
    "resolve_device": "device",
    "resolve_precision": "device",
    "CropDecoder": "decode",
    "DecodedItem": "decode",
    "normalize_batch": "decode",
    "preprocess_pil": "decode",
    "PreparedBatch": "batches",
    "RawBatch": "batches",
    "read_batch": "batches",
    "GpuBatchDecoder": "gpu_decode",
    "build_loader": "loader",
    "default_workers": "loader",
    "iterate_loader": "loader",
    "worker_init": "loader",
    "Stage": "pipeline",
    "CPU_BATCH_SIZE": "embedder",
    "CUDA_BATCH_CANDIDATES": "embedder",
    "EmbeddedBatch": "embedder",
    "Embedder": "embedder",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .allocator import keep_freed_memory
    from .batches import PreparedBatch, RawBatch, read_batch
    from .cuda_probe import cuda_maybe_present
    from .decode import CropDecoder, DecodedItem, normalize_batch, preprocess_pil
    from .device import (
        DECODE_CHOICES,
        PRECISION_CHOICES,
        PRECISION_NAMES,
        autocast_dtype,
        check_embed_options,
        cpu_has_native_bf16,
        nvjpeg_unavailable_reason,
        resolve_decode,
        resolve_device,
        resolve_precision,
    )
    from .embedder import CPU_BATCH_SIZE, CUDA_BATCH_CANDIDATES, EmbeddedBatch, Embedder
    from .gpu_decode import GpuBatchDecoder
    from .loader import build_loader, default_workers, iterate_loader, worker_init
    from .pipeline import Stage


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
