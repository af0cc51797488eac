"""Decoding JPEGs on the GPU (nvJPEG through torchvision), with the CPU decoder as the fallback.

Two halves, split so that the expensive host work runs in parallel worker processes:

* :func:`read_batch` (DataLoader workers): read each file, hash it, read its header with Pillow
  (size, EXIF orientation, mode: exactly what the CPU path records) and route it. Plain 8-bit
  baseline/progressive JPEGs in RGB or grayscale go to the GPU as raw bytes (one concatenated
  blob per batch, so one shared-memory transfer); everything else (PNG, WebP, CMYK, 12-bit,
  arithmetic-coded, truncated, over ``max_pixels``, unreadable) is decoded right there by the CPU
  path, errors included, so failures read exactly as they do without a GPU.
* :class:`GpuBatchDecoder` (a thread in the main process): one batched ``decode_jpeg`` call per
  batch on its own CUDA stream, EXIF orientation, resize (antialias) + centre crop grouped by
  image size, normalisation; a file that nvJPEG rejects falls back to the CPU decoder.

The geometry (:func:`apply_orientation`, :func:`resize_crop`) is plain torch code that runs on
any device, so it is tested on CPU against the PIL path.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ImageError
from .images import content_hash, read_bytes
from .models import Preprocessing

log = logging.getLogger(__name__)

# Per decode call, at most this many decoded pixels (3 bytes each on the GPU): bounds GPU memory
# for batches of large photos without splitting batches of ordinary ones.
DECODE_PIXEL_BUDGET = 256 * 1024 * 1024
# Per resize call, at most this many source pixels (4 bytes each as float32).
RESIZE_PIXEL_BUDGET = 64 * 1024 * 1024

_SOF_GPU = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman)
_SOF_ALL = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC are not frames


@dataclass(frozen=True)
class JpegProbe:
    """What a marker scan learns about a JPEG without decoding it."""

    sof: int  # frame marker (0xC0 baseline, 0xC2 progressive, ...)
    precision: int
    width: int
    height: int
    components: int
    component_ids: tuple[int, ...]
    adobe_transform: int | None
    end: int  # offset just past the first EOI after the first scan (the primary image's end)
    header_end: int  # offset just past the first SOS header: everything Pillow reads to open the file

    @property
    def gpu_ok(self) -> bool:
        """Whether nvJPEG decodes this to the same pixels Pillow would (else: CPU)."""
        if self.sof not in _SOF_GPU or self.precision != 8 or self.width < 1 or self.height < 1:
            return False
        if self.components == 1:
            return True
        if self.components != 3:
            return False  # CMYK / YCCK
        if self.adobe_transform == 0:
            return False  # Adobe "no transform": stored as RGB, not YCbCr
        return self.component_ids != (ord("R"), ord("G"), ord("B"))


def probe_jpeg(data: bytes | bytearray | memoryview) -> JpegProbe | None:
    """Scan a JPEG's markers up to its first scan; None when it is not a complete, plain JPEG.

    "Complete" means an EOI marker follows the first scan: a truncated file never has one there
    (0xFF in entropy-coded data is always stuffed or a restart marker), so truncated files go to
    the CPU decoder, which reports them exactly as it does without a GPU. A file that ends with
    EOI and holds no MPF (multi-picture) index is one image: no need to search for its end.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    sof: tuple[int, int, int, int, int, tuple[int, ...]] | None = None
    adobe: int | None = None
    mpf = False
    sos_end = -1
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker == 0xD9:
            return None  # EOI before any scan
        seglen = (data[pos + 2] << 8) | data[pos + 3]
        start, end = pos + 4, pos + 2 + seglen
        if seglen < 2 or end > n:
            return None
        if marker in _SOF_ALL:
            if sof is None:
                if seglen < 8:
                    return None
                ncomp = data[start + 5]
                ids = tuple(data[start + 6 + 3 * i] for i in range(ncomp) if start + 6 + 3 * i < end)
                sof = (
                    marker,
                    data[start],
                    (data[start + 3] << 8) | data[start + 4],
                    (data[start + 1] << 8) | data[start + 2],
                    ncomp,
                    ids,
                )
        elif marker == 0xEE and seglen >= 14 and bytes(data[start : start + 5]) == b"Adobe":
            adobe = data[start + 11]
        elif marker == 0xE2 and bytes(data[start : start + 4]) == b"MPF\x00":
            mpf = True
        elif marker == 0xDA:
            sos_end = end
            break
        pos = end
    if sof is None or sos_end < 0:
        return None
    if not mpf and data[n - 2] == 0xFF and data[n - 1] == 0xD9:
        end = n
    else:  # trailing bytes, several images, or truncated: find the first image's EOI, if any
        eoi = (data if isinstance(data, bytes) else bytes(data)).find(b"\xff\xd9", sos_end)
        if eoi < 0:
            return None
        end = eoi + 2
    marker, precision, width, height, ncomp, ids = sof
    return JpegProbe(marker, precision, width, height, ncomp, ids, adobe, end, sos_end)


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


# -- worker side: read, hash, route ----------------------------------------------------------


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

    items: list[Any]
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


def gpu_route(data: bytes | memoryview, max_pixels: int | None) -> tuple[JpegProbe, int, tuple[int, int]] | None:
    """(probe, EXIF orientation, upright size) when ``data`` should be decoded on the GPU, else None.

    Size and orientation come from Pillow itself, so the metadata matches the CPU path exactly.
    """
    probe = probe_jpeg(data)
    if probe is None or not probe.gpu_ok:
        return None
    try:  # Pillow reads markers up to the first scan only: the header is all it needs
        with Image.open(io.BytesIO(bytes(data[: probe.header_end]))) as im:
            if im.format not in ("JPEG", "MPO") or im.mode not in ("RGB", "L"):
                return None
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception:  # whatever Pillow dislikes, the CPU path reports in its own words
        return None
    if (w, h) != (probe.width, probe.height):
        return None
    if max_pixels is not None and w * h > max_pixels:
        return None  # the CPU path raises the over-the-limit error
    if not isinstance(orientation, int):
        orientation = 1
    size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return probe, orientation, size


def read_batch(
    paths: Sequence[str],
    prep: Preprocessing,
    max_pixels: int | None,
    draft: bool,
    gpu: bool,
) -> RawBatch:
    """Read one batch of files (in a worker): JPEG bytes for the GPU, CPU-decoded crops for the rest.

    With ``gpu``, files are read straight into one blob (in shared memory when running in a
    DataLoader worker, so handing it to the main process copies nothing); the hash and the
    routing work on views of it.
    """
    from .embed import DecodedItem, decode_file_bytes

    batch = RawBatch(items=[])
    crops: list[torch.Tensor] = []

    def cpu_decode(item: DecodedItem, data: bytes) -> None:
        crop = decode_file_bytes(item, data, prep, max_pixels, draft)
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
        route = gpu_route(mv, max_pixels)
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
        with open(path, "rb") as f:
            n = os.fstat(f.fileno()).st_size
            if n <= 0 or pos + n > len(view):
                return None
            mv = view[pos : pos + n]
            if f.readinto(mv) != n or f.read(1):
                return None
            return mv
    except OSError:
        return None


# -- main-process side: decode on the GPU -----------------------------------------------------


def nvjpeg_unavailable_reason(device: torch.device) -> str | None:
    """None when ``decode_jpeg(device=cuda)`` works here; else why not (checked by decoding a tiny JPEG)."""
    if device.type != "cuda":
        return "GPU decoding needs a CUDA device"
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = decode_jpeg([data], mode=ImageReadMode.UNCHANGED, device=device)
        torch.cuda.synchronize(device)
        if tuple(out[0].shape) != (3, 16, 16):
            return f"torchvision's GPU decoder returned shape {tuple(out[0].shape)} for a 16x16 RGB JPEG"
    except Exception as exc:  # no nvJPEG in this torchvision build, driver trouble, ...
        return f"torchvision cannot decode JPEGs on {device}: {exc}"
    return None


@dataclass
class PreparedBatch:
    """Model input on the device, ready once ``event`` has completed."""

    items: list[Any]
    x: torch.Tensor
    event: Any = None


class GpuBatchDecoder:
    """Turns a :class:`RawBatch` into normalised model input on the GPU (call from one thread).

    Call it with ``self.stream`` current. The stream is synchronised before each decode: nvJPEG
    writes its output on a stream of its own, into memory the caching allocator may hand back
    from this stream's earlier (possibly still queued) work.
    """

    def __init__(self, device: torch.device, prep: Preprocessing, dtype: torch.dtype, channels_last: bool = True) -> None:
        self.device = device
        self.prep = prep
        self.dtype = dtype
        self.channels_last = channels_last
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.max_pixels: int | None = None
        self.draft = True
        self.gpu_decoded = 0
        self.cpu_fallbacks = 0

    def decode_list(self, views: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Batched nvJPEG decode; on an error (the call is all-or-nothing) bisect to find the culprits."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return list(decode_jpeg(views, mode=ImageReadMode.UNCHANGED, device=self.device))
        except RuntimeError as exc:
            if len(views) == 1:
                log.debug("nvJPEG rejected a file: %s", exc)
                return [None]
            mid = len(views) // 2
            return self.decode_list(views[:mid]) + self.decode_list(views[mid:])

    def __call__(self, raw: RawBatch) -> PreparedBatch:
        from .embed import decode_file_bytes, normalize_batch

        n = len(raw.slots)
        c = self.prep.crop_size
        if self.stream is not None:
            self.stream.synchronize()
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
                    crop = decode_file_bytes(item, data, self.prep, self.max_pixels, self.draft)
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
