"""The training configuration and its checks: every bad option refused before data is read.

:class:`TrainConfig` is stored whole in each checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputError
from ..images import DEFAULT_MAX_PIXELS
from ..models import get_spec
from .losses import LOSSES, MINERS

PHASES = ("head", "finetune", "both")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored whole in the checkpoint)."""

    model: str = "resnet50"
    weights: str = "imagenet"
    seed: int = 0
    dim: int = 512
    bn: bool = True
    dropout: float = 0.0
    head_init: str = "lda"  # lda | pca | random (lda and pca need the head phase's cached features)
    loss: str = "proxyanchor"
    miner: str | None = None
    epochs: int = 10  # per phase (upper bound: early stopping may end sooner)
    head_epochs: int | None = None  # head phase epochs, if different from ``epochs``
    batch_size: int = 64
    lr_head: float = 1e-3
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    unfreeze: int = 1
    phases: str = "both"
    val_fraction: float = 0.2
    val_classes: str | None = None
    in_chans: int = 3
    adapt_first_conv: bool = False
    image_size: int | None = None  # crop size to train and embed at (default: the backbone's)
    augment: bool = True
    cache_trunk: bool = False
    cache_max_gb: float = 4.0
    freeze_all_bn: bool = False
    patience: int = 3
    phase_checkpoints: bool = False  # also write <out>.head.pt and <out>.finetune.pt: each phase's best
    device: str = "auto"
    workers: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    exclude: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse bad options before any data is read or any model built."""
        spec = get_spec(self.model)
        if self.dim < 2:
            raise InputError("--dim must be at least 2")
        if self.dim > spec.dim:
            raise InputError(
                f"--dim {self.dim} is larger than {self.model}'s {spec.dim}-d features; "
                f"a projection cannot add information (use --dim {spec.dim} or less)"
            )
        if self.phases not in PHASES:
            raise InputError(f"--phases must be one of {', '.join(PHASES)}")
        if self.loss not in LOSSES:
            raise InputError(f"unknown loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.miner is not None and (self.loss != "triplet" or self.miner not in MINERS):
            raise InputError(f"--miner ({', '.join(MINERS)}) applies to --loss triplet only")
        if self.epochs < 1 or (self.head_epochs is not None and self.head_epochs < 1):
            raise InputError("--epochs must be at least 1")
        if self.batch_size < 2:
            raise InputError("--batch-size must be at least 2")
        if self.lr_head <= 0 or self.lr_backbone <= 0:
            raise InputError("learning rates must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError("--dropout must be in [0, 1)")
        if self.head_init not in ("lda", "pca", "random"):
            raise InputError("--head-init must be lda, pca or random")
        if self.in_chans not in (1, 3):
            raise InputError("--in-chans must be 1 or 3")
        if self.adapt_first_conv and self.in_chans != 1:
            raise InputError("--adapt-first-conv needs --in-chans 1")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise InputError("--image-size must be between 16 and 1024 pixels")
        if self.patience < 1:
            raise InputError("--patience must be at least 1")
        if self.phases != "head":
            n = len(spec.stages)
            if not 1 <= self.unfreeze <= n:
                raise InputError(f"--unfreeze must be between 1 and {n} for {self.model} ({', '.join(spec.stages)})")
            if spec.sequence is None:
                raise InputError(f"{self.model} cannot be fine-tuned by stages; use --phases head")
        if self.cache_trunk and self.phases == "head":
            raise InputError("--cache-trunk applies to the finetune phase")
        if self.val_classes is not None and self.val_fraction not in (0.0, 0.2):
            raise InputError("give --val-fraction or --val-classes, not both")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d
