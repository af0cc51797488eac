"""Keeping the best state of a run, and stopping a phase that no longer improves.

States compare by validation MAP@R, then Recall@1: MAP@R ranks every relevant neighbour, so it keeps
moving where Recall@1 has saturated (validation images that are near-copies of training ones, or a
few easy held-out classes, sit at a Recall@1 of 0.96-1.0 for every state). The best over both
phases is kept (the state a phase starts from competes too, so a phase that does not help on
validation never replaces it); with ``phase_checkpoints`` each phase's own best is kept as well.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from .results import EpochRecord

log = logging.getLogger(__name__)

# How many standard errors of validation MAP@R a state of a later phase must gain to replace the best
# state of an earlier one.
SWITCH_SE = 2.0


def metric_key(metrics: dict[str, Any] | None) -> tuple[float, float]:
    """What "better" means: (MAP@R, Recall@1); the lowest for an epoch without validation."""
    return (-1.0, -1.0) if metrics is None else (metrics["map@r"], metrics["recall@1"])


class BestState:
    """The best head (and, once fine-tuning, backbone top) state so far, and where it was reached.

    ``proxies``: the loss module when it has learnable class proxies; they are kept with the head,
    so that the proxies a checkpoint records are those of the state it holds, not of the last epoch.
    """

    def __init__(self, head: nn.Module, top: nn.Module, per_phase: bool, proxies: nn.Module | None = None) -> None:
        self.head, self.top, self.per_phase = head, top, per_phase
        self.proxies = proxies if proxies is not None and any(True for _ in proxies.parameters()) else None
        self.key: tuple[float, float] | None = None
        self.state: dict[str, Any] | None = None
        self.phase: str | None = None
        self.epoch: int | None = None
        self.metrics: dict[str, Any] | None = None
        self.finetuning = False
        self.top_initial: dict[str, Any] = {}
        self.phase_best: dict[str, tuple[tuple[float, float], dict[str, Any]]] = {}
        self.phase_keys: dict[str, tuple[float, float]] = {}  # each phase's best validation so far
        self.phase_improved = False  # whether the last state considered was its phase's best so far

    def start_finetuning(self) -> None:
        """From now on the backbone top is part of the state; remember the top it starts from."""
        self.top_initial = copy.deepcopy(self.top.state_dict())
        self.finetuning = True

    def snapshot(self) -> dict[str, Any]:
        state = {"head": copy.deepcopy(self.head.state_dict())}
        if self.proxies is not None:
            state["proxies"] = copy.deepcopy(self.proxies.state_dict())
        if self.finetuning:
            state["top"] = copy.deepcopy(self.top.state_dict())
        return state

    def consider(self, phase: str, epoch: int, metrics: dict[str, Any] | None) -> bool:
        """Keep this state if it is the best so far (always, without validation); also per phase."""
        key = metric_key(metrics)
        prev_key = self.phase_keys.get(phase)
        self.phase_improved = metrics is None or prev_key is None or key > prev_key
        if self.phase_improved:
            self.phase_keys[phase] = key
        snapshot = None
        if self.per_phase and self.phase_improved:
            snapshot = self.snapshot()
            self.phase_best[phase] = (key, snapshot)
        if metrics is not None and self.key is not None and not self._beats(phase, key, metrics):
            return False
        self.key, self.phase, self.epoch, self.metrics = key, phase, epoch, metrics
        self.state = snapshot or self.snapshot()
        return True

    def _beats(self, phase: str, key: tuple[float, float], metrics: dict[str, Any]) -> bool:
        """Better than the best so far; a phase taking over from another must win clearly.

        Within a phase any gain counts. A fine-tuned state replaces the head phase's (or the frozen
        start's) only when its validation MAP@R is higher by ``SWITCH_SE`` standard errors: a small
        validation set of held-out classes moves by about that much between states that do equally
        well, and fine-tuning that only matches the head on validation tends to lose to it on
        classes neither saw (measured on Grocery's unseen classes: validation +0.9 points of MAP@R,
        test -1.5). It is no guarantee for such classes: on another seed fine-tuning gained 4.5
        points on its held-out classes and still lost on the test classes (see the README).
        """
        if key <= self.key:
            return False
        if self.phase == phase or self.metrics is None:
            return True
        margin = SWITCH_SE * float(metrics.get("map@r_se") or 0.0)
        return key[0] > self.key[0] + margin

    def restore(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        self.head.load_state_dict(state["head"])
        if self.proxies is not None and "proxies" in state:
            self.proxies.load_state_dict(state["proxies"])
        if self.finetuning:
            self.top.load_state_dict(state.get("top", self.top_initial))

    def restore_best(self) -> None:
        self.restore(self.state)


class EarlyStopping:
    """``patience`` epochs in a row without a better validation end a phase.

    "Better" is within the phase: fine-tuning starts below the head's state (new views, a warm-up,
    the backbone moving), and ends when it stops improving on itself, not when it has not yet
    overtaken the head.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.stale = 0  # epochs since the phase's last better validation

    def reset(self) -> None:
        self.stale = 0

    def should_stop(self, phase: str, improved: bool) -> bool:
        """Count an epoch; True when the phase should stop."""
        if improved:
            self.stale = 0
            return False
        self.stale += 1
        if self.stale >= self.patience:
            log.info("%s phase: no better validation MAP@R for %d epochs; stopping", phase, self.stale)
            return True
        return False


def phase_best_metrics(history: list[EpochRecord], phase: str, last: dict[str, Any] | None) -> dict[str, Any] | None:
    """The best validation figures reached in ``phase`` (the last epoch's without validation)."""
    recs = [r for r in history if r.phase == phase and r.metrics is not None]
    if not recs:
        return last
    return max(recs, key=lambda r: metric_key(r.metrics)).metrics
