"""Which images form each training batch: m-per-class for pair losses, shuffled otherwise."""

from __future__ import annotations

import torch

from .losses import LossSetup


def epoch_batches(loss: LossSetup, labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for one epoch: m-per-class for pair losses, shuffled otherwise."""
    n = len(labels)
    if loss.m_per_class:
        from pytorch_metric_learning.samplers import MPerClassSampler

        m = loss.m_per_class
        b = sampler_batch(batch_size, m, len(torch.unique(labels)))
        length = max(b, n - n % b)
        idx = torch.as_tensor(list(iter(MPerClassSampler(labels, m, batch_size=b, length_before_new_iter=length))))
        return list(idx.split(b))
    b = min(batch_size, n)
    perm = torch.randperm(n, generator=generator)
    batches = list(perm.split(b))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches = batches[:-1]  # BatchNorm cannot train on a batch of one
    return batches


def sampler_batch(batch_size: int, m: int, n_classes: int) -> int:
    """The m-per-class batch size: at most ``batch_size`` and all classes' m, a multiple of m."""
    b = min(batch_size, m * n_classes)
    b -= b % m
    return max(b, m)
