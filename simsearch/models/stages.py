"""Cutting a backbone into stages: a frozen trunk and a trainable top.

Fine-tuning uses these, but they live with the models because they read only what a backbone's
registry entry says about its forward pass (``BackboneSpec.stages`` and ``.sequence``): training
imports them, the model layer never imports training.
"""

from __future__ import annotations

from torch import nn

from ..errors import InputError
from .embedding import EmbeddingModel, Twin


def backbone_sequence(model: EmbeddingModel) -> list[tuple[str, nn.Module]]:
    """The backbone's forward pass as ordered (name, module) pairs (see BackboneSpec.sequence)."""
    if model.spec.sequence is None:
        raise InputError(f"{model.model_name} cannot be split into stages")
    return model.spec.sequence(model.backbone)


def split_backbone(model: EmbeddingModel, n_top: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(trunk, top): the backbone cut before its top ``n_top`` stages; modules are shared, not copied.

    ``top(trunk(model.adapt_input(x)))`` equals ``model.features(x)``.
    """
    first_top = top_stages(model, n_top)[0]
    seq = backbone_sequence(model)
    names = [n for n, _ in seq]
    cut = names.index(first_top)
    return nn.Sequential(*[m for _, m in seq[:cut]]), nn.Sequential(*[m for _, m in seq[cut:]])


def top_stages(model: EmbeddingModel, n_top: int) -> list[str]:
    """Names of the top ``n_top`` stages (the ones fine-tuning unfreezes)."""
    stages = model.spec.stages
    if not 1 <= n_top <= len(stages):
        raise InputError(f"--unfreeze must be between 1 and {len(stages)} for {model.model_name} ({', '.join(stages)})")
    return list(stages[len(stages) - n_top :])


def attach_twin(model: EmbeddingModel, twin: Twin) -> EmbeddingModel:
    """Give ``model`` a :class:`Twin` on its backbone's trunk (cut before the top ``twin.stages``);
    its embedding is then the two joined, ``model.dim`` the sum of the heads' dims."""
    trunk, top = split_backbone(model, twin.stages)
    model.twin = twin
    model._split = (trunk, top)  # plain attributes: the modules are the backbone's own
    model.dim = int(model.head.dim if model.head is not None else model.spec.dim) + int(getattr(twin.head, "dim", 0))
    return model
