"""``create_model``: a registry name and a weights source in, an :class:`EmbeddingModel` out.

``create_model(name, weights)`` returns a model whose forward pass maps a normalised image batch
to L2-normalised float32 embeddings. ``weights`` is:

* ``"imagenet"``: the backbone's pretrained weights (see :mod:`.weights`).
* ``"random"``: seeded random initialisation, for tests and offline trials.
* a path: a torchvision state dict for the backbone, or a simsearch training checkpoint
  (backbone + metric head), see :mod:`.checkpoint`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import InputError, WeightsError
from .checkpoint import is_checkpoint, model_from_checkpoint
from .embedding import EmbeddingModel, adapt_first_conv_to_gray
from .registry import get_spec
from .weights import file_digest, load_backbone_file, load_imagenet, load_weights_file

log = logging.getLogger(__name__)


def create_model(
    name: str = "resnet50",
    weights: str | os.PathLike[str] = "imagenet",
    seed: int = 0,
    in_chans: int = 3,
    adapt_first_conv: bool = False,
) -> EmbeddingModel:
    """Build an embedding model by registry name; ``weights`` is imagenet, random or a file path.

    A path to a simsearch training checkpoint carries its own backbone name, channels and head,
    which win over ``name``/``in_chans`` (the checkpoint knows what it holds).
    ``in_chans=1`` makes a gray-level model (gray replicated to RGB), and with
    ``adapt_first_conv`` its first convolution takes one channel (see :func:`adapt_first_conv_to_gray`).
    """
    if in_chans not in (1, 3):
        raise InputError(f"--in-chans must be 1 or 3, not {in_chans}")
    if adapt_first_conv and in_chans != 1:
        raise InputError("--adapt-first-conv needs --in-chans 1")
    weights = str(weights)
    if weights not in ("imagenet", "random"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights must be 'imagenet', 'random' or a path to a weights file; {weights!r} is none of these"
            )
        state = load_weights_file(path)
        if is_checkpoint(state):
            if name != state.get("backbone", {}).get("name", name):
                log.info("%s holds a %s checkpoint; using that, not %s", path, state["backbone"]["name"], name)
            return model_from_checkpoint(state, path)
        spec = get_spec(name)
        net = spec.build()
        load_backbone_file(spec, net, path, state)
        model = EmbeddingModel(net, spec, f"file:{path.name}:{file_digest(path)}")
    else:
        spec = get_spec(name)
        if weights == "random":
            torch.manual_seed(seed)
            net = spec.build()
            weights_id = f"random:seed={seed}"
        else:
            net = spec.build()
            weights_id = load_imagenet(spec, net)
        model = EmbeddingModel(net, spec, weights_id)
    if in_chans == 1:
        model.in_chans = 1
        if adapt_first_conv:
            adapt_first_conv_to_gray(model)
    model.eval()
    return model
