"""The model layer: backbone registry, networks, the embedding model and reading weights.

Modules, lowest first (each imports only those above it):

* :mod:`.registry`: :class:`Preprocessing`, :class:`BackboneSpec`, :func:`register`,
  :func:`get_spec`, :func:`available_models`.
* :mod:`.weights`: ImageNet weights from torchvision's cache, state dict files, content digests.
* :mod:`.resnet` and :mod:`.lite0`: the backbones; importing them registers them.
* :mod:`.embedding`: :class:`EmbeddingModel`, its :class:`Twin`, and the gray-level adaptations.
* :mod:`.head`: the :class:`MetricHead` a trained model carries.
* :mod:`.stages`: cutting a backbone into a frozen trunk and a trainable top (and a twin's).
* :mod:`.checkpoint`: reading ``simsearch train`` checkpoints.
* :mod:`.factory`: :func:`create_model`.

Importing the package registers every backbone: the ResNets always, EfficientNet-Lite0 when its
optional extra is installed (a broken extra logs a warning and the ResNets still work).
"""

from __future__ import annotations

import logging

from . import resnet  # noqa: F401  (registers the ResNets)
from .checkpoint import load_checkpoint, model_from_checkpoint
from .embedding import LUMA, EmbeddingModel, Twin, adapt_first_conv_to_gray, gray_preprocessing, join_embeddings
from .factory import create_model
from .head import MetricHead
from .registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, Preprocessing, available_models, get_spec, register
from .stages import attach_twin, backbone_sequence, split_backbone, top_stages
from .weights import file_digest, imagenet_cache_path

log = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LUMA",
    "BackboneSpec",
    "EmbeddingModel",
    "MetricHead",
    "Preprocessing",
    "Twin",
    "adapt_first_conv_to_gray",
    "attach_twin",
    "available_models",
    "backbone_sequence",
    "create_model",
    "file_digest",
    "get_spec",
    "gray_preprocessing",
    "imagenet_cache_path",
    "join_embeddings",
    "load_checkpoint",
    "model_from_checkpoint",
    "register",
    "split_backbone",
    "top_stages",
]


def _register_optional_backbones() -> None:
    try:
        from . import lite0  # noqa: F401  (registers efficientnet_lite0 when its extra is present)
    except ImportError:
        pass  # the extra is not installed: the ResNets are all there is
    except Exception as exc:  # a broken optional package must not take the ResNets down with it
        log.warning("efficientnet_lite0 is not available: %s", exc)


_register_optional_backbones()
