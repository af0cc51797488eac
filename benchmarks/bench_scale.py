"""Scale: approximate layouts at 100k-1M+ vectors, and what each command costs on an index that size.

    python benchmarks/bench_scale.py --n 100000 --dim 512 --layouts flat,hnsw,ivf,ivfpq \
        --images /path/to/caltech101 --kmeans 1000

Builds one index of ``n`` synthetic vectors through the public import API
(:meth:`simsearch.store.IndexStore.import_vectors`): not uniform noise (the worst case for any ANN)
but Gaussian clusters of very different (Pareto) sizes whose spread follows the measured spectrum
of real embeddings (``--spectrum real``, the default; ``--spectrum flat`` is isotropic noise, the
hard case where neighbours within a cluster are nearly equidistant); their model identity
is a random-weight ResNet-18's (512-d), so real images can be added and queried with that model.
Then, per layout (the index copied, its layout rebuilt from the stored vectors by
:func:`simsearch.store.layouts.maintain_layout`), it prints side by side:

- build: seconds to build and tune the layout (after the import), and disk per image;
- recall@10 of the tuned layout against exact search, on queries near (not at) stored vectors;
- warm search: p50 / p99 of one query, and queries/s for a batch of 1000;
- cold ``simsearch query`` subprocesses: an indexed, unchanged image (stored vector, no model) and a
  new image (model built), each with wall time and peak RSS;
- an incremental ``simsearch index`` run adding 2 files (no ``--model``: the index keeps its own),
  wall time and peak RSS; ``simsearch info`` wall time;
- once per run, ``simsearch cluster -k K`` (``--kmeans K``) wall time.

Images for the incremental run and the queries come from ``--images`` (any folder of photos, e.g.
Caltech-101); without it three are drawn. Everything runs on the CPU. ``--reuse`` keeps a
``--workdir``'s imported vectors and built layouts, to measure the commands again after a change.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simsearch.store import IndexStore
from simsearch.store.exact import exact_search_chunks
from simsearch.store.layouts import (
    AnnRequest,
    LayoutSearch,
    maintain_layout,
    open_layout_search,
    recall_at,
)

# Within-cluster spread of real embeddings: the variance of EfficientNet-Lite0 embeddings of
# Caltech-101 around their class means falls off as a power law, lambda_i ~ i^-0.69 (fitted over the
# top 300 principal components of the 9,144 photos' residuals). ``flat`` (isotropic noise, every
# direction equal) is the hard case: neighbours within a cluster are then nearly equidistant.
REAL_SPECTRUM_SLOPE = 0.69
NOISE_POWER = 0.64  # total within-cluster variance per dim (0.8^2), as a share of a centre's
N_BASES = 32  # clusters spread along one of this many random orientations


def clustered(n: int, dim: int, seed: int, clusters: int = 2000, chunk: int = 100_000, spectrum: str = "real"):
    """Chunks of unit vectors in Gaussian clusters of Pareto-distributed sizes.

    ``spectrum``: ``real`` gives each cluster's noise the measured power-law spectrum of real
    embeddings (in one of :data:`N_BASES` random orientations); ``flat`` gives isotropic noise.
    Both have the same total noise power, so only the shape of the spread differs.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    weights = rng.pareto(1.1, clusters) + 0.05
    p = weights / weights.sum()
    if spectrum == "real":
        lam = np.arange(1, dim + 1, dtype=np.float64) ** -REAL_SPECTRUM_SLOPE
        scale = np.sqrt(lam * NOISE_POWER * dim / lam.sum()).astype(np.float32)
        bases = [np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32) for _ in range(N_BASES)]
    elif spectrum != "flat":
        raise ValueError(f"spectrum {spectrum!r}: use real or flat")
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = rng.choice(clusters, size=m, p=p)
        if spectrum == "flat":
            noise = np.sqrt(NOISE_POWER, dtype=np.float32) * rng.standard_normal((m, dim)).astype(np.float32)
        else:
            z = rng.standard_normal((m, dim)).astype(np.float32) * scale
            noise = np.empty_like(z)
            for b, basis in enumerate(bases):
                rows = which % N_BASES == b
                noise[rows] = z[rows] @ basis.T
        x = centers[which] + noise
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


# A small launcher runs each command and reports its child's peak RSS: measured from the benchmark
# process itself, the child's ru_maxrss would include the pages it shared with this (large) process
# before exec.
_LAUNCHER = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t0
if proc.returncode:
    sys.exit(proc.stderr[-2000:])
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(wall, use.ru_maxrss / 1024, use.ru_utime + use.ru_stime, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "-")
"""

REPO = Path(__file__).resolve().parents[1]

# The model build of a cold query of a new image, timed alone in a fresh process: every module
# imported first (torch and simsearch's own: their cost belongs to the query, not to the build),
# then what the query does to get its model: create_model, the identity check, the Embedder.
_MODEL_BUILD = """
import sys, time
import torch
from simsearch.search import load_index_model
from simsearch.store import IndexStore
import simsearch.embed.embedder, simsearch.models
with IndexStore.open(sys.argv[1], map_faiss=True) as store:
    t0 = time.perf_counter()
    load_index_model(store, device="cpu")
    print(time.perf_counter() - t0)
"""


def _launch(argv: list[str], src: Path) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one command in a fresh interpreter,
    with ``src`` (a checkout of simsearch) first on the path; ``out``: its last line of output."""
    env = dict(os.environ, PYTHONPATH=str(src))
    # -P: the working directory does not go first on the path (it would win over PYTHONPATH)
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-P", *argv], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr}")
    wall, rss, cpu, out = proc.stdout.split(maxsplit=3)
    return {"seconds": round(float(wall), 2), "cpu_seconds": round(float(cpu), 2), "peak_rss_mb": round(float(rss)), "out": out.strip()}


def cli_measure(args: list[str], src: Path = REPO) -> dict:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one ``simsearch`` command in a fresh interpreter."""
    m = _launch(["-m", "simsearch", *args], src)
    m.pop("out")
    return m


def _median(runs: list[dict]) -> dict:
    """Per key, the median over repeated measurements (and the range of the wall time)."""
    out = {k: round(float(np.median([r[k] for r in runs])), 3) for k in runs[0]}
    if len(runs) > 1:
        out["seconds_range"] = [min(r["seconds"] for r in runs), max(r["seconds"] for r in runs)]
    return out


def new_image_query_parts(idx: Path, image: Path, src: Path) -> dict:
    """A cold query of a new image beside what the goal allows it: ``import torch`` alone in a fresh
    process (interpreter start included, as in the query) and the model build alone
    (:data:`_MODEL_BUILD`); ``beyond`` is the query's wall time less both."""
    query = cli_measure(["query", str(image), "-k", "5", "--device", "cpu", "--index", str(idx)], src)
    torch_import = _launch(["-c", "import torch"], src)
    build = float(_launch(["-c", _MODEL_BUILD, str(idx)], src)["out"])
    return {
        "seconds": query["seconds"],
        "cpu_seconds": query["cpu_seconds"],
        "peak_rss_mb": query["peak_rss_mb"],
        "torch_import_seconds": torch_import["seconds"],
        "model_build_seconds": round(build, 3),
        "beyond": round(query["seconds"] - torch_import["seconds"] - build, 3),
    }


def recall_and_latency(search, q: np.ndarray, truth: np.ndarray) -> dict:
    """recall@10 of ``search`` on the queries against the exact top-10, and its warm one-query p50 / p99."""
    _, found = search.search(q, 10)
    lat = []
    for v in q:
        t = time.perf_counter()
        search.search(v[None], 10)
        lat.append(time.perf_counter() - t)
    return {
        "recall_at_10": round(recall_at(found, truth), 4),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2),
    }


def pick_images(folder: str | None, tmp: Path) -> list[Path]:
    out = tmp / "images"
    out.mkdir(exist_ok=True)
    if folder:
        found = sorted(p for p in Path(folder).rglob("*.jpg"))[:3]
        for i, p in enumerate(found):
            shutil.copy(p, out / f"img{i}.jpg")
    else:
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(out / f"img{i}.jpg")
    return sorted(out.glob("*.jpg"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layouts", default="flat,hnsw,ivf,ivfpq", help="comma list: auto, flat, hnsw, ivf, ivfpq or factory strings")
    p.add_argument("--images", default=None, help="a folder of photos for the incremental run and the queries")
    p.add_argument("--kmeans", type=int, default=1000, help="k of the k-means timing (0: skip)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--workdir", default=None, help="where the indexes go (default: a temporary folder)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--spectrum", choices=("real", "flat"), default="real",
                   help="within-cluster spread: real (measured power law) or flat (isotropic, the hard case)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the workdir's imported vectors and built layouts (re-measure the commands only)")
    p.add_argument("--baseline-src", default=None,
                   help="another checkout of simsearch: its cold query and info commands run too, alternating with this one's")
    p.add_argument("--settings", default=None,
                   help='JSON list of search settings also measured on the new queries, e.g. \'[{"nprobe": 24, "rerank": 12}]\'')
    p.add_argument("--repeat", type=int, default=1, help="runs of each cold query and info command (medians reported)")
    a = p.parse_args()
    if a.dim != 512:
        print("note: real-image steps use a 512-d ResNet-18; other dims skip them", file=sys.stderr)

    from simsearch.vector_import import model_identity

    tmp = Path(a.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    tmp.mkdir(parents=True, exist_ok=True)
    images = pick_images(a.images, tmp)
    identity = model_identity("resnet18", "random", 0) if a.dim == 512 else {
        "model": "synthetic", "weights": "synthetic", "dim": a.dim, "preprocessing": {}
    }
    res: dict = {"n": a.n, "dim": a.dim, "spectrum": a.spectrum, "cpus": os.cpu_count(), "layouts": {}}
    sources = [("", REPO)] + ([("baseline_", Path(a.baseline_src).resolve())] if a.baseline_src else [])

    base = tmp / "base"
    if a.reuse and (base / "catalog.db").exists():
        res["import_seconds"] = None
    else:
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        with IndexStore.open(base, create=True) as store:
            store.lock_for_writing()
            start = 0
            for x in clustered(a.n, a.dim, seed=0, spectrum=a.spectrum):
                recs = [{"path": f"/synthetic/{i // 1000:05d}/{i:08d}.jpg", "size": 1000, "mtime_ns": i} for i in range(start, start + len(x))]
                store.import_vectors(recs, x, identity)
                start += len(x)
            store.save()
        res["import_seconds"] = round(time.perf_counter() - t0, 1)
    with IndexStore.open(base) as store:  # queries near (not at) stored vectors spread over the index
        _, q = store.vectors_of(np.linspace(1, a.n, a.queries).astype(np.int64))
        q = q + 0.3 * np.random.default_rng(1).standard_normal(q.shape).astype(np.float32) / np.sqrt(a.dim)
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        truth = exact_search_chunks(store.iter_vectors(chunk=65536), q, 10)[1]
    print(f"imported {a.n} x {a.dim} in {res['import_seconds']} s", flush=True)

    for layout in a.layouts.split(","):
        idx = tmp / f"idx-{layout.replace(',', '_')}"
        reused = a.reuse and (idx / "catalog.db").exists()
        if not reused:
            shutil.rmtree(idx, ignore_errors=True)
            shutil.copytree(base, idx)
        row: dict = {}
        with IndexStore.open(idx) as store:
            store.lock_for_writing()
            t0 = time.perf_counter()
            info = store.meta.get("ann_layout") if reused else maintain_layout(store, AnnRequest(layout), force=True)
            row["build_seconds"] = None if reused else round(time.perf_counter() - t0, 1)
            row["factory"], row["params"], row["tuned_recall"] = info["factory"], info["params"], info["recall_at_10"]
            search = open_layout_search(store)
            row.update(recall_and_latency(search, q, truth))
            if a.settings:  # other search settings of the same layout, on the same new queries
                row["settings"] = [
                    dict(params=params, **recall_and_latency(LayoutSearch(store.require_vectors(), store, params), q, truth))
                    for params in json.loads(a.settings)
                ]
            batch = np.repeat(q, max(1, 1000 // len(q)), axis=0)[:1000]
            t = time.perf_counter()
            search.search(batch, 10)
            row["batch_qps"] = round(len(batch) / (time.perf_counter() - t))
            row["disk_bytes_per_image"] = round(store.size_on_disk() / a.n)
            row["ann_file_bytes_per_image"] = round(store.ann_path.stat().st_size / a.n)
        if a.dim == 512:
            new_dir = tmp / f"new-{layout}-{time.strftime('%Y%m%d%H%M%S')}"  # files this index has not seen
            new_dir.mkdir()
            for img in images[:2]:
                shutil.copy(img, new_dir / img.name)
            common = ["--index", str(idx)]
            row["incremental_2_files"] = cli_measure(["index", str(new_dir), *common, "--workers", "0", "--device", "cpu", "-q"])
            runs: dict = {name: {"query_indexed": [], "query_new": [], "info": []} for name, _ in sources}
            for _ in range(a.repeat):  # the sources alternate, so that both see the same load
                for name, src in sources:
                    runs[name]["query_indexed"].append(cli_measure(["query", str(new_dir / images[0].name), "-k", "5", *common], src))
                    runs[name]["query_new"].append(new_image_query_parts(idx, images[2], src))
                    runs[name]["info"].append(cli_measure(["info", "--index", str(idx)], src))
            for name, measured in runs.items():
                row.update({name + key: _median(values) for key, values in measured.items()})
        else:
            for name, src in sources:
                row[f"{name}info"] = _median([cli_measure(["info", "--index", str(idx)], src) for _ in range(a.repeat)])
        res["layouts"][layout] = row
        print(json.dumps({layout: row}), flush=True)
        if layout != a.layouts.split(",")[-1] and not a.reuse:
            shutil.rmtree(idx, ignore_errors=True)
    if a.kmeans:
        res["kmeans"] = cli_measure(["cluster", "-k", str(a.kmeans), "-r", "0", "--device", "cpu", "--index", str(base)])
        print(json.dumps({"kmeans": res["kmeans"]}), flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
