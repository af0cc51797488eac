"""Where a cold ``simsearch query`` of a new image spends its time, inside the one process.

``bench_scale.py`` measures the goal from outside: the query's wall time less ``python -c "import
torch"`` and the model's build, each timed in processes of their own. Those three spread by more
than the remainder between runs (torch's import alone varies by ~0.5 s here). This runs the CLI's
own ``query`` command in this process with a timestamp at each step, so the remainder is read
directly: everything the query does outside the thread that imports torch and builds the model.

    python benchmarks/trace_cold_query.py IMAGE --index INDEX [--runs 5]

Each run is a fresh interpreter (this script re-executes itself), as a shell user's query is.
Prints each run's steps, then the median time outside the model thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

START = time.perf_counter()


def _traced_run(image: str, index: str) -> None:
    """One cold query through the CLI, timestamps on stderr as one JSON line."""
    marks: list[tuple[float, str, str]] = []

    def mark(what: str) -> None:
        marks.append((time.perf_counter() - START, threading.current_thread().name, what))

    def wrap(owner: object, name: str) -> None:
        fn = getattr(owner, name)

        def traced(*a: object, **k: object) -> object:
            mark(f"> {name}")
            try:
                return fn(*a, **k)
            finally:
                mark(f"< {name}")

        setattr(owner, name, traced)

    import simsearch.cli as cli
    import simsearch.search as search

    mark("cli imported")
    wrap(search, "build_index_model")  # on the model thread: torch's import and the model's build
    wrap(search.Searcher, "_search_vectors")
    sys.argv = ["simsearch", "query", image, "-k", "5", "--device", "cpu", "--index", index]
    stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")
    try:
        cli.main()
    except SystemExit:
        pass
    finally:
        sys.stdout = stdout
    mark("done")
    print(json.dumps(marks), file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image")
    p.add_argument("--index", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _traced_run(a.image, a.index)
        return
    outside = []
    for run in range(a.runs):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, a.image, "--index", a.index, "--child"],
                              capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        marks = json.loads(proc.stderr.strip().splitlines()[-1])
        at = {what: t for t, _, what in marks}
        build = at["< build_index_model"] - at["> build_index_model"]
        rest = at["done"] - build
        outside.append(rest)
        print(f"run {run + 1}: wall {wall:.2f} s (interpreter start to exit); in the process: "
              f"CLI imported {at['cli imported']:.2f} s, model thread from {at['> build_index_model']:.2f} to "
              f"{at['< build_index_model']:.2f} s (torch import + build {build:.2f} s), search "
              f"{at['< _search_vectors'] - at['> _search_vectors']:.3f} s, done {at['done']:.2f} s; "
              f"outside the model thread {rest:.2f} s")
    print(f"median time outside torch's import and the model's build: {statistics.median(outside):.2f} s "
          f"(range {min(outside):.2f}-{max(outside):.2f}; the interpreter's own start-up, before this script runs, not included)")


if __name__ == "__main__":
    main()
