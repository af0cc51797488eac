"""k-means and exact search timings: simsearch.cluster.kmeans on the GPU (torch) vs FAISS on the CPU.

    python benchmarks/bench_kmeans.py --n 1000000 --d 512 --k 1000 --json-out kmeans.json

Data: ``k_true`` Gaussian blobs on the unit sphere (normalised, like the embeddings), made on the
device. Prints the wall time of ``cluster.kmeans`` (numpy in, numpy out: host<->device copies
included) and of the bare torch loop on device-resident data, the exact top-k search time for a
batch of queries, and FAISS-CPU k-means on a subset for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def blobs(n: int, d: int, k_true: int, seed: int, device: str):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(k_true, d, generator=g, device=device), dim=1)
    labels = torch.randint(0, k_true, (n,), generator=g, device=device)
    x = centers[labels] + 0.5 / d**0.5 * torch.randn(n, d, generator=g, device=device)
    return torch.nn.functional.normalize(x, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", default="1000,100", help="comma list of k")
    p.add_argument("--niter", type=int, default=25)
    p.add_argument("--device", default="cuda")
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--faiss-n", type=int, default=100_000, help="rows for the FAISS-CPU comparison (0: skip)")
    p.add_argument("--json-out", default=None)
    a = p.parse_args()

    import numpy as np
    import torch

    from simsearch.cluster import kmeans
    from simsearch.embed.gpu_ops import exact_search, spherical_kmeans

    res: dict = {"args": vars(a)}
    if a.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name(0)

    def save() -> None:
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(res, indent=2))

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        x = blobs(a.n, a.d, 2000, 0, a.device)
        sync()
        host = x.cpu().numpy()
        print(f"data: {a.n} x {a.d} float32 ({host.nbytes / 2**30:.2f} GiB)", flush=True)
        spherical_kmeans(x[:10000], 10, niter=2)  # warm-up (cuBLAS handles)
        sync()
        for k in [int(v) for v in a.k.split(",")]:
            t = time.perf_counter()
            _, _, obj = spherical_kmeans(x, k, niter=a.niter, seed=1)
            sync()
            loop = time.perf_counter() - t
            t = time.perf_counter()
            c, assign, dist, obj2 = kmeans(host, k, niter=a.niter, seed=1, device="cuda" if a.device.startswith("cuda") else "cpu")
            full = time.perf_counter() - t
            r = {"k": k, "niter": a.niter, "torch_loop_s": round(loop, 3), "cluster_kmeans_s": round(full, 3),
                 "objective": round(obj2, 2), "clusters_used": int(len(np.unique(assign)))}
            res[f"kmeans_k{k}"] = r
            print(f"kmeans n={a.n} d={a.d} k={k} niter={a.niter}: torch loop {loop:.2f}s, cluster.kmeans (numpy in/out) {full:.2f}s", flush=True)
            save()
        q = x[: a.queries].clone()  # the first vectors, so each query's nearest neighbour is itself
        nq = len(q)  # fewer than --queries when --n is smaller
        exact_search(q[:100], x, a.topk)
        sync()
        t = time.perf_counter()
        s, i = exact_search(q, x, a.topk)
        sync()
        el = time.perf_counter() - t
        self_hit = float((i[:, 0] == torch.arange(nq, device=i.device)).float().mean())
        res["exact_search"] = {"queries": nq, "database": a.n, "k": a.topk, "seconds": round(el, 3),
                               "queries_per_s": round(nq / el, 1), "self_hit_rate": self_hit}
        print(f"exact search: {nq} queries x {a.n} vectors, top-{a.topk}: {el:.3f}s (self-hit {self_hit:.3f})", flush=True)
        save()
        del x

    if a.faiss_n:
        sub = np.ascontiguousarray(host[: a.faiss_n])
        runs = [("faiss-cpu", "cpu", "faiss_cpu_kmeans_k{k}")]
        if a.device.startswith("cuda"):
            runs.append(("torch-cuda", "cuda", "torch_cuda_kmeans_k{k}_same_n"))
        for k in [int(v) for v in a.k.split(",")]:
            for label, device, key in runs:
                t = time.perf_counter()
                kmeans(sub, k, niter=a.niter, seed=1, device=device)
                el = time.perf_counter() - t
                res[key.format(k=k)] = {"n": a.faiss_n, "seconds": round(el, 2)}
                print(f"{label} kmeans n={a.faiss_n} k={k}: {el:.2f}s", flush=True)
                save()


if __name__ == "__main__":
    main()
