"""Which JPEGs the GPU may decode: a marker scan, and Pillow's reading of the header.

nvJPEG is given a file only when its hardware decoder (A100/H100/H200) takes it in the batched
call and decodes it to the same pixels Pillow would: 8-bit baseline Huffman JPEGs in YCbCr or
grayscale, with a common chroma subsampling (4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1), complete, within
``max_pixels``. Everything else goes to the CPU decoder, which reports failures in its own words.
Progressive JPEGs (SOF2) in particular go to the CPU: torchvision hands whatever the hardware
decoder rejects to nvJPEG's software path, one file at a time and with a host sync per file, in
the single thread that prepares batches for the GPU, where the DataLoader workers decode them in
parallel. Host code only (no torch),
run in the DataLoader workers by :func:`simsearch.embed.batches.read_batch`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from ..images import THIN_ASPECT

_SOF_GPU = (0xC0,)  # baseline only: the hardware decoder's format
# luma (H, V) sampling factors the hardware decoder takes, chroma being 1x1: 4:4:4, 4:2:2, 4:4:0,
# 4:2:0, 4:1:1
_LUMA_SAMPLING_GPU = frozenset({(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)})
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
    sampling: tuple[tuple[int, int], ...]  # (H, V) sampling factors per component
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
        if self.components != 3 or len(self.sampling) != 3:
            return False  # CMYK / YCCK
        if self.sampling[0] not in _LUMA_SAMPLING_GPU or self.sampling[1:] != ((1, 1), (1, 1)):
            return False  # a subsampling the hardware decoder leaves to the software path
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
    sof: tuple[int, int, int, int, int, tuple[int, ...], tuple[tuple[int, int], ...]] | None = None
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
                comps = [start + 6 + 3 * i for i in range(ncomp) if start + 6 + 3 * i + 1 < end]
                ids = tuple(data[c] for c in comps)
                sampling = tuple((data[c + 1] >> 4, data[c + 1] & 0x0F) for c in comps)
                sof = (
                    marker,
                    data[start],
                    (data[start + 3] << 8) | data[start + 4],
                    (data[start + 1] << 8) | data[start + 2],
                    ncomp,
                    ids,
                    sampling,
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
    marker, precision, width, height, ncomp, ids, sampling = sof
    return JpegProbe(marker, precision, width, height, ncomp, ids, sampling, adobe, end, sos_end)


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
    if max(w, h) > THIN_ASPECT * min(w, h):
        return None  # the CPU path trims a very thin image before resizing it (bounded memory)
    if not isinstance(orientation, int):
        orientation = 1
    size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return probe, orientation, size

