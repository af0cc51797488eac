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
   Images are augmented (random resized crop, flip, colour jitter), or with ``cache_trunk`` the
   top stages train on the cached trunk activations (flip only; much faster on a CPU).

Each epoch is validated with :func:`simsearch.evaluate.retrieval_metrics` (Recall@1, then MAP@R
to break ties); the best state over both phases is kept (the frozen start of phase 2 included,
so fine-tuning that does not help never makes the model worse), and ``patience`` epochs without
improvement stop a phase. The result is one self-describing checkpoint file.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..images import DEFAULT_MAX_PIXELS
from ..embed import worker_init
from .data import (
    ImageDataset,
    LabelledSet,
    check_classes,
    collate,
    drop_items,
    load_labelled,
    make_loader,
    split_by_class,
    split_by_image,
)
from .head import MetricHead
from .losses import LOSSES, MINERS, LossSetup, init_proxies, make_loss

log = logging.getLogger(__name__)

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
        from ..models import get_spec

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [asdict(r) for r in self.history]
        return d


class TrainCallback:
    """Progress hooks; the CLI renders them on stderr. Every method may be left as is."""

    def on_extract_start(self, total: int, what: str) -> None: ...

    def on_extract_advance(self, n: int) -> None: ...

    def on_extract_end(self) -> None: ...

    def on_phase_start(self, phase: str, epochs: int, steps_per_epoch: int) -> None: ...

    def on_step(self, loss: float) -> None: ...

    def on_epoch_end(self, record: EpochRecord) -> None: ...

    def on_phase_end(self, phase: str) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))  # pytorch-metric-learning's samplers draw from np.random
    torch.manual_seed(seed)


# -- the run ----------------------------------------------------------------------------------


@dataclass
class _Cache:
    features: torch.Tensor  # (N, D) frozen pooled features, float32, CPU
    trunk: torch.Tensor | None  # (N, C, H, W) frozen trunk activations, float16, CPU


def train(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    callback: TrainCallback | None = None,
) -> TrainSummary:
    """Train a metric head (and fine-tune the backbone's top) on a labelled set; write a checkpoint."""
    from ..embed import resolve_device
    from ..evaluate import retrieval_metrics
    from ..models import create_model, split_backbone
    from .checkpoint import save_checkpoint

    config = config or TrainConfig()
    cb = callback or TrainCallback()
    t_start = time.perf_counter()
    config.check()
    out_path = Path(out).expanduser()
    if out_path.exists() and out_path.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name such as model.pt")
    if not out_path.parent.exists():
        raise InputError(f"--out: folder {out_path.parent} does not exist")
    device = resolve_device(config.device)
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
    workers = _workers(config.workers, device)

    # 0. one pass over every image: validates decoding, caches frozen features / trunk activations.
    t_scan = time.perf_counter()
    cache, bad = _scan(
        model, trunk, top, dataset, device, config, workers, cb,
        features=run_head, trunk_acts=run_finetune and config.cache_trunk,
    )
    unreadable = len(bad)
    keep = np.asarray([i for i in range(len(dataset)) if i not in bad], dtype=np.int64)
    dataset = drop_items(dataset, bad, "unreadable")
    if cache is not None:
        cache = _Cache(cache.features[keep], None if cache.trunk is None else cache.trunk[keep])
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
        tr_cache = _Cache(cache.features[train_idx], None if cache.trunk is None else cache.trunk[train_idx])
        val_cache = (
            _Cache(cache.features[val_idx], None if cache.trunk is None else cache.trunk[val_idx]) if val_set else None
        )
    if tr_cache is not None and config.head_init == "pca":
        head.init_pca(tr_cache.features)
    elif tr_cache is not None and config.head_init == "lda":
        head.init_lda(tr_cache.features, train_labels)
    if tr_cache is not None and config.head_init != "random":
        head.eval()
        with torch.no_grad():
            init_proxies(loss, head(tr_cache.features), train_labels)  # proxies start at the class means
    run = _Run(model, trunk, top, head, loss, config, device, cb, retrieval_metrics)
    frozen_metrics = None
    if val_set is not None and val_cache is not None:
        frozen_metrics = run.metrics(nn.functional.normalize(val_cache.features, dim=1), val_set.labels)
        run.history.append(EpochRecord("frozen", 0, None, frozen_metrics, 0.0))

    head_metrics = finetune_metrics = None
    phase_seconds: dict[str, float] = {"scan": round(time.perf_counter() - t_scan, 3)}
    head_checkpoint = None
    if run_head:
        t0 = time.perf_counter()
        assert tr_cache is not None
        head_metrics = run.head_phase(tr_cache.features, train_labels, val_cache, val_set)
        run.restore_best()  # fine-tuning starts from the best head, not the last one
        phase_seconds["head"] = round(time.perf_counter() - t0, 3)
        if run_finetune and config.phase_checkpoints:
            head_checkpoint = out_path.with_name(out_path.stem + ".head" + out_path.suffix)
            model.head, model.dim = head, config.dim
            partial = SimpleNamespace(
                frozen_metrics=frozen_metrics, head_metrics=head_metrics, finetune_metrics=None,
                best_metrics=run.best_metrics, best_phase=run.best_phase, best_epoch=run.best_epoch, history=run.history,
            )
            save_checkpoint(head_checkpoint, model, config, dataset.class_names, partial)
    finetune_checkpoint = None
    if run_finetune:
        t0 = time.perf_counter()
        finetune_metrics = run.finetune_phase(train_set, train_labels, tr_cache, val_set, val_cache, workers)
        phase_seconds["finetune"] = round(time.perf_counter() - t0, 3)
        if config.phase_checkpoints and "finetune" in run.phase_best:
            # the fine-tuned model itself, even where validation preferred the head phase's state
            finetune_checkpoint = out_path.with_name(out_path.stem + ".finetune" + out_path.suffix)
            run.restore(run.phase_best["finetune"][1])
            model.head, model.dim = head, config.dim
            partial = SimpleNamespace(
                frozen_metrics=frozen_metrics, head_metrics=head_metrics, finetune_metrics=finetune_metrics,
                best_metrics=finetune_metrics, best_phase="finetune", best_epoch=None, history=run.history,
            )
            save_checkpoint(finetune_checkpoint, model, config, dataset.class_names, partial)
    run.restore_best()

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
        best_phase=run.best_phase,
        best_epoch=run.best_epoch,
        frozen_metrics=frozen_metrics,
        head_metrics=head_metrics,
        finetune_metrics=finetune_metrics,
        best_metrics=run.best_metrics,
        history=run.history,
        phase_seconds=phase_seconds,
        warnings=dataset.warnings + run.warnings,
        device=str(device),
        head_checkpoint=None if head_checkpoint is None else str(head_checkpoint),
        finetune_checkpoint=None if finetune_checkpoint is None else str(finetune_checkpoint),
    )
    model.head = head.cpu().eval()
    model.dim = config.dim
    model.cpu().eval()
    save_checkpoint(out_path, model, config, dataset.class_names, summary)
    summary.seconds = round(time.perf_counter() - t_start, 3)
    return summary


def scaled_preprocessing(prep: Any, crop: int) -> Any:
    """The same resize/crop ratio at another crop size (training at a lower resolution is faster)."""
    from dataclasses import replace

    return replace(prep, crop_size=crop, resize_size=int(round(crop * prep.resize_size / prep.crop_size)))


def _workers(workers: int | None, device: torch.device) -> int:
    if workers is not None:
        return workers
    from ..embed import default_workers

    return min(default_workers(), 8 if device.type == "cuda" else 2)


def _autocast(device: torch.device) -> Any:
    from ..embed import autocast_dtype

    dtype = autocast_dtype(device)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()


def _to_device(images: torch.Tensor, model: Any, device: torch.device) -> torch.Tensor:
    from ..embed import normalize_batch

    x = normalize_batch(images.to(device, non_blocking=True), model.preprocessing)
    x = model.adapt_input(x)
    return x.contiguous(memory_format=torch.channels_last)  # the fast layout on CPU (oneDNN) and GPU


def _scan(
    model: Any,
    trunk: nn.Module,
    top: nn.Module,
    dataset: LabelledSet,
    device: torch.device,
    config: TrainConfig,
    workers: int,
    cb: TrainCallback,
    features: bool,
    trunk_acts: bool,
) -> tuple[_Cache | None, set[int]]:
    """Decode every image once; with ``features``/``trunk_acts`` also run the frozen network."""
    n = len(dataset)
    ds = ImageDataset(dataset.paths, dataset.labels, model.preprocessing, augment=False, max_pixels=config.max_pixels)
    batch = max(config.batch_size, 64 if device.type == "cuda" else 32)
    loader = make_loader(ds, batch, workers, pin_memory=device.type == "cuda", seed=config.seed)
    bad: set[int] = set()
    feats = torch.zeros((n, model.spec.dim), dtype=torch.float32) if features or trunk_acts else None
    acts: torch.Tensor | None = None
    if trunk_acts:
        shape = _trunk_shape(model, trunk, device)
        gb = n * math.prod(shape) * 2 / 1e9
        if gb > config.cache_max_gb:
            raise InputError(
                f"--cache-trunk would hold {gb:.1f} GB of activations (limit {config.cache_max_gb} GB); "
                "unfreeze fewer stages, use fewer images, or fine-tune on images (no --cache-trunk)"
            )
        acts = torch.zeros((n, *shape), dtype=torch.float16)
    trunk.to(device, memory_format=torch.channels_last).eval()
    top.to(device, memory_format=torch.channels_last).eval()
    cb.on_extract_start(n, "frozen features" if feats is not None else "checking images")
    try:
        with torch.inference_mode():
            for b in loader:
                for i, err in b["errors"]:
                    bad.add(int(i))
                    log.warning("skipped unreadable image: %s", err)
                if feats is not None and len(b["index"]):
                    x = _to_device(b["images"], model, device)
                    with _autocast(device):
                        a = trunk(x)
                        f = top(a)
                    feats[b["index"]] = f.float().cpu()
                    if acts is not None:
                        acts[b["index"]] = a.half().cpu()
                cb.on_extract_advance(len(b["index"]) + len(b["errors"]))
    finally:
        cb.on_extract_end()
    if feats is None:
        return None, bad
    return _Cache(feats, acts), bad


def _trunk_shape(model: Any, trunk: nn.Module, device: torch.device) -> tuple[int, ...]:
    c = model.preprocessing.crop_size
    trunk.to(device).eval()
    with torch.inference_mode():
        x = torch.zeros((1, model.conv_in, c, c), device=device)
        return tuple(trunk(x).shape[1:])


class _Run:
    """The mutable state of one training run: modules, the best state so far, the history."""

    def __init__(
        self,
        model: Any,
        trunk: nn.Module,
        top: nn.Module,
        head: MetricHead,
        loss: LossSetup,
        config: TrainConfig,
        device: torch.device,
        cb: TrainCallback,
        metric_fn: Any,
    ) -> None:
        self.model, self.trunk, self.top, self.head, self.loss = model, trunk, top, head, loss
        self.config, self.device, self.cb, self.metric_fn = config, device, cb, metric_fn
        self.history: list[EpochRecord] = []
        self.warnings: list[str] = []
        self.best_key: tuple[float, float] | None = None
        self.best_state: dict[str, Any] | None = None
        self.best_phase: str | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, Any] | None = None
        self.finetuning = False
        self._stale = 0  # epochs since the phase's last better validation (early stopping)
        self.top_initial: dict[str, Any] = {}
        self.phase_best: dict[str, tuple[tuple[float, float], dict[str, Any]]] = {}
        self.head.to(device)
        self.loss.loss.to(device)

    # -- bookkeeping ----------------------------------------------------------------------
    def metrics(self, embeddings: torch.Tensor, labels: np.ndarray) -> dict[str, Any]:
        m = self.metric_fn(embeddings.float().cpu().numpy(), labels, nmi=True, seed=self.config.seed)
        return m.to_dict()

    def _snapshot(self) -> dict[str, Any]:
        state = {"head": copy.deepcopy(self.head.state_dict())}
        if self.finetuning:
            state["top"] = copy.deepcopy(self.top.state_dict())
        return state

    def _consider(self, phase: str, epoch: int, metrics: dict[str, Any] | None) -> bool:
        """Keep this state if it is the best so far (always, without validation); also per phase."""
        key = (-1.0, -1.0) if metrics is None else (metrics["recall@1"], metrics["map@r"])
        snapshot = None
        if self.config.phase_checkpoints:
            prev = self.phase_best.get(phase)
            if metrics is None or prev is None or key > prev[0]:
                snapshot = self._snapshot()
                self.phase_best[phase] = (key, snapshot)
        if metrics is not None and self.best_key is not None and key <= self.best_key:
            return False
        self.best_key, self.best_phase, self.best_epoch, self.best_metrics = key, phase, epoch, metrics
        self.best_state = snapshot or self._snapshot()
        return True

    def restore(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        self.head.load_state_dict(state["head"])
        if self.finetuning:
            self.top.load_state_dict(state.get("top", self.top_initial))

    def restore_best(self) -> None:
        self.restore(self.best_state)

    def _optimizer(self, backbone_params: list[nn.Parameter], steps: int) -> tuple[Any, Any]:
        c = self.config
        groups = [{"params": list(self.head.parameters()), "lr": c.lr_head, "weight_decay": c.weight_decay}]
        if self.loss.has_parameters:
            groups.append(
                {"params": list(self.loss.loss.parameters()), "lr": c.lr_head * self.loss.proxy_lr_mult, "weight_decay": 0.0}
            )
        if backbone_params:
            groups.append({"params": backbone_params, "lr": c.lr_backbone, "weight_decay": c.weight_decay})
        opt = torch.optim.AdamW(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        return opt, sched

    def _batches(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Index batches for one epoch: m-per-class for pair losses, shuffled otherwise."""
        n = len(labels)
        if self.loss.m_per_class:
            from pytorch_metric_learning.samplers import MPerClassSampler

            m = self.loss.m_per_class
            b = _sampler_batch(batch_size, m, len(torch.unique(labels)))
            length = max(b, n - n % b)
            idx = torch.as_tensor(list(iter(MPerClassSampler(labels, m, batch_size=b, length_before_new_iter=length))))
            return list(idx.split(b))
        b = min(batch_size, n)
        perm = torch.randperm(n, generator=generator)
        batches = list(perm.split(b))
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches = batches[:-1]  # BatchNorm cannot train on a batch of one
        return batches

    def _step(self, opt: Any, sched: Any, scaler: Any, emb: torch.Tensor, labels: torch.Tensor) -> float:
        value = self.loss(nn.functional.normalize(emb.float(), dim=1), labels)
        if not torch.isfinite(value.detach()):
            raise _Diverged(float(value.detach()))
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()
        else:
            value.backward()
            opt.step()
        sched.step()
        v = float(value.detach())
        self.cb.on_step(v)
        return v

    def _end_epoch(self, phase: str, epoch: int, losses: list[float], metrics: dict[str, Any] | None, t0: float) -> bool:
        """Record a training epoch; True when the phase should stop (``patience`` epochs without a better validation)."""
        if self._record_epoch(phase, epoch, losses, metrics, t0):
            self._stale = 0
            return False
        self._stale += 1
        if self._stale >= self.config.patience:
            log.info("%s phase: no better validation Recall@1 for %d epochs; stopping", phase, self._stale)
            return True
        return False

    def _record_epoch(self, phase: str, epoch: int, losses: list[float], metrics: dict[str, Any] | None, t0: float) -> bool:
        """Add an epoch to the history and offer its state as the best; True when it is the best so far."""
        best = self._consider(phase, epoch, metrics)
        mean_loss = float(np.mean(losses)) if losses else None
        record = EpochRecord(phase, epoch, mean_loss, metrics, round(time.perf_counter() - t0, 3), best)
        self.history.append(record)
        self.cb.on_epoch_end(record)
        return best

    # -- phase 1 --------------------------------------------------------------------------
    def head_phase(
        self, feats: torch.Tensor, labels: torch.Tensor, val: _Cache | None, val_set: LabelledSet | None
    ) -> dict[str, Any] | None:
        c = self.config
        epochs = c.head_epochs or c.epochs
        gen = torch.Generator().manual_seed(c.seed)
        steps = len(self._batches(labels, c.batch_size, gen))
        opt, sched = self._optimizer([], steps * epochs)
        feats_d, labels_d = feats.to(self.device), labels.to(self.device)
        val_d = val.features.to(self.device) if val is not None else None
        self.cb.on_phase_start("head", epochs, steps)
        self._stale = 0
        last = None
        if c.head_init != "random" and val_d is not None:
            # the initial projection competes too: training that does not help is not kept
            t0 = time.perf_counter()
            last = self._validate_cached(val_d, val_set)
            self._record_epoch("head", 0, [], last, t0)
        try:
            for epoch in range(1, epochs + 1):
                t0 = time.perf_counter()
                self.head.train()
                losses = []
                try:
                    for idx in self._batches(labels, c.batch_size, gen):
                        idx = idx.to(self.device)
                        losses.append(self._step(opt, sched, None, self.head(feats_d[idx]), labels_d[idx]))
                except _Diverged as exc:
                    self._diverged("head", epoch, exc)
                    break
                last = self._validate_cached(val_d, val_set)
                if self._end_epoch("head", epoch, losses, last, t0):
                    break
        finally:
            self.cb.on_phase_end("head")
        return self._phase_best("head", last)

    def _validate_cached(self, feats: torch.Tensor | None, val_set: LabelledSet | None) -> dict[str, Any] | None:
        if feats is None or val_set is None:
            return None
        self.head.eval()
        with torch.inference_mode():
            emb = nn.functional.normalize(self.head(feats).float(), dim=1)
        return self.metrics(emb, val_set.labels)

    def _phase_best(self, phase: str, last: dict[str, Any] | None) -> dict[str, Any] | None:
        """The best validation figures reached in ``phase`` (the last epoch's without validation)."""
        recs = [r for r in self.history if r.phase == phase and r.metrics is not None]
        if not recs:
            return last
        return max(recs, key=lambda r: (r.metrics["recall@1"], r.metrics["map@r"])).metrics  # type: ignore[index]

    # -- phase 2 --------------------------------------------------------------------------
    def _set_train_mode(self) -> None:
        self.trunk.eval()  # frozen: BatchNorm statistics stay as pretrained
        self.top.train()
        if self.config.freeze_all_bn:
            for mod in self.top.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.eval()
        self.head.train()

    def finetune_phase(
        self,
        train_set: LabelledSet,
        labels: torch.Tensor,
        tr_cache: _Cache | None,
        val_set: LabelledSet | None,
        val_cache: _Cache | None,
        workers: int,
    ) -> dict[str, Any] | None:
        c = self.config
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        top_params = [p for p in self.top.parameters()]
        for p in top_params:
            p.requires_grad_(True)
        self.trunk.to(self.device, memory_format=torch.channels_last)
        self.top.to(self.device, memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(c.seed + 1)
        steps = len(self._batches(labels, c.batch_size, gen))
        opt, sched = self._optimizer(top_params, steps * c.epochs)
        scaler = None
        from ..embed import autocast_dtype

        if self.device.type == "cuda" and autocast_dtype(self.device) == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
        # The state we start from (the head phase's best) keeps competing: fine-tuning that does
        # not improve validation is not kept. Remember the backbone top it had.
        self.top_initial = copy.deepcopy(self.top.state_dict())
        self.finetuning = True
        ds = ImageDataset(train_set.paths, train_set.labels, self.model.preprocessing, augment=c.augment, max_pixels=c.max_pixels)
        self.cb.on_phase_start("finetune", c.epochs, steps)
        self._stale = 0
        last = None
        try:
            for epoch in range(1, c.epochs + 1):
                t0 = time.perf_counter()
                self._set_train_mode()
                losses = []
                batches = self._batches(labels, c.batch_size, gen)
                try:
                    self._finetune_epoch(batches, tr_cache, ds, labels, workers, epoch, opt, sched, scaler, gen, losses)
                except _Diverged as exc:
                    self._diverged("finetune", epoch, exc)
                    break
                last = self._validate_finetune(val_set, val_cache, workers)
                if self._end_epoch("finetune", epoch, losses, last, t0):
                    break
        finally:
            self.cb.on_phase_end("finetune")
            for p in top_params:
                p.requires_grad_(False)
        return self._phase_best("finetune", last)

    def _diverged(self, phase: str, epoch: int, exc: "_Diverged") -> None:
        msg = (
            f"{phase} phase: the loss became {exc.value} in epoch {epoch}; stopping the phase and keeping the best "
            "state so far (lower the learning rate)"
        )
        log.warning("%s", msg)
        self.warnings.append(msg)

    def _finetune_epoch(
        self,
        batches: list[torch.Tensor],
        tr_cache: _Cache | None,
        ds: ImageDataset,
        labels: torch.Tensor,
        workers: int,
        epoch: int,
        opt: Any,
        sched: Any,
        scaler: Any,
        gen: torch.Generator,
        losses: list[float],
    ) -> None:
        if self.config.cache_trunk:
            assert tr_cache is not None and tr_cache.trunk is not None
            for idx in batches:
                a = tr_cache.trunk[idx].to(self.device).float()
                flip = torch.rand(len(idx), generator=gen) < 0.5
                a[flip.to(self.device)] = a[flip.to(self.device)].flip(-1)
                a = a.contiguous(memory_format=torch.channels_last)
                with _autocast(self.device):
                    emb = self.head(self.top(a))
                losses.append(self._step(opt, sched, scaler, emb, labels[idx].to(self.device)))
        else:
            for b in self._image_batches(ds, batches, workers, epoch):
                if len(b["labels"]) < 2:
                    continue
                x = _to_device(b["images"], self.model, self.device)
                with _autocast(self.device):
                    with torch.no_grad():
                        a = self.trunk(x)
                    emb = self.head(self.top(a))
                losses.append(self._step(opt, sched, scaler, emb, b["labels"].to(self.device)))

    def _image_batches(
        self, ds: ImageDataset, batches: list[torch.Tensor], workers: int, epoch: int
    ) -> Iterator[dict[str, Any]]:
        loader = torch.utils.data.DataLoader(
            ds,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init if workers else None,
            generator=torch.Generator().manual_seed(self.config.seed * 1000 + epoch),
        )
        yield from loader

    def _validate_finetune(
        self, val_set: LabelledSet | None, val_cache: _Cache | None, workers: int
    ) -> dict[str, Any] | None:
        if val_set is None:
            return None
        self.top.eval()
        self.head.eval()
        if self.config.cache_trunk and val_cache is not None and val_cache.trunk is not None:
            out = []
            with torch.inference_mode():
                for start in range(0, len(val_cache.trunk), 256):
                    a = val_cache.trunk[start : start + 256].to(self.device).float()
                    with _autocast(self.device):
                        out.append(self.head(self.top(a)).float())
            return self.metrics(nn.functional.normalize(torch.cat(out), dim=1), val_set.labels)
        emb, labels = embed_set(self.model, self.trunk, self.top, self.head, val_set, self.device, workers, self.config)
        return self.metrics(emb, labels)


class _Diverged(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


def _sampler_batch(batch_size: int, m: int, n_classes: int) -> int:
    b = min(batch_size, m * n_classes)
    b -= b % m
    return max(b, m)


def embed_set(
    model: Any,
    trunk: nn.Module,
    top: nn.Module,
    head: nn.Module | None,
    data: LabelledSet,
    device: torch.device,
    workers: int,
    config: TrainConfig,
) -> tuple[torch.Tensor, np.ndarray]:
    """Centre-crop embeddings of a labelled set with the current modules (eval mode)."""
    ds = ImageDataset(data.paths, data.labels, model.preprocessing, augment=False, max_pixels=config.max_pixels)
    loader = make_loader(ds, max(config.batch_size, 32), workers, pin_memory=device.type == "cuda", seed=config.seed)
    out, labels = [], []
    trunk.eval()
    top.eval()
    if head is not None:
        head.eval()
    with torch.inference_mode():
        for b in loader:
            if not len(b["index"]):
                continue
            x = _to_device(b["images"], model, device)
            with _autocast(device):
                f = top(trunk(x))
                if head is not None:
                    f = head(f)
            out.append(nn.functional.normalize(f.float(), dim=1).cpu())
            labels.append(b["labels"].numpy())
    return torch.cat(out), np.concatenate(labels)
