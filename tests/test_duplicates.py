"""Near-duplicates: the neighbour graph and groups against numpy brute force, keepers, the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from simsearch.store import VectorIndex
from simsearch.cli import cli
from simsearch.duplicates import (
    group_duplicates,
    keeper_key,
    neighbour_graph,
)

from conftest import make_collection, run_index, unit_vectors


def planted_vectors(n_base: int, copies: int, seed: int, dim: int = 32, noise: float = 0.08) -> np.ndarray:
    """``n_base`` random unit vectors, each followed by up to ``copies`` noisy copies of it."""
    rng = np.random.default_rng(seed)
    base = unit_vectors(n_base, seed, dim)
    out = []
    for b in base:
        out.append(b)
        for _ in range(rng.integers(0, copies + 1)):
            v = b + noise * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
            out.append(v / np.linalg.norm(v))
    return np.stack(out).astype(np.float32)


def flat(vectors: np.ndarray, ids: np.ndarray) -> VectorIndex:
    index = VectorIndex(vectors.shape[1])
    index.add(ids, vectors)
    return index


def chunks(ids: np.ndarray, vectors: np.ndarray, size: int = 37):
    for s in range(0, len(ids), size):
        yield ids[s : s + size], vectors[s : s + size]


@pytest.mark.parametrize("cells", [1, 8])  # every pair compared, and the cell path
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_graph_matches_brute_force(cells, dtype):
    x = planted_vectors(150, 4, seed=3).astype(dtype)
    ids = np.random.default_rng(5).permutation(5000)[: len(x)].astype(np.int64)
    k, min_score = 6, 0.9
    graph = neighbour_graph(ids, x, k=k, min_score=min_score, cells=cells, probes=3)
    x = x.astype(np.float32)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    expected = {(int(ids[i]), int(ids[j])) for i, j in zip(*np.nonzero(sims >= min_score))}
    assert max(np.sum(sims >= min_score, axis=1)) <= k  # every pair above min_score is within the k searched
    got = set(zip(graph.src.tolist(), graph.dst.tolist()))
    assert got == expected
    position = {int(i): n for n, i in enumerate(ids)}
    for a, b, s in zip(graph.src.tolist(), graph.dst.tolist(), graph.score.tolist()):
        assert s == pytest.approx(float(x[position[a]] @ x[position[b]]), abs=1e-5)  # exact scores, cells too


def test_graph_cells_find_the_near_copies_at_scale():
    """Seeded 20,000 x 64 vectors, 2 % of them noisy copies (cosine about 0.95): the cell path
    (78 cells, 6 probed) finds every pair above the threshold that brute force finds."""
    rng = np.random.default_rng(7)
    x = unit_vectors(20_000, seed=8, dim=64)
    copies = np.flatnonzero(rng.random(len(x)) < 0.02)
    sources = rng.integers(0, len(x), len(copies))
    noisy = x[sources] + 0.3 * rng.standard_normal((len(copies), 64)).astype(np.float32) / 8
    x[copies] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    ids = np.arange(len(x), dtype=np.int64) * 3 + 1
    graph = neighbour_graph(ids, x.astype(np.float16), k=10, min_score=0.9)
    got = {(a, b) for a, b in zip(graph.src.tolist(), graph.dst.tolist())}
    expected = set()
    for s in range(0, len(x), 4096):
        sims = x[s : s + 4096] @ x.T
        for i, j in zip(*np.nonzero(sims >= 0.9)):
            if s + i != j:
                expected.add((int(ids[s + i]), int(ids[j])))
    assert len(expected) >= 600
    assert len(got & expected) / len(expected) >= 0.99 and got <= expected


@dataclass
class Row:
    id: int
    path: str
    size: int
    mtime_ns: int
    hash: str | None
    width: int
    height: int


def fake_rows(n: int, seed: int) -> dict[int, Row]:
    rng = np.random.default_rng(seed)
    return {
        i: Row(i, f"/c/{'deep/' * int(rng.integers(0, 3))}img{i}.jpg", int(rng.integers(1000, 9000)), int(rng.integers(1, 10**9)),
               f"h{i}", int(rng.integers(50, 500)), int(rng.integers(50, 500)))
        for i in range(n)
    }


def brute_force_groups(x: np.ndarray, rows: dict[int, Row], threshold: float, key) -> list[tuple[int, tuple[int, ...]]]:
    """All-pairs components, then the keeper-first rule, written independently on the full matrix."""
    n = len(x)
    sims = x @ x.T
    label = list(range(n))

    def find(a):
        while label[a] != a:
            a = label[a]
        return a

    for i, j in zip(*np.nonzero(np.triu(sims >= threshold, 1))):
        label[find(i)] = find(j)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    out = []
    for comp in comps.values():
        order = sorted(comp, key=lambda i: key(rows[i]))
        while order:
            keeper, rest = order[0], order[1:]
            members = tuple(sorted(j for j in rest if sims[keeper, j] >= threshold))
            if members:
                out.append((keeper, members))
            order = [j for j in rest if j not in members]
    return sorted(out)


@pytest.mark.parametrize("keep", ["largest", "oldest", "newest", "shortest-path"])
def test_groups_match_brute_force(keep):
    x = planted_vectors(120, 5, seed=11, noise=0.2)
    n = len(x)
    rows = fake_rows(n, seed=2)
    ids = np.arange(n, dtype=np.int64)
    threshold = 0.96
    key = keeper_key(keep)
    graph = neighbour_graph(ids, x, k=8, min_score=threshold)
    groups = group_duplicates(graph, [], lambda ids_: {i: rows[i] for i in ids_}, lambda ids_: x[ids_], threshold, key)
    got = sorted((g.keeper.id, tuple(sorted(m.id for m in g.duplicates))) for g in groups)
    expected = brute_force_groups(x, rows, threshold, key)
    assert got == expected and len(got) > 20
    for g in groups:  # each member's score is its cosine to the keeper
        for m in g.duplicates:
            assert m.score == pytest.approx(float(x[g.keeper.id] @ x[m.id]), abs=1e-5)
            assert m.score >= threshold


def test_grouping_does_not_chain_different_photos():
    # a -> b -> c -> d: each step 0.95 similar, but a and d are different pictures (cosine ~0.6)
    angle = np.arccos(0.95)
    x = np.stack([[np.cos(t * angle), np.sin(t * angle), 0.0] for t in range(4)]).astype(np.float32)
    rows = {i: Row(i, f"/c/{i}.jpg", 100, i, f"h{i}", 10, 10) for i in range(4)}
    ids = np.arange(4, dtype=np.int64)
    graph = neighbour_graph(ids, x, k=3, min_score=0.9)
    groups = group_duplicates(graph, [], lambda i: {j: rows[j] for j in i}, lambda i: x[i], 0.9, keeper_key("oldest"))
    # plain connected components would make one group {0, 1, 2, 3}
    assert [(g.keeper.id, [m.id for m in g.duplicates]) for g in groups] == [(0, [1]), (2, [3])]
    for g in groups:
        assert all(m.score >= 0.9 for m in g.duplicates)


def _vectors_with_cosines(gram: np.ndarray) -> np.ndarray:
    return np.linalg.cholesky(gram).astype(np.float32)  # rows: unit vectors with these cosines


@pytest.mark.parametrize("a_b", [0.85, 0.6])
def test_verification_reaches_a_copy_through_the_keepers_members(a_b):
    # keeper K, its copy A (0.8), a heavy copy B far from K (0.45) but near A (a_b), and a different
    # photo X near A (0.75); the pair check knows the scenes: K, A, B one photo, X another
    gram = np.array([[1, 0.8, 0.45, 0.5], [0.8, 1, a_b, 0.75], [0.45, a_b, 1, 0.55], [0.5, 0.75, 0.55, 1]])
    x = _vectors_with_cosines(gram)
    scene = {0: "p", 1: "p", 2: "p", 3: "q"}
    rows = {i: Row(i, f"/c/{i}.jpg", 100, i, f"h{i}", 10, 10) for i in range(4)}
    ids = np.arange(4, dtype=np.int64)
    graph = neighbour_graph(ids, x, k=3, min_score=0.7, cells=1)
    checked = []

    def verify(a, b):
        checked.append((a.id, b.id))
        return scene[a.id] == scene[b.id]

    groups = group_duplicates(graph, [], lambda i: {j: rows[j] for j in i}, lambda i: x[i], 0.99, keeper_key("oldest"),
                              candidate_threshold=0.7, verify=verify)
    got = [(g.keeper.id, sorted(m.id for m in g.duplicates)) for g in groups]
    if a_b >= 0.7:  # B is A's candidate neighbour: checked against K itself (never against A), and kept
        assert got == [(0, [1, 2])]
        assert sorted(checked) == [(0, 1), (0, 2), (0, 3)]
        member = next(m for m in groups[0].duplicates if m.id == 2)
        assert member.verified and member.score == pytest.approx(0.45, abs=1e-5)
    else:  # nothing links B to the group: it is never checked
        assert got == [(0, [1])]
        assert sorted(checked) == [(0, 1), (0, 3)]
    # X, a different photo reached the same way, is checked against K and refused; nothing chains
    assert all(3 not in m for _, m in got)


def test_identical_files_always_group_and_prefer_folder():
    x = unit_vectors(4, seed=9, dim=8)  # four different pictures...
    rows = {i: Row(i, p, 100, i, h, 10, 10) for i, (p, h) in enumerate(
        [("/a/1.jpg", "same"), ("/keep/1.jpg", "same"), ("/a/2.jpg", "x"), ("/a/3.jpg", "y")])}
    ids = np.arange(4, dtype=np.int64)
    graph = neighbour_graph(ids, x, k=3, min_score=0.99)
    # ...but 0 and 1 have the same bytes: a group whatever their vectors say
    groups = group_duplicates(graph, [[0, 1]], lambda i: {j: rows[j] for j in i}, lambda i: x[i], 0.99,
                              keeper_key("oldest", prefer=["/keep"]))
    assert len(groups) == 1
    assert groups[0].keeper.path == "/keep/1.jpg"
    assert [(m.path, m.identical, m.score) for m in groups[0].duplicates] == [("/a/1.jpg", True, 1.0)]


def test_keeper_rules():
    rows = [Row(1, "/x/long/name.jpg", 500, 30, "a", 100, 100), Row(2, "/x/b.jpg", 900, 10, "b", 50, 50),
            Row(3, "/y/c.jpg", 100, 20, "c", 200, 100)]
    assert sorted(rows, key=keeper_key("largest"))[0].id == 3
    assert sorted(rows, key=keeper_key("oldest"))[0].id == 2
    assert sorted(rows, key=keeper_key("newest"))[0].id == 1
    assert sorted(rows, key=keeper_key("shortest-path"))[0].id == 2
    assert sorted(rows, key=keeper_key("largest", prefer=["/x/long"]))[0].id == 1


# -- the command, on a real index ------------------------------------------------------------
def make_duplicate_collection(root: Path) -> list[Path]:
    """8 distinct images; two identical copies of the first, a half-size copy of the second, a JPEG
    re-save of the third and an enlarged PNG of the fifth (13 files)."""
    paths = make_collection(root, n=8)
    (root / "copies").mkdir()
    for name in ("same.jpg", "same-again.jpg"):
        (root / "copies" / name).write_bytes(paths[0].read_bytes())
    img = Image.open(paths[1])
    img.resize((img.width // 2, img.height // 2)).save(root / "copies" / "half.jpg", quality=90)
    Image.open(paths[2]).save(root / "copies" / "resaved.jpg", quality=50)
    Image.open(paths[4]).resize((800, 600)).save(root / "copies" / "big.png")
    return paths


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("dup") / "photos"
    paths = make_duplicate_collection(root)
    index = root.parent / "index"
    run_index(root, index)
    return root, index, paths


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_command_json_csv_and_text(dup_index):
    root, index, paths = dup_index
    result = invoke("duplicates", "--index", index, "--threshold", "0.999", "--verify", "off", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["threshold"] == 0.999 and data["threshold_source"] == "given" and data["images"] == 13
    groups = {frozenset(m["path"] for m in g["members"]): g for g in data["groups"]}
    same = frozenset({str(paths[0]), str(root / "copies" / "same.jpg"), str(root / "copies" / "same-again.jpg")})
    assert same in groups
    for g in data["groups"]:
        keepers = [m for m in g["members"] if m["keeper"]]
        assert len(keepers) == 1 and keepers[0]["path"] == g["keeper"]
        assert all(m["score"] >= 0.999 or m["identical"] for m in g["members"])
    # the half-size copy is smaller: with --keep largest its original is the keeper
    half = [g for g in data["groups"] if str(root / "copies" / "half.jpg") in {m["path"] for m in g["members"]}]
    assert half and half[0]["keeper"] == str(paths[1])
    csv_out = invoke("duplicates", "--index", index, "--threshold", "0.999", "--verify", "off", "--csv")
    lines = csv_out.stdout.splitlines()
    assert lines[0] == "duplicate,keeper,score"
    assert len(lines) - 1 == sum(len(g["members"]) - 1 for g in data["groups"])
    text = invoke("duplicates", "--index", index, "--threshold", "0.999", "--verify", "off")
    assert text.exit_code == 0 and f"keep {paths[1]}" in text.stdout


def test_bad_input_one_line_errors(dup_index, tmp_path):
    root, index, _ = dup_index
    bad = invoke("duplicates", "--index", index, "--threshold", "1.5")
    assert bad.exit_code == 2 and "1.5" in bad.stderr
    inside = invoke("duplicates", "--index", index, "--threshold", "0.999", "--move-to", root / "dups")
    assert inside.exit_code == 1 and "inside the indexed folder" in inside.stderr
    assert len(inside.stderr.strip().splitlines()) == 1
    run_index(tmp_path / "empty", tmp_path / "idx") if (tmp_path / "empty").mkdir() is None else None
    empty = invoke("duplicates", "--index", tmp_path / "idx", "--threshold", "0.9")
    assert empty.exit_code == 1 and "no images" in empty.stderr
    missing = invoke("duplicates", "--index", tmp_path / "nothing", "--threshold", "0.9")
    assert missing.exit_code == 1 and "no index" in missing.stderr


def test_grouping_does_not_import_torch(dup_index):
    _, index, _ = dup_index
    code = (
        "import sys\n"
        "from simsearch.cli import cli\n"
        f"try:\n    cli(['duplicates', '--index', {str(index)!r}, '--threshold', '0.95', '--verify', 'off', '--json'])\n"
        "except SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.stderr.strip().splitlines()[-1] == "False", out.stderr
    assert json.loads(out.stdout)["groups"]


def test_check_new_images_without_adding(dup_index, tmp_path):
    root, index, paths = dup_index
    before = json.loads(invoke("info", "--index", index, "--json").stdout)["indexed"]
    outside = tmp_path / "new.png"
    Image.open(paths[3]).save(outside)  # same pixels, other bytes
    other = tmp_path / "other.jpg"
    make_collection(tmp_path / "fresh", n=1, seed=7)[0].rename(other)
    result = invoke("duplicates", str(outside), str(other), str(paths[0]), "--index", index, "--threshold", "0.999", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    found = {c["image"]: c["matches"] for c in data["images"]}
    assert [m["path"] for m in found[str(outside)]][0] == str(paths[3])
    assert found[str(other)] == []
    identical = {m["path"] for m in found[str(paths[0])] if m["identical"]}
    assert identical == {str(paths[0]), str(root / "copies" / "same.jpg"), str(root / "copies" / "same-again.jpg")}
    assert json.loads(invoke("info", "--index", index, "--json").stdout)["indexed"] == before


def test_move_to_dry_run_then_apply(tmp_path):
    root = tmp_path / "photos"
    paths = make_collection(root, n=6)
    (root / "b" / "c" / "twin.jpg").write_bytes(paths[0].read_bytes())
    (root / "a" / "copy_of_img002.jpg").write_bytes(paths[2].read_bytes())
    index = tmp_path / "index"
    run_index(root, index)
    target = tmp_path / "dups"
    args = ["duplicates", "--index", index, "--threshold", "0.999", "--verify", "off", "--keep", "shortest-path", "--move-to", target]
    dry = invoke(*args)
    assert dry.exit_code == 0, dry.stderr
    assert "would move" in dry.stdout and not target.exists()
    # a file changed since it was indexed is skipped with a warning
    changed = root / "a" / "copy_of_img002.jpg"
    Image.open(paths[3]).save(changed)
    applied = invoke(*args, "--apply")
    assert applied.exit_code == 0, applied.stderr
    moved = target / "photos" / "b" / "c" / "twin.jpg"
    assert moved.read_bytes() == paths[0].read_bytes()  # moved with its relative path, not copied elsewhere
    assert not (root / "b" / "c" / "twin.jpg").exists()
    assert changed.exists() and "skipped" in applied.stderr and "changed" in applied.stderr
    assert paths[0].exists() and paths[2].exists()  # keepers stay
    info = json.loads(invoke("info", "--index", index, "--json").stdout)
    assert info["indexed"] == 7 and info["consistent"]
    again = json.loads(invoke("duplicates", "--index", index, "--threshold", "0.999", "--verify", "off", "--json").stdout)
    assert str(root / "b" / "c" / "twin.jpg") not in json.dumps(again)
