"""Turning images into L2-normalised float32 vectors, in batches, on the chosen device.

``Embedder.embed_files`` is a pipeline whose stages run concurrently, joined by bounded queues
(:mod:`simsearch.pipeline`), so that no stage waits for another when it does not have to:

1. DataLoader worker processes read, hash and decode files, a batch at a time. With
   ``decode="cpu"`` they hand back uint8 crops (4x less to copy than float); with ``decode="gpu"``
   they hand back the raw JPEG bytes (one blob per batch) plus CPU-decoded crops of whatever the
   GPU cannot decode (:mod:`simsearch.gpu_decode`).
2. On CUDA, a "prepare" thread on its own stream decodes the JPEGs with nvJPEG, resizes and crops
   them, copies the CPU crops in from pinned memory, and normalises (shared ``normalize_batch``).
3. A "forward" thread on another stream runs the model (bf16, or fp16 where bf16 is unsupported,
   channels_last, optionally torch.compile'd) and copies the vectors back asynchronously.
4. The caller (the indexer) consumes batches from the generator and writes them to SQLite/FAISS
   while the next batches are being decoded and embedded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ImageError, InputError
from .images import DEFAULT_MAX_PIXELS, decode_image_sized
from .models import EmbeddingModel, Preprocessing
from .pipeline import Stage

log = logging.getLogger(__name__)

DECODE_CHOICES = ("auto", "cpu", "gpu")
# Batch sizes tried, largest first, when none is given on CUDA (the first whose forward fits).
CUDA_BATCH_CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
CPU_BATCH_SIZE = 32


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available (use --device cpu or auto)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


PRECISION_CHOICES = ("auto", "fp32", "bf16")
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), about twice as fast as
    fp32; elsewhere bf16 is emulated and slower than fp32."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.7
    if capabilities is None:
        return False
    try:
        caps = capabilities()
    except Exception:  # an unknown CPU must not stop a run
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The reduced dtype the model runs in, None for float32.

    ``auto``: bf16 on a GPU that supports it, else fp16; on a CPU, bf16 where the CPU has bf16
    units (:func:`cpu_has_native_bf16`), else fp32. The embeddings agree with fp32's to a cosine
    of about 0.9999, far closer than any two different images. ``fp32`` and ``bf16`` force a choice.
    """
    if precision not in PRECISION_CHOICES:
        raise InputError(f"unknown precision {precision!r}; use {', '.join(PRECISION_CHOICES)}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise InputError("this GPU has no bf16; use --precision auto (fp16) or fp32")
        return autocast_dtype(device)
    if precision == "bf16" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None (full fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_decode(decode: str, device: torch.device) -> str:
    """``auto`` = gpu when the model runs on CUDA and torchvision can decode JPEGs there, else cpu."""
    if decode not in DECODE_CHOICES:
        raise InputError(f"unknown decoder {decode!r}; use auto, cpu or gpu")
    if decode == "cpu":
        return "cpu"
    if device.type != "cuda":
        if decode == "gpu":
            raise InputError(
                "--decode gpu needs the model on a CUDA device, but it runs on the CPU here "
                "(no CUDA device available, or --device cpu); use --decode cpu or auto"
            )
        return "cpu"
    from .gpu_decode import nvjpeg_unavailable_reason

    reason = nvjpeg_unavailable_reason(device)
    if reason is None:
        return "gpu"
    if decode == "gpu":
        raise InputError(f"--decode gpu: {reason}; use --decode cpu or auto")
    log.warning("decoding on the CPU: %s", reason)
    return "cpu"


def check_embed_options(device: str, decode: str, precision: str = "auto") -> None:
    """Fail fast (before any index is touched) on a device/decoder/precision combination that cannot work."""
    dev = resolve_device(device)
    resolve_precision(precision, dev)
    if decode not in DECODE_CHOICES:
        raise InputError(f"unknown decoder {decode!r}; use auto, cpu or gpu")
    if decode == "gpu" and dev.type != "cuda":
        resolve_decode(decode, dev)  # raises the explanatory InputError


def preprocess_pil(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Resize the shorter side, centre-crop, return a uint8 CHW tensor (normalised later, on device)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = F.resize(img, [prep.resize_size], interpolation=InterpolationMode(prep.interpolation), antialias=True)
    img = F.center_crop(img, [prep.crop_size])
    return F.pil_to_tensor(img)


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


@dataclass
class EmbeddedBatch:
    """One batch of files: ``items`` in input order; ``vectors`` has one row per ``ok`` item, in order."""

    items: list[DecodedItem]
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


def decode_file_bytes(
    item: DecodedItem, data: bytes, prep: Preprocessing, max_pixels: int | None, draft: bool
) -> torch.Tensor | None:
    """The CPU decode path for one file's bytes: a uint8 crop, or None with ``item.error`` set.

    Fills ``item.width``/``item.height`` (upright, full size, even when decoded at a draft scale).
    """
    try:
        img, (item.width, item.height) = decode_image_sized(
            data, item.path, max_pixels=max_pixels, draft_size=prep.resize_size if draft else None
        )
        return preprocess_pil(img, prep)
    except ImageError as exc:
        item.error = str(exc)
    except Exception as exc:  # never let one file kill a worker and the whole run
        item.error = f"{item.path}: unexpected decoding failure: {exc!r}"
    item.width = item.height = None
    return None


class _BatchDataset(torch.utils.data.Dataset):
    """Index = a list of positions; item = one :class:`~simsearch.gpu_decode.RawBatch` (read in a worker)."""

    def __init__(self, paths: Sequence[str], prep: Preprocessing, max_pixels: int | None, draft: bool, gpu: bool) -> None:
        self.paths = list(paths)
        self.prep = prep
        self.max_pixels = max_pixels
        self.draft = draft
        self.gpu = gpu

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices: list[int]) -> Any:
        from .gpu_decode import read_batch

        return read_batch([self.paths[i] for i in indices], self.prep, self.max_pixels, self.draft, self.gpu)


def _identity(x: Any) -> Any:
    return x


def worker_init(_: int) -> None:
    """DataLoader workers decode with one thread each: N workers must not each start N torch threads."""
    torch.set_num_threads(1)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _iterate_loader(it: Any) -> Iterator[Any]:
    """Yield from a DataLoader iterator; shut its workers down however iteration ends."""
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()


@dataclass
class _Pending:
    items: list[DecodedItem]
    vectors: torch.Tensor
    event: Any = None


class Embedder:
    """Runs an :class:`EmbeddingModel` over files or images, batch by batch.

    ``decode``: ``auto`` (nvJPEG when the model is on CUDA and torchvision supports it), ``cpu``
    or ``gpu`` (an :class:`InputError` without CUDA). ``compile``: wrap the model in
    ``torch.compile`` (pays off on long runs; batches are padded to one shape so it compiles once).
    ``batch_size=None`` picks the largest of :data:`CUDA_BATCH_CANDIDATES` whose forward fits in
    GPU memory (32 on CPU), probed on first use. ``warmup``: do that probe, cuDNN's autotuning and
    the compilation in the constructor (the indexer does; a one-off query need not).

    ``precision`` (see :func:`resolve_precision`): on CUDA the weights themselves are converted to
    bf16 (fp16); on a CPU the weights stay float32 and convolutions run under bf16 autocast.

    The model is moved to the device, put in eval mode and converted to channels_last in place
    (oneDNN's and cuDNN's fast layout: about 1.4x on a CPU), and on CUDA to bf16 (fp16) as well, so
    the GPU never holds a second copy of the weights. Pass a copy if you need the original (for
    example to keep training it).
    """

    def __init__(
        self,
        model: EmbeddingModel,
        device: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        draft: bool = True,
        decode: str = "auto",
        compile: bool = False,
        warmup: bool = False,
        precision: str = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        if batch_size is not None and batch_size < 1:
            raise InputError("--batch-size must be at least 1")
        self.decode = resolve_decode(decode, self.device)
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise InputError("--workers must be at least 0")
        self.max_pixels = max_pixels
        self.draft = draft
        self.compiled = compile
        self.prep = model.preprocessing
        self.cuda = self.device.type == "cuda"
        # on a CPU the weights stay float32 and bf16 comes from autocast (BN, pooling and the final
        # normalisation stay in float32); on CUDA the weights are converted (no second copy)
        self._cpu_autocast = not self.cuda and self.dtype is not None
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        weights_dtype = self.dtype if self.cuda else None
        model = model.to(device=self.device, dtype=weights_dtype, memory_format=torch.channels_last)
        self.model = model.eval()
        self._forward_module: Callable[[torch.Tensor], torch.Tensor] = self.model
        if compile:
            self._forward_module = torch.compile(self.model, dynamic=False)
        self._batch_size = batch_size or (None if self.cuda else CPU_BATCH_SIZE)
        if warmup and (self.cuda or compile):
            self.warm_up()

    def warm_up(self) -> None:
        """Pay the one-off costs now (batch-size probe, cuDNN autotuning, compilation), not in the first batch."""
        if self._batch_size is None:
            self._batch_size = self._auto_batch_size()  # its probe is a full-size forward
            return
        c = self.prep.crop_size
        x = torch.randint(0, 256, (self._batch_size, 3, c, c), dtype=torch.uint8)
        with torch.inference_mode():
            self._forward(self._prepare_crops(x))
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @property
    def batch_size(self) -> int:
        """Images per forward pass; on CUDA, unless given, probed on first use (queries never need to)."""
        if self._batch_size is None:
            self._batch_size = self._auto_batch_size()
        return self._batch_size

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def precision(self) -> str:
        """What the model computes in: fp32, bf16 or fp16."""
        return PRECISION_NAMES[self.dtype]

    # -- the model ---------------------------------------------------------------------------

    def _input_dtype(self) -> torch.dtype:
        return self.dtype if self.cuda and self.dtype is not None else torch.float32

    def _auto_batch_size(self) -> int:
        """The largest candidate batch whose forward pass fits (probed; also warms up cuDNN/compile)."""
        c = self.prep.crop_size
        for size in CUDA_BATCH_CANDIDATES:
            try:
                x = torch.randn((size, 3, c, c), device=self.device, dtype=self._input_dtype())
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    self._forward_module(x)
                torch.cuda.synchronize(self.device)
                del x
                log.info("batch size %d (probed on %s)", size, self.device)
                return size
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
        raise InputError("not even a batch of 1 fits in GPU memory; use --device cpu")

    def _forward(self, x: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """Model output (float32, L2-normalised) for a prepared input batch.

        Batches are padded to one shape when compiled (one compilation) and, with ``pad``, on CUDA
        (one set of cuDNN algorithms: a short last batch would otherwise be autotuned anew).
        """
        n = x.shape[0]
        if (self.compiled or (pad and self.cuda)) and 0 < n < self.batch_size:
            filler = x.new_zeros((self.batch_size - n, *x.shape[1:]))
            x = torch.cat([x, filler]).contiguous(memory_format=torch.channels_last)
        if self._cpu_autocast:
            with torch.autocast("cpu", dtype=self.dtype):
                out = self._forward_module(x)
        else:
            out = self._forward_module(x)
        return out[:n].float()

    def _prepare_crops(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        x = normalize_batch(x, self.prep, self._input_dtype())
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def embed_uint8(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a uint8 NCHW batch of preprocessed crops."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        step = self._query_batch_size()
        out = [self._forward(self._prepare_crops(chunk), pad=False) for chunk in batch.split(step)]
        return torch.cat(out).cpu().numpy()

    def _query_batch_size(self) -> int:
        # a few query images need no probe for the largest batch that fits (unless compiled)
        return self._batch_size or (self.batch_size if self.compiled else 64)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed already-decoded RGB images (used for queries)."""
        out = [np.zeros((0, self.dim), np.float32)]
        step = self._query_batch_size()
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            out.append(self.embed_uint8(torch.stack([preprocess_pil(im, self.prep) for im in chunk])))
        return np.concatenate(out)

    # -- files: the pipeline -------------------------------------------------------------------

    def _loader(self, paths: Sequence[str]) -> Any:
        gpu = self.decode == "gpu"
        batches = [list(range(s, min(s + self.batch_size, len(paths)))) for s in range(0, len(paths), self.batch_size)]
        workers = min(self.workers, len(batches)) if self.workers else 0
        dataset = _BatchDataset(paths, self.prep, self.max_pixels, self.draft, gpu)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=batches,
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=self.cuda,
            worker_init_fn=worker_init if workers else None,
            prefetch_factor=2 if workers else None,
        )

    def _stage_context(self, stream: Any) -> Callable[[], Any]:
        def setup() -> Any:
            stack = contextlib.ExitStack()
            stack.enter_context(torch.inference_mode())
            if stream is not None:
                stack.enter_context(torch.cuda.stream(stream))
            return stack

        return setup

    def _make_decoder(self) -> Any:
        from .gpu_decode import GpuBatchDecoder

        decoder = GpuBatchDecoder(self.device, self.prep, self._input_dtype())
        decoder.max_pixels = self.max_pixels
        decoder.draft = self.draft
        return decoder

    def _prepare_raw(self, raw: Any) -> Any:
        """RawBatch of CPU crops -> prepared input (on CUDA with ``decode=cpu``, or on CPU)."""
        from .gpu_decode import PreparedBatch

        x = self._prepare_crops(raw.crops) if raw.slots else None
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return PreparedBatch(raw.items, x if x is not None else torch.zeros(0), event)

    def _embed_prepared(self, prepared: Any) -> _Pending:
        if self.cuda and prepared.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(prepared.event)
            if prepared.x.is_cuda:
                prepared.x.record_stream(stream)
        ok = sum(1 for item in prepared.items if item.ok)
        if ok == 0:
            return _Pending(prepared.items, torch.zeros((0, self.dim)))
        out = self._forward(prepared.x)
        if self.cuda:
            host = out.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            return _Pending(prepared.items, host, event)
        return _Pending(prepared.items, out)

    def embed_files(
        self, paths: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> Iterator[EmbeddedBatch]:
        """Decode, embed and yield batches in input order, each stage running ahead of the next by a
        bounded number of batches (so the caller's writes overlap the next batches' work)."""
        if not paths:
            return
        it = iter(self._loader(paths))  # workers fork here, before any pipeline thread exists
        source: Any = _iterate_loader(it)
        stages: list[Stage[Any]] = []
        try:
            if self.decode == "gpu":  # (runs on CPU too, with torchvision's CPU decoder: used by tests)
                decoder = self._make_decoder()
                stages.append(Stage(source, decoder, maxsize=2, name="prepare", setup=self._stage_context(decoder.stream)))
            elif self.cuda:
                stream = torch.cuda.Stream(self.device)
                stages.append(Stage(source, self._prepare_raw, maxsize=2, name="prepare", setup=self._stage_context(stream)))
            fwd_stream = torch.cuda.Stream(self.device) if self.cuda else None
            if stages:
                forward: Callable[[Any], _Pending] = self._embed_prepared
                upstream: Any = stages[-1]
            else:  # CPU decode, CPU model: normalise in the forward thread
                forward, upstream = (lambda raw: self._embed_prepared(self._prepare_raw(raw))), source
            stages.append(Stage(upstream, forward, maxsize=3, name="forward", setup=self._stage_context(fwd_stream)))
            for pending in stages[-1]:
                if pending.event is not None:
                    pending.event.synchronize()
                vectors = pending.vectors.numpy().astype(np.float32, copy=True)
                if progress is not None:
                    progress(len(pending.items))
                yield EmbeddedBatch(pending.items, vectors.reshape(-1, self.dim))
        finally:
            for stage in reversed(stages):
                stage.close()
            if not stages:
                source.close()
