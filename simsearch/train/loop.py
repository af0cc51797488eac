"""Transfer learning for retrieval: a metric head on a frozen backbone, then fine-tuning its top.

``train(data, out, config)`` runs, in order, and checks everything that can be wrong with the data
before the first optimiser step:

0. read the labelled set; one decoding pass over every image (unreadable ones are dropped and
   counted) which, when the head phase runs, also caches the frozen backbone's pooled features
   (and, with ``cache_trunk``, the frozen trunk's activations); class checks; the split.
1. **head** phase: only the metric head (and the loss's proxies) train, on the cached features,
   so an epoch costs milliseconds. The head starts as a shrunk within-class whitening of the
   features (``head_init="lda"``; or their PCA, or random) and the loss's proxies at the class
   means, so training starts from the pretrained geometry; that start competes as "epoch 0".
2. **finetune** phase: the top ``unfreeze`` stages of the backbone train too, with their own,
   smaller learning rate; the frozen trunk stays in eval mode (its BatchNorm statistics frozen).
   Images are augmented (random resized crop, flip, colour jitter), or with ``cache_trunk`` (the
   default when it fits in ``cache_max_gb``) the top stages train on cached trunk activations: of
   the centre crops and of ``views`` augmented views per image, drawn once, with flips.

Each epoch is validated with :func:`simsearch.evaluate.retrieval_metrics` (MAP@R, then Recall@1
to break ties); the best state over both phases is kept (the frozen start of phase 2 included,
so fine-tuning that does not help never makes the model worse), and ``patience`` epochs without
improvement stop a phase. With both phases (and ``ensemble`` > 0, the default), the model kept is
the fine-tuned one joined with the head phase's (:mod:`.ensemble`) when validation says the pair
does better than the head alone. The result is one self-describing checkpoint file.

This module is the orchestration only; each concern has its module in this package (config,
feature cache, phases, early stopping, validation, results, checkpoint writing).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..embed import keep_freed_memory, resolve_device
from ..errors import ImageError, InputError
from ..images import hash_file
from ..labelled import LabelledSet, check_classes, drop_items, load_labelled, split_by_class, split_by_image
from ..models import MetricHead, Preprocessing, attach_twin, create_model, split_backbone
from .callbacks import TrainCallback
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .ensemble import join_phases
from .feature_cache import FeatureCache, augmented_views, cache_fits, scan
from .losses import class_proxies, init_proxies, make_loss
from .phases import PhaseRunner
from .results import EpochRecord, MetricsRecord, TrainSummary
from .runtime import seed_everything, train_workers
from .validation import embed_set, embed_trunk_activations

log = logging.getLogger(__name__)


def train(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    callback: TrainCallback | None = None,
) -> TrainSummary:
    """Train a metric head (and fine-tune the backbone's top) on a labelled set; write a checkpoint."""
    config = config or TrainConfig()
    cb = callback or TrainCallback()
    t_start = time.perf_counter()
    config.check()
    config = config.resolved()
    out_path = Path(out).expanduser()
    if out_path.exists() and out_path.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name such as model.pt")
    if not out_path.parent.exists():
        raise InputError(f"--out: folder {out_path.parent} does not exist")
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory()  # activations of a training batch are reused, not page-faulted in per layer
    seed_everything(config.seed)

    dataset = load_labelled(data, config.exclude)
    model = create_model(
        config.model, config.weights, seed=config.seed, in_chans=config.in_chans, adapt_first_conv=config.adapt_first_conv
    )
    if config.weights not in ("imagenet", "random") and model.head is not None:
        raise InputError("--weights is a trained checkpoint; train from its backbone weights or imagenet/random")
    if config.image_size is not None:
        model.preprocessing = scaled_preprocessing(model.preprocessing, config.image_size)
    n_top = config.unfreeze if config.phases != "head" else len(model.spec.stages)
    trunk, top = (
        split_backbone(model, n_top) if model.spec.sequence is not None else (nn.Sequential(), model.backbone)
    )
    run_head = config.phases in ("head", "both")
    run_finetune = config.phases in ("finetune", "both")
    workers = train_workers(config.workers, device)
    if not run_finetune:
        config = replace(config, cache_trunk=False)
    elif config.cache_trunk is None:
        config = replace(config, cache_trunk=cache_fits(model, trunk, len(dataset), device, config))

    # 0. one pass over every image: validates decoding, caches frozen features / trunk activations.
    t_scan = time.perf_counter()
    cache, bad = scan(
        model, trunk, top, dataset, device, config, workers, cb,
        features=run_head, trunk_acts=run_finetune and config.cache_trunk,
    )
    unreadable = len(bad)
    keep = np.asarray([i for i in range(len(dataset)) if i not in bad], dtype=np.int64)
    dataset = drop_items(dataset, bad, "unreadable")
    if cache is not None:
        cache = cache.select(keep)
    check_classes(dataset)

    if config.val_classes is not None:
        train_idx, val_idx, val_names = split_by_class(dataset.labels, dataset.class_names, config.val_classes, config.seed)
    else:
        train_idx, val_idx = split_by_image(dataset.labels, config.val_fraction, config.seed)
        val_names = []
    train_set, val_set = dataset.subset(train_idx), dataset.subset(val_idx) if len(val_idx) else None
    if len(train_set.class_names) < 2:
        raise InputError("the training split holds fewer than 2 classes; lower --val-fraction / --val-classes")
    if val_set is not None and (val_set.counts() >= 2).sum() == 0:
        val_set = None
    if val_set is None:
        dataset.warnings.append("no validation set (too few images): every epoch runs and the last one is kept")
        log.warning("%s", dataset.warnings[-1])

    seed_everything(config.seed)
    head = MetricHead(model.spec.dim, config.dim, bn=config.bn, dropout=config.dropout)
    loss = make_loss(config.loss, len(train_set.class_names), config.dim, config.miner)
    train_labels = torch.as_tensor(train_set.labels)
    tr_cache = val_cache = None
    if cache is not None:
        tr_cache = cache.select(train_idx)
        val_cache = cache.select(val_idx) if val_set else None
    if run_finetune and config.cache_trunk and config.views and tr_cache is not None:
        t_views = time.perf_counter()
        tr_cache.views = augmented_views(model, trunk, train_set, device, config, workers, cb)
        phase_seconds_views = round(time.perf_counter() - t_views, 3)
    else:
        phase_seconds_views = None
    if tr_cache is not None and config.head_init == "pca":
        head.init_pca(tr_cache.features)
    elif tr_cache is not None and config.head_init == "lda":
        head.init_lda(tr_cache.features, train_labels)
    if tr_cache is not None and config.head_init != "random":
        head.eval()
        with torch.no_grad():
            init_proxies(loss, head(tr_cache.features), train_labels)  # proxies start at the class means
    run = PhaseRunner(model, trunk, top, head, loss, config, device, cb)
    best = run.best
    frozen_metrics = None
    if val_set is not None and val_cache is not None:
        frozen_metrics = run.metrics(nn.functional.normalize(val_cache.features, dim=1), val_set.labels)
        run.history.append(EpochRecord("frozen", 0, None, frozen_metrics, 0.0))

    head_metrics = finetune_metrics = None
    phase_seconds: dict[str, float] = {"scan": round(time.perf_counter() - t_scan, 3)}
    if phase_seconds_views is not None:
        phase_seconds["views"] = phase_seconds_views
        phase_seconds["scan"] = round(phase_seconds["scan"] - phase_seconds_views, 3)
    trained = content_hashes(train_set.paths)  # recorded with the class vectors, for classify's calibration
    head_checkpoint = None
    if run_head:
        t0 = time.perf_counter()
        assert tr_cache is not None
        head_metrics = run.head_phase(tr_cache.features, train_labels, val_cache, val_set)
        best.restore_best()  # fine-tuning starts from the best head, not the last one
        phase_seconds["head"] = round(time.perf_counter() - t0, 3)
        if run_finetune and config.phase_checkpoints:
            head_checkpoint = _phase_checkpoint_path(out_path, "head")
            model.head, model.dim = head, config.dim
            record = MetricsRecord(
                frozen_metrics, head_metrics, None, best.metrics, best.phase, best.epoch, run.history
            )
            classifier = head_classifier(run, train_set, tr_cache, workers, finetuned=False, trained=trained)
            save_checkpoint(head_checkpoint, model, config, dataset.class_names, record, classifier)
    finetune_checkpoint = None
    if run_finetune:
        t0 = time.perf_counter()
        finetune_metrics = run.finetune_phase(train_set, train_labels, tr_cache, val_set, val_cache, workers)
        phase_seconds["finetune"] = round(time.perf_counter() - t0, 3)
        if config.phase_checkpoints and "finetune" in best.phase_best:
            # the fine-tuned model itself, even where validation preferred the head phase's state
            finetune_checkpoint = _phase_checkpoint_path(out_path, "finetune")
            best.restore(best.phase_best["finetune"][1])
            model.head, model.dim = head, config.dim
            record = MetricsRecord(
                frozen_metrics, head_metrics, finetune_metrics, finetune_metrics, "finetune", None, run.history
            )
            classifier = head_classifier(run, train_set, tr_cache, workers, finetuned=True, trained=trained)
            save_checkpoint(finetune_checkpoint, model, config, dataset.class_names, record, classifier)
    joined = None
    if run_head and run_finetune and config.ensemble > 0:
        joined = join_phases(
            run, best, n_top, config.ensemble, val_set, val_cache, workers,
            lambda finetuned: head_classifier(run, train_set, tr_cache, workers, finetuned=finetuned, trained=trained),
        )
    if joined is not None:  # the fine-tuned state is in place; its twin joins it below
        best_phase, best_epoch, best_metrics, classifier = "ensemble", None, joined.metrics, joined.classifier
    else:
        best.restore_best()
        best_phase, best_epoch, best_metrics = best.phase, best.epoch, best.metrics
        classifier = head_classifier(run, train_set, tr_cache, workers, finetuned=best.phase == "finetune", trained=trained)

    summary = TrainSummary(
        out=str(out_path),
        model=config.model,
        weights=model.weights_id,
        dim=config.dim,
        classes=len(dataset.class_names),
        train_images=len(train_set),
        val_images=0 if val_set is None else len(val_set),
        val_classes=val_names,
        unreadable=unreadable,
        best_phase=best_phase,
        best_epoch=best_epoch,
        frozen_metrics=frozen_metrics,
        head_metrics=head_metrics,
        finetune_metrics=finetune_metrics,
        best_metrics=best_metrics,
        history=run.history,
        phase_seconds=phase_seconds,
        warnings=dataset.warnings + run.warnings,
        device=str(device),
        head_checkpoint=None if head_checkpoint is None else str(head_checkpoint),
        finetune_checkpoint=None if finetune_checkpoint is None else str(finetune_checkpoint),
    )
    model.head = head.cpu().eval()
    model.dim = config.dim
    if joined is not None:
        attach_twin(model, joined.twin)
        summary.dim = model.dim
    model.cpu().eval()
    save_checkpoint(out_path, model, config, dataset.class_names, summary.metrics_record(), classifier)
    summary.seconds = round(time.perf_counter() - t_start, 3)
    return summary


def head_classifier(
    run: PhaseRunner, train_set: LabelledSet, tr_cache: FeatureCache | None, workers: int, finetuned: bool,
    trained: list[str],
) -> dict[str, Any]:
    """The class vectors the checkpoint records for ``classify --method head``, in the current state,
    and ``trained``: the content hashes of the training images. A model scores the images it was
    fitted on far more confidently than new ones, so ``classify`` calibrates on labelled images that
    are not among them.

    A proxy loss (arcface, cosface, proxyanchor) has learned one vector per class: those. A pair
    loss has none: the normalised class means of the training images' embeddings stand in (from the
    cached features or trunk activations where they are still valid, else one pass over the images).
    """
    proxies = class_proxies(run.loss)
    if proxies is not None:
        return {"class_names": train_set.class_names, "proxies": proxies, "source": f"proxies of the {run.loss.name} loss",
                "trained_on": trained}
    run.head.eval()
    run.top.eval()
    if not finetuned and tr_cache is not None and tr_cache.features is not None:
        with torch.no_grad():
            emb = nn.functional.normalize(run.head(tr_cache.features.to(run.device)).float(), dim=1).cpu()
        labels = np.asarray(train_set.labels)
    elif run.config.cache_trunk and tr_cache is not None and tr_cache.trunk is not None:
        emb = embed_trunk_activations(run.top, run.head, tr_cache.trunk, run.device).cpu()
        labels = np.asarray(train_set.labels)
    else:
        emb, labels = embed_set(run.model, run.trunk, run.top, run.head, train_set, run.device, workers, run.config)
    index = torch.as_tensor(labels, dtype=torch.long)
    sums = torch.zeros((len(train_set.class_names), emb.shape[1])).index_add_(0, index, emb.float())
    return {
        "class_names": train_set.class_names,
        "proxies": nn.functional.normalize(sums, dim=1),
        "source": "class means of the training embeddings",
        "trained_on": trained,
    }


def content_hashes(paths: list[str]) -> list[str]:
    """Content hashes (the index's identity of a file, whatever its path) of ``paths``, sorted;
    unreadable files are left out."""
    hashes = set()
    for path in paths:
        try:
            hashes.add(hash_file(path))
        except (OSError, ImageError):
            continue
    return sorted(hashes)


def _phase_checkpoint_path(out_path: Path, phase: str) -> Path:
    """``<out>.head.pt`` / ``<out>.finetune.pt`` beside the final checkpoint."""
    return out_path.with_name(out_path.stem + "." + phase + out_path.suffix)


def scaled_preprocessing(prep: Preprocessing, crop: int) -> Preprocessing:
    """The same resize/crop ratio at another crop size (training at a lower resolution is faster)."""
    return replace(prep, crop_size=crop, resize_size=int(round(crop * prep.resize_size / prep.crop_size)))
