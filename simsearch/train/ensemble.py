"""The model ``simsearch train`` keeps by default: the fine-tuned model joined with the head-only one.

Why: fine-tuning the backbone's top gains on the classes it was trained on and loses on classes it
never saw, and validation on a few held-out classes does not tell when (Grocery's unseen classes:
fine-tuning gained 4.5 points of validation MAP@R and lost 1.9 points of test Recall@1). Joining the
two models' embeddings (:class:`simsearch.models.Twin`, weight ``--ensemble`` on the fine-tuned one)
kept the seen-class gain (+3.1 and +4.1 points of Recall@1 over the head-only model on two seeds)
with no loss beyond one standard error on the unseen classes, and found near-copies more often than
either model alone (``benchmarks/README.md``, ``bench_ensemble.py``). The weight is fixed (0.6,
where Recall@1 averaged over five runs' development data peaks): one run's validation set is too
small to choose it by (its best weight ranged from 0.3 to 1.0 from run to run).

The joined model's validation is compared with the head phase's best: it is kept when it does
better (MAP@R, then Recall@1); otherwise validation's own choice stands, as with ``--ensemble 0``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..labelled import LabelledSet
from ..models import Twin, join_embeddings
from .early_stopping import BestState, metric_key
from .feature_cache import FeatureCache
from .phases import PhaseRunner
from .validation import embed_set, embed_trunk_activations

log = logging.getLogger(__name__)


@dataclass
class Joined:
    """The twin to attach to the fine-tuned model, what validation measured of the pair, and the
    class vectors of the pair (for ``classify --method head``)."""

    twin: Twin
    metrics: dict[str, Any] | None
    classifier: dict[str, Any]


def join_phases(
    run: PhaseRunner,
    best: BestState,
    n_top: int,
    weight: float,
    val_set: LabelledSet | None,
    val_cache: FeatureCache | None,
    workers: int,
    classifier_of: Callable[[bool], dict[str, Any]],
) -> Joined | None:
    """The head phase's best model as a twin of the fine-tuning's best, leaving the runner's modules in
    the fine-tuned state; None when a phase has no best state or the pair validates no better than
    the head alone.
    ``classifier_of(finetuned)``: the class vectors of the runner's current state."""
    if "head" not in best.phase_best or "finetune" not in best.phase_best:
        return None
    best.restore(best.phase_best["head"][1])  # the head phase's head on the pretrained top
    twin = Twin(copy.deepcopy(run.top).eval(), copy.deepcopy(run.head).eval(), n_top, weight)
    twin_classes = classifier_of(False)
    best.restore(best.phase_best["finetune"][1])
    metrics = None
    if val_set is not None:
        metrics = run.metrics(_joined_embeddings(run, twin, val_set, val_cache, workers), val_set.labels)
        head_key = best.phase_best["head"][0]
        if metric_key(metrics) <= head_key:
            log.info("the joined model validates no better than the head phase's best (MAP@R %.4f, %.4f): not kept",
                     metrics["map@r"], head_key[0])
            return None
    return Joined(twin, metrics, joined_proxies(classifier_of(True), twin_classes, weight))


def _joined_embeddings(
    run: PhaseRunner, twin: Twin, val_set: LabelledSet, val_cache: FeatureCache | None, workers: int
) -> torch.Tensor:
    """Validation embeddings of the joined model: the fine-tuned state (the runner's modules) and the twin."""
    twin.to(run.device)
    run.head.eval()
    run.top.eval()
    if run.config.cache_trunk and val_cache is not None and val_cache.trunk is not None:
        main = embed_trunk_activations(run.top, run.head, val_cache.trunk, run.device)
        other = embed_trunk_activations(twin.top, twin.head, val_cache.trunk, run.device)
    else:
        main, _ = embed_set(run.model, run.trunk, run.top, run.head, val_set, run.device, workers, run.config)
        other, _ = embed_set(run.model, run.trunk, twin.top, twin.head, val_set, run.device, workers, run.config)
    twin.cpu()
    return join_embeddings(main, other, twin.weight).cpu()


def joined_proxies(main: dict[str, Any], other: dict[str, Any], weight: float) -> dict[str, Any]:
    """The class vectors of the joined model: each class's two vectors joined as the embeddings are,
    so that a class's cosine with an image is the weighted sum of the two models'."""
    proxies = join_embeddings(main["proxies"], other["proxies"], weight)
    return dict(main, proxies=proxies, source=f"{main['source']}, joined with the head-only model's")
