"""The one decode-to-crop path: encoded bytes -> upright RGB -> resized, centre-cropped uint8 tensor.

Indexing (CPU workers, and the GPU decoder's fallback), querying, training and evaluation all
turn a file into model input through :class:`CropDecoder`, so they see the same pixels for the
same file (draft-scale JPEG decoding included: the draft size is the model's resize size) and
one place decides what an unexpected decoding failure reads like. Normalisation happens later,
on the model's device (:func:`normalize_batch`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ImageError
from ..images import DEFAULT_MAX_PIXELS, THIN_ASPECT, decode_image_sized
from ..models import Preprocessing


@dataclass
class DecodedItem:
    """The outcome of reading one file: metadata always, an error instead of pixels on failure."""

    path: str
    hash: str | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def trim_thin(img: Image.Image, aspect: int = THIN_ASPECT) -> Image.Image:
    """Keep the centred part of a very thin image's long side, at most ``aspect`` times its short side.

    The shorter side is resized to the model's resize size and only a centred square is kept, so
    the trimmed-off ends never reach the model; but resizing them first would allocate
    ``long / short * resize_size**2`` pixels (about 12 GB for a 60000 x 1 strip). Trimmed, the
    resize allocates at most ``aspect * resize_size**2`` pixels whatever the file. Images within
    the aspect ratio are returned as they are.
    """
    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short == 0 or long <= aspect * short:
        return img
    keep = aspect * short
    start = (long - keep) // 2
    return img.crop((start, 0, start + keep, h) if w > h else (0, start, w, start + keep))


# torchvision's InterpolationMode values -> Pillow's resampling filters (torchvision's own mapping)
PIL_RESAMPLE = {"nearest": 0, "nearest-exact": 0, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5, "lanczos": 1}


def preprocess_pil(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Resize the shorter side, centre-crop, return a uint8 CHW tensor (normalised later, on device).

    A very thin image is first trimmed to its centre (:func:`trim_thin`), so that memory stays
    bounded whatever the aspect ratio. The pixels are those of torchvision's ``resize`` (shorter
    side, antialiased), ``center_crop`` and ``pil_to_tensor`` on a PIL image, done with Pillow
    directly: importing torchvision would cost a cold query as much as importing torch (a test
    compares the two).
    """
    img = trim_thin(img)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = prep.resize_size, int(prep.resize_size * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != img.size:
        img = img.resize(size, PIL_RESAMPLE[prep.interpolation])
    img = _center_crop(img, prep.crop_size)
    array = np.array(img, copy=True)
    return torch.from_numpy(array.reshape(img.size[1], img.size[0], -1)).permute(2, 0, 1)


def _center_crop(img: Image.Image, crop: int) -> Image.Image:
    """torchvision's ``center_crop`` of a PIL image: pad with black when smaller, round the offsets."""
    w, h = img.size
    if crop > w or crop > h:
        pad_w, pad_h = max(crop - w, 0), max(crop - h, 0)
        img = ImageOps.expand(img, border=(pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2), fill=_black(img))
        w, h = img.size
        if (w, h) == (crop, crop):
            return img
    top, left = round((h - crop) / 2.0), round((w - crop) / 2.0)
    return img.crop((left, top, left + crop, top + crop))


def _black(img: Image.Image) -> int | tuple[int, ...]:
    bands = len(img.getbands())
    return 0 if bands == 1 else (0,) * bands


@dataclass(frozen=True)
class CropDecoder:
    """Decodes files into uint8 CHW crops for a model's :class:`Preprocessing`.

    ``max_pixels``: refuse larger images (an :class:`ImageError`). ``draft``: decode big JPEGs at
    a reduced DCT scale whose shorter side still covers ``prep.resize_size``. ``crop``: what turns
    the decoded image into a tensor; the centre crop of :func:`preprocess_pil` unless given (training
    passes its random augmentation).
    """

    prep: Preprocessing
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    draft: bool = True
    crop: Callable[[Image.Image], torch.Tensor] | None = None

    def decode(self, data: bytes, name: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """(crop, upright full-size (width, height)) of one file's bytes.

        Raises :class:`ImageError` for whatever goes wrong, an unexpected exception included (so a
        caller that records failures never lets one file kill a worker and the whole run).
        """
        try:
            img, size = decode_image_sized(
                data, name, max_pixels=self.max_pixels, draft_size=self.prep.resize_size if self.draft else None
            )
            return (self.crop(img) if self.crop is not None else preprocess_pil(img, self.prep)), size
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"{name}: unexpected decoding failure: {exc!r}") from exc

    def decode_item(self, item: DecodedItem, data: bytes) -> torch.Tensor | None:
        """The crop of ``item``'s bytes, recording its size; or None with ``item.error`` set."""
        try:
            crop, (item.width, item.height) = self.decode(data, item.path)
            return crop
        except ImageError as exc:
            item.error = str(exc)
        item.width = item.height = None
        return None


def normalize_batch(batch: torch.Tensor, prep: Preprocessing, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """uint8 (or float in [0, 255]) NCHW -> float, scaled to [0, 1] and normalised with the preprocessing's mean/std."""
    mean, std = _mean_std(prep.mean, prep.std, batch.device)
    return ((batch.float() - mean) / std).to(dtype or torch.float32)


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation constants on ``device``, made once (not two small host-to-device copies per batch)."""
    with torch.inference_mode(False):  # ordinary tensors, usable inside and outside inference mode
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).mul_(255.0).to(device)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).mul_(255.0).to(device)
    return m, s
