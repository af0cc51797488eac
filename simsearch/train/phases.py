"""The two training phases: the head on cached features, then fine-tuning the backbone's top.

:class:`PhaseRunner` holds the modules of one run, its history and warnings, the best state so
far (:class:`.early_stopping.BestState`) and its early stopping; each phase records every epoch,
validates it and offers its state as the best. A loss that becomes NaN or infinite ends its
phase with a warning, keeping the best state so far.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..embed import autocast_dtype
from ..labelled import LabelledSet
from .callbacks import TrainCallback
from .config import TrainConfig
from .data import ImageDataset, make_loader
from .early_stopping import BestState, EarlyStopping, phase_best_metrics
from .feature_cache import FeatureCache
from .losses import LossSetup
from .results import EpochRecord
from .runtime import autocast_context, batch_to_device
from .sampling import epoch_batches
from .validation import embed_set, embed_trunk_activations, validation_metrics

log = logging.getLogger(__name__)


class Diverged(Exception):
    """The loss became NaN or infinite."""

    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


def make_optimizer(
    config: TrainConfig,
    head: nn.Module,
    loss: LossSetup,
    backbone_stages: list[list[nn.Parameter]],
    steps: int,
    warmup_steps: int = 0,
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the head (and the loss's proxies, and the backbone's top stages) with a cosine schedule.

    ``backbone_stages`` are the unfrozen stages' parameters, top stage first: the top one trains at
    ``lr_backbone``, each one below at ``lr_decay`` times the one above it (layer-wise decay: lower
    stages hold more general features). The first ``warmup_steps`` steps ramp every learning rate up
    linearly, so the first updates (with a head and proxies still fitting the frozen features) do not
    throw away what the pretrained stages knew.
    """
    c = config
    groups = [{"params": list(head.parameters()), "lr": c.lr_head, "weight_decay": c.weight_decay}]
    if loss.has_parameters:
        groups.append({"params": list(loss.loss.parameters()), "lr": c.lr_head * loss.proxy_lr_mult, "weight_decay": 0.0})
    for depth, params in enumerate(backbone_stages):
        if params:
            groups.append({"params": params, "lr": c.lr_backbone * c.lr_decay**depth, "weight_decay": c.weight_decay})
    opt = torch.optim.AdamW(groups)
    total = max(1, steps)
    warm = min(max(0, warmup_steps), total - 1)

    def factor(step: int) -> float:
        ramp = (step + 1) / (warm + 1) if step < warm else 1.0
        progress = min(max(step - warm, 0), total - warm) / max(1, total - warm)
        return ramp * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched


class PhaseRunner:
    """The mutable state of one training run: modules, the best state so far, the history."""

    def __init__(
        self,
        model: Any,
        trunk: nn.Module,
        top: nn.Module,
        head: nn.Module,
        loss: LossSetup,
        config: TrainConfig,
        device: torch.device,
        cb: TrainCallback,
    ) -> None:
        self.model, self.trunk, self.top, self.head, self.loss = model, trunk, top, head, loss
        self.config, self.device, self.cb = config, device, cb
        self.history: list[EpochRecord] = []
        self.warnings: list[str] = []
        self.best = BestState(head, top, per_phase=config.phase_checkpoints or config.ensemble > 0, proxies=loss.loss)
        self.stopping = EarlyStopping(config.patience)
        self.head.to(device)
        self.loss.loss.to(device)

    def metrics(self, embeddings: torch.Tensor, labels: np.ndarray) -> dict[str, Any]:
        return validation_metrics(embeddings, labels, self.config.seed)

    def batches(self, labels: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return epoch_batches(self.loss, labels, self.config.batch_size, generator)

    def record_epoch(self, phase: str, epoch: int, losses: list[float], metrics: dict[str, Any] | None, t0: float) -> bool:
        """Add an epoch to the history and offer its state as the best; True when it is the best so far."""
        best = self.best.consider(phase, epoch, metrics)
        mean_loss = float(np.mean(losses)) if losses else None
        record = EpochRecord(phase, epoch, mean_loss, metrics, round(time.perf_counter() - t0, 3), best)
        self.history.append(record)
        self.cb.on_epoch_end(record)
        return best

    def end_epoch(self, phase: str, epoch: int, losses: list[float], metrics: dict[str, Any] | None, t0: float) -> bool:
        """Record a training epoch; True when the phase should stop (``patience`` epochs without a better
        validation within the phase)."""
        self.record_epoch(phase, epoch, losses, metrics, t0)
        return self.stopping.should_stop(phase, self.best.phase_improved)

    def _step(self, opt: Any, sched: Any, scaler: Any, emb: torch.Tensor, labels: torch.Tensor) -> float:
        value = self.loss(nn.functional.normalize(emb.float(), dim=1), labels)
        if not torch.isfinite(value.detach()):
            raise Diverged(float(value.detach()))
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

    def _diverged(self, phase: str, epoch: int, exc: Diverged) -> None:
        msg = (
            f"{phase} phase: the loss became {exc.value} in epoch {epoch}; stopping the phase and keeping the best "
            "state so far (lower the learning rate)"
        )
        log.warning("%s", msg)
        self.warnings.append(msg)

    # -- phase 1 --------------------------------------------------------------------------
    def head_phase(
        self, feats: torch.Tensor, labels: torch.Tensor, val: FeatureCache | None, val_set: LabelledSet | None
    ) -> dict[str, Any] | None:
        """Train the head (and the loss's proxies) on cached features; the phase's best figures."""
        c = self.config
        epochs = c.head_epochs or c.epochs
        gen = torch.Generator().manual_seed(c.seed)
        steps = len(self.batches(labels, gen))
        opt, sched = make_optimizer(c, self.head, self.loss, [], steps * epochs)
        feats_d, labels_d = feats.to(self.device), labels.to(self.device)
        val_d = val.features.to(self.device) if val is not None else None
        self.cb.on_phase_start("head", epochs, steps)
        self.stopping.reset()
        last = None
        if c.head_init != "random" and val_d is not None:
            # the initial projection competes too: training that does not help is not kept
            t0 = time.perf_counter()
            last = self._validate_cached(val_d, val_set)
            self.record_epoch("head", 0, [], last, t0)
        try:
            for epoch in range(1, epochs + 1):
                t0 = time.perf_counter()
                self.head.train()
                losses = []
                try:
                    for idx in self.batches(labels, gen):
                        idx = idx.to(self.device)
                        losses.append(self._step(opt, sched, None, self.head(feats_d[idx]), labels_d[idx]))
                except Diverged as exc:
                    self._diverged("head", epoch, exc)
                    break
                last = self._validate_cached(val_d, val_set)
                if self.end_epoch("head", epoch, losses, last, t0):
                    break
        finally:
            self.cb.on_phase_end("head")
        return phase_best_metrics(self.history, "head", last)

    def _validate_cached(self, feats: torch.Tensor | None, val_set: LabelledSet | None) -> dict[str, Any] | None:
        if feats is None or val_set is None:
            return None
        self.head.eval()
        with torch.inference_mode():
            emb = nn.functional.normalize(self.head(feats).float(), dim=1)
        return self.metrics(emb, val_set.labels)

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
        tr_cache: FeatureCache | None,
        val_set: LabelledSet | None,
        val_cache: FeatureCache | None,
        workers: int,
    ) -> dict[str, Any] | None:
        """Train the backbone's top stages with the head; the phase's best figures."""
        c = self.config
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        top_params = [p for p in self.top.parameters()]
        for p in top_params:
            p.requires_grad_(True)
        stages = [list(m.parameters()) for m in reversed(list(self.top.children()))]  # top stage first
        self.trunk.to(self.device, memory_format=torch.channels_last)
        self.top.to(self.device, memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(c.seed + 1)
        steps = len(self.batches(labels, gen))
        opt, sched = make_optimizer(
            c, self.head, self.loss, [p for p in stages if p], steps * c.epochs, int(round(c.warmup * steps))
        )
        scaler = None
        if self.device.type == "cuda" and autocast_dtype(self.device) == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
        # The state we start from (the head phase's best) keeps competing: fine-tuning that does
        # not improve validation is not kept. Remember the backbone top it had.
        self.best.start_finetuning()
        ds = ImageDataset(train_set.paths, train_set.labels, self.model.preprocessing, augment=c.augment, max_pixels=c.max_pixels)
        self.cb.on_phase_start("finetune", c.epochs, steps)
        self.stopping.reset()
        last = None
        try:
            for epoch in range(1, c.epochs + 1):
                t0 = time.perf_counter()
                self._set_train_mode()
                losses: list[float] = []
                batches = self.batches(labels, gen)
                try:
                    self._finetune_epoch(batches, tr_cache, ds, labels, workers, epoch, opt, sched, scaler, gen, losses)
                except Diverged as exc:
                    self._diverged("finetune", epoch, exc)
                    break
                last = self._validate_finetune(val_set, val_cache, workers)
                if self.end_epoch("finetune", epoch, losses, last, t0):
                    break
        finally:
            self.cb.on_phase_end("finetune")
            for p in top_params:
                p.requires_grad_(False)
        return phase_best_metrics(self.history, "finetune", last)

    def _finetune_epoch(
        self,
        batches: list[torch.Tensor],
        tr_cache: FeatureCache | None,
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
            views = tr_cache.views
            for idx in batches:
                if views is not None:  # one of the cached augmented views of each image, drawn per step
                    pick = torch.randint(views.shape[1], (len(idx),), generator=gen)
                    a = views[idx, pick].to(self.device).float()
                else:
                    a = tr_cache.trunk[idx].to(self.device).float()
                flip = torch.rand(len(idx), generator=gen) < 0.5
                a[flip.to(self.device)] = a[flip.to(self.device)].flip(-1)
                a = a.contiguous(memory_format=torch.channels_last)
                with autocast_context(self.device):
                    emb = self.head(self.top(a))
                losses.append(self._step(opt, sched, scaler, emb, labels[idx].to(self.device)))
        else:
            for b in self._image_batches(ds, batches, workers, epoch):
                if len(b["labels"]) < 2:
                    continue
                x = batch_to_device(b["images"], self.model, self.device)
                with autocast_context(self.device):
                    with torch.no_grad():
                        a = self.trunk(x)
                    emb = self.head(self.top(a))
                losses.append(self._step(opt, sched, scaler, emb, b["labels"].to(self.device)))

    def _image_batches(
        self, ds: ImageDataset, batches: list[torch.Tensor], workers: int, epoch: int
    ) -> Iterator[dict[str, Any]]:
        """Decoded batches of exactly ``batches``: they are all one size but the last, so the
        loader's sequential batching of their concatenation gives them back as they are."""
        if not batches:
            return
        order = torch.cat(batches).tolist()
        yield from make_loader(
            ds,
            len(batches[0]),
            workers,
            sampler=order,
            pin_memory=self.device.type == "cuda",
            seed=self.config.seed * 1000 + epoch,
        )

    def _validate_finetune(
        self, val_set: LabelledSet | None, val_cache: FeatureCache | None, workers: int
    ) -> dict[str, Any] | None:
        if val_set is None:
            return None
        self.top.eval()
        self.head.eval()
        if self.config.cache_trunk and val_cache is not None and val_cache.trunk is not None:
            return self.metrics(embed_trunk_activations(self.top, self.head, val_cache.trunk, self.device), val_set.labels)
        emb, labels = embed_set(self.model, self.trunk, self.top, self.head, val_set, self.device, workers, self.config)
        return self.metrics(emb, labels)
