"""Metric learning on a labelled image set: a head on a frozen backbone, then fine-tuning its top.

Entry point: :func:`simsearch.train.loop.train` (``simsearch train``); the checkpoint format is in
:mod:`simsearch.train.checkpoint`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainCallback", "TrainConfig", "TrainSummary", "train"]


def __getattr__(name: str) -> Any:  # lazy: importing the package must not import torch
    if name in __all__:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(name)
