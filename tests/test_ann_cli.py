"""Cheap queries from the shell (stored vectors, no torch), an index keeping its model, --exact,
import-vectors and the layout shown by info, through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FAST_ARGS, make_collection, run_index
from simsearch.cli import cli
from simsearch.store import IndexStore


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"SIMSEARCH_INDEX": None}, catch_exceptions=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("anncli")
    paths = make_collection(base / "photos", n=10)
    run_index(base / "photos", base / "idx")
    return base, paths


def run_cli(args: list[str]) -> tuple[dict, bool]:
    """Run the CLI in a fresh interpreter: (its JSON output, whether torch got imported). A run that
    imported torch ends inside ``main`` (no interpreter teardown), so only the others print the marker."""
    code = (
        "import sys, json\n"
        "from simsearch.cli import main\n"
        f"sys.argv = ['simsearch'] + {[str(a) for a in args]!r}\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), "NOTORCH" not in proc.stderr


def test_query_of_an_indexed_unchanged_image_needs_no_model(site):
    base, paths = site
    stored, torch_loaded = run_cli(["query", paths[0], "-k", "3", "--json", "--index", base / "idx"])
    assert not torch_loaded
    by_id, torch_loaded = run_cli(["query", "--id", "1", "--path", paths[0], "-k", "3", "--json", "--index", base / "idx"])
    assert not torch_loaded
    assert stored[0]["results"] == by_id[0]["results"] == by_id[1]["results"]
    assert str(paths[0]) not in [r["path"] for r in stored[0]["results"]]  # self left out
    # the same query through the model (the file looks changed): same neighbours, torch loaded
    st = os.stat(paths[0])
    try:
        os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        embedded, torch_loaded = run_cli(["query", paths[0], "-k", "3", "--json", "--index", base / "idx", "--device", "cpu"])
    finally:
        os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert torch_loaded
    assert [r["path"] for r in embedded[0]["results"]] == [r["path"] for r in stored[0]["results"]]
    np.testing.assert_allclose(
        [r["score"] for r in embedded[0]["results"]], [r["score"] for r in stored[0]["results"]], atol=1e-4
    )


def test_query_by_unknown_id_or_path_is_an_error(site):
    base, _ = site
    for args in (["--id", "999"], ["--path", "/nowhere.jpg"]):
        result = invoke("query", *args, "--index", base / "idx")
        assert result.exit_code == 1 and "Error:" in result.stderr
    assert invoke("query", "--index", base / "idx").exit_code == 2


def test_exact_query_and_info_layout(site, tmp_path):
    base, paths = site
    idx = tmp_path / "idx"
    import shutil

    shutil.copytree(base / "idx", idx)
    result = invoke("index", base / "photos", "--index", idx, "--ann", "hnsw", "--workers", "0", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    assert "layout: hnsw" in result.stderr
    info = json.loads(invoke("info", "--json", "--index", idx).stdout)
    assert info["ann_layout"]["layout"] == "hnsw" and info["ann_layout"]["recall_at_10"] >= 0.95
    assert "efSearch" in info["ann_layout"]["params"]
    assert "layout: hnsw (IDMap2,HNSW32,Flat; efSearch=" in invoke("info", "--index", idx).stdout
    exact = json.loads(invoke("query", paths[1], "--exact", "-k", "9", "--json", "--index", idx).stdout)
    approx = json.loads(invoke("query", paths[1], "-k", "9", "--json", "--index", idx).stdout)
    flat = json.loads(invoke("query", paths[1], "-k", "9", "--json", "--index", base / "idx").stdout)
    assert exact[0]["results"] == flat[0]["results"] == approx[0]["results"]  # 10 images: all found


def test_an_existing_index_keeps_its_model(site, tmp_path):
    base, _ = site
    idx = tmp_path / "idx"
    # built with resnet18/random weights; a re-run without --model must not try resnet50's weights
    assert invoke("index", base / "photos", "--index", idx, *FAST_ARGS, "-q").exit_code == 0
    make_collection(tmp_path / "more", n=3, seed=5)
    result = invoke("index", tmp_path / "more", "--index", idx, "--workers", "0", "--device", "cpu", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["added"] == 3
    with IndexStore.open(idx) as store:
        assert store.meta["model"] == "resnet18" and store.meta["weights_source"] == "random"
    # naming another model is still refused
    result = invoke("index", tmp_path / "more", "--index", idx, "--model", "resnet34", "--weights", "random", "-q")
    assert result.exit_code == 1 and "was built with" in result.stderr


def test_import_vectors_command(site, tmp_path):
    base, paths = site
    with IndexStore.open(base / "idx") as store:
        identity = {k: store.meta[k] for k in ("model", "weights", "dim", "preprocessing", "weights_source", "seed")}
        ids, vectors = store.all_vectors()
        rows = store.catalog.rows_by_ids(ids)
    npz = tmp_path / "shard.npz"
    np.savez(
        npz,
        vectors=vectors,
        paths=np.array([rows[i].path for i in ids]),
        sizes=np.array([rows[i].size for i in ids]),
        mtimes_ns=np.array([rows[i].mtime_ns for i in ids]),
        hashes=np.array([rows[i].hash for i in ids]),
        widths=np.array([rows[i].width for i in ids]),
        heights=np.array([rows[i].height for i in ids]),
        identity=json.dumps(identity),
    )
    idx = tmp_path / "idx"
    out, torch_loaded = run_cli(["import-vectors", npz, "--index", idx, "--json"])
    assert out["imported"] == len(ids) == out["total_indexed"] and not torch_loaded
    # the imported index answers like the original (a file there is indexed and unchanged: no model)
    a, _ = run_cli(["query", paths[2], "-k", "4", "--json", "--index", idx])
    b, _ = run_cli(["query", paths[2], "-k", "4", "--json", "--index", base / "idx"])
    assert a == b
    # an .npy + CSV into the existing index: identity from the index, dim checked
    np.save(tmp_path / "v.npy", vectors[:2])
    (tmp_path / "p.csv").write_text("path,size,mtime_ns\n/elsewhere/a.jpg,1,2\n/elsewhere/b.jpg,3,4\n")
    result = invoke("import-vectors", tmp_path / "v.npy", "--paths", tmp_path / "p.csv", "--index", idx)
    assert result.exit_code == 0, result.stderr
    assert f"{len(ids) + 2} images indexed" in result.stdout
    np.save(tmp_path / "bad.npy", np.ones((2, 7), np.float32))
    result = invoke("import-vectors", tmp_path / "bad.npy", "--paths", tmp_path / "p.csv", "--index", idx)
    assert result.exit_code == 1 and "7-d" in result.stderr


def test_a_command_that_loaded_torch_exits_at_once_with_its_output_and_status(site, tmp_path):
    """``python -m simsearch`` as a user runs it: after the model ran, the process ends without the
    interpreter's teardown, its output complete and its exit status click's."""
    import shutil

    base, paths = site
    new = tmp_path / "new.jpg"
    shutil.copy(paths[0], new)  # not in the index: embedded by the model
    run = [sys.executable, "-m", "simsearch"]
    ok = subprocess.run(run + ["query", new, "-k", "3", "--json", "--device", "cpu", "--index", base / "idx"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    results = json.loads(ok.stdout)[0]["results"]
    assert [r["rank"] for r in results] == [1, 2, 3] and str(paths[0]) not in [r["path"] for r in results]  # itself left out
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    failed = subprocess.run(run + ["query", bad, "--device", "cpu", "--index", base / "idx"],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.strip().startswith("Error:") and "Traceback" not in failed.stderr
