"""The Embedder: turning images into L2-normalised float32 vectors, in batches, on the chosen device.

``Embedder.embed_files`` is a pipeline whose stages run concurrently, joined by bounded queues
(:mod:`simsearch.embed.pipeline`), so that no stage waits for another when it does not have to:

1. DataLoader worker processes (:mod:`simsearch.embed.loader`) read, hash and decode files, a
   batch at a time (:func:`simsearch.embed.batches.read_batch`). With ``decode="cpu"`` they hand
   back uint8 crops (4x less to copy than float); with ``decode="gpu"`` they hand back the raw JPEG
   bytes (one blob per batch) plus CPU-decoded crops of whatever the GPU cannot decode.
2. On CUDA, a "prepare" thread on its own stream decodes the JPEGs with nvJPEG
   (:mod:`simsearch.embed.gpu_decode`), resizes and crops them, copies the CPU crops in from
   pinned memory, and normalises (shared ``normalize_batch``).
3. A "forward" thread on another stream runs the model (bf16, or fp16 where bf16 is unsupported,
   channels_last, optionally torch.compile'd) and copies the vectors back asynchronously.
4. The caller (the indexer) consumes batches from the generator and writes them to SQLite/FAISS
   while the next batches are being decoded and embedded.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..images import DEFAULT_MAX_PIXELS
from ..models import EmbeddingModel
from .allocator import keep_freed_memory
from .batches import PreparedBatch, RawBatch
from .decode import CropDecoder, DecodedItem, normalize_batch, preprocess_pil
from .device import PRECISION_NAMES, resolve_decode, resolve_device, resolve_precision
from .gpu_decode import GpuBatchDecoder
from .loader import BatchDataset, build_loader, default_workers, iterate_loader
from .pipeline import Stage

log = logging.getLogger(__name__)

# Batch sizes tried, largest first, when none is given on CUDA (the first whose forward fits).
CUDA_BATCH_CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
CPU_BATCH_SIZE = 32
# Query batches on CUDA are padded up to one of these sizes (or to the query batch size), so that
# cudnn.benchmark autotunes a handful of shapes per process, not one per number of query images.
QUERY_PAD_SIZES = (1, 4, 16, 64)


def query_pad_size(n: int, step: int) -> int:
    """The batch size a query chunk of ``n`` images (``n <= step``) is padded to: the smallest of
    :data:`QUERY_PAD_SIZES` that holds it, but never more than ``step`` (the chunk size)."""
    if not 0 < n <= step:
        raise ValueError(f"a query chunk holds 1 to {step} images, not {n}")
    return min([s for s in QUERY_PAD_SIZES if s >= n] + [step])


@dataclass
class EmbeddedBatch:
    """One batch of files: ``items`` in input order; ``vectors`` has one row per ``ok`` item, in order."""

    items: list[DecodedItem]
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


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
        else:
            keep_freed_memory()  # batch activations are reused, not page-faulted in again per layer
        weights_dtype = self.dtype if self.cuda else None
        model = model.to(device=self.device, dtype=weights_dtype, memory_format=torch.channels_last)
        self.model = model.eval()
        self._forward_module: Callable[[torch.Tensor], torch.Tensor] = self.model
        if compile:
            self._forward_module = torch.compile(self.model, dynamic=False)
        self._batch_size = batch_size or (None if self.cuda else CPU_BATCH_SIZE)
        # pad query chunks to QUERY_PAD_SIZES (on CUDA: one cuDNN autotuning per size, not per count)
        self.pad_queries = self.cuda
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
            self.forward_crops(x)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @property
    def batch_size(self) -> int:
        """Images per forward pass; on CUDA, unless given, probed on first use (queries never need to)."""
        if self._batch_size is None:
            self._batch_size = self._auto_batch_size()
        return self._batch_size

    @property
    def crop_decoder(self) -> CropDecoder:
        """The decode-to-crop path for this model's preprocessing and this embedder's options."""
        return CropDecoder(self.prep, max_pixels=self.max_pixels, draft=self.draft)

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
                # built inside inference_mode, as every real batch is: an ordinary tensor here would
                # make a compiled model guard on it, and the first real batch would recompile
                with torch.inference_mode():
                    x = torch.randn((size, 3, c, c), device=self.device, dtype=self._input_dtype())
                    x = x.contiguous(memory_format=torch.channels_last)
                    self._forward_module(x)
                torch.cuda.synchronize(self.device)
                del x
                log.info("batch size %d (probed on %s)", size, self.device)
                return size
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
        raise InputError("not even a batch of 1 fits in GPU memory; use --device cpu")

    def _forward(self, x: torch.Tensor, pad: bool = True, pad_to: int | None = None) -> torch.Tensor:
        """Model output (float32, L2-normalised) for a prepared input batch.

        Batches are padded to one shape when compiled (one compilation) and, with ``pad``, on CUDA
        (one set of cuDNN algorithms: a short last batch would otherwise be autotuned anew);
        otherwise to ``pad_to`` rows when given. Padding rows are zeros, and their outputs dropped.
        """
        n = x.shape[0]
        target = self.batch_size if self.compiled or (pad and self.cuda) else (pad_to or n)
        if 0 < n < target:
            filler = x.new_zeros((target - n, *x.shape[1:]))
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

    def forward_crops(self, batch: torch.Tensor, pad: bool = True, pad_to: int | None = None) -> torch.Tensor:
        """Normalise a uint8 NCHW batch of crops on the device and run the model: float32 vectors, on the
        device (no copy back; call under ``torch.inference_mode``). See :meth:`_forward` for the padding."""
        return self._forward(self._prepare_crops(batch), pad=pad, pad_to=pad_to)

    @torch.inference_mode()
    def embed_uint8(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a uint8 NCHW batch of preprocessed crops."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        step = self._query_batch_size()
        out = [
            self.forward_crops(chunk, pad=False, pad_to=query_pad_size(len(chunk), step) if self.pad_queries else None)
            for chunk in batch.split(step)
        ]
        return torch.cat(out).cpu().numpy()

    def _query_batch_size(self) -> int:
        # a few query images need no probe for the largest batch that fits (unless compiled)
        return self._batch_size or (self.batch_size if self.compiled else 64)

    def embed_crops(self, crops: Sequence[torch.Tensor]) -> np.ndarray:
        """Embed uint8 CHW crops (from :class:`~simsearch.embed.decode.CropDecoder`), a query batch at a time."""
        out = [np.zeros((0, self.dim), np.float32)]
        step = self._query_batch_size()
        for start in range(0, len(crops), step):
            out.append(self.embed_uint8(torch.stack(list(crops[start : start + step]))))
        return np.concatenate(out)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed already-decoded RGB images."""
        return self.embed_crops([preprocess_pil(im, self.prep) for im in images])

    # -- files: the pipeline -------------------------------------------------------------------

    def raw_batches(self, paths: Sequence[str]) -> Iterator[RawBatch]:
        """The pipeline's source: batches of ``paths`` as the DataLoader workers read and decode them.

        The workers start here (before any pipeline thread exists) and stop however iteration ends.
        """
        batches = [list(range(s, min(s + self.batch_size, len(paths)))) for s in range(0, len(paths), self.batch_size)]
        workers = min(self.workers, len(batches)) if self.workers else 0
        dataset = BatchDataset(paths, self.crop_decoder, gpu=self.decode == "gpu")
        loader = build_loader(dataset, workers, batch_size=None, sampler=batches, pin_memory=self.cuda)
        return iterate_loader(iter(loader))

    def _stage_context(self, stream: Any) -> Callable[[], Any]:
        def setup() -> Any:
            stack = contextlib.ExitStack()
            stack.enter_context(torch.inference_mode())
            if stream is not None:
                stack.enter_context(torch.cuda.stream(stream))
            return stack

        return setup

    def make_gpu_decoder(self) -> GpuBatchDecoder:
        """The nvJPEG stage's decoder for this embedder (it counts GPU-decoded files and CPU fallbacks)."""
        return GpuBatchDecoder(self.device, self.crop_decoder, self._input_dtype())

    def prepare_stage(
        self, source: Iterator[RawBatch], decoder: GpuBatchDecoder | None = None
    ) -> Stage[PreparedBatch] | None:
        """The "prepare" stage over ``source``: the GPU decoder with ``decode="gpu"`` (``decoder``, or a
        new one), else on CUDA a copy of the CPU crops to the device on a stream of its own; None for
        CPU decoding with the model on the CPU (the forward thread normalises then)."""
        if self.decode == "gpu":  # (runs on CPU too, with torchvision's CPU decoder: used by tests)
            decoder = decoder or self.make_gpu_decoder()
            return Stage(source, decoder, maxsize=2, name="prepare", setup=self._stage_context(decoder.stream))
        if self.cuda:
            stream = torch.cuda.Stream(self.device)
            return Stage(source, self._prepare_raw, maxsize=2, name="prepare", setup=self._stage_context(stream))
        return None

    def _prepare_raw(self, raw: RawBatch) -> PreparedBatch:
        """RawBatch of CPU crops -> prepared input (on CUDA with ``decode=cpu``, or on CPU)."""
        x = self._prepare_crops(raw.crops) if raw.slots else None
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return PreparedBatch(raw.items, x if x is not None else torch.zeros(0), event)

    def _embed_prepared(self, prepared: PreparedBatch) -> _Pending:
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
        source = self.raw_batches(paths)  # workers fork here, before any pipeline thread exists
        stages: list[Stage[Any]] = []
        try:
            prepare = self.prepare_stage(source)
            if prepare is not None:
                stages.append(prepare)
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
