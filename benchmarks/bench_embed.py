"""Embedding throughput, measured side by side in one run: model-only, decode-only, end-to-end.

    python benchmarks/bench_embed.py --model resnet50 --n 10000 --workdir /tmp/bench
    python benchmarks/bench_embed.py --model resnet18 --big --big-n 16 --device cpu

Prints (and with --json-out writes):

* model-only images/s: the forward pass on device-resident uint8 crops (normalise + forward, same
  dtype / channels_last / torch.compile setting as indexing uses);
* decode-only images/s for each decoder available: ``cpu`` (Pillow in --workers processes:
  read, hash, decode, resize, crop) and ``gpu`` (workers read/hash/route, nvJPEG + GPU resize);
* commit-only images/s: the store committing synthetic vectors to SQLite + FAISS (the consumer);
* end-to-end images/s: the real ``index_folders`` into a fresh index (in a child process, which
  also reports its peak RSS and its worker processes' peak RSS), and the ratio
  end-to-end / min(model-only, decode-only of the decoder it used);
* ``--big``: a folder of 12 MP JPEGs, CPU decode-only and end-to-end with draft (DCT-domain
  downscaling) against full-size decoding, and their ratios.

Images are synthetic photo-like JPEGs (``synth_images``; 500x375, ~100 KB) unless --data is given.
Weights are random (same compute as ImageNet weights, nothing to download).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from synth_images import make_folder  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # KiB on Linux


def list_images(folder: str, n: int) -> list[str]:
    from simsearch.images import iter_image_files

    out = []
    for entry in iter_image_files([folder]):
        out.append(entry.path)
        if len(out) >= n:
            break
    return out


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(args: argparse.Namespace) -> dict[str, Any]:
    """Forward-only throughput on device-resident uint8 batches (rotating among 4 distinct batches)."""
    import torch

    from simsearch.embed import Embedder
    from simsearch.models import create_model

    t0 = time.perf_counter()
    emb = Embedder(create_model(args.model, "random"), device=args.device, batch_size=args.batch_size,
                   workers=0, decode="cpu", compile=args.compile, precision=args.precision)
    setup = time.perf_counter() - t0
    c = emb.prep.crop_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (emb.batch_size, 3, c, c), dtype=torch.uint8, generator=g).to(emb.device) for _ in range(4)]
    with torch.inference_mode():
        for b in batches[:2]:  # warm-up (cuDNN autotune, compile)
            emb.forward_crops(b)
        _sync(emb.device)
        n = 0
        t = time.perf_counter()
        i = 0
        while True:
            emb.forward_crops(batches[i % 4])
            n += emb.batch_size
            i += 1
            if i % 4 == 0 or emb.device.type == "cpu":
                _sync(emb.device)
                el = time.perf_counter() - t
                if el >= args.model_seconds and i >= args.min_batches:
                    break
        rate = n / el
    out = {"images_per_s": round(rate, 1), "batch_size": emb.batch_size, "device": str(emb.device),
           "precision": emb.precision, "compile": args.compile, "setup_s": round(setup, 1), "images": n}
    del emb, batches
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def bench_decode(paths: list[str], args: argparse.Namespace, decoder: str, draft: bool = True) -> dict[str, Any]:
    """Decode-only throughput of the pipeline's input side (workers + GPU decode stage for gpu)."""
    import torch

    from simsearch.embed import Embedder
    from simsearch.models import create_model

    emb = Embedder(create_model("resnet18", "random"), device=args.device if decoder == "gpu" else "cpu",
                   batch_size=args.batch_size or (256 if decoder == "gpu" else 32),
                   workers=args.workers, decode=decoder, draft=draft)
    workers = emb.workers
    t = time.perf_counter()
    source = emb.raw_batches(paths)
    n_ok = n = 0
    if decoder == "gpu":
        dec = emb.make_gpu_decoder()
        stage = emb.prepare_stage(source, dec)
        for prepared in stage:
            prepared.event.synchronize()
            n += len(prepared.items)
            n_ok += int(prepared.x.shape[0])
        extra = {"gpu_decoded": dec.gpu_decoded, "cpu_fallbacks": dec.cpu_fallbacks}
    else:
        for raw in source:
            n += len(raw.items)
            n_ok += len(raw.slots)
        extra = {}
    el = time.perf_counter() - t
    del emb
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"images_per_s": round(n / el, 1), "images": n, "ok": n_ok, "seconds": round(el, 2),
            "workers": workers, "draft": draft, **extra}


def bench_commit(n: int, dim: int, batch: int = 256) -> dict[str, Any]:
    """The consumer alone: synthetic vectors through the store's per-batch SQLite + FAISS commit."""
    import numpy as np

    from simsearch.store import IndexStore

    with tempfile.TemporaryDirectory() as d:
        store = IndexStore.open(d, create=True)
        try:
            store.ensure_identity({"model": "bench", "weights": "random", "dim": dim, "preprocessing": {}}, rebuild=False)
            records = [
                {"path": f"/bench/img{i:07d}.jpg", "size": 100_000, "mtime_ns": 1, "hash": "0" * 32,
                 "width": 500, "height": 375, "status": "ok", "error": None}
                for i in range(n)
            ]
            rng = np.random.default_rng(0)
            t = time.perf_counter()
            for s in range(0, n, batch):
                part = records[s : s + batch]
                v = rng.random((len(part), dim), dtype=np.float32)
                store.commit(part, v, [None] * len(part))
            el = time.perf_counter() - t
        finally:
            store.close()
    return {"images_per_s": round(n / el, 1), "images": n, "dim": dim}


def run_e2e_child(folder: str, args: argparse.Namespace, decode: str, draft: bool = True, device: str | None = None) -> dict[str, Any]:
    """End-to-end in a fresh child process (clean peak-RSS figures)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "e2e.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_e2e", "--folder", folder, "--model", args.model,
               "--device", device or args.device, "--decode", decode, "--json-out", str(out), "--index-dir", str(Path(tmp) / "idx")]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        if args.compile:
            cmd += ["--compile"]
        cmd += ["--precision", args.precision]
        if not draft:
            cmd += ["--no-draft"]
        proc = subprocess.run(cmd, text=True, capture_output=True, timeout=args.e2e_timeout)
        if proc.returncode != 0 or not out.exists():
            return {"error": (proc.stderr or proc.stdout)[-2000:]}
        return json.loads(out.read_text())


def e2e_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--folder", required=True)
    p.add_argument("--index-dir", required=True)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="auto")
    p.add_argument("--decode", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-draft", action="store_true")
    p.add_argument("--precision", default="auto")
    p.add_argument("--json-out", required=True)
    a = p.parse_args(argv)
    from simsearch.indexer import EmbedOptions, index_folders

    opts = EmbedOptions(model=a.model, weights="random", device=a.device, batch_size=a.batch_size, workers=a.workers,
                        decode=a.decode, compile=a.compile, draft=not a.no_draft, precision=a.precision)
    class Clock:
        """Times the batches as the indexer commits them: steady-state rate = after the first batch."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def start(self, total: int) -> None:
            self.marks = [(time.perf_counter(), 0)]

        def advance(self, n: int) -> None:
            self.marks.append((time.perf_counter(), self.marks[-1][1] + n))

        def close(self) -> None:
            pass

    clock = Clock()
    t = time.perf_counter()
    s = index_folders([a.folder], a.index_dir, opts, progress=clock)
    total = time.perf_counter() - t
    steady = None
    if len(clock.marks) >= 3:
        (t1, n1), (t2, n2) = clock.marks[1], clock.marks[-1]
        steady = round((n2 - n1) / (t2 - t1), 1) if t2 > t1 else None
    res = {
        "images": s.embedded, "failed": s.failed, "embed_seconds": round(s.embed_seconds, 2),
        "images_per_s": round(s.embedded / s.embed_seconds, 1) if s.embed_seconds else 0.0,
        "steady_images_per_s": steady,
        "first_batch_s": round(clock.marks[1][0] - clock.marks[0][0], 2) if len(clock.marks) > 1 else None,
        "total_seconds": round(total, 2), "decode": a.decode, "draft": not a.no_draft,
        "peak_rss_mb": round(rss_mb(), 1), "peak_rss_children_mb": round(rss_mb(resource.RUSAGE_CHILDREN), 1),
    }
    Path(a.json_out).write_text(json.dumps(res))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_e2e":
        return e2e_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--n", type=int, default=10000, help="images in the generated folder (or taken from --data)")
    p.add_argument("--data", default=None, help="a folder of JPEGs to use instead of generated ones")
    p.add_argument("--workdir", default=None, help="where generated folders go (kept between runs) [a temp dir]")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--decode", default="auto", help="decoder(s) for end-to-end: auto, cpu, gpu or a list like gpu,cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (model-only and end-to-end alike)")
    p.add_argument("--workers", type=int, default=None, help="decode worker processes [simsearch's default]")
    p.add_argument("--gen-processes", type=int, default=None, help="processes generating images [all cores]")
    p.add_argument("--decode-n", type=int, default=None, help="images for the decode-only figures [--n]")
    p.add_argument("--model-seconds", type=float, default=8.0)
    p.add_argument("--min-batches", type=int, default=3)
    p.add_argument("--e2e-timeout", type=float, default=1800)
    p.add_argument("--skip", default="", help="comma list of steps to skip: model,decode,commit,e2e")
    p.add_argument("--big", action="store_true", help="also: 12 MP JPEGs, CPU end-to-end with draft vs full decode")
    p.add_argument("--big-n", type=int, default=24)
    p.add_argument("--big-batch-size", type=int, default=8, help="batch size for --big (small: the workers share a folder of few files)")
    p.add_argument("--big-only", action="store_true", help="only the --big figures")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import torch

    from simsearch.embed import resolve_decode, resolve_device

    results: dict[str, Any] = {"args": vars(args), "host": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    dev = resolve_device(args.device)
    if dev.type == "cuda":
        results["host"]["gpu"] = torch.cuda.get_device_name(dev)
    log(f"device {dev}" + (f" ({results['host']['gpu']})" if dev.type == "cuda" else "") + f", {os.cpu_count()} CPUs")

    def save() -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2))

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="simsearch-bench-"))
    if not args.big_only:
        if args.data:
            folder = args.data
        else:
            folder = str(workdir / f"imagenet_like_{args.n}")
            t = time.perf_counter()
            make_folder(folder, args.n, (500, 375), processes=args.gen_processes)
            log(f"generated/checked {args.n} JPEGs in {time.perf_counter() - t:.1f}s under {folder}")
        paths = list_images(folder, args.n)
        sizes = [os.path.getsize(p) for p in paths[:2000]]
        results["data"] = {"folder": folder, "images": len(paths), "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1)}
        log(f"data: {results['data']}")
        decode_paths = paths[: args.decode_n] if args.decode_n else paths

        if "model" not in skip:
            results["model_only"] = bench_model(args)
            log(f"model-only: {results['model_only']}")
            save()
        if "decode" not in skip:
            results["decode_only"] = {}
            decoders = ["cpu"] + (["gpu"] if dev.type == "cuda" and resolve_decode("auto", dev) == "gpu" else [])
            for d in decoders:
                results["decode_only"][d] = bench_decode(decode_paths, args, d)
                log(f"decode-only {d}: {results['decode_only'][d]}")
                save()
        if "commit" not in skip:
            from simsearch.models import get_spec

            results["commit_only"] = bench_commit(min(len(paths), 20000), get_spec(args.model).dim)
            log(f"commit-only: {results['commit_only']}")
            save()
        if "e2e" not in skip:
            results["end_to_end"] = {}
            for d in args.decode.split(","):
                used = resolve_decode(d, dev)
                r = run_e2e_child(folder, args, d)
                r["decoder_used"] = used
                model_rate = results.get("model_only", {}).get("images_per_s")
                dec_rate = results.get("decode_only", {}).get(used, {}).get("images_per_s")
                if "images_per_s" in r and model_rate and dec_rate:
                    r["ratio_vs_min_model_decode"] = round(r["images_per_s"] / min(model_rate, dec_rate), 3)
                if "images_per_s" in r and model_rate:
                    r["ratio_vs_model"] = round(r["images_per_s"] / model_rate, 3)
                if r.get("steady_images_per_s") and model_rate and dec_rate:
                    r["steady_ratio_vs_min_model_decode"] = round(r["steady_images_per_s"] / min(model_rate, dec_rate), 3)
                results["end_to_end"][d] = r
                log(f"end-to-end ({d} -> {used}): {r}")
                save()

    if args.big or args.big_only:
        big_folder = str(workdir / f"big_12mp_{args.big_n}")
        t = time.perf_counter()
        make_folder(big_folder, args.big_n, (4000, 3000), processes=args.gen_processes, per_dir=100000)
        log(f"generated/checked {args.big_n} 12 MP JPEGs in {time.perf_counter() - t:.1f}s")
        big_paths = list_images(big_folder, args.big_n)
        big = {"images": len(big_paths), "mean_mb": round(sum(os.path.getsize(p) for p in big_paths) / len(big_paths) / 2**20, 2)}
        big_args = argparse.Namespace(**{**vars(args), "batch_size": args.big_batch_size})
        for draft in (True, False):
            key = "draft" if draft else "full"
            big[f"decode_only_{key}"] = bench_decode(big_paths, big_args, "cpu", draft=draft)
            log(f"big decode-only cpu {key}: {big[f'decode_only_{key}']}")
            big[f"end_to_end_{key}"] = run_e2e_child(big_folder, big_args, "cpu", draft=draft, device="cpu")
            log(f"big end-to-end cpu {key}: {big[f'end_to_end_{key}']}")
        try:
            big["decode_speedup"] = round(big["decode_only_draft"]["images_per_s"] / big["decode_only_full"]["images_per_s"], 2)
            big["end_to_end_speedup"] = round(
                big["end_to_end_draft"]["images_per_s"] / big["end_to_end_full"]["images_per_s"], 2
            )
        except (KeyError, ZeroDivisionError):
            pass
        results["big"] = big
        save()

    results["peak_rss_mb"] = round(rss_mb(), 1)
    save()
    print(summary_table(results))


def summary_table(r: dict[str, Any]) -> str:
    lines = [f"simsearch bench_embed: model {r['args']['model']}, device {r['host'].get('gpu', 'cpu')}, {r['host']['cpus']} CPUs"]
    if "data" in r:
        lines.append(f"  data: {r['data']['images']} JPEGs, {r['data']['mean_kb']} KB mean")
    if "model_only" in r:
        m = r["model_only"]
        lines.append(f"  model-only      {m['images_per_s']:>10.1f} img/s  (batch {m['batch_size']}, {m['precision']}, compile={m['compile']})")
    for d, v in r.get("decode_only", {}).items():
        lines.append(f"  decode-only {d:<4}{v['images_per_s']:>10.1f} img/s  (workers {v['workers']})")
    if "commit_only" in r:
        lines.append(f"  commit-only     {r['commit_only']['images_per_s']:>10.1f} img/s  (SQLite+FAISS writes, dim {r['commit_only']['dim']})")
    for d, v in r.get("end_to_end", {}).items():
        if "error" in v:
            lines.append(f"  end-to-end {d}: ERROR {v['error'][-300:]}")
            continue
        lines.append(
            f"  end-to-end {d:<5}{v['images_per_s']:>10.1f} img/s  (decoder {v['decoder_used']}, "
            f"ratio vs min(model, decode) {v.get('ratio_vs_min_model_decode')}, vs model {v.get('ratio_vs_model')}; "
            f"steady state {v.get('steady_images_per_s')} img/s, ratio {v.get('steady_ratio_vs_min_model_decode')}; "
            f"first batch after {v.get('first_batch_s')} s; "
            f"peak RSS {v['peak_rss_mb']:.0f} MB, workers' peak {v['peak_rss_children_mb']:.0f} MB)"
        )
    if "big" in r:
        b = r["big"]
        lines.append(f"  big: {b['images']} x 12 MP JPEGs, {b['mean_mb']} MB mean")
        for key in ("draft", "full"):
            d, e = b.get(f"decode_only_{key}", {}), b.get(f"end_to_end_{key}", {})
            lines.append(f"    {key:<5} decode-only {d.get('images_per_s', 'ERR'):>8} img/s   end-to-end {e.get('images_per_s', e.get('error', 'ERR')[-200:] if isinstance(e.get('error'), str) else 'ERR'):>8} img/s")
        lines.append(f"    draft speed-up: decode-only x{b.get('decode_speedup')}, end-to-end x{b.get('end_to_end_speedup')}")
    lines.append(f"  bench process peak RSS {r.get('peak_rss_mb', 0):.0f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
