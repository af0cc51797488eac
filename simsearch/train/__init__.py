"""Metric learning on a labelled image set: a head on a frozen backbone, then fine-tuning its top.

Entry point: :func:`train` (``simsearch train``), configured by :class:`TrainConfig`, reporting
through a :class:`TrainCallback` and returning a :class:`TrainSummary`. Modules, by concern:

* :mod:`.config`: the options and their checks; :mod:`.results`: what a run reports;
  :mod:`.callbacks`: progress hooks.
* :mod:`.loop`: the orchestration of one run; :mod:`.phases`: the head and fine-tune phases and
  their optimisers; :mod:`.sampling`: batches; :mod:`.early_stopping`: the best state and patience;
  :mod:`.validation`: validation figures; :mod:`.feature_cache`: the frozen network's outputs;
  :mod:`.ensemble`: joining the fine-tuned model with the head-only one (the default result).
* :mod:`.losses`: losses and miners; :mod:`.data`: decoding and loaders; :mod:`.runtime`: device,
  precision, workers and seeds; :mod:`.checkpoint`: writing the checkpoint (its format and
  reading it: :mod:`simsearch.models.checkpoint`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainCallback", "TrainConfig", "TrainSummary", "train"]

_HOMES = {
    "TrainCallback": "callbacks",
    "TrainConfig": "config",
    "TrainSummary": "results",
    "train": "loop",
}


def __getattr__(name: str) -> Any:  # lazy: importing the package must not import torch
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(name)
