"""DataLoader plumbing shared by embedding and training: one loader builder, worker set-up, clean shutdown.

:func:`build_loader` is the only place a ``torch.utils.data.DataLoader`` is configured (worker
count, thread budget per worker, prefetching, pinning, seeding); the Embedder feeds it a
:class:`BatchDataset` (one item = one whole batch, read by :func:`simsearch.embed.batches.read_batch`),
training its labelled image datasets.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .batches import RawBatch, read_batch
from .decode import CropDecoder


def worker_init(_: int) -> None:
    """DataLoader workers decode with one thread each: N workers must not each start N torch threads."""
    torch.set_num_threads(1)


def default_workers() -> int:
    """Decoding processes when none is asked for: one per CPU, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _identity(x: Any) -> Any:
    return x


class BatchDataset(torch.utils.data.Dataset):
    """Index = a list of positions; item = one :class:`~simsearch.embed.batches.RawBatch` (read in a worker)."""

    def __init__(self, paths: Sequence[str], decoder: CropDecoder, gpu: bool) -> None:
        self.paths = list(paths)
        self.decoder = decoder
        self.gpu = gpu

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices: list[int]) -> RawBatch:
        return read_batch([self.paths[i] for i in indices], self.decoder, self.gpu)


def build_loader(
    dataset: torch.utils.data.Dataset,
    workers: int,
    batch_size: int | None = 1,
    sampler: Iterable[Any] | None = None,
    shuffle: bool = False,
    collate_fn: Callable[[Any], Any] | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    seed: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader with simsearch's worker set-up: one torch thread per worker, 2 batches prefetched each.

    ``batch_size=None`` with a ``sampler`` of index lists hands each list to the dataset whole
    (:class:`BatchDataset`); ``collate_fn=None`` then passes items through untouched. ``seed``
    seeds the loader's own generator (shuffling, worker seeds); without it the global RNG is used.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn if collate_fn is not None else (_identity if batch_size is None else None),
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
        generator=generator,
    )


def iterate_loader(it: Iterator[Any]) -> Iterator[Any]:
    """Yield from a DataLoader iterator; shut its workers down however iteration ends."""
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
