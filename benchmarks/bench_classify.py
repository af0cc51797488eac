"""Classification from the index on Caltech-101, and the time to classify large synthetic indexes.

Part 1 (``--data``): index every image of a Caltech-101 folder (``train.txt`` / ``test.txt`` of
relative paths ``class/file.jpg``) into ``--index`` with the offline pretrained efficientnet_lite0
(incremental: a second run reuses the index), import the labels of the training images, classify
the test images by kNN and print their accuracy against the true labels (``BACKGROUND_Google``,
clutter with no class, is indexed as distractors but neither labelled nor scored, as the data
set's README advises; ``--background class`` treats it as a 102nd class), the accuracy of the most
confident 90%, the calibration error on these held-out images (and the leave-one-out one the
classifier reports), and the leave-one-out accuracy for k in 1, 5, 10, 20. Then, with 5% of the
training labels changed to a random wrong class, the precision of the top 5% of ``--suspects`` at
finding them. All of it twice, side by side: with the settings of before (plain cosine, k = 10,
T = 0.07) and with the default now (chosen by leave-one-out on the labels). The clean labels are
imported again at the end. With ``--weights CKPT``, a ``simsearch train`` checkpoint (fitted on the
training labels), the index is built with that model instead (use a new ``--index``), and a third
run classifies the test images with the trained head's class proxies (``--method head``).

Part 2 (``--synthetic``): for each size, an index of that many seeded clustered unit vectors (with
``--synthetic-labelled`` of them labelled) is written to a temporary folder, and the classification of
all the unlabelled ones is timed in a fresh process, with that process's peak memory.

    python benchmarks/bench_classify.py --data DATASET_DIR --index INDEX_DIR
    python benchmarks/bench_classify.py --data DATASET_DIR --index TRAINED_INDEX_DIR --weights model.pt
    python benchmarks/bench_classify.py --synthetic 100000,1000000 --work TMP_DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simsearch.classify import accuracy_at_coverage, classify_index, evaluate_labels, expected_calibration_error, find_suspects  # noqa: E402
from simsearch.labels import import_labels  # noqa: E402
from simsearch.store import IndexStore  # noqa: E402


BACKGROUND = "BACKGROUND_Google"


def read_split(data: Path, name: str) -> list[tuple[str, str]]:
    rows = []
    for line in (data / name).read_text().splitlines():
        if line.strip():
            rel = line.strip()
            rows.append((str((data / rel).resolve()), rel.split("/")[0]))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


SETTINGS = {
    # what classify did before the settings were chosen by leave-one-out: plain cosine, k = 10, T = 0.07
    "before": {"k": 10, "transform": "cosine", "temperature": 0.07},
    # the default now: transform, k and temperature chosen by leave-one-out on the training labels
    "after": {},
}
# with a ``simsearch train`` checkpoint as --weights: the trained head's class proxies as well
HEAD_SETTINGS = {"head": {"method": "head"}}


def run_settings(args: argparse.Namespace, work: Path, truth: dict, flipped: set, n_flip: int, name: str, settings: dict) -> dict:
    """Classify the test images, evaluate, and find the flipped labels, with one set of settings."""
    settings = dict(settings)
    method = settings.pop("method", "knn")
    if args.k is not None and method == "knn":
        settings["k"] = args.k
    with IndexStore.open(args.index) as store:
        store.clear_labels()
    import_labels(work / "train.csv", args.index)
    t0 = time.perf_counter()
    result = classify_index(args.index, method=method, **settings)
    seconds = time.perf_counter() - t0
    preds = {p.path: p for p in result.predictions()}
    paths = [p for p in preds if p in truth]
    correct = np.array([preds[p].best == truth[p] for p in paths])
    conf = np.array([preds[p].confidence for p in paths])
    info = result.calibration
    figures = {
        "test_images": len(paths),
        "method": info.method,
        "transform": info.transform,
        "k": result.k,
        "temperature": info.temperature,
        "selection": info.selection,
        "test_accuracy": round(float(correct.mean()), 4),
        "test_accuracy_at_90_coverage": round(accuracy_at_coverage(conf, correct, 0.9), 4),
        "test_ece": round(expected_calibration_error(conf, correct), 4),
        "loo_accuracy_reported": info.loo_accuracy,
        "loo_ece_reported": info.ece,
        "classify_seconds": round(seconds, 2),
    }
    if method == "head":  # leave-one-out and suspects are the kNN vote's: see the other runs
        print(f"[{name}] classify (trained head's class proxies) of {len(paths)} test images [{seconds:.2f}s]: accuracy "
              f"{figures['test_accuracy']:.4f}, at 90% coverage {figures['test_accuracy_at_90_coverage']:.4f}, ECE on the "
              f"test images {figures['test_ece']:.4f}")
        return figures
    report = evaluate_labels(args.index, **settings)
    figures["loo_accuracy_at_k"] = report.accuracy_at_k
    print(f"[{name}] classify (kNN, {info.transform}, k={result.k}, T={info.temperature}) of {len(paths)} test images "
          f"[{seconds:.2f}s incl. choosing the settings and calibration]:")
    print(f"  accuracy {figures['test_accuracy']:.4f}, at 90% coverage {figures['test_accuracy_at_90_coverage']:.4f}, "
          f"ECE on the test images {figures['test_ece']:.4f} (leave-one-out on train, as reported: accuracy "
          f"{info.loo_accuracy:.4f}, ECE {info.ece:.4f})")
    print("  leave-one-out accuracy on train: " + ", ".join(f"k={j} {a:.4f}" for j, a in report.accuracy_at_k.items()))
    if info.selection:
        print("  chosen from: " + "; ".join(f"{s['transform']} k={s['k']} T={s['temperature']} loo {s['loo_accuracy']:.4f}" for s in info.selection))

    import_labels(work / "noisy.csv", args.index)
    t0 = time.perf_counter()
    suspects = find_suspects(args.index, **settings)
    seconds = time.perf_counter() - t0
    top = suspects[:n_flip]
    precision = sum(s.path in flipped for s in top) / max(len(top), 1)
    recall_all = sum(s.path in flipped for s in suspects) / n_flip
    with IndexStore.open(args.index) as store:
        noisy_info = store.meta["classifier"]
    figures.update(
        suspects=len(suspects), suspects_precision_top5=round(precision, 4), suspects_recall_all=round(recall_all, 4),
        suspects_seconds=round(seconds, 2),
        suspects_settings={key: noisy_info.get(key) for key in ("transform", "k", "temperature")},
    )
    print(f"  suspects with {n_flip} training labels flipped ({figures['suspects_settings']}): {len(suspects)} suspects; "
          f"precision of the top {len(top)} {precision:.4f}; {recall_all:.4f} of the flips among all suspects [{seconds:.2f}s]")
    return figures


def caltech(args: argparse.Namespace) -> dict:
    from simsearch.indexer import EmbedOptions, index_folders

    data = Path(args.data).resolve()
    t0 = time.perf_counter()
    summary = index_folders([data], args.index, EmbedOptions(model=args.model, weights=args.weights))
    print(f"index: {summary.total_indexed} images ({summary.added} added now) [{time.perf_counter() - t0:.1f}s]")
    train, test = read_split(data, "train.txt"), read_split(data, "test.txt")
    if args.background == "distractor":  # the data set's advice: clutter, no class; indexed, never labelled or scored
        train = [(p, c) for p, c in train if c != BACKGROUND]
        test = [(p, c) for p, c in test if c != BACKGROUND]
    truth = dict(test)
    work = Path(tempfile.mkdtemp(prefix="bench_classify_"))
    with IndexStore.open(args.index) as store:
        store.clear_labels()
    imported = import_labels(write_csv(work / "train.csv", train), args.index)
    print(f"labels: {imported.imported} training images, {imported.classes} classes, {len(imported.not_indexed)} not indexed")

    rng = np.random.default_rng(args.seed)
    classes = sorted({c for _, c in train})
    n_flip = int(round(0.05 * len(train)))
    flip = set(rng.choice(len(train), n_flip, replace=False).tolist())
    noisy = []
    for n, (path, label) in enumerate(train):
        if n in flip:
            label = classes[(classes.index(label) + rng.integers(1, len(classes))) % len(classes)]
        noisy.append((path, label))
    write_csv(work / "noisy.csv", noisy)
    flipped = {train[n][0] for n in flip}
    figures: dict = {"test_images": 0, "flipped": n_flip}
    runs = dict(SETTINGS, **(HEAD_SETTINGS if Path(args.weights).is_file() else {}))
    for name, settings in runs.items():
        figures[name] = run_settings(args, work, truth, flipped, n_flip, name, settings)
        figures["test_images"] = figures[name].pop("test_images")
    with IndexStore.open(args.index) as store:
        store.clear_labels()
    import_labels(work / "train.csv", args.index)
    return figures


# -- synthetic ----------------------------------------------------------------------------------
def build_synthetic(path: Path, n: int, dim: int, classes: int, labelled: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    description = {"model": "synthetic", "weights": "none", "dim": dim, "preprocessing": {"resize_size": 1, "crop_size": 1}}
    with IndexStore.open(path, create=True) as store:
        store.ensure_identity(description)
        given: dict[int, str] = {}
        for start in range(0, n, 50_000):
            m = min(50_000, n - start)
            y = rng.integers(0, classes, m)
            x = centres[y] + 1.5 * rng.standard_normal((m, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            ids = store.commit([{"path": f"/s/{start + i}.jpg", "status": "ok"} for i in range(m)], x, [None] * m)
            given.update({i: f"c{c}" for i, c in zip(ids, y) if i <= labelled})
        store.save()
        store.import_labels(given)


CHILD = """
import json, sys, time
from simsearch.classify import classify_index
t0 = time.perf_counter()
r = classify_index(sys.argv[1], **json.loads(sys.argv[2]))
# this process's own high-water mark (ru_maxrss would include the launching benchmark's peak: Linux
# carries it across exec)
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"images": len(r.ids), "seconds": time.perf_counter() - t0, "calibration_fitted_on": r.calibration.fitted_on,
                  "transform": r.calibration.transform, "k": r.k, "temperature": r.calibration.temperature,
                  "peak_rss_mib": peak_kib / 1024}))
"""


def synthetic(args: argparse.Namespace) -> list[dict]:
    out = []
    root = Path(args.work or tempfile.mkdtemp(prefix="bench_classify_synth_"))
    for n in [int(s) for s in args.synthetic.split(",")]:
        path = root / f"synthetic_{n}_{args.synthetic_dim}"
        if not (path / "catalog.db").exists():
            t0 = time.perf_counter()
            build_synthetic(path, n, args.synthetic_dim, args.synthetic_classes, args.synthetic_labelled, args.seed)
            print(f"built a synthetic index of {n} {args.synthetic_dim}-d vectors [{time.perf_counter() - t0:.1f}s]")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        for name, settings in SETTINGS.items():
            settings = dict(settings, **({"k": args.k} if args.k is not None else {}))
            for run in ("first (fits the calibration)", "again (recorded calibration)"):
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), json.dumps(settings)], capture_output=True, text=True, env=env, check=True
                )
                fig = dict(json.loads(done.stdout), n=n, dim=args.synthetic_dim, labelled=args.synthetic_labelled, run=run, settings=name)
                out.append(fig)
                print(f"[{name}] synthetic {n:>9,} vectors ({args.synthetic_dim}-d, {args.synthetic_labelled:,} labelled, {run}): "
                      f"{fig['images']:,} classified in {fig['seconds']:.1f}s, peak RSS {fig['peak_rss_mib']:.0f} MiB"
                      + (f" [{fig['transform']}, k={fig['k']}, T={fig['temperature']}]" if "transform" in fig else ""))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="Caltech-101 folder (class folders, train.txt, test.txt)")
    p.add_argument("--index", help="where the Caltech-101 index is built (and reused)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (frozen backbone), or a simsearch train checkpoint: then the head is measured too")
    p.add_argument("--background", choices=("distractor", "class"), default="distractor",
                   help="BACKGROUND_Google: indexed but neither labelled nor scored (the data set's advice), or a class")
    p.add_argument("--k", type=int, default=None, help="fix k in both runs [default: 10 before, chosen after]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", default="", help="comma-separated sizes, e.g. 100000,1000000")
    p.add_argument("--synthetic-dim", type=int, default=256)
    p.add_argument("--synthetic-classes", type=int, default=100)
    p.add_argument("--synthetic-labelled", type=int, default=2_000)
    p.add_argument("--work", help="folder for the synthetic indexes (kept, reused) [default: a new temporary one]")
    p.add_argument("--json-out")
    args = p.parse_args()
    figures: dict = {}
    if args.data:
        if not args.index:
            p.error("--data needs --index")
        figures["caltech101"] = caltech(args)
    if args.synthetic:
        figures["synthetic"] = synthetic(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
