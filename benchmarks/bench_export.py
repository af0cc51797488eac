"""``simsearch export-vectors`` on an index: seconds, peak memory and file size, float32 and float16,
each in a process of its own (as a user runs it), side by side in one run; with ``--import-into``,
also the ``import-vectors`` of the float16 file into a new index (the merge of a shard).

    python benchmarks/bench_export.py INDEX [--out-dir DIR] [--import-into DIR]

Prints one JSON object. The exported files are deleted afterwards (they are as big as the vectors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("index", help="an index folder")
    p.add_argument("--out-dir", default=None, help="where the exported files go for the run [a temporary folder]")
    p.add_argument("--import-into", default=None, help="also import the float16 file into this new index folder")
    args = p.parse_args(argv)

    from bench_duplicates import simsearch  # runs the CLI in a process of its own: (stdout, seconds, peak RSS MiB)
    from bench_index import cpu_name

    from simsearch.store import IndexStore

    with IndexStore.open(args.index) as store:
        n, dim = store.catalog.count_stored(), int(store.catalog.meta_value("dim"))
    made = args.out_dir is None
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="bench-export-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"index": args.index, "images": n, "dim": dim, "cpu": cpu_name(), "cpus": os.cpu_count()}
    files = []
    try:
        for dtype in ("float16", "float32"):
            out = out_dir / f"export-{dtype}.npz"
            files.append(out)
            _, seconds, peak = simsearch(["export-vectors", str(out), "--index", args.index] + (["--float16"] if dtype == "float16" else []))
            report[dtype] = {
                "seconds": round(seconds, 2), "images_per_s": round(n / seconds), "peak_rss_mib": round(peak),
                "file_mib": round(out.stat().st_size / 2**20),
            }
        if args.import_into:
            if Path(args.import_into).exists():
                raise SystemExit(f"{args.import_into} exists: --import-into makes a new index")
            _, seconds, peak = simsearch(["import-vectors", str(files[0]), "--index", args.import_into])
            report["import_float16"] = {"seconds": round(seconds, 2), "images_per_s": round(n / seconds), "peak_rss_mib": round(peak)}
    finally:
        for f in files:
            f.unlink(missing_ok=True)
        if made:
            out_dir.rmdir()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
