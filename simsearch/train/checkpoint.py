"""Writing the training checkpoint (the format, and reading it back, are in :mod:`simsearch.models.checkpoint`).

The file is written atomically and holds only types ``torch.load(weights_only=True)`` accepts, so
``simsearch index --weights model.pt`` recreates the trained model with nothing else.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from ..store import utc_now
from ..errors import WeightsError
from ..models import EmbeddingModel
from ..models.checkpoint import FORMAT, VERSION
from .results import MetricsRecord


def _plain(x: Any) -> Any:
    """Only types that ``torch.load(weights_only=True)`` accepts (no numpy scalars, no tuples of objects)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def build_checkpoint(
    model: EmbeddingModel,
    config: Any,
    class_names: Sequence[str],
    record: MetricsRecord | None = None,
    classifier: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict for a trained EmbeddingModel (backbone + MetricHead).

    ``classifier``: the head's class vectors (``class_names``, ``proxies`` as a (classes, dim)
    tensor, ``source``), what ``simsearch classify --method head`` classifies with, and
    ``trained_on``, the content hashes of the training images (classify calibrates on others).
    """
    from .. import __version__

    head = model.head
    if head is None or not hasattr(head, "config"):
        raise WeightsError("only a model with a metric head can be saved as a simsearch checkpoint")
    metrics, history = (None, []) if record is None else (record.checkpoint_metrics(), record.checkpoint_history())
    return {
        "format": FORMAT,
        "version": VERSION,
        "backbone": {
            "name": model.model_name,
            "weights": model.weights_id,
            "in_chans": int(model.in_chans),
            "conv_in": int(model.conv_in),
            "state_dict": _cpu_state(model.backbone),
        },
        "head": {
            "config": _plain(head.config()),
            "state_dict": _cpu_state(head),
        },
        **({} if model.twin is None else {"twin": {
            "stages": int(model.twin.stages),
            "weight": float(model.twin.weight),
            "top": _cpu_state(model.twin.top),
            "head": {"config": _plain(model.twin.head.config()), "state_dict": _cpu_state(model.twin.head)},
        }}),
        "dim": int(model.dim),
        "preprocessing": _plain(model.preprocessing.to_dict()),
        "class_names": [str(c) for c in class_names],
        "config": _plain(config.to_dict() if hasattr(config, "to_dict") else dict(config)),
        "metrics": _plain(metrics),
        "history": _plain(history),
        **({} if classifier is None else {"classifier": {
            "class_names": [str(c) for c in classifier["class_names"]],
            "proxies": classifier["proxies"].detach().float().cpu().contiguous(),
            "source": str(classifier["source"]),
            "trained_on": [str(h) for h in classifier.get("trained_on", ())],
        }}),
        "created_at": utc_now(),
        "versions": {"simsearch": str(__version__), "torch": str(torch.__version__)},
    }


def save_checkpoint(
    path: str | os.PathLike[str],
    model: EmbeddingModel,
    config: Any,
    class_names: Sequence[str],
    record: MetricsRecord | None = None,
    classifier: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint atomically (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    state = build_checkpoint(model, config, class_names, record, classifier)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is an ordinary file
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
