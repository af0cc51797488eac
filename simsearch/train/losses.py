"""A thin factory over pytorch-metric-learning: one name -> loss (+ miner, sampler need, defaults).

Two families:

* proxy / classification losses (``arcface``, ``cosface``, ``proxyanchor``): hold learnable class
  weights (trained with the head, at ``proxy_lr_mult`` times its learning rate); plain shuffled batches.
* pair losses (``triplet``, ``ms``, ``supcon``): compare items within a batch, so batches are drawn
  with an m-per-class sampler to always contain positives; ``triplet`` mines batch-hard triplets
  by default (``miner="multi-similarity"`` for the MS miner).

Defaults are the published ones for embeddings on the unit sphere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import InputError

LOSSES = ("arcface", "cosface", "proxyanchor", "triplet", "ms", "supcon")
MINERS = ("batch-hard", "multi-similarity")


@dataclass
class LossSetup:
    """What the training loop needs to know about a loss."""

    name: str
    loss: nn.Module
    miner: Any = None
    m_per_class: int = 0  # > 0: batches come from an MPerClassSampler with this m
    proxy_lr_mult: float = 1.0  # learning rate of the loss's own parameters, relative to the head's
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, embeddings: Any, labels: Any) -> Any:
        if self.miner is not None:
            return self.loss(embeddings, labels, self.miner(embeddings, labels))
        return self.loss(embeddings, labels)

    @property
    def has_parameters(self) -> bool:
        return any(True for _ in self.loss.parameters())


def make_loss(name: str, num_classes: int, dim: int, miner: str | None = None, **overrides: Any) -> LossSetup:
    """Build a loss by name with sensible defaults; ``overrides`` change its constructor arguments."""
    from pytorch_metric_learning import losses, miners

    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    if miner is not None and name != "triplet":
        raise InputError("--miner applies to --loss triplet only")
    if miner is not None and miner not in MINERS:
        raise InputError(f"unknown miner {miner!r}; choose one of: {', '.join(MINERS)}")
    if name == "arcface":
        params = {"margin": 28.6, "scale": 64.0, **overrides}
        return LossSetup(name, losses.ArcFaceLoss(num_classes, dim, **params), proxy_lr_mult=10.0, params=params)
    if name == "cosface":
        params = {"margin": 0.35, "scale": 64.0, **overrides}
        return LossSetup(name, losses.CosFaceLoss(num_classes, dim, **params), proxy_lr_mult=10.0, params=params)
    if name == "proxyanchor":
        params = {"margin": 0.1, "alpha": 32.0, **overrides}
        # Kim et al. (2020) train the proxies 100x faster than the network.
        return LossSetup(name, losses.ProxyAnchorLoss(num_classes, dim, **params), proxy_lr_mult=100.0, params=params)
    if name == "triplet":
        params = {"margin": 0.1, **overrides}
        which = miner or "batch-hard"
        mined = miners.BatchHardMiner() if which == "batch-hard" else miners.MultiSimilarityMiner(epsilon=0.1)
        return LossSetup(
            name, losses.TripletMarginLoss(**params), mined, m_per_class=4, params={**params, "miner": which}
        )
    if name == "ms":
        params = {"alpha": 2.0, "beta": 50.0, "base": 0.5, **overrides}
        return LossSetup(
            name, losses.MultiSimilarityLoss(**params), miners.MultiSimilarityMiner(epsilon=0.1), m_per_class=4, params=params
        )
    params = {"temperature": 0.1, **overrides}
    return LossSetup(name, losses.SupConLoss(**params), m_per_class=4, params=params)


def _proxy_weight(setup: LossSetup) -> tuple[Any, bool]:
    """The loss's class weights and whether they are stored (dim, classes); (None, False) without proxies."""
    weight = getattr(setup.loss, "proxies", None)
    if weight is not None:
        return weight, False
    weight = getattr(setup.loss, "W", None)  # ArcFace / CosFace: (dim, num_classes)
    return weight, weight is not None


def class_proxies(setup: LossSetup) -> Any:
    """The loss's learned class vectors as an L2-normalised (classes, dim) CPU tensor; None without proxies."""
    import torch

    weight, transposed = _proxy_weight(setup)
    if weight is None:
        return None
    with torch.no_grad():
        w = weight.detach().float().cpu()
        return torch.nn.functional.normalize(w.T if transposed else w, dim=1).contiguous()


def init_proxies(setup: LossSetup, embeddings: Any, labels: Any) -> bool:
    """Start a proxy loss's class weights at the (normalised) class means of ``embeddings``.

    Random proxies make the first steps pull every embedding towards arbitrary directions, which
    wrecks a pretrained geometry before the proxies have moved; proxies at the class means make the
    loss start from the geometry the features already have. Returns False for losses without proxies.
    """
    import torch

    weight, transposed = _proxy_weight(setup)
    if weight is None:
        return False
    with torch.no_grad():
        e = torch.nn.functional.normalize(embeddings.float(), dim=1)
        n_classes = weight.shape[1] if transposed else weight.shape[0]
        means = torch.zeros((n_classes, e.shape[1]), dtype=e.dtype, device=e.device)
        means.index_add_(0, labels.to(e.device), e)
        means = torch.nn.functional.normalize(means, dim=1).to(weight.device, weight.dtype)
        missing = means.norm(dim=1) == 0
        if missing.any():  # a class without embeddings keeps its random proxy
            current = weight.T if transposed else weight
            means[missing] = torch.nn.functional.normalize(current[missing].float(), dim=1).to(weight.dtype)
        weight.copy_(means.T if transposed else means)
    return True
