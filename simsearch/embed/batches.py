"""The batches that travel from DataLoader workers to the model, and the worker side that fills them.

:func:`read_batch` runs in a worker: it reads each file, hashes it and routes it. With ``gpu``, plain
JPEGs (:func:`simsearch.embed.jpeg.gpu_route`) go on as raw bytes (one concatenated blob per batch,
so one shared-memory transfer), and everything else (PNG, WebP, CMYK, 12-bit, truncated, over
``max_pixels``, unreadable) is decoded right there by the one CPU path
(:class:`simsearch.embed.decode.CropDecoder`), errors included, so failures read exactly as they do
without a GPU. Without ``gpu`` every file takes the CPU path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import ImageError
from ..images import content_hash, open_regular, read_bytes
from .decode import CropDecoder, DecodedItem
from .jpeg import gpu_route


@dataclass
class JpegRef:
    """A JPEG in a batch's blob: its slot (row of the model input) and where its bytes are."""

    slot: int
    start: int
    size: int  # the whole file
    jpeg_size: int  # the primary image (up to its EOI), what nvJPEG gets
    orientation: int
    pixels: int


@dataclass
class RawBatch:
    """A batch as the workers hand it over: metadata for every file, pixels or bytes for the ok ones.

    ``slots[i]`` is the index in ``items`` of model-input row ``i``; rows come either from
    ``jpegs`` (to decode on the GPU) or from ``crops`` (decoded on the CPU, rows ``crop_slots``).
    """

    items: list[DecodedItem]
    slots: list[int] = field(default_factory=list)
    blob: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.uint8))
    jpegs: list[JpegRef] = field(default_factory=list)
    crops: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 3, 1, 1), dtype=torch.uint8))
    crop_slots: list[int] = field(default_factory=list)

    def pin_memory(self) -> "RawBatch":
        """Called by the DataLoader's pin-memory thread: pin the crops (the JPEG blob stays pageable;
        nvJPEG stages its own copies)."""
        if self.crops.numel():
            self.crops = self.crops.pin_memory()
        return self


@dataclass
class PreparedBatch:
    """Model input on the device, ready once ``event`` has completed."""

    items: list[DecodedItem]
    x: torch.Tensor
    event: Any = None


def read_batch(paths: Sequence[str], decoder: CropDecoder, gpu: bool) -> RawBatch:
    """Read one batch of files (in a worker): JPEG bytes for the GPU, CPU-decoded crops for the rest.

    With ``gpu``, files are read straight into one blob (in shared memory when running in a
    DataLoader worker, so handing it to the main process copies nothing); the hash and the
    routing work on views of it.
    """
    batch = RawBatch(items=[])
    crops: list[torch.Tensor] = []

    def cpu_decode(item: DecodedItem, data: bytes) -> None:
        crop = decoder.decode_item(item, data)
        if crop is not None:
            batch.crop_slots.append(len(batch.slots))
            batch.slots.append(len(batch.items) - 1)
            crops.append(crop)

    def read_and_cpu_decode(item: DecodedItem) -> None:
        """The CPU path's reading, hashing, decoding and errors, for one file."""
        try:
            data = read_bytes(item.path)
        except ImageError as exc:
            item.error = str(exc)
            return
        item.hash = content_hash(data)
        cpu_decode(item, data)

    if not gpu:
        for path in paths:
            item = DecodedItem(path)
            batch.items.append(item)
            read_and_cpu_decode(item)
        if crops:
            batch.crops = torch.stack(crops)
        return batch

    sizes = []
    for path in paths:
        try:
            sizes.append(os.stat(path).st_size)
        except OSError:
            sizes.append(0)
    blob = torch.empty(sum(sizes), dtype=torch.uint8)
    if len(blob) and torch.utils.data.get_worker_info() is not None:
        blob.share_memory_()
    view = memoryview(blob.numpy()) if len(blob) else memoryview(b"")
    pos = 0
    for path in paths:
        item = DecodedItem(path)
        batch.items.append(item)
        mv = _read_into(path, view, pos)
        if mv is None:  # empty, unreadable, changed under us...: the CPU path's reading and errors
            read_and_cpu_decode(item)
            continue
        item.hash = content_hash(mv)  # type: ignore[arg-type]
        route = gpu_route(mv, decoder.max_pixels)
        if route is None:
            cpu_decode(item, bytes(mv))  # its blob space is reused by the next file
            continue
        probe, orientation, (item.width, item.height) = route
        batch.jpegs.append(JpegRef(len(batch.slots), pos, len(mv), probe.end, orientation, probe.width * probe.height))
        batch.slots.append(len(batch.items) - 1)
        pos += len(mv)
    batch.blob = blob[:pos]
    if crops:
        batch.crops = torch.stack(crops)
    return batch


def _read_into(path: str, view: memoryview, pos: int) -> memoryview | None:
    """Read a whole file into ``view[pos:]``; None if it is empty, unreadable or does not fit."""
    try:
        with open_regular(path) as f:  # a FIFO swapped in since the walk must not block
            n = os.fstat(f.fileno()).st_size
            if n <= 0 or pos + n > len(view):
                return None
            mv = view[pos : pos + n]
            if f.readinto(mv) != n or f.read(1):
                return None
            return mv
    except (OSError, ImageError):
        return None

