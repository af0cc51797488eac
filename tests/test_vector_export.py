"""Past one machine: export-vectors writes an index's vectors and metadata as the .npz that
import-vectors reads, whole, from one state of the index, and back into an index without
re-embedding anything; index --shard splits a collection between machines, import --rewrite merges
their parts under this machine's paths."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_collection, make_image, run_index
from simsearch.cli import cli
from simsearch.errors import EmptyIndexError, IndexCorruptError, InputError, SimsearchError
from simsearch.store import IndexStore
from simsearch.store.vector_file import HEADER_SIZE, VECTOR_FILE
from simsearch.vector_export import export_vectors
from simsearch.vector_import import import_vector_file


def _odd_name(folder: Path, name: bytes) -> str:
    """A path as os.scandir reports it (surrogate escapes for bytes that are not UTF-8)."""
    return os.fsdecode(os.fsencode(str(folder)) + b"/" + name)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def stored(index: Path) -> dict[str, tuple[np.ndarray, tuple]]:
    """real path -> (stored vector, file metadata), read through the store."""
    with IndexStore.open(index) as store:
        ids, vectors = store.all_vectors()
        rows = store.catalog.rows_by_ids(ids)
    return {
        rows[int(i)].real_path: (v, (rows[int(i)].size, rows[int(i)].mtime_ns, rows[int(i)].hash, rows[int(i)].width, rows[int(i)].height))
        for i, v in zip(ids, vectors)
    }


@pytest.fixture
def indexed(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "photos"
    make_collection(root, n=10)
    os.rename(make_image(root / "t.jpg", color=(9, 9, 250), seed=8), _odd_name(root, b"x\xff.jpg"))  # not UTF-8
    (root / "broken.jpg").write_bytes(b"not an image")  # a failed row: not exported
    index = tmp_path / "index"
    summary = run_index(root, index)
    assert (summary.added, summary.failed) == (11, 1)
    return root, index


def test_export_holds_every_searchable_image_as_the_store_has_it(indexed, tmp_path: Path) -> None:
    _, index = indexed
    out = tmp_path / "vectors.npz"
    summary = export_vectors(index, out, chunk=4)  # several chunks
    assert (summary.exported, summary.dim, summary.dtype) == (11, 512, "float32")
    assert summary.bytes == out.stat().st_size
    expected = stored(index)
    with np.load(out, allow_pickle=False) as data:
        assert data["vectors"].dtype == np.float32 and data["vectors"].shape == (11, 512)
        assert list(data["ids"]) == sorted(data["ids"])
        got = {
            p: (v, (s, m, h, w, hh))
            for p, v, s, m, h, w, hh in zip(
                data["paths"].tolist(), data["vectors"], data["sizes"].tolist(), data["mtimes_ns"].tolist(),
                data["hashes"].tolist(), data["widths"].tolist(), data["heights"].tolist(),
            )
        }
        identity = json.loads(str(data["identity"]))
    assert got.keys() == expected.keys()
    for path, (vector, meta) in expected.items():
        assert np.array_equal(got[path][0], vector) and got[path][1] == meta
    with IndexStore.open(index) as store:
        assert {k: identity[k] for k in store.catalog.identity()} == store.catalog.identity()
        assert (identity["weights_source"], identity["seed"]) == ("random", 0)

    half = export_vectors(index, tmp_path / "half.npz", dtype="float16")
    with np.load(tmp_path / "half.npz", allow_pickle=False) as data:
        assert data["vectors"].dtype == np.float16
        np.testing.assert_allclose(data["vectors"].astype(np.float32), np.stack([v for v, _ in got.values()]), atol=1e-3)
    member = lambda path: zipfile.ZipFile(path).getinfo("vectors.npy").file_size  # noqa: E731
    assert member(tmp_path / "half.npz") - 128 == (member(out) - 128) // 2 == 11 * 512 * 2  # after the .npy header
    assert half.bytes < summary.bytes


def test_exported_vectors_import_into_an_index_that_needs_no_reembedding(indexed, tmp_path: Path) -> None:
    root, index = indexed
    out = tmp_path / "vectors.npz"
    export_vectors(index, out)
    merged = tmp_path / "merged"
    result = import_vector_file(merged, out)  # a new index takes the file's identity
    assert result.imported == result.total_indexed == 11
    with IndexStore.open(merged) as store:
        assert (store.meta["weights_source"], store.meta["seed"], store.meta["precisions"]) == ("random", 0, ["fp32"])
    before, after = stored(index), stored(merged)
    assert after.keys() == before.keys()
    for path, (vector, meta) in before.items():
        assert np.array_equal(after[path][0], vector) and after[path][1] == meta
    again = run_index(root, merged)  # the same files, the same model: nothing to embed
    assert (again.unchanged, again.added, again.updated, again.failed) == (11, 0, 0, 1)

    from simsearch.search import query_images

    [a] = query_images([root / "a" / "img000.jpg"], index, k=5, device="cpu")
    [b] = query_images([root / "a" / "img000.jpg"], merged, k=5, device="cpu")
    assert [(h.path, round(h.score, 5)) for h in a.results] == [(h.path, round(h.score, 5)) for h in b.results]


def test_unknown_metadata_goes_out_as_marks_and_comes_back_as_none(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    source = tmp_path / "bare.npz"
    np.savez(source, vectors=rng.normal(size=(3, 512)).astype(np.float32), paths=np.array(["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"]))
    first = tmp_path / "first"
    import_vector_file(first, source, model="resnet18", weights="random")
    export_vectors(first, tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz", allow_pickle=False) as data:
        assert data["sizes"].tolist() == data["widths"].tolist() == [-1, -1, -1]
        assert data["hashes"].tolist() == ["", "", ""]
    second = tmp_path / "second"
    import_vector_file(second, tmp_path / "out.npz")
    assert {meta for _, meta in stored(second).values()} == {(None, None, None, None, None)}


def test_a_vector_that_does_not_match_its_checksum_stops_the_export(indexed, tmp_path: Path) -> None:
    _, index = indexed
    with IndexStore.open(index) as store:
        victim = store.catalog.rows("status = 'ok'")[3]
        slot = store.catalog.db.execute("SELECT slot FROM images WHERE id = ?", [victim.id]).fetchone()[0]
        row_bytes = store.vectors.row_bytes
    with open(index / VECTOR_FILE, "r+b") as f:  # as a writer reusing the slot meanwhile would leave it
        f.seek(HEADER_SIZE + slot * row_bytes + 10)
        f.write(b"\x3c" * 32)
    out = tmp_path / "vectors.npz"
    with pytest.raises(IndexCorruptError, match="does not match its checksum"):
        export_vectors(index, out)
    assert not out.exists() and not list(tmp_path.glob(".vectors.npz.*"))  # nothing half-written left


def test_a_writer_committing_during_an_export_is_not_seen(indexed, tmp_path: Path) -> None:
    _, index = indexed
    rng = np.random.default_rng(1)
    with IndexStore.open(index) as reader:
        identity = reader.catalog.identity()
        with reader.catalog.snapshot():
            n = reader.catalog.count_stored()
            first = next(reader.iter_stored(chunk=2))
            with IndexStore.open(index) as writer:  # another connection commits two new rows
                writer.lock_for_writing()
                writer.import_vectors(
                    [{"path": "/elsewhere/new1.jpg"}, {"path": "/elsewhere/new2.jpg"}], rng.normal(size=(2, 512)), identity
                )
                writer.save()
            rows = [r for part in reader.iter_stored(chunk=2) for r in part[0]]
            assert reader.catalog.count_stored() == n == len(rows) == 11
            assert [r.id for r in first[0]] == [r.id for r in rows[:2]]
        assert reader.catalog.count_stored() == 13  # the snapshot ended: the new rows are there


def test_export_errors(tmp_path: Path, indexed) -> None:
    _, index = indexed
    with pytest.raises(InputError, match=r"\.npz"):
        export_vectors(index, tmp_path / "vectors.npy")
    with pytest.raises(InputError, match="float16"):
        export_vectors(index, tmp_path / "v.npz", dtype="int8")
    with pytest.raises(SimsearchError, match="cannot export to"):
        export_vectors(index, tmp_path / "no" / "such" / "v.npz")
    IndexStore.open(tmp_path / "empty", create=True).close()
    with pytest.raises(EmptyIndexError):
        export_vectors(tmp_path / "empty", tmp_path / "v.npz")
    r = invoke("export-vectors", tmp_path / "v.npz", "--index", tmp_path / "nothing-here")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_export_vectors_command(indexed, tmp_path: Path) -> None:
    _, index = indexed
    r = invoke("export-vectors", tmp_path / "v.npz", "--index", index)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("exported 11 vectors (512-d float32, ") and str(tmp_path / "v.npz") in r.stdout
    r = invoke("export-vectors", tmp_path / "h.npz", "--index", index, "--float16", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["exported"], summary["dtype"], summary["out"]) == (11, "float16", str(tmp_path / "h.npz"))
    r = invoke("import-vectors", tmp_path / "h.npz", "--index", tmp_path / "copy")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("imported 11 vectors; 11 images indexed")



def test_rewrite_path_applies_the_first_folder_that_holds_the_path() -> None:
    from simsearch.vector_import import parse_rewrite, rewrite_path

    rules = [parse_rewrite("/mnt/a/=/data/a"), parse_rewrite("/mnt=/srv")]
    assert rewrite_path("/mnt/a/x/y.jpg", rules) == "/data/a/x/y.jpg"
    assert rewrite_path("/mnt/ab/y.jpg", rules) == "/srv/ab/y.jpg"  # not under /mnt/a: the next rule
    assert rewrite_path("/mnt", rules) == "/srv"
    assert rewrite_path("/mntx/y.jpg", rules) == "/mntx/y.jpg"  # no folder holds it
    assert rewrite_path("/p/q.jpg", [parse_rewrite("/=/root/")]) == "/root/p/q.jpg"
    for bad in ("/mnt", "=/x", "/x="):
        with pytest.raises(InputError, match="OLD=NEW"):
            parse_rewrite(bad)


def test_shards_indexed_elsewhere_merge_under_this_machines_paths(tmp_path: Path) -> None:
    """Two folders indexed where they were mounted elsewhere, merged here with --rewrite: the
    merged index knows the files where they are now and embeds none of them again."""
    import shutil

    there = tmp_path / "there"
    make_collection(there / "2024", n=6, seed=1)
    make_collection(there / "2025", n=4, seed=2)
    for year in ("2024", "2025"):
        run_index(there / year, tmp_path / f"shard-{year}")
        assert invoke("export-vectors", tmp_path / f"{year}.npz", "--index", tmp_path / f"shard-{year}").exit_code == 0
    here = tmp_path / "here"
    shutil.copytree(there, here)  # copy2: the same sizes and mtimes, another folder
    merged = tmp_path / "merged"
    for year in ("2024", "2025"):
        r = invoke("import-vectors", tmp_path / f"{year}.npz", "--index", merged, "--rewrite", f"{there}={here}")
        assert r.exit_code == 0, r.output
    with IndexStore.open(merged) as store:
        paths = sorted(row.path for row in store.catalog.rows())
    assert len(paths) == 10 and all(p.startswith(str(here) + "/") for p in paths)
    again = run_index(here, merged)
    assert (again.unchanged, again.added, again.updated, again.moved, again.removed) == (10, 0, 0, 0, 0)
    r = invoke("import-vectors", tmp_path / "2024.npz", "--index", merged, "--rewrite", "no-equals-sign")
    assert r.exit_code == 2 and "OLD=NEW" in r.stderr


def test_shards_are_disjoint_balanced_and_the_same_wherever_the_folder_is() -> None:
    from simsearch.images import Shard

    names = [f"{d}/IMG_{i:05d}.jpg" for d in ("2023", "2024/summer", "x") for i in range(1000)]
    parts = [[n for n in names if Shard(i, 4).holds(n)] for i in range(1, 5)]
    assert sorted(sum(parts, [])) == sorted(names)  # every name in exactly one part
    assert all(abs(len(p) - 750) < 0.1 * 750 for p in parts), [len(p) for p in parts]
    assert [n for n in names if Shard(1, 1).holds(n)] == names
    assert str(Shard.parse("3/8")) == "3/8"
    for bad in ("0/4", "5/4", "1/0", "x", "1/2/3", ""):
        with pytest.raises(InputError, match="shard"):
            Shard.parse(bad)


def test_a_collection_indexed_in_shards_merges_into_the_whole(tmp_path: Path) -> None:
    """Three machines index a third each (here, from copies of the collection at other paths), the
    exports are merged with --rewrite, and the merged index is the collection: nothing to embed."""
    import shutil

    from simsearch.images import Shard

    root = tmp_path / "photos"
    make_collection(root, n=18)
    merged = tmp_path / "merged"
    seen: list[set[str]] = []
    for i in (1, 2, 3):
        mount = tmp_path / f"machine{i}" / "nas"
        shutil.copytree(root, mount)
        summary = run_index(mount, tmp_path / f"shard{i}", shard=Shard(i, 3))
        assert summary.failed == 0
        with IndexStore.open(tmp_path / f"shard{i}") as store:
            seen.append({os.path.relpath(r.path, mount) for r in store.catalog.rows()})
            assert store.meta["shard"] == f"{i}/3"
        r = invoke("info", "--index", tmp_path / f"shard{i}")
        assert f"shard: {i}/3 of the files" in r.stdout
        assert invoke("export-vectors", tmp_path / f"{i}.npz", "--index", tmp_path / f"shard{i}").exit_code == 0
        r = invoke("import-vectors", tmp_path / f"{i}.npz", "--index", merged, "--rewrite", f"{mount}={root}")
        assert r.exit_code == 0, r.output
    assert all(seen) and set.union(*seen) == {os.path.relpath(p, root) for p in root.rglob("*.jpg")}
    assert sum(len(s) for s in seen) == 18  # disjoint
    again = run_index(root, merged)
    assert (again.unchanged, again.added, again.updated, again.removed) == (18, 0, 0, 0)
    # an index run with another --shard over the same index keeps only that part
    other = run_index(root, merged, shard=Shard(2, 3))
    assert other.removed == 18 - len(seen[1]) and other.added == 0
    r = invoke("index", root, "--index", merged, "--shard", "4/3")
    assert r.exit_code == 2 and "between 1 and N" in r.stderr
