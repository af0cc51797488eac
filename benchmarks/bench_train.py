"""Does fine-tuning help on classes it never saw? Class-disjoint retrieval on Caltech-101.

    python benchmarks/bench_train.py --data ../shared/datasets/caltech101 --model efficientnet_lite0
    python benchmarks/bench_train.py --model resnet50 --weights imagenet --device cuda
    # quick check: --limit-per-class 5 --epochs 1

Protocol (the dataset README's): the 101 classes in Python ``sorted()`` order, BACKGROUND_Google
left out; ``simsearch.train`` trains on the first 50 (validation: ``--val-classes`` of them held
out, for early stopping and choosing the best epoch), and the other 51 classes are the test set:
every test image is a query against all the other test images (leave-one-out, exact search).

It reports Recall@1/2/4/8, MAP@R and k-means NMI on the test classes for

1. the **frozen** backbone (pooled features, L2-normalised);
2. after the **head** phase (metric head on the frozen backbone; ``<out>/model.head.pt``);
3. after **fine-tuning** the top ``--unfreeze`` stages (``<out>/model.finetune.pt``: the best
   fine-tuning epoch by validation, even where validation preferred the head phase's state,
   which is then what ``<out>/model.pt`` holds);

with the wall time of each step and the machine. One pass over the test images with the frozen
backbone yields both its pooled features and the activations where the fine-tuned stages begin;
the head and the fine-tuned top are then applied to those: what the full models compute, since the
frozen part is unchanged (checked bit for bit against the checkpoint), up to the float16 storage of
the activations (a 1.6e-5 difference on the L2-normalised embeddings, measured). Metrics come from
``simsearch.evaluate.retrieval_metrics``, the code ``simsearch eval`` and training validation use.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets" / "caltech101"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def split_caltech(root: Path, limit: int | None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) lists of (path, class): first 50 classes in sorted() order vs the other 51."""
    from simsearch.images import iter_image_files

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != "BACKGROUND_Google")
    if len(classes) != 101:
        log(f"warning: expected 101 classes in {root}, found {len(classes)}")
    out: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for i, name in enumerate(classes):
        files = [e.path for e in iter_image_files([root / name])]
        if limit:
            files = files[:limit]
        out["train" if i < 50 else "test"].extend((p, name) for p in files)
    return out["train"], out["test"]


def test_pass(model: Any, cut: int, items: list[tuple[str, str]], args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Frozen pooled features and trunk activations (before the top ``cut`` stages) of the test images."""
    import numpy as np
    import torch

    from simsearch.embed import resolve_device
    from simsearch.models import split_backbone
    from simsearch.train.data import ImageDataset, make_loader
    from simsearch.train.runtime import autocast_context, batch_to_device

    device = resolve_device(args.device)
    trunk, top = split_backbone(model, cut)
    trunk.to(device).eval()
    top.to(device).eval()
    labels = [c for _, c in items]
    ds = ImageDataset([p for p, _ in items], np.zeros(len(items), np.int64), model.preprocessing)
    loader = make_loader(ds, 64 if device.type == "cuda" else 32, args.workers if args.workers is not None else 2, pin_memory=device.type == "cuda")
    feats, acts, keep = [], [], []
    t0 = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for b in loader:
            for i, err in b["errors"]:
                log(f"skipped unreadable test image: {err}")
            if not len(b["index"]):
                continue
            x = batch_to_device(b["images"], model, device)
            with autocast_context(device):
                a = trunk(x)
                f = top(a)
            feats.append(f.float().cpu())
            acts.append(a.half().cpu())
            keep.extend(b["index"].tolist())
            done += len(b["index"])
            if done % 640 < len(b["index"]):
                log(f"  test pass: {done}/{len(items)} images, {done / (time.perf_counter() - t0):.1f} img/s")
    return torch.cat(feats), torch.cat(acts), [labels[i] for i in keep]


def apply_checkpoint(path: str, cut: int, feats: Any, acts: Any, device: str, use_acts: bool) -> Any:
    """Embeddings of the test images under a checkpoint, from the frozen pass's features/activations."""
    import torch
    from torch import nn

    from simsearch.embed import resolve_device
    from simsearch.models import create_model, split_backbone
    from simsearch.train.runtime import autocast_context

    dev = resolve_device(device)
    model = create_model("resnet50", path).to(dev).eval()
    trunk, top = split_backbone(model, cut)
    out = []
    with torch.inference_mode():
        for start in range(0, len(feats), 256):
            with autocast_context(dev):
                if use_acts:
                    f = top(acts[start : start + 256].to(dev).float())
                else:
                    f = feats[start : start + 256].to(dev)
                out.append(model.head(f).float().cpu())
    return nn.functional.normalize(torch.cat(out), dim=1)


def frozen_trunk_unchanged(base: Any, path: str, cut: int) -> bool:
    """The fine-tuned checkpoint's frozen stages are bit-identical to the pretrained backbone's."""
    import torch

    from simsearch.models import create_model, split_backbone

    ft = create_model("resnet50", path)
    a = split_backbone(base, cut)[0].state_dict()
    b = split_backbone(ft, cut)[0].state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (upper bound)")
    ap.add_argument("--head-epochs", type=int, default=10, help="head-phase epochs (upper bound)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--loss", default="proxyanchor")
    ap.add_argument("--head-init", default="lda", choices=["lda", "pca", "random"])
    ap.add_argument("--lr-head", type=float, default=1e-4)
    ap.add_argument("--lr-backbone", type=float, default=1e-5)
    ap.add_argument("--unfreeze", type=int, default=1)
    ap.add_argument("--val-classes", default="10", help="training classes held out for validation")
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--cache-trunk", action="store_true", help="fine-tune on cached trunk activations (flips only)")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-per-class", type=int, default=None, help="first N images of each class (quick runs)")
    ap.add_argument("--out", type=Path, default=Path("bench_train_out"), help="folder for checkpoints and results.json")
    args = ap.parse_args()

    import torch

    from simsearch.embed import resolve_device
    from simsearch.evaluate import retrieval_metrics
    from simsearch.models import create_model
    from simsearch.train import TrainCallback, TrainConfig, train

    t_all = time.perf_counter()
    device = str(resolve_device(args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    train_items, test_items = split_caltech(args.data, args.limit_per_class)
    log(f"{len(train_items)} training images (50 classes), {len(test_items)} test images (51 classes)")
    train_csv = args.out / "train.csv"
    with open(train_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(train_items)

    class Progress(TrainCallback):
        def __init__(self) -> None:
            self.t = time.perf_counter()
            self.n = 0

        def on_extract_start(self, total: int, what: str) -> None:
            self.total, self.n, self.t = total, 0, time.perf_counter()

        def on_extract_advance(self, n: int) -> None:
            self.n += n
            if self.n % 640 < n:
                log(f"  train pass ({self.n}/{self.total}): {self.n / (time.perf_counter() - self.t):.1f} img/s")

        def on_phase_start(self, phase: str, epochs: int, steps: int) -> None:
            log(f"{phase} phase: up to {epochs} epochs of {steps} steps")

        def on_epoch_end(self, r: Any) -> None:
            val = "" if r.metrics is None else f"val R@1 {r.metrics['recall@1']:.4f} MAP@R {r.metrics['map@r']:.4f}"
            loss = "" if r.loss is None else f"loss {r.loss:.4f} "
            log(f"  {r.phase} epoch {r.epoch}: {loss}{val} [{r.seconds:.1f}s]{' *' if r.best else ''}")

    config = TrainConfig(
        model=args.model, weights=args.weights, seed=args.seed, dim=args.dim, head_init=args.head_init, loss=args.loss,
        epochs=args.epochs, head_epochs=args.head_epochs, batch_size=args.batch_size, lr_head=args.lr_head,
        lr_backbone=args.lr_backbone, unfreeze=args.unfreeze, phases="both", val_classes=args.val_classes,
        patience=args.patience, cache_trunk=args.cache_trunk, augment=not args.no_augment, device=args.device,
        workers=args.workers, phase_checkpoints=True,
    )
    out = args.out / "model.pt"
    summary = train(train_csv, out, config, callback=Progress())
    log(f"training done in {summary.seconds:.0f}s; kept {summary.best_phase} epoch {summary.best_epoch}")

    # One frozen pass over the test images, then each model's embeddings from it.
    base = create_model(args.model, args.weights, seed=args.seed)
    t0 = time.perf_counter()
    feats, acts, labels = test_pass(base, args.unfreeze, test_items, args)
    t_test = time.perf_counter() - t0
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    results["frozen"] = retrieval_metrics(torch.nn.functional.normalize(feats, dim=1).numpy(), labels, seed=args.seed)
    t_metrics = time.perf_counter() - t0
    assert summary.head_checkpoint and summary.finetune_checkpoint
    results["head"] = retrieval_metrics(
        apply_checkpoint(summary.head_checkpoint, args.unfreeze, feats, acts, device, use_acts=False).numpy(), labels, seed=args.seed
    )
    results["finetune"] = retrieval_metrics(
        apply_checkpoint(summary.finetune_checkpoint, args.unfreeze, feats, acts, device, use_acts=True).numpy(), labels, seed=args.seed
    )
    unchanged = frozen_trunk_unchanged(base, summary.finetune_checkpoint, args.unfreeze)

    ps = summary.phase_seconds
    times = {
        "frozen": ps.get("scan", 0.0),
        "head": ps.get("head", 0.0),
        "finetune": ps.get("finetune", 0.0),
    }
    info = machine(device)
    print(f"machine: {info['cpus']} CPUs ({info['cpu']}), torch {info['torch']} ({info['torch_threads']} threads), device {device}"
          + (f" ({info['gpu']})" if "gpu" in info else ""))
    print(f"model: {args.model} ({base.weights_id}); train {summary.train_images} images / {summary.classes} classes "
          f"(validation: {summary.val_images} images of {len(summary.val_classes)} held-out classes); "
          f"test {len(labels)} images / {len(set(labels))} classes")
    print(f"config: loss {args.loss}, dim {args.dim}, head init {args.head_init}, lr head {args.lr_head:g}, "
          f"lr backbone {args.lr_backbone:g}, unfreeze {args.unfreeze}, batch {args.batch_size}, "
          f"epochs head<={args.head_epochs} finetune<={args.epochs}, "
          f"{'cached trunk (flips)' if args.cache_trunk else 'images (augmented)' if not args.no_augment else 'images'}")
    print(f"{'':>9}  {'R@1':>6} {'R@2':>6} {'R@4':>6} {'R@8':>6} {'MAP@R':>6} {'NMI':>6}   wall time")
    what = {
        "frozen": f"{times['frozen']:.0f}s train feature pass (decode + frozen forward)",
        "head": f"{times['head']:.0f}s head phase",
        "finetune": f"{times['finetune']:.0f}s fine-tuning phase",
    }
    for name in ("frozen", "head", "finetune"):
        m = results[name]
        nmi = float("nan") if m.nmi is None else m.nmi
        print(f"{name:>9}  {m.recall[1]:6.4f} {m.recall[2]:6.4f} {m.recall[4]:6.4f} {m.recall[8]:6.4f} "
              f"{m.map_at_r:6.4f} {nmi:6.4f}   {what[name]}")
    print(f"test pass (frozen forward, {len(labels)} images): {t_test:.0f}s; metrics: {t_metrics:.1f}s per model; "
          f"total wall time {time.perf_counter() - t_all:.0f}s")
    print(f"validation (held-out training classes), R@1: frozen "
          f"{(summary.frozen_metrics or {}).get('recall@1', float('nan')):.4f}, head {(summary.head_metrics or {}).get('recall@1', float('nan')):.4f}, "
          f"finetune {(summary.finetune_metrics or {}).get('recall@1', float('nan')):.4f}; "
          f"{out.name} keeps {summary.best_phase} epoch {summary.best_epoch}")
    print(f"frozen stages of the fine-tuned checkpoint bit-identical to the pretrained backbone: {unchanged}")
    payload = {
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "test": {k: v.to_dict() for k, v in results.items()},
        "seconds": {**times, "test_pass": round(t_test, 1), "total": round(time.perf_counter() - t_all, 1)},
        "train_summary": summary.to_dict(),
        "frozen_stages_unchanged": unchanged,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    log(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
