"""The metric head: a projection from pooled backbone features to the embedding.

Linear -> optional BatchNorm1d -> optional Dropout; the L2 normalisation that follows lives in
:class:`simsearch.models.EmbeddingModel`, so indexing and training normalise the same way. It is
part of the model layer because a trained checkpoint holds one: recreating the model for indexing
needs it without importing training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MetricHead(nn.Sequential):
    """Linear(in_dim, dim) [-> BatchNorm1d(dim)] [-> Dropout(p)]."""

    def __init__(self, in_dim: int, dim: int, bn: bool = True, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Linear(in_dim, dim)]
        if bn:
            layers.append(nn.BatchNorm1d(dim))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.in_dim, self.dim, self.bn, self.dropout = in_dim, dim, bn, dropout

    def config(self) -> dict[str, Any]:
        return {"type": "MetricHead", "in_dim": self.in_dim, "dim": self.dim, "bn": self.bn, "dropout": self.dropout}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MetricHead":
        return cls(int(config["in_dim"]), int(config["dim"]), bool(config["bn"]), float(config["dropout"]))

    @torch.no_grad()
    def init_lda(self, features: torch.Tensor, labels: torch.Tensor, shrink: float = 1.0) -> None:
        """Start as a shrunk within-class whitening of the features, then their PCA to ``dim``.

        ``x -> (S_w + shrink * mean_eig(S_w) * I)^(-1/2) (x - mean)``, with S_w the within-class
        covariance of the training classes: directions along which images of one class vary
        (background, pose, lighting) are damped, the others kept. It holds no class-specific
        direction, so it tends to carry over to unseen classes better than a trained projection.
        """
        x = features.double()
        y = labels.to(x.device).long()
        n_classes = int(y.max()) + 1
        sums = torch.zeros((n_classes, x.shape[1]), dtype=x.dtype).index_add_(0, y, x)
        counts = torch.bincount(y, minlength=n_classes).clamp(min=1).to(x.dtype)
        within = x - (sums / counts[:, None])[y]
        ev, evec = torch.linalg.eigh(within.T @ within / len(x))
        ev = ev.clamp(min=0)
        ev = ev + shrink * ev.mean() + 1e-12
        t = (evec * ev.rsqrt()) @ evec.T
        t = t / t.diagonal().mean()  # keep the overall scale of the features
        self._init_projection(features.float(), t.float())

    @torch.no_grad()
    def init_pca(self, features: torch.Tensor) -> None:
        """Start as the top principal directions of the features (a projection keeping their geometry).

        The bias centres the data; a BatchNorm after it starts as the identity on these features
        (running statistics measured, affine parameters undoing them), so the initial head is
        exactly the PCA projection: training starts from the pretrained geometry, not a random one.
        """
        x = features.float()
        self._init_projection(x, torch.eye(x.shape[1], dtype=x.dtype))

    def _init_projection(self, x: torch.Tensor, transform: torch.Tensor) -> None:
        """Linear = top-``dim`` principal directions of ``transform @ (x - mean)``; BatchNorm = identity."""
        linear = self[0]
        assert isinstance(linear, nn.Linear)
        mean = x.mean(0)
        z = (x - mean) @ transform.T
        q = min(self.dim, z.shape[0], z.shape[1])
        _, _, v = torch.pca_lowrank(z, q=q, center=False, niter=4)
        w = torch.randn(self.dim, z.shape[1], generator=torch.Generator().manual_seed(0)) * 1e-3
        w[:q] = v[:, :q].T
        w = w @ transform  # out = w_pca @ transform @ (x - mean)
        linear.weight.copy_(w)
        linear.bias.copy_(-(w @ mean))
        if self.bn:
            bn = self[1]
            assert isinstance(bn, nn.BatchNorm1d)
            out = (x - mean) @ w.T
            mu, var = out.mean(0), out.var(0, unbiased=False)
            bn.running_mean.copy_(mu)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mu)
