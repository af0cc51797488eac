"""Near-duplicates on a real collection with planted copies, and on synthetic vectors at scale.

Part 1 (``DATA``, a folder of photos such as Caltech-101): a seeded sample of ``--originals``
photos gets one copy per kind of edit in :data:`simsearch.calibrate.EDITS` (JPEG q=20-40, half
size, crops removing 5-20 % and keeping 50-80 %, 10 degree rotation, mirror, grayscale, colour,
text overlay, border, two and three mild edits combined, and six at once), mixed with
``--others`` other photos of the same collection. The collection is indexed with
``--model`` (default: the offline pretrained efficientnet_lite0); then ``simsearch duplicates``
runs with a fresh calibration, with verification off (global embedding only) and on. For each
run it prints per kind of edit the recall of the planted pairs (a copy counts as found when it
lands in its original's group; originals are the oldest files and ``--keep oldest`` makes them
keepers), the precision of all reported (keeper, member) pairs (correct when both come from the
same original), the threshold, and the time and peak RSS of the command.

Part 2 (``--synthetic N``, repeatable): an index of N random 512-d vectors, 1 % of them a planted
near copy (cosine about 0.97) of another, and the time and peak RSS of ``simsearch duplicates
--threshold 0.9`` and the planted pairs it found.

    python benchmarks/bench_duplicates.py DATA --workdir /tmp/dupbench --originals 500 --others 1000 --synthetic 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from simsearch.calibrate import EDITS
from simsearch.images import is_image_name

OLD = 1_500_000_000  # originals' mtime (2017): older than every copy


# runs the CLI and reports its own peak RSS on exit: VmHWM, the high-water mark of this process's own
# memory (ru_maxrss would not do: Linux carries the launching process's peak into it across exec, so
# a child of a large benchmark process reported the benchmark's peak)
RUNNER = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('PEAK_RSS_KB', next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')), file=sys.stderr))\n"
    "sys.argv = ['simsearch'] + sys.argv[1:]\n"
    "from simsearch.cli import main\n"
    "main()\n"
)


def simsearch(args: list[str]) -> tuple[str, float, float]:
    """Run ``simsearch ARGS`` in its own process: (stdout, seconds, peak RSS in MiB)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"simsearch {' '.join(args)} failed:\n{proc.stderr}")
    peak = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    return proc.stdout, seconds, int(peak[-1]) / 1024


def build_collection(data: Path, work: Path, originals: int, others: int, seed: int) -> Path:
    files = sorted(p for p in data.rglob("*") if p.is_file() and is_image_name(p.name))
    rnd = random.Random(seed)
    picked = rnd.sample(files, originals + others)
    root = work / "collection"
    if root.exists():
        shutil.rmtree(root)
    for n, src in enumerate(picked):
        stem = f"{src.parent.name}_{src.stem}"
        if n < originals:
            dst = root / "orig" / f"{stem}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            os.utime(dst, (OLD, OLD))
            img = Image.open(src).convert("RGB")
            for name, edit in EDITS.items():
                out = root / "copies" / name / f"{stem}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                edit(img, random.Random(f"{seed}-{stem}-{name}")).save(out, quality=95)
        else:
            dst = root / "other" / f"{stem}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            os.utime(dst, (OLD, OLD))
    return root


def family(path: str) -> str:
    """The photo a file shows. Caltech-101's ``Faces_easy`` pictures are crops of the ``Faces``
    pictures of the same number, so ``Faces_easy_image_0130`` and ``Faces_image_0130`` are one photo."""
    return Path(path).stem.replace("Faces_easy_image_", "Faces_image_")


def score(data: dict, root: Path) -> tuple[dict[str, float], float, int]:
    """(recall per edit, precision of reported pairs, reported pairs)."""
    group_of: dict[str, int] = {}
    pairs = correct = 0
    for n, g in enumerate(data["groups"]):
        for m in g["members"]:
            group_of[m["path"]] = n
            if not m["keeper"]:
                pairs += 1
                correct += family(m["path"]) == family(g["keeper"])
    recall = {}
    for edit in EDITS:
        copies = sorted((root / "copies" / edit).glob("*.jpg"))
        found = sum(
            str(c) in group_of and group_of.get(str(root / "orig" / c.name)) == group_of[str(c)] for c in copies
        )
        recall[edit] = found / max(len(copies), 1)
    return recall, correct / max(pairs, 1), pairs


def part1(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    root, index = work / "collection", work / "index"
    if not (args.reuse and index.exists()):
        root = build_collection(Path(args.data), work, args.originals, args.others, args.seed)
        if index.exists():
            shutil.rmtree(index)
        _, t_index, _ = simsearch(["index", str(root), "--index", str(index), "--model", args.model, "-q"])
        print(f"indexed with {args.model} in {t_index:.0f} s")
    root = root.resolve()  # the index holds real paths
    n_images = sum(1 for p in root.rglob("*.jpg"))
    print(f"collection: {args.originals} originals x {len(EDITS)} edits + {args.others} other photos = {n_images} images")
    cal_out, t_cal, rss_cal = simsearch(
        ["duplicates", "--index", str(index), "--calibrate", "--calibration-sample", str(args.calibration_sample), "--keep", "oldest", "--verify", "off", "--json", "-q"]
    )
    cal = json.loads(cal_out)["calibration"]
    print(f"calibration (sample {cal['sample']}, {cal['copies']} copies, {cal['negatives']} non-copies) and a first run: {t_cal:.1f} s, peak RSS {rss_cal:.0f} MiB")
    print(f"threshold {cal['threshold']:.4f} (precision target {cal['precision_target']}); verification from {cal.get('candidate_threshold')}, "
          f"calibration says default={cal.get('verify_default')}")
    rows = {}
    for mode in ("off", "on"):
        out, seconds, rss = simsearch(["duplicates", "--index", str(index), "--keep", "oldest", "--verify", mode, "--json", "-q"])
        data = json.loads(out)
        recall, precision, pairs = score(data, root)
        rows[mode] = (recall, precision, pairs, seconds, rss, data.get("pairs_verified", 0))
    print()
    print(f"{'edit':<12} {'global':>8} {'verified':>9}   (recall of planted pairs; calibration's estimate: global / verified)")
    for edit in EDITS:
        est = cal["recall"].get(edit, {}).get("recall")
        est_v = (cal.get("verified_recall") or {}).get(edit)
        extra = f"   est. {est:.2f} / {est_v:.2f}" if est is not None and est_v is not None else ""
        print(f"{edit:<12} {rows['off'][0][edit]:8.3f} {rows['on'][0][edit]:9.3f}{extra}")
    singles = [e for e in EDITS if not e.startswith("combo") and e != "six"]
    for mode, label in (("off", "global only"), ("on", "with verification")):
        recall, precision, pairs, seconds, rss, checked = rows[mode]
        print(
            f"{label:>18}: single-edit recall {np.mean([recall[e] for e in singles]):.3f}, combined (2-3) "
            f"{np.mean([recall['combo2'], recall['combo3']]):.3f}, six {recall['six']:.3f}; precision {precision:.4f} "
            f"of {pairs} pairs; {seconds:.1f} s, peak RSS {rss:.0f} MiB" + (f", {checked} pairs verified" if mode == "on" else "")
        )


def part2(n: int, work: Path, seed: int, dim: int = 512) -> None:
    from simsearch.store import IndexStore

    index = work / f"synthetic-{n}"
    if index.exists():
        shutil.rmtree(index)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    planted: list[tuple[int, int]] = []  # (copy row, original row), rows numbered from 0 in insertion order
    with IndexStore.open(index, create=True) as store:
        store.ensure_identity({"model": "synthetic", "weights": "random", "dim": dim, "preprocessing": {"resize_size": 0, "crop_size": 0}})
        base = None
        for s in range(0, n, 50_000):
            m = min(50_000, n - s)
            x = rng.standard_normal((m, dim), dtype=np.float32)
            if base is not None:  # 1 % of the rows: a noisy copy (cosine about 0.97) of a row of the previous chunk
                rows = np.flatnonzero(rng.random(m) < 0.01)
                x[rows] = base[: len(rows)] + 0.011 * rng.standard_normal((len(rows), dim), dtype=np.float32)
                planted += [(s + int(r), s - len(base) + k) for k, r in enumerate(rows)]
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            records = [{"path": f"/synthetic/{s + i}.jpg", "size": 1, "mtime_ns": 1, "hash": f"h{s + i}", "width": 1, "height": 1, "status": "ok"} for i in range(m)]
            store.commit(records, x, [None] * m)
            base = x
        store.save()
    print(f"synthetic {n:,} x {dim}: built in {time.perf_counter() - start:.0f} s", flush=True)
    out, seconds, rss = simsearch(["duplicates", "--index", str(index), "--threshold", "0.9", "--verify", "off", "--json", "-q"])
    data = json.loads(out)
    group_of = {m["path"]: g for g, group in enumerate(data["groups"]) for m in group["members"]}
    found = sum(
        f"/synthetic/{c}.jpg" in group_of and group_of[f"/synthetic/{c}.jpg"] == group_of.get(f"/synthetic/{o}.jpg")
        for c, o in planted
    )
    print(
        f"synthetic {n:,} x {dim}: simsearch duplicates --threshold 0.9 {seconds:.1f} s, peak RSS {rss:.0f} MiB; "
        f"{found}/{len(planted)} planted pairs found, {data['duplicates']} duplicates reported"
    )
    shutil.rmtree(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", help="folder of photos (e.g. Caltech-101); omit for the synthetic part only")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--originals", type=int, default=500)
    parser.add_argument("--others", type=int, default=1000)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--calibration-sample", type=int, default=100)
    parser.add_argument("--reuse", action="store_true", help="keep the collection and index of a previous run in --workdir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", type=int, action="append", default=[])
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.data:
        part1(args)
    for n in args.synthetic:
        part2(n, Path(args.workdir), args.seed)


if __name__ == "__main__":
    main()
