"""Does fine-tuning pay off? Retrieval before and after training, on classes seen and unseen.

    # Grocery Store (github.com/marcusklasson/GroceryStoreDataset), seen classes: train on its
    # train split, its test images are queries against train + val as the gallery
    python benchmarks/bench_train.py --protocol grocery-seen --data GROCERY/dataset \
        --instance ../shared/datasets/caltech101 --out OUT_DIR
    # Grocery unseen classes: train on the first 40 fine classes (sorted names), test on the other 41
    python benchmarks/bench_train.py --protocol grocery-unseen --data GROCERY/dataset --out OUT_DIR
    # Caltech-101, class-disjoint (the dataset README's protocol)
    python benchmarks/bench_train.py --protocol caltech --data ../shared/datasets/caltech101 --out OUT_DIR
    # quick check of the plumbing: --limit-per-class 5 --epochs 1 --head-epochs 2

Protocols:

* ``caltech``: the 101 classes in Python ``sorted()`` order, BACKGROUND_Google left out;
  ``simsearch.train`` trains on the first 50 (``--val-classes`` of them held out for early
  stopping and choosing the epoch kept); the other 51 are the test set, leave-one-out.
* ``grocery-seen``: train on ``train.txt`` (validation: ``--val-fraction`` of its images); the
  ``test.txt`` images are queries against the ``train.txt`` + ``val.txt`` images (a product
  catalogue searched with new photos of the same products).
* ``grocery-unseen``: the 81 fine classes by sorted name; train on the first 40 (all their
  images; ``--val-classes`` held out), test on every image of the other 41, leave-one-out.

For each it reports Recall@1/2/4/8, MAP@R and k-means NMI of

1. the **frozen** backbone (pooled features, L2-normalised);
2. the model after the **head** phase (metric head on the frozen backbone; ``<out>/model.head.pt``);
3. the model after **fine-tuning** its top stages (``<out>/model.finetune.pt``: the best fine-tuning
   epoch by validation, even where validation preferred the head phase's state, which is then what
   ``<out>/model.pt`` holds);
4. the **ensemble**, when training kept it (the default, ``--ensemble``): the fine-tuned and the
   head-only model joined (``<out>/model.pt``, :class:`simsearch.models.Twin`);

and, with ``--instance CALTECH_ROOT``, the **instance-level** Recall@1 of each: Caltech-101's
``Faces_easy`` images (crops of the ``Faces`` photos) as queries against the ``Faces`` photos, a hit
when the nearest photo is the query's own original. A class-trained model may make near-copies
harder to find; this says by how much. Wall time of each phase and the training throughput too.

One pass over the evaluation images with the frozen backbone yields both its pooled features and
the activations where the fine-tuned stages begin; the head and the fine-tuned top are then applied
to those: what the full models compute, since the frozen part is unchanged (checked bit for bit
against the checkpoint), up to the float16 storage of the activations (a 1.6e-5 difference on the
L2-normalised embeddings, measured). Metrics come from ``simsearch.evaluate.retrieval_metrics``,
the code ``simsearch eval`` and training validation use. Training options not given here are
``simsearch train``'s defaults.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
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


Item = tuple[str, str]  # (path, class)


@dataclass
class EvalSet:
    """Queries and their gallery; no gallery: leave-one-out among the queries."""

    queries: list[Item]
    gallery: list[Item] | None = None


def first_per_class(items: list[Item], limit: int | None) -> list[Item]:
    if not limit:
        return items
    seen: dict[str, int] = {}
    out = []
    for path, cls in items:
        seen[cls] = seen.get(cls, 0) + 1
        if seen[cls] <= limit:
            out.append((path, cls))
    return out


def split_caltech(root: Path, limit: int | None) -> tuple[list[Item], EvalSet]:
    """First 50 classes in sorted() order to train on, the other 51 left-one-out."""
    from simsearch.images import iter_image_files

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != "BACKGROUND_Google")
    if len(classes) != 101:
        log(f"warning: expected 101 classes in {root}, found {len(classes)}")
    out: dict[str, list[Item]] = {"train": [], "test": []}
    for i, name in enumerate(classes):
        files = [e.path for e in iter_image_files([root / name])]
        out["train" if i < 50 else "test"].extend((p, name) for p in files)
    return first_per_class(out["train"], limit), EvalSet(first_per_class(out["test"], limit))


def grocery_root(root: Path) -> Path:
    """The folder holding train.txt / val.txt / test.txt (the repository's ``dataset`` folder)."""
    for cand in (root, root / "dataset"):
        if (cand / "train.txt").exists():
            return cand
    raise SystemExit(f"{root}: no train.txt (give the Grocery Store dataset's 'dataset' folder)")


def grocery_list(root: Path, split: str) -> list[Item]:
    """(path, fine class) of one split file; the fine class is the image's folder name."""
    items = []
    for line in (root / f"{split}.txt").read_text().splitlines():
        if line.strip():
            rel = line.split(",")[0].strip()
            items.append((str(root / rel), Path(rel).parent.name))
    return items


def split_grocery_seen(root: Path, limit: int | None) -> tuple[list[Item], EvalSet]:
    root = grocery_root(root)
    gallery = grocery_list(root, "train") + grocery_list(root, "val")
    return (
        first_per_class(grocery_list(root, "train"), limit),
        EvalSet(first_per_class(grocery_list(root, "test"), limit), first_per_class(gallery, limit)),
    )


def split_grocery_unseen(root: Path, limit: int | None) -> tuple[list[Item], EvalSet]:
    root = grocery_root(root)
    items = grocery_list(root, "train") + grocery_list(root, "val") + grocery_list(root, "test")
    classes = sorted({c for _, c in items})
    if len(classes) != 81:
        log(f"warning: expected 81 fine classes in {root}, found {len(classes)}")
    train_classes = set(classes[:40])
    train = [it for it in items if it[1] in train_classes]
    test = [it for it in items if it[1] not in train_classes]
    return first_per_class(train, limit), EvalSet(first_per_class(test, limit))


def instance_set(caltech: Path) -> EvalSet:
    """Faces_easy (crops) as queries against Faces (their originals); the class is the file name."""
    easy = sorted((caltech / "Faces_easy").glob("*.jpg"))
    full = {p.name: p for p in (caltech / "Faces").glob("*.jpg")}
    pairs = [(str(p), p.name) for p in easy if p.name in full]
    if not pairs:
        raise SystemExit(f"{caltech}: no Faces_easy / Faces pairs")
    return EvalSet(pairs, [(str(p), name) for name, p in sorted(full.items())])


def frozen_pass(model: Any, cut: int, items: list[Item], args: argparse.Namespace, what: str) -> tuple[Any, Any, list[str]]:
    """Frozen pooled features and trunk activations (before the top ``cut`` stages) of ``items``."""
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
                log(f"skipped unreadable {what} image: {err}")
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
                log(f"  {what} pass: {done}/{len(items)} images, {done / (time.perf_counter() - t0):.1f} img/s")
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


PROTOCOLS = {"caltech": split_caltech, "grocery-seen": split_grocery_seen, "grocery-unseen": split_grocery_unseen}


def main() -> None:
    from simsearch.train import TrainConfig

    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="caltech")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Caltech-101 root, or the Grocery Store dataset folder")
    ap.add_argument("--instance", type=Path, default=None, help="Caltech-101 root: also measure Faces_easy -> Faces instance Recall@1")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--epochs", type=int, default=d.epochs, help="fine-tuning epochs (upper bound)")
    ap.add_argument("--head-epochs", type=int, default=d.head_epochs or d.epochs, help="head-phase epochs (upper bound)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--dim", type=int, default=d.dim)
    ap.add_argument("--loss", default=d.loss)
    ap.add_argument("--head-init", default=d.head_init, choices=["lda", "pca", "random"])
    ap.add_argument("--lr-head", type=float, default=d.lr_head)
    ap.add_argument("--lr-backbone", type=float, default=d.lr_backbone)
    ap.add_argument("--lr-decay", type=float, default=d.lr_decay)
    ap.add_argument("--warmup", type=float, default=d.warmup)
    ap.add_argument("--unfreeze", type=int, default=None, help="top stages to fine-tune [default: the model's]")
    ap.add_argument("--val-classes", default=None, help="held-out validation classes [caltech: 10, grocery-unseen: 8]")
    ap.add_argument("--val-fraction", type=float, default=d.val_fraction, help="grocery-seen: validation images per class")
    ap.add_argument("--patience", type=int, default=d.patience)
    ap.add_argument("--cache-trunk", action=argparse.BooleanOptionalAction, default=d.cache_trunk)
    ap.add_argument("--views", type=int, default=d.views, help="augmented views cached per image (with --cache-trunk)")
    ap.add_argument("--ensemble", type=float, default=d.ensemble,
                    help="weight of the fine-tuned model in the kept pair (0: keep one model)")
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
    from simsearch.models import create_model, join_embeddings
    from simsearch.train import TrainCallback, train

    t_all = time.perf_counter()
    device = str(resolve_device(args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    train_items, eval_set = PROTOCOLS[args.protocol](args.data, args.limit_per_class)
    unfreeze = TrainConfig(model=args.model, unfreeze=args.unfreeze).resolved().unfreeze
    val_classes = args.val_classes
    if val_classes is None and args.protocol != "grocery-seen":
        val_classes = "10" if args.protocol == "caltech" else "8"
    n_train_classes = len({c for _, c in train_items})
    n_eval = len(eval_set.queries) + len(eval_set.gallery or [])
    log(f"{args.protocol}: {len(train_items)} training images ({n_train_classes} classes), "
        f"{len(eval_set.queries)} queries" + (f" against {len(eval_set.gallery)} gallery images" if eval_set.gallery else " (leave-one-out)"))
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
            self.total, self.n, self.t, self.what = total, 0, time.perf_counter(), what

        def on_extract_advance(self, n: int) -> None:
            self.n += n
            if self.n % 640 < n:
                log(f"  {self.what} ({self.n}/{self.total}): {self.n / (time.perf_counter() - self.t):.1f} img/s")

        def on_phase_start(self, phase: str, epochs: int, steps: int) -> None:
            log(f"{phase} phase: up to {epochs} epochs of {steps} steps")

        def on_epoch_end(self, r: Any) -> None:
            val = "" if r.metrics is None else f"val R@1 {r.metrics['recall@1']:.4f} MAP@R {r.metrics['map@r']:.4f}"
            loss = "" if r.loss is None else f"loss {r.loss:.4f} "
            log(f"  {r.phase} epoch {r.epoch}: {loss}{val} [{r.seconds:.1f}s]{' *' if r.best else ''}")

    config = TrainConfig(
        model=args.model, weights=args.weights, seed=args.seed, dim=args.dim, head_init=args.head_init, loss=args.loss,
        epochs=args.epochs, head_epochs=args.head_epochs, batch_size=args.batch_size, lr_head=args.lr_head,
        lr_backbone=args.lr_backbone, lr_decay=args.lr_decay, warmup=args.warmup, unfreeze=unfreeze, phases="both",
        val_classes=val_classes, val_fraction=0.2 if val_classes else args.val_fraction,
        patience=args.patience, cache_trunk=args.cache_trunk, views=args.views, augment=not args.no_augment, ensemble=args.ensemble,
        device=args.device, workers=args.workers, phase_checkpoints=True,
    )
    out = args.out / "model.pt"
    summary = train(train_csv, out, config, callback=Progress())
    epoch = "" if summary.best_epoch is None else f" epoch {summary.best_epoch}"
    log(f"training done in {summary.seconds:.0f}s; kept {summary.best_phase}{epoch}")

    # One frozen pass over the evaluation images, then each model's embeddings from it.
    base = create_model(args.model, args.weights, seed=args.seed)
    sets = {"eval": eval_set}
    if args.instance is not None:
        sets["instance"] = instance_set(args.instance)
    t0 = time.perf_counter()
    passes: dict[str, dict[str, Any]] = {}
    for name, es in sets.items():
        for side, items in (("queries", es.queries), ("gallery", es.gallery)):
            if items is not None:
                feats, acts, labels = frozen_pass(base, unfreeze, items, args, f"{name} {side}")
                passes.setdefault(name, {})[side] = (feats, acts, labels)
    t_test = time.perf_counter() - t0
    assert summary.head_checkpoint and summary.finetune_checkpoint
    checkpoints = {"frozen": None, "head": summary.head_checkpoint, "finetune": summary.finetune_checkpoint}
    if summary.best_phase == "ensemble":
        checkpoints["ensemble"] = str(out)  # model.pt: the two above joined (models.Twin)

    def embed(which: str, feats: Any, acts: Any) -> Any:
        if which == "frozen":
            return torch.nn.functional.normalize(feats, dim=1)
        if which == "ensemble":  # what model.pt computes (models.Twin), from the two phase models
            return join_embeddings(embed("finetune", feats, acts), embed("head", feats, acts), args.ensemble)
        return apply_checkpoint(checkpoints[which], unfreeze, feats, acts, device, use_acts=which == "finetune")

    results: dict[str, dict[str, Any]] = {}
    for which in checkpoints:
        for name, sides in passes.items():
            q = embed(which, *sides["queries"][:2]).numpy()
            if "gallery" in sides:
                g = embed(which, *sides["gallery"][:2]).numpy()
                m = retrieval_metrics(q, sides["queries"][2], g, sides["gallery"][2], nmi=name == "eval", seed=args.seed)
            else:
                m = retrieval_metrics(q, sides["queries"][2], nmi=True, seed=args.seed)
            results.setdefault(which, {})[name] = m
    unchanged = frozen_trunk_unchanged(base, summary.finetune_checkpoint, unfreeze)

    ps = summary.phase_seconds
    ft_epochs = sum(1 for r in summary.history if r.phase == "finetune" and r.loss is not None)
    ft_rate = summary.train_images * ft_epochs / ps["finetune"] if ps.get("finetune") else float("nan")
    info = machine(device)
    print(f"machine: {info['cpus']} CPUs ({info['cpu']}), torch {info['torch']} ({info['torch_threads']} threads), device {device}"
          + (f" ({info['gpu']})" if "gpu" in info else "") + f", load average at the end {os.getloadavg()[0]:.1f}")
    print(f"protocol {args.protocol}, model {args.model} ({base.weights_id}), seed {args.seed}: train {summary.train_images} images / "
          f"{summary.classes} classes (validation: {summary.val_images} images"
          + (f" of {len(summary.val_classes)} held-out classes" if summary.val_classes else "") + "); "
          f"evaluation {len(eval_set.queries)} queries" + (f" against {len(eval_set.gallery)} gallery images" if eval_set.gallery else " (leave-one-out)"))
    print(f"config: loss {args.loss}, dim {args.dim}, head init {args.head_init}, lr head {args.lr_head:g}, "
          f"lr backbone {args.lr_backbone:g} (decay {args.lr_decay:g}/stage, warm-up {args.warmup:g} epochs), unfreeze {unfreeze}, "
          f"batch {args.batch_size}, epochs head<={args.head_epochs} finetune<={args.epochs}, "
          + (f"cached trunk ({args.views} augmented views + flips)" if "views" in summary.phase_seconds
             else "cached trunk (centre crops + flips)" if args.cache_trunk or (args.cache_trunk is None and args.views == 0)
             else "images (augmented)" if not args.no_augment else "images"))
    inst = "instance R@1" if "instance" in passes else ""
    print(f"{'':>9}  {'R@1':>6} {'R@2':>6} {'R@4':>6} {'R@8':>6} {'MAP@R':>6} {'NMI':>6}  {inst:>12}   wall time")
    what = {
        "frozen": f"{ps.get('scan', 0.0):.0f}s frozen pass over {summary.train_images + summary.val_images} training images",
        "head": f"{ps.get('head', 0.0):.0f}s head phase",
        "finetune": (f"{ps.get('views', 0.0):.0f}s caching {args.views} views + " if "views" in ps else "")
        + f"{ps.get('finetune', 0.0):.0f}s fine-tuning ({ft_epochs} epochs, {ft_rate:.1f} img/s with validation)",
        "ensemble": f"the two above joined (weight {args.ensemble:g} on the fine-tuned; model.pt)",
    }
    for which in checkpoints:
        m = results[which]["eval"]
        nmi = float("nan") if m.nmi is None else m.nmi
        i1 = f"{results[which]['instance'].recall[1]:.4f}" if "instance" in results[which] else ""
        print(f"{which:>9}  {m.recall[1]:6.4f} {m.recall[2]:6.4f} {m.recall[4]:6.4f} {m.recall[8]:6.4f} "
              f"{m.map_at_r:6.4f} {nmi:6.4f}  {i1:>12}   {what[which]}")
    print(f"evaluation passes (frozen forward of {n_eval + sum(len(e.queries) + len(e.gallery or []) for k, e in sets.items() if k != 'eval')} images): "
          f"{t_test:.0f}s; total wall time {time.perf_counter() - t_all:.0f}s")
    print(f"validation R@1: frozen "
          f"{(summary.frozen_metrics or {}).get('recall@1', float('nan')):.4f}, head {(summary.head_metrics or {}).get('recall@1', float('nan')):.4f}, "
          f"finetune {(summary.finetune_metrics or {}).get('recall@1', float('nan')):.4f}; "
          + (f"{out.name} keeps the ensemble (validation R@1 {(summary.best_metrics or {}).get('recall@1', float('nan')):.4f})"
             if summary.best_phase == "ensemble" else f"{out.name} keeps {summary.best_phase} epoch {summary.best_epoch}"))
    print(f"frozen stages of the fine-tuned checkpoint bit-identical to the pretrained backbone: {unchanged}")
    payload = {
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "unfreeze": unfreeze,
        "test": {w: {k: v.to_dict() for k, v in r.items()} for w, r in results.items()},
        "seconds": {**ps, "evaluation_passes": round(t_test, 1), "total": round(time.perf_counter() - t_all, 1)},
        "finetune_images_per_second": ft_rate,
        "train_summary": summary.to_dict(),
        "frozen_stages_unchanged": unchanged,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    log(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
