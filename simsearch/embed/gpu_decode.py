"""Decoding JPEGs on the GPU (nvJPEG through torchvision), with the one CPU decode path as the fallback.

The worker side (read, hash, route each file; CPU-decode what the GPU will not take) is
:func:`simsearch.embed.batches.read_batch`. Here is the main-process side:
:class:`GpuBatchDecoder` (a thread in the main process) makes one batched ``decode_jpeg`` call per
batch on its own CUDA stream, applies the EXIF orientation, resizes (antialias) + centre-crops
grouped by image size, and normalises; a file that nvJPEG rejects falls back to the CPU decoder
(:class:`simsearch.embed.decode.CropDecoder`), which decides as it would without a GPU.

The geometry (:func:`apply_orientation`, :func:`resize_crop`) is plain torch code that runs on
any device, so it is tested on CPU against the PIL path.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from ..models import Preprocessing
from .batches import JpegRef, PreparedBatch, RawBatch
from .decode import CropDecoder, normalize_batch
from .device import ignore_torchvision_io_deprecation

log = logging.getLogger(__name__)

# Per decode call, at most this many decoded pixels (3 bytes each on the GPU): bounds GPU memory
# for batches of large photos without splitting batches of ordinary ones.
DECODE_PIXEL_BUDGET = 256 * 1024 * 1024
# Per resize call, at most this many source pixels (4 bytes each as float32).
RESIZE_PIXEL_BUDGET = 64 * 1024 * 1024

# -- geometry (device-agnostic) -------------------------------------------------------------


def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Make a (C, H, W) image upright for an EXIF orientation, as ``ImageOps.exif_transpose`` does."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return img.flip(-1)
    if orientation == 3:  # ROTATE_180
        return img.flip(-2, -1)
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return img.flip(-2)
    if orientation == 5:  # TRANSPOSE
        return img.transpose(-2, -1)
    if orientation == 6:  # ROTATE_270 (90 degrees clockwise)
        return img.transpose(-2, -1).flip(-1)
    if orientation == 7:  # TRANSVERSE
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # ROTATE_90 (90 degrees counter-clockwise)
        return img.transpose(-2, -1).flip(-2)
    return img


def resize_crop(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 255] -> (N, 3, crop, crop): the CPU path's geometry, on any device.

    Shorter side to ``prep.resize_size`` (antialiased, torchvision's output-size rule), then a
    centre crop of ``prep.crop_size`` (torchvision's rounding), clamped to [0, 255] like a uint8
    image would be.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    out = F.resize(batch, [prep.resize_size], interpolation=InterpolationMode(prep.interpolation), antialias=True)
    out = F.center_crop(out, [prep.crop_size])
    return out.clamp_(0.0, 255.0)


def resize_crop_images(images: Sequence[torch.Tensor], prep: Preprocessing, budget: int = RESIZE_PIXEL_BUDGET) -> torch.Tensor:
    """Resize + crop a list of (C, H, W) uint8 images of any sizes into one float (N, 3, c, c) batch.

    Images of the same size are stacked and resized together (one kernel per size, not per image);
    a group is split so that no call converts more than ``budget`` pixels to float at once.
    """
    if not images:
        raise ValueError("no images")
    device = images[0].device
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault((int(img.shape[-2]), int(img.shape[-1])), []).append(i)
    pieces: list[torch.Tensor] = []
    order: list[int] = []
    for (h, w), idx in groups.items():
        step = max(1, budget // max(1, h * w))
        for s in range(0, len(idx), step):
            part = idx[s : s + step]
            stacked = torch.stack([_rgb(images[i]) for i in part]) if len(part) > 1 else _rgb(images[part[0]])[None]
            pieces.append(resize_crop(stacked.float(), prep))
            order.extend(part)
    out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    if order != list(range(len(images))):
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[np.asarray(order)] = np.arange(len(order))
        out = out.index_select(0, torch.from_numpy(inverse).to(device, non_blocking=True))
    return out


def _rgb(img: torch.Tensor) -> torch.Tensor:
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


# -- main-process side: decode on the GPU -----------------------------------------------------


class GpuBatchDecoder:
    """Turns a :class:`RawBatch` into normalised model input on the GPU (call from one thread).

    Call it with ``self.stream`` current. Around every ``decode_jpeg`` call (each chunk of a batch
    of big photos, each bisection step) the stream is synchronised first: nvJPEG writes its output
    from a stream of its own, into memory that the caching allocator hands out on this stream and
    may have taken back from this stream's earlier work (the previous chunk's images, freed while
    their resize kernels are still queued). Afterwards this stream waits for the decode (torchvision
    makes only the legacy default stream wait for it), so nothing reads an image before it is written.
    """

    def __init__(
        self, device: torch.device, decoder: CropDecoder, dtype: torch.dtype, channels_last: bool = True
    ) -> None:
        self.device = device
        self.decoder = decoder  # the CPU path, for what nvJPEG rejects
        self.prep = decoder.prep
        self.dtype = dtype
        self.channels_last = channels_last
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.gpu_decoded = 0
        self.cpu_fallbacks = 0
        ignore_torchvision_io_deprecation()  # here, in the constructing thread, not per call

    def _decode_jpeg(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """One batched nvJPEG call, ordered against this stream's work on both sides."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.stream is not None:
            self.stream.synchronize()  # earlier kernels done with any memory nvJPEG may write into
        out = list(decode_jpeg(views, mode=ImageReadMode.UNCHANGED, device=self.device))
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.default_stream(self.device))
        return out

    def decode_list(self, views: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Batched nvJPEG decode; on an error (the call is all-or-nothing) bisect to find the culprits."""
        try:
            return self._decode_jpeg(views)
        except RuntimeError as exc:
            if len(views) == 1:
                log.debug("nvJPEG rejected a file: %s", exc)
                return [None]
            mid = len(views) // 2
            return self.decode_list(views[:mid]) + self.decode_list(views[mid:])

    def __call__(self, raw: RawBatch) -> PreparedBatch:
        n = len(raw.slots)
        c = self.prep.crop_size
        pieces: list[tuple[torch.Tensor, list[int]]] = []  # (rows, their slots)
        dropped: set[int] = set()
        for refs in _chunks_by_pixels(raw.jpegs, DECODE_PIXEL_BUDGET):
            decoded = self.decode_list([raw.blob[r.start : r.start + r.jpeg_size] for r in refs])
            upright: list[torch.Tensor] = []
            upright_slots: list[int] = []
            for ref, img in zip(refs, decoded):
                if img is None:  # nvJPEG said no: the CPU decoder decides, as it would without a GPU
                    self.cpu_fallbacks += 1
                    item = raw.items[raw.slots[ref.slot]]
                    data = raw.blob[ref.start : ref.start + ref.size].numpy().tobytes()
                    crop = self.decoder.decode_item(item, data)
                    if crop is None:
                        dropped.add(ref.slot)
                    else:
                        pieces.append((crop[None].to(self.device).float(), [ref.slot]))
                    continue
                upright.append(apply_orientation(img, ref.orientation))
                upright_slots.append(ref.slot)
            if upright:
                self.gpu_decoded += len(upright)
                pieces.append((resize_crop_images(upright, self.prep), upright_slots))
        if raw.crop_slots:
            crops = raw.crops
            if self.device.type == "cuda" and not crops.is_pinned():
                crops = crops.pin_memory()
            pieces.append((crops.to(self.device, non_blocking=True).float(), list(raw.crop_slots)))
        order = [s for _, slots in pieces for s in slots]
        if pieces:
            x = torch.cat([p for p, _ in pieces]) if len(pieces) > 1 else pieces[0][0]
        else:
            x = torch.zeros((0, 3, c, c), device=self.device)
        keep = [s for s in range(n) if s not in dropped]
        if order != keep:
            pos = {slot: i for i, slot in enumerate(order)}
            idx = torch.tensor([pos[s] for s in keep], dtype=torch.int64)
            x = x.index_select(0, idx.to(self.device, non_blocking=True))
        if dropped:
            raw.slots = [raw.slots[s] for s in keep]
        x = normalize_batch(x, self.prep, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
        return PreparedBatch(raw.items, x, event)


def _chunks_by_pixels(refs: list[JpegRef], budget: int) -> list[list[JpegRef]]:
    out: list[list[JpegRef]] = []
    cur: list[JpegRef] = []
    total = 0
    for r in refs:
        if cur and total + r.pixels > budget:
            out.append(cur)
            cur, total = [], 0
        cur.append(r)
        total += r.pixels
    if cur:
        out.append(cur)
    return out
