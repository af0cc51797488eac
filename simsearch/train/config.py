"""The training configuration and its checks: every bad option refused before data is read.

:class:`TrainConfig` is stored whole in each checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
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
    lr_backbone: float = 3e-4
    lr_decay: float = 1.0  # each unfrozen stage below the top trains at this times the one above's rate
    warmup: float = 1.0  # fine-tuning epochs over which the learning rates ramp up linearly
    weight_decay: float = 1e-4
    unfreeze: int | None = None  # top backbone stages to fine-tune (None: the model's top_stages)
    phases: str = "both"
    val_fraction: float = 0.2
    val_classes: str | None = None
    in_chans: int = 3
    adapt_first_conv: bool = False
    image_size: int | None = None  # crop size to train and embed at (default: the backbone's)
    augment: bool = True
    cache_trunk: bool | None = None  # None: cache when the activations fit in cache_max_gb
    views: int = 2  # with cache_trunk: augmented views per training image whose trunk activations are cached
    cache_max_gb: float = 4.0
    freeze_all_bn: bool = False
    patience: int = 3
    # with both phases: the kept model joins the fine-tuned model's embedding (this weight) and the
    # head-only model's (the rest); 0 keeps one of them, the one validation prefers (models.Twin)
    ensemble: float = 0.6
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
        if not 0.0 < self.lr_decay <= 1.0:
            raise InputError("--lr-decay must be in (0, 1]")
        if self.warmup < 0 or self.warmup > self.epochs:
            raise InputError("--warmup must be between 0 and --epochs")
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
            if self.unfreeze is not None and not 1 <= self.unfreeze <= n:
                raise InputError(f"--unfreeze must be between 1 and {n} for {self.model} ({', '.join(spec.stages)})")
            if spec.sequence is None:
                raise InputError(f"{self.model} cannot be fine-tuned by stages; use --phases head")
        if not 0.0 <= self.ensemble < 1.0:
            raise InputError("--ensemble must be at least 0 and below 1 (0: no ensemble)")
        if not 0 <= self.views <= 64:
            raise InputError("--views must be between 0 and 64")
        if self.cache_trunk and self.phases == "head":
            raise InputError("--cache-trunk applies to the finetune phase")
        if self.val_classes is not None and self.val_fraction not in (0.0, 0.2):
            raise InputError("give --val-fraction or --val-classes, not both")

    def resolved(self) -> "TrainConfig":
        """This configuration with the model's defaults filled in (what a checkpoint records)."""
        if self.unfreeze is not None:
            return self
        return replace(self, unfreeze=get_spec(self.model).top_stages)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d
