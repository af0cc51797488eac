"""What a training run reports: per-epoch records, the figures a checkpoint keeps, the summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EpochRecord:
    """One epoch's outcome (``epoch`` 0 = the state a phase starts from)."""

    phase: str
    epoch: int
    loss: float | None
    metrics: dict[str, Any] | None
    seconds: float
    best: bool = False

    @property
    def recall_at_1(self) -> float | None:
        return None if self.metrics is None else self.metrics.get("recall@1")


@dataclass
class MetricsRecord:
    """The validation figures a checkpoint records: each phase's best, the overall best, the history."""

    frozen_metrics: dict[str, Any] | None
    head_metrics: dict[str, Any] | None
    finetune_metrics: dict[str, Any] | None
    best_metrics: dict[str, Any] | None
    best_phase: str | None
    best_epoch: int | None
    history: list[EpochRecord] = field(default_factory=list)

    def checkpoint_metrics(self) -> dict[str, Any]:
        """The checkpoint's ``metrics`` entry."""
        return {
            "frozen": self.frozen_metrics,
            "head": self.head_metrics,
            "finetune": self.finetune_metrics,
            "best": self.best_metrics,
            "best_phase": self.best_phase,
            "best_epoch": self.best_epoch,
        }

    def checkpoint_history(self) -> list[dict[str, Any]]:
        """The checkpoint's ``history`` entry: one dict per epoch record."""
        return [asdict(r) for r in self.history]


@dataclass
class TrainSummary:
    """What a training run did and where its checkpoint is."""

    out: str
    model: str
    weights: str
    dim: int
    classes: int
    train_images: int
    val_images: int
    val_classes: list[str]
    unreadable: int
    best_phase: str | None
    best_epoch: int | None
    frozen_metrics: dict[str, Any] | None
    head_metrics: dict[str, Any] | None
    finetune_metrics: dict[str, Any] | None
    best_metrics: dict[str, Any] | None
    history: list[EpochRecord] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    device: str = "cpu"
    head_checkpoint: str | None = None
    finetune_checkpoint: str | None = None

    def metrics_record(self) -> MetricsRecord:
        """The figures the final checkpoint records."""
        return MetricsRecord(
            self.frozen_metrics, self.head_metrics, self.finetune_metrics, self.best_metrics,
            self.best_phase, self.best_epoch, self.history,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [asdict(r) for r in self.history]
        return d
