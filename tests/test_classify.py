"""Labels and classification from the index: kNN votes, calibration, suspects and evaluation against
numpy brute force on seeded vectors; the labels' life through re-indexing, moves, changes and deletion;
CSV errors; the CLI."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FAST_ARGS, make_image, run_index
from simsearch.classify import (
    GRID_K,
    GRID_T,
    TEMPERATURE,
    Calibration,
    LabelledNeighbours,
    classify_index,
    evaluate_labels,
    expected_calibration_error,
    find_suspects,
    fit_isotonic,
    fit_whitening,
    vote_shares,
)
from simsearch.cli import cli
from simsearch.errors import InputError
from simsearch.labels import import_labels, list_labels
from simsearch.store import IndexStore


def clustered(n: int, classes: int, dim: int = 16, spread: float = 0.35, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded unit vectors around ``classes`` random centres, with their true classes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    y = rng.integers(0, classes, n)
    x = centres[y] / np.sqrt(dim) + spread * rng.standard_normal((n, dim)) / np.sqrt(dim) * 2
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, y


def vector_index(path: Path, vectors: np.ndarray) -> list[int]:
    """An index holding these vectors under made-up paths (no model, no images): the row ids."""
    with IndexStore.open(path, create=True) as store:
        store.ensure_identity(
            {"model": "synthetic", "weights": "none", "dim": vectors.shape[1], "preprocessing": {"resize_size": 1, "crop_size": 1}}
        )
        records = [{"path": f"/synthetic/{i:06d}.jpg", "size": 1, "status": "ok"} for i in range(len(vectors))]
        ids = store.commit(records, vectors, [None] * len(records))
        store.save()
    return ids


def give(path: Path, ids, labels) -> None:
    with IndexStore.open(path) as store:
        store.import_labels({int(i): f"c{int(l)}" for i, l in zip(ids, labels)})


def anisotropic(n: int, classes: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded unit vectors whose classes differ only in low-variance directions, while a few
    directions of large class-free variance dominate the plain cosine: what whitening is for."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((classes, dim))
    centres[:, dim // 2 :] = rng.standard_normal((classes, dim - dim // 2))
    y = rng.integers(0, classes, n)
    scale = np.ones(dim)
    scale[:3] = 8.0  # nuisance directions
    x = 3.0 + centres[y] + 0.6 * rng.standard_normal((n, dim)) * scale
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, y


def brute_space(stored: np.ndarray, kind: str) -> np.ndarray:
    """The vectors the cosine is taken on, with numpy only: for ``whitened`` (all dimensions kept, as
    for d < 512) the Mahalanobis form of signed-square-root vectors, through the inverse covariance."""
    if kind == "cosine":
        return stored.astype(np.float64)
    z = np.sign(stored) * np.sqrt(np.abs(stored.astype(np.float64)))
    z -= z.mean(axis=0)
    inv = np.linalg.inv(z.T @ z / len(z))
    w = z @ np.linalg.cholesky(inv)  # w w^T = z inv z^T
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def brute_loo_accuracy(space: np.ndarray, y: np.ndarray, k: int, temperature: float, n_classes: int) -> float:
    full = space @ space.T
    np.fill_diagonal(full, -np.inf)
    return float(np.mean([brute_shares(full[i], y, k, n_classes, temperature).argmax() == y[i] for i in range(len(y))]))


def brute_shares(sims_row: np.ndarray, labels_row: np.ndarray, k: int, n_classes: int, temperature: float = TEMPERATURE) -> np.ndarray:
    """The vote of one query from its full similarity row, with numpy only."""
    order = np.argsort(-sims_row, kind="stable")[:k]
    w = np.exp((sims_row[order] - sims_row[order].max()) / temperature)
    out = np.zeros(n_classes)
    for weight, label in zip(w, labels_row[order]):
        out[label] += weight
    return out / out.sum()


# -- the algorithm against brute force ------------------------------------------------------------
def test_knn_vote_matches_numpy() -> None:
    x, y = clustered(600, 5, seed=1)
    ref, q = x[:400], x[400:]
    nb = LabelledNeighbours(ref, y[:400])
    for k in (1, 7, 20):
        sims, labels = nb.search(q, k)
        got = vote_shares(sims, labels, 5)
        full = q @ ref.T
        want = np.stack([brute_shares(full[i], y[:400], k, 5) for i in range(len(q))])
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_leave_one_out_matches_numpy() -> None:
    x, y = clustered(300, 4, seed=2)
    nb = LabelledNeighbours(x, y)
    got = nb.leave_one_out_shares(np.arange(300), 10, chunk=64)  # several chunks
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    want = np.stack([brute_shares(full[i], y, 10, 4) for i in range(300)])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_vote_with_fewer_neighbours_than_k() -> None:
    sims = np.array([[0.9, 0.5, -1.0]], np.float32)
    labels = np.array([[1, 0, -1]])  # the third is no neighbour
    shares = vote_shares(sims, labels, 2)
    w = np.exp(np.array([0.9, 0.5]) / TEMPERATURE)
    np.testing.assert_allclose(shares[0], [w[1] / w.sum(), w[0] / w.sum()], rtol=1e-5)


def test_isotonic_fit_is_the_minmax_solution() -> None:
    rng = np.random.default_rng(3)
    x = rng.random(60)
    y = (rng.random(60) < x).astype(float)
    xs, ys = fit_isotonic(x, y)
    fitted = np.interp(np.sort(x), xs, ys)
    ysorted = y[np.argsort(x)]
    # the isotonic regression at i is max over j<=i of min over l>=i of mean(y[j..l])
    want = np.array(
        [max(min(ysorted[j : l + 1].mean() for l in range(i, 60)) for j in range(i + 1)) for i in range(60)]
    )
    np.testing.assert_allclose(fitted, want, atol=1e-12)
    assert np.all(np.diff(ys) >= 0)


def test_ece_by_hand() -> None:
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    # bins: 0.95 -> acc 0.5 (gap .45, weight .5); 0.55 -> acc 1 (gap .45, weight .5)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.45)


# -- through an index ---------------------------------------------------------------------------
def test_calibrated_confidence_is_right_as_often_as_it_says(tmp_path: Path) -> None:
    """Overlapping clusters with 15% label noise: on held-out images, ECE of the confidence is small."""
    x, y = clustered(6000, 6, spread=0.9, seed=4)
    rng = np.random.default_rng(5)
    noisy = np.where(rng.random(len(y)) < 0.15, rng.integers(0, 6, len(y)), y)
    ids = vector_index(tmp_path / "idx", x)
    give(tmp_path / "idx", ids[:4000], noisy[:4000])
    result = classify_index(tmp_path / "idx", k=20)
    assert len(result.ids) == 2000 and set(result.ids.tolist()) == set(ids[4000:])
    truth = {i: f"c{l}" for i, l in zip(ids[4000:], noisy[4000:])}
    correct = np.array([result.classes[b] == truth[int(i)] for i, b in zip(result.ids, result.best)])
    assert 0.4 < correct.mean() < 0.95  # a problem where confidence matters
    assert expected_calibration_error(result.confidence, correct) < 0.05
    assert result.calibration.ece < 0.05
    # the raw vote share is over-confident here: calibrating is what made it honest
    assert expected_calibration_error(result.vote_share, correct) > 2 * expected_calibration_error(result.confidence, correct)
    # recorded in the index, reused while the labels are the same
    with IndexStore.open(tmp_path / "idx") as store:
        recorded = store.meta["classifier"]
    assert recorded["k"] == 20 and recorded["labelled"] == 4000
    again = classify_index(tmp_path / "idx", k=20)
    assert again.calibration.fitted_at == recorded["fitted_at"]
    np.testing.assert_array_equal(again.confidence, result.confidence)


def test_min_confidence_abstains_and_write_stores_predictions(tmp_path: Path) -> None:
    x, y = clustered(400, 3, spread=0.8, seed=6)
    ids = vector_index(tmp_path / "idx", x)
    give(tmp_path / "idx", ids[:200], y[:200])
    result = classify_index(tmp_path / "idx", k=10, min_confidence=0.9, write=True)
    preds = list(result.predictions())
    assert len(preds) == 200
    assert all((p.label is None) == (p.confidence < 0.9) for p in preds)
    assert 0 < result.abstained < 200
    listing = list_labels(tmp_path / "idx")
    assert listing.given == 200 and listing.predicted == result.classified == result.written
    with IndexStore.open(tmp_path / "idx") as store:
        given = store.catalog.labels("given")
        predicted = store.catalog.labels("predicted")
    assert set(given) == set(ids[:200]) and not set(predicted) & set(given)
    # the given labels vote, the predicted ones do not: a second run predicts the same images again
    again = classify_index(tmp_path / "idx", k=10, min_confidence=0.0, write=True)
    assert len(again.ids) == 200 and again.written == 200
    assert list_labels(tmp_path / "idx").predicted == 200


def test_suspects_find_planted_label_flips(tmp_path: Path) -> None:
    x, y = clustered(2000, 8, spread=0.25, seed=7)  # well separated: clean leave-one-out accuracy 0.99
    ids = vector_index(tmp_path / "idx", x)
    rng = np.random.default_rng(8)
    flipped = rng.choice(2000, 100, replace=False)
    given = y.copy()
    given[flipped] = (y[flipped] + rng.integers(1, 8, 100)) % 8
    give(tmp_path / "idx", ids, given)
    suspects = find_suspects(tmp_path / "idx", k=10)
    top = suspects[:100]
    path_to_pos = {f"/synthetic/{i:06d}.jpg": i for i in range(2000)}
    hits = [path_to_pos[s.path] in set(flipped.tolist()) for s in top]
    assert np.mean(hits) >= 0.9
    found = [s for s in top if path_to_pos[s.path] in set(flipped.tolist())]
    right = [s.suggested == f"c{y[path_to_pos[s.path]]}" for s in found]
    assert np.mean(right) >= 0.95  # the neighbours suggest the true class
    shares = [s.label_share for s in suspects]
    assert shares == sorted(shares)


@pytest.mark.parametrize("kind", ["cosine", "whitened"])
def test_eval_matches_numpy_leave_one_out(tmp_path: Path, kind: str) -> None:
    x, y = clustered(500, 5, spread=0.9, seed=9)
    ids = vector_index(tmp_path / "idx", x)
    give(tmp_path / "idx", ids, y)
    report = evaluate_labels(tmp_path / "idx", k=10, transform=kind)
    assert report.transform == kind and report.temperature in GRID_T
    with IndexStore.open(tmp_path / "idx") as store:
        _, x = store.all_vectors()  # what the index holds (float16 on disk), in id order = x's order
    space = brute_space(x, kind)
    for k in (1, 5, 10, 20):
        want = brute_loo_accuracy(space, y, k, report.temperature, 5)
        assert report.accuracy_at_k[k] == pytest.approx(want, abs=1e-6)
    assert report.curve[0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": pytest.approx(report.accuracy_at_k[10])}
    coverages = [row["coverage"] for row in report.curve]
    assert coverages == sorted(coverages, reverse=True)
    assert report.accuracy_at_90_coverage >= report.accuracy_at_k[10] - 1e-9
    assert report.ece < 0.08


def test_whitening_makes_the_sample_white() -> None:
    x, _ = anisotropic(3000, 4, seed=20)
    w = fit_whitening(x)
    assert w is not None and w.kind == "whitened" and w.dims == 16
    z = (np.sign(x) * np.sqrt(np.abs(x)) - w.mean) @ w.projection
    np.testing.assert_allclose(z.T @ z / len(z), np.eye(16), atol=2e-3)
    out = w(x)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert fit_whitening(x[:2]) is None  # too few vectors to fit one


def test_settings_are_chosen_by_leave_one_out_as_numpy_finds(tmp_path: Path) -> None:
    """Auto settings = the grid point of best leave-one-out accuracy (numpy brute force over every
    transform, k and T); on this data it is the whitened space, and it classifies held-out images better."""
    x, y = anisotropic(900, 4, seed=21)
    ids = vector_index(tmp_path / "idx", x)
    give(tmp_path / "idx", ids[:300], y[:300])
    auto = classify_index(tmp_path / "idx")
    info = auto.calibration
    with IndexStore.open(tmp_path / "idx") as store:
        _, stored = store.all_vectors()
        assert store.meta["classifier"]["transform"] == info.transform  # recorded
    best: dict[str, tuple[float, int, float]] = {}
    for kind in ("cosine", "whitened"):
        space = brute_space(stored, kind)[:300]  # the whitening is fitted on every indexed vector
        for k in GRID_K:
            for t in GRID_T:
                acc = brute_loo_accuracy(space, y[:300], k, t, 4)
                if kind not in best or acc > best[kind][0] + 1e-12:
                    best[kind] = (acc, k, t)
    assert [(s["transform"], s["k"], s["temperature"]) for s in info.selection] == [(t, best[t][1], best[t][2]) for t in best]
    for s in info.selection:
        assert s["loo_accuracy"] == pytest.approx(best[s["transform"]][0], abs=1e-6)
    assert info.transform == "whitened" and best["whitened"][0] > best["cosine"][0]
    assert (info.k, info.temperature) == best["whitened"][1:]
    truth = dict(zip(ids, y))

    def accuracy(result) -> float:
        return float(np.mean([truth[int(i)] == int(result.classes[b][1:]) for i, b in zip(result.ids, result.best)]))

    plain = classify_index(tmp_path / "idx", transform="cosine")
    assert plain.calibration.transform == "cosine" and plain.calibration.selection[0]["transform"] == "cosine"
    assert accuracy(auto) > accuracy(plain) + 0.05


def test_no_labels_or_one_class_says_what_is_needed(tmp_path: Path) -> None:
    x, y = clustered(50, 2, seed=10)
    ids = vector_index(tmp_path / "idx", x)
    with pytest.raises(InputError, match="no labels.*at least two classes"):
        classify_index(tmp_path / "idx")
    give(tmp_path / "idx", ids[:10], [0] * 10)
    for call in (classify_index, find_suspects, evaluate_labels):
        with pytest.raises(InputError, match="one class only.*at least two classes"):
            call(tmp_path / "idx")


def test_method_head_on_a_plain_backbone_is_a_clear_error(tmp_path: Path) -> None:
    x, y = clustered(50, 2, seed=11)
    ids = vector_index(tmp_path / "idx", x)
    give(tmp_path / "idx", ids[:20], y[:20])
    with pytest.raises(InputError, match="--method head needs an index built with a simsearch train checkpoint"):
        classify_index(tmp_path / "idx", method="head")
    assert classify_index(tmp_path / "idx", method="auto").method == "knn"


def test_an_index_without_the_labels_table_gains_it(tmp_path: Path) -> None:
    x, _ = clustered(20, 2, seed=12)
    vector_index(tmp_path / "idx", x)
    conn = sqlite3.connect(tmp_path / "idx" / "catalog.db")
    conn.execute("DROP TABLE labels")
    conn.commit()
    conn.close()
    with IndexStore.open(tmp_path / "idx") as store:
        assert "labels" in store.catalog.db.table_names()
        assert store.catalog.counts()["ok"] == 20  # vectors kept, nothing re-embedded


# -- labels of real files: import, and their life through re-indexing ----------------------------
@pytest.fixture
def pets(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    for c, (cls, colour) in enumerate((("cat", (220, 40, 40)), ("dog", (40, 40, 220)))):
        for i in range(4):
            make_image(root / cls / f"{cls}{i}.jpg", color=colour, shape=("ellipse", "rectangle")[c], seed=10 * c + i)
    return root


def labels_by_path(index_dir: Path, source: str = "given") -> dict[str, str]:
    with IndexStore.open(index_dir) as store:
        rows = store.catalog.rows_by_ids(store.catalog.labels(source, ok_only=False))
        return {rows[i].path: label for i, label in store.catalog.labels(source, ok_only=False).items()}


def test_labels_survive_reindex_move_and_change_and_go_with_a_deleted_file(tmp_path: Path, pets: Path) -> None:
    idx = tmp_path / "idx"
    run_index(pets, idx)
    summary = import_labels(pets, idx)
    assert (summary.imported, summary.classes, summary.not_indexed) == (8, 2, [])
    before = labels_by_path(idx)
    assert before[str(pets / "cat" / "cat0.jpg")] == "cat"
    with IndexStore.open(idx) as store:  # a prediction for one image, to see it go when the file changes
        store.write_predictions({store.catalog.row_by_path(str(pets / "dog" / "dog3.jpg")).id: "cat"}, {})
    store_given = {p: l for p, l in before.items() if not p.endswith("dog3.jpg")}
    # unchanged re-index
    run_index(pets, idx)
    assert labels_by_path(idx) == before
    # move: cat0 to another folder; change: cat1 gets new content; delete: dog0; dog3 changes too
    moved = pets / "elsewhere" / "moved_cat0.jpg"
    moved.parent.mkdir()
    os.rename(pets / "cat" / "cat0.jpg", moved)
    make_image(pets / "cat" / "cat1.jpg", color=(10, 200, 10), shape="triangle", seed=99)
    make_image(pets / "dog" / "dog3.jpg", color=(10, 200, 200), shape="stripes", seed=98)
    (pets / "dog" / "dog0.jpg").unlink()
    s = run_index(pets, idx)
    assert (s.moved, s.updated, s.removed) == (1, 2, 1)
    after = labels_by_path(idx)
    assert after[str(moved)] == "cat"  # moved: kept its label
    assert after[str(pets / "cat" / "cat1.jpg")] == "cat"  # re-embedded: given label kept
    assert str(pets / "dog" / "dog0.jpg") not in after  # deleted: label gone
    assert len(after) == 7
    assert labels_by_path(idx, "predicted") == {}  # the stale prediction of the changed dog3 went
    with IndexStore.open(idx) as store:
        orphans = store.catalog.db.execute("SELECT count(*) FROM labels WHERE image_id NOT IN (SELECT id FROM images)").fetchone()[0]
    assert orphans == 0
    assert len(store_given) == 7


def test_csv_import_reports_unindexed_files_and_names_bad_lines(tmp_path: Path, pets: Path) -> None:
    idx = tmp_path / "idx"
    run_index(pets / "cat", idx)
    outside = make_image(tmp_path / "loose.jpg")
    good = tmp_path / "labels.csv"
    good.write_text(f"path,label\npets/cat/cat0.jpg,cat\n{pets / 'cat' / 'cat1.jpg'},kitten\n{outside},dog\n\n# comment\n")
    summary = import_labels(good, idx)
    assert summary.imported == 2 and summary.not_indexed == [str(outside)]
    assert labels_by_path(idx)[str(pets / "cat" / "cat1.jpg")] == "kitten"
    bad_rows = {
        "missing column": ("pets/cat/cat0.jpg,cat\npets/cat/cat2.jpg\n", ":2: expected two columns"),
        "empty label": ("pets/cat/cat0.jpg,cat\n\npets/cat/cat2.jpg, \n", ":3: empty label"),
        "unknown path": ("pets/cat/cat0.jpg,cat\nno/such.jpg,cat\n", ":2: no such file, and not in the index"),
    }
    for name, (text, message) in bad_rows.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.csv"
        bad.write_text(text)
        with pytest.raises(InputError, match=message):
            import_labels(bad, idx)
    assert labels_by_path(idx)[str(pets / "cat" / "cat0.jpg")] == "cat"  # nothing written by a bad file
    assert len(labels_by_path(idx)) == 2


# -- CLI ------------------------------------------------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"SIMSEARCH_INDEX": None}, catch_exceptions=False)


def test_cli_labels_and_classify(tmp_path: Path, pets: Path) -> None:
    idx = tmp_path / "idx"
    assert invoke("index", pets, "--index", idx, *FAST_ARGS, "-q").exit_code == 0
    r = invoke("classify", "--index", idx)
    assert r.exit_code == 1 and "no labels" in r.stderr and "\n" not in r.stderr.strip()
    labels_csv = tmp_path / "l.csv"
    labels_csv.write_text("".join(f"{pets / c / f'{c}{i}.jpg'},{c}\n" for c in ("cat", "dog") for i in range(3)))
    r = invoke("labels", "import", labels_csv, "--index", idx)
    assert r.exit_code == 0 and "imported 6 labels of 2 classes" in r.stdout
    r = invoke("labels", "--index", idx, "--json")
    data = json.loads(r.stdout)
    assert data["given"] == 6 and {c["label"]: c["given"] for c in data["classes"]} == {"cat": 3, "dog": 3}
    r = invoke("classify", "--index", idx, "--k", "3", "--json")
    out = json.loads(r.stdout)
    assert out["images"] == 2 and {p["path"] for p in out["predictions"]} == {str(pets / "cat" / "cat3.jpg"), str(pets / "dog" / "dog3.jpg")}
    r = invoke("classify", "--index", idx, "--k", "3", "--csv", "--write")
    lines = r.stdout.splitlines()
    assert lines[0] == "path,label,confidence,best,vote_share" and len(lines) == 3
    assert "wrote" in r.stderr
    assert json.loads(invoke("labels", "--index", idx, "--json").stdout)["predicted"] >= 0
    r = invoke("classify", "--index", idx, "--k", "3", pets / "cat" / "cat3.jpg")  # an indexed IMAGE
    assert r.exit_code == 0 and r.stdout.endswith(f"{pets / 'cat' / 'cat3.jpg'}\n")
    outside = make_image(tmp_path / "new" / "red.jpg", color=(220, 40, 40), shape="ellipse", seed=77)
    r = invoke("classify", "--index", idx, "--k", "3", "--device", "cpu", "--json", outside)  # embedded with the index's model
    assert r.exit_code == 0, r.stderr
    [p] = json.loads(r.stdout)["predictions"]
    assert p["path"] == str(outside) and p["best"] in ("cat", "dog") and 0 <= p["confidence"] <= 1
    r = invoke("classify", "--index", idx, "--eval", "--json")
    assert set(json.loads(r.stdout)["accuracy_at_k"]) <= {"1", "5", "10", "20", "3", "4", "5"}
    r = invoke("classify", "--index", idx, "--suspects", "--json")
    assert r.exit_code == 0 and isinstance(json.loads(r.stdout), list)
    r = invoke("classify", "--index", idx, "--method", "head")
    assert r.exit_code == 1 and "simsearch train checkpoint" in r.stderr
    assert invoke("classify", "--index", idx, "--eval", "--suspects").exit_code == 2
    r = invoke("labels", "clear", "--index", idx, "--source", "all")
    assert r.exit_code == 0 and json.loads(invoke("labels", "--index", idx, "--json").stdout)["given"] == 0


def test_classify_of_stored_vectors_does_not_import_torch(tmp_path: Path) -> None:
    x, y = clustered(100, 3, seed=13)
    ids = vector_index(tmp_path / "idx", x)
    give(tmp_path / "idx", ids[:50], y[:50])
    code = (
        "import sys\n"
        "from simsearch.cli import cli\n"
        f"for args in (['labels'], ['classify'], ['classify', '--eval'], ['classify', '--suspects']):\n"
        f"    try:\n"
        f"        cli(args + ['--index', {str(tmp_path / 'idx')!r}])\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "False"


# -- the trained head (--method head) ---------------------------------------------------------------
def trained_checkpoint(tmp_path: Path, loss: str) -> tuple[Path, Path]:
    """Generated shape images (3 classes) and a seeded random ResNet-18 with a head trained on them for one epoch."""
    from simsearch.train import TrainConfig, train

    data = tmp_path / "shapes"
    for c, shape in enumerate(("ellipse", "rectangle", "triangle")):
        for i in range(6):
            make_image(data / shape / f"{i}.png", size=(64, 64), color=(60 + 30 * i, 200 - 20 * c, 90), shape=shape, seed=100 * c + i)
    config = TrainConfig(
        model="resnet18", weights="random", dim=16, epochs=1, batch_size=32, workers=0, image_size=64,
        loss=loss, head_init="random", val_fraction=0.0, phases="head", device="cpu",
    )
    out = tmp_path / f"{loss}.pt"
    train(data, out, config)
    return data, out


@pytest.mark.parametrize("loss", ["supcon", "arcface"])
def test_method_head_classifies_by_the_checkpoints_class_proxies(tmp_path: Path, loss: str) -> None:
    from simsearch.models.checkpoint import load_checkpoint

    data, out = trained_checkpoint(tmp_path, loss)
    state = load_checkpoint(out)
    recorded = state["classifier"]
    names = recorded["class_names"]
    proxies = recorded["proxies"].numpy()
    assert names == ["ellipse", "rectangle", "triangle"] and proxies.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(proxies, axis=1), 1.0, rtol=1e-5)
    idx = tmp_path / "idx"
    assert invoke("index", data, "--index", idx, "--weights", out, "--workers", "0", "--device", "cpu", "-q").exit_code == 0
    with IndexStore.open(idx) as store:
        ids, stored = store.all_vectors()
        path_of = {int(i): r.path for i, r in store.catalog.rows_by_ids(ids.tolist()).items()}
    truth = np.array([names.index(Path(path_of[int(i)]).parent.name) for i in ids])
    if loss == "supcon":  # no proxies in the loss: the class means of the training embeddings
        assert recorded["source"] == "class means of the training embeddings"
        means = np.stack([stored[truth == c].mean(axis=0) for c in range(3)])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        assert np.all(np.sum(means * proxies, axis=1) > 0.99)
    else:
        assert recorded["source"] == "proxies of the arcface loss"

    # no labels: the head needs none; every image goes to its nearest proxy (numpy), uncalibrated
    result = classify_index(idx, method="head")
    assert result.method == "head" and result.classes == names and list(result.ids) == list(ids)
    cos = stored.astype(np.float64) @ proxies.T.astype(np.float64)
    np.testing.assert_array_equal(result.best, cos.argmax(axis=1))
    p = np.exp((cos - cos.max(axis=1, keepdims=True)) / 0.05)
    np.testing.assert_allclose(result.vote_share, (p / p.sum(axis=1, keepdims=True)).max(axis=1), rtol=1e-4)
    np.testing.assert_allclose(result.confidence, result.vote_share, rtol=1e-6)
    assert result.calibration.fitted_on == 0 and result.calibration.loo_accuracy is None
    assert classify_index(idx, method="auto").method == "head"  # no labels to vote with

    # with labels of half the images: calibrated on them, the other half classified
    give_paths = {path_of[int(i)]: names[t] for n, (i, t) in enumerate(zip(ids, truth)) if n % 2 == 0}
    with IndexStore.open(idx) as store:
        store.import_labels({store.catalog.row_by_path(p).id: label for p, label in give_paths.items()})
    result = classify_index(idx, method="head", write=True)
    labelled = np.array([n % 2 == 0 for n in range(len(ids))])
    assert sorted(result.ids.tolist()) == sorted(ids[~labelled].tolist()) and result.written == len(result.ids)
    assert result.calibration.fitted_on == labelled.sum()
    assert result.calibration.loo_accuracy == pytest.approx(float(np.mean(cos[labelled].argmax(axis=1) == truth[labelled])), abs=1e-6)
    knn = classify_index(idx, method="knn")
    auto = classify_index(idx, method="auto")
    assert auto.method == ("head" if result.calibration.loo_accuracy >= knn.calibration.loo_accuracy else "knn")
    r = invoke("classify", "--index", idx, "--method", "head", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["method"] == "head"
    assert "head (" in invoke("classify", "--index", idx, "--method", "head").stderr


def test_method_head_with_a_checkpoint_without_proxies(tmp_path: Path) -> None:
    """A checkpoint written before the proxies were recorded: head is a clear error, auto is kNN."""
    import torch

    data, out = trained_checkpoint(tmp_path, "supcon")
    state = torch.load(out, weights_only=True)
    del state["classifier"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    idx = tmp_path / "idx"
    assert invoke("index", data, "--index", idx, "--weights", old, "--workers", "0", "--device", "cpu", "-q").exit_code == 0
    import_labels(data, idx)
    with pytest.raises(InputError, match="does not record.*train again with this version, or use --method knn"):
        classify_index(idx, method="head")
    r = invoke("classify", "--index", idx, "--method", "head")
    assert r.exit_code == 1 and "class proxies" in r.stderr
    assert classify_index(idx, method="auto", k=3).method == "knn"


def test_classify_html_groups_thumbnails_by_predicted_class(tmp_path: Path, pets: Path) -> None:
    import html as html_lib
    import re

    from simsearch.report import write_classify_html

    idx = tmp_path / "idx"
    run_index(pets, idx)
    labels_csv = tmp_path / "l.csv"
    labels_csv.write_text("".join(f"{pets / c / f'{c}{i}.jpg'},{c}\n" for c in ("cat", "dog") for i in range(2)))
    import_labels(labels_csv, idx)
    page = tmp_path / "classes.html"
    r = invoke("classify", "--index", idx, "--k", "3", "--html", page, "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    text = page.read_text()
    sections = re.findall(r'<section class="class" data-label="([^"]*)" data-abstained="(\w+)">(.*?)</section>', text, re.S)
    by_label = {label: body for label, abstained, body in sections if abstained == "false"}
    assert set(by_label) == set(out["by_class"])  # one section per predicted class, named
    for p in out["predictions"]:
        body = by_label[p["label"]]
        assert f'data-path="{html_lib.escape(p["path"], quote=True)}"' in body  # each image under its class
        assert f'data-score="{p["confidence"]:.4f}"' in body
    assert text.count("<figure") == len(out["predictions"]) == 4
    assert text.count('src="data:image/jpeg;base64,') == 4  # thumbnails inline

    # abstentions get their own section with the best guess; per_class caps what is shown
    result = classify_index(idx, k=3)
    result.min_confidence = float(np.median(result.confidence)) + 1e-6  # half of them, at least, abstain
    assert result.abstained >= 2
    write_classify_html(idx, result, page, per_class=1)
    text = page.read_text()
    assert 'data-abstained="true"' in text and "best guess: " in text and "Abstained" in text
    assert text.count("<figure") == text.count('<section class="class"') == 1 + len(result.summary()["by_class"])
    assert f"{result.abstained} images (confidence shown), the 1 most confident shown, {result.abstained - 1} more" in text
    assert invoke("classify", "--index", idx, "--suspects", "--html", page).exit_code == 2


def test_a_trained_model_is_calibrated_on_labelled_images_it_never_saw(tmp_path: Path, monkeypatch) -> None:
    """The checkpoint records the content hashes of its training images; classify, its evaluation and
    the head's calibration leave those out (they still vote) when enough others are labelled."""
    import torch

    import simsearch.classify as classify_module
    from simsearch.classify import load_labelled
    from simsearch.images import hash_file

    data, out = trained_checkpoint(tmp_path, "arcface")
    files = sorted(data.rglob("*.png"))
    state = torch.load(out, weights_only=True)
    assert sorted(state["classifier"]["trained_on"]) == sorted({hash_file(f) for f in files})  # val_fraction 0: all
    # say the model saw only the first four images of each class: 6 of the 18 labelled ones are new to it
    seen_files = [f for f in files if int(f.stem) < 4]
    state["classifier"]["trained_on"] = sorted(hash_file(f) for f in seen_files)
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    idx = tmp_path / "idx"
    assert invoke("index", data, "--index", idx, "--weights", partial, "--workers", "0", "--device", "cpu", "-q").exit_code == 0
    import_labels(data, idx)
    with IndexStore.open(idx) as store:
        labelled = load_labelled(store)
        rows = store.catalog.rows_by_ids(labelled.ids.tolist())
    assert labelled.seen is not None
    assert sorted(rows[int(i)].path for i, s in zip(labelled.ids, labelled.seen) if s) == sorted(str(f.resolve()) for f in seen_files)

    monkeypatch.setattr(classify_module, "MIN_HELD_OUT", 5)
    result = classify_index(idx, [files[0]], method="knn", device="cpu")
    knn = result.calibration
    assert knn.fitted_on == 6 and knn.calibrated_on == "labelled images the model was not trained on"
    assert result.summary()["calibration"]["calibrated_on"] == knn.calibrated_on  # in --json and the summary line
    report = evaluate_labels(idx)
    assert report.labelled == 18 and report.evaluated == 6
    head = classify_index(idx, [files[0]], method="head", device="cpu").calibration
    assert head.fitted_on == 6 and "not trained on" in head.calibrated_on

    monkeypatch.setattr(classify_module, "MIN_HELD_OUT", 7)  # too few new images: all of them, said to be optimistic
    with IndexStore.open(idx) as store:
        store.record_classifier({})  # the recorded choice would be reused otherwise
    knn = classify_index(idx, [files[0]], method="knn", device="cpu").calibration
    assert knn.fitted_on == 18 and "optimistic" in knn.calibrated_on
    assert evaluate_labels(idx).evaluated == 18
