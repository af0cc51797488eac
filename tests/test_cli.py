"""The click CLI: outputs, --json shapes, exit codes (0 ok, 1 error, 2 usage), stdout vs stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import FAST_ARGS, make_collection, make_image
from simsearch.cli import cli
from simsearch.store import IndexStore

N = 6


def invoke(*args, env=None, **kwargs):
    """Run the CLI in-process; SIMSEARCH_INDEX is unset unless ``env`` sets it."""
    env = {"SIMSEARCH_INDEX": None, **(env or {})}
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False, **kwargs)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in err, err
    assert result.stdout == ""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A collection with two bad files, indexed once through the CLI."""
    base = tmp_path_factory.mktemp("cli")
    photos = base / "photos"
    make_collection(photos, n=N)
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "words.png").write_text("no pixels here")
    index_dir = base / "idx"
    first = invoke("index", photos, "--index", index_dir, *FAST_ARGS)
    return base, photos, index_dir, first


def test_index_summary_on_stdout_progress_on_stderr(site) -> None:
    _, _, index_dir, first = site
    assert first.exit_code == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    assert lines[0] == f"added {N}, updated 0, moved 0, removed 0, unchanged 0, failed 2"
    assert lines[1].startswith(f"{N} images indexed, 2 failed, in {index_dir}")
    assert "img/s" not in first.stdout and "%|" not in first.stdout  # no progress bar on stdout
    assert "indexing" in first.stderr and "img/s" in first.stderr  # it is on stderr
    assert "--show-failed" in first.stderr
    assert "zero.jpg" in first.stderr  # the skipped files are warned about on stderr


def test_index_again_quiet_and_json(site) -> None:
    _, photos, index_dir, _ = site
    quiet = invoke("index", photos, "--index", index_dir, *FAST_ARGS, "--quiet")
    assert quiet.exit_code == 0
    assert quiet.stdout.startswith(f"added 0, updated 0, moved 0, removed 0, unchanged {N + 2}, failed 0")
    assert quiet.stderr == ""  # nothing to embed, nothing to warn about, no bar
    data = json.loads(invoke("index", photos, "--index", index_dir, *FAST_ARGS, "--json", "-q").stdout)
    assert {"added", "updated", "moved", "removed", "unchanged", "failed", "total_indexed", "total_failed"} <= set(data)
    assert (data["unchanged"], data["total_indexed"], data["total_failed"]) == (N + 2, N, 2)


def test_quiet_silences_progress_during_real_work(tmp_path: Path) -> None:
    make_collection(tmp_path / "p", n=2)
    result = invoke("index", tmp_path / "p", "--index", tmp_path / "idx", *FAST_ARGS, "-q")
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.startswith("added 2,")


def test_show_failed_and_info_failed(site) -> None:
    _, photos, index_dir, _ = site
    for args in (["index", "--show-failed"], ["info", "--failed"]):
        text = invoke(*args, "--index", index_dir)
        assert text.exit_code == 0
        rows = dict(line.split("\t") for line in text.stdout.strip().splitlines())
        assert set(rows) == {str(photos / "zero.jpg"), str(photos / "words.png")}
        assert "empty" in rows[str(photos / "zero.jpg")]
        data = json.loads(invoke(*args, "--index", index_dir, "--json").stdout)
        assert sorted(Path(d["path"]).name for d in data) == ["words.png", "zero.jpg"]
        assert all(d["error"] for d in data)


def test_query_json_shape(site) -> None:
    base, photos, index_dir, _ = site
    probe = make_image(base / "probe.jpg", color=(250, 250, 0), shape="triangle", seed=9)
    own = photos / "a" / "img000.jpg"
    result = invoke("query", probe, own, "--index", index_dir, "-k", "3", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [d["query"] for d in data] == [str(probe), str(own)]
    for entry in data:
        assert set(entry) == {"query", "results"}
        assert [r["rank"] for r in entry["results"]] == [1, 2, 3]
        for r in entry["results"]:
            assert set(r) == {"rank", "score", "path", "width", "height"}
            assert isinstance(r["score"], float) and -1.0 <= r["score"] <= 1.0001
            assert (r["width"], r["height"]) == (160, 120)
        scores = [r["score"] for r in entry["results"]]
        assert scores == sorted(scores, reverse=True)
    assert str(own) not in [r["path"] for r in data[1]["results"]]  # self excluded by default


def test_query_table_include_self_and_threshold(site) -> None:
    _, photos, index_dir, _ = site
    own = photos / "b" / "c" / "img001.jpg"
    result = invoke("query", own, "--index", index_dir, "-k", "2", "--include-self", "--device", "cpu")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"query: {own}"
    rank, score, size, path = lines[1].split()
    assert (rank, size, path) == ("1", "160x120", str(own)) and float(score) > 0.9999
    assert len(lines) == 3
    none = invoke("query", own, "--index", index_dir, "--threshold", "1.0", "--device", "cpu")
    assert none.exit_code == 0 and "(no results)" in none.stdout


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("missing.jpg", None, ["query image not found", "missing.jpg"]),
        ("fake.jpg", b"hello, not pixels", ["fake.jpg", "not an image"]),
        ("void.png", b"", ["void.png", "empty"]),
    ],
    ids=["missing", "not-an-image", "zero-bytes"],
)
def test_query_bad_query_file(site, tmp_path: Path, name, content, fragments) -> None:
    _, _, index_dir, _ = site
    if content is not None:
        (tmp_path / name).write_bytes(content)
    result = invoke("query", tmp_path / name, "--index", index_dir, "--device", "cpu")
    assert_one_line_error(result, *fragments)
    assert "BytesIO" not in result.stderr


def test_no_index_and_empty_index(tmp_path: Path) -> None:
    probe = make_image(tmp_path / "probe.jpg")
    for args in (["query", probe], ["cluster", "-k", "2"], ["info"], ["index", "--show-failed"]):
        assert_one_line_error(invoke(*args, "--index", tmp_path / "nowhere"), "no index at")
    (tmp_path / "empty").mkdir()
    assert invoke("index", tmp_path / "empty", "--index", tmp_path / "idx", *FAST_ARGS).exit_code == 0
    assert_one_line_error(invoke("query", probe, "--index", tmp_path / "idx"), "holds no images")
    assert_one_line_error(invoke("cluster", "-k", "2", "--index", tmp_path / "idx"), "holds no images")
    info = invoke("info", "--index", tmp_path / "idx")
    assert info.exit_code == 0 and "indexed: 0" in info.stdout


def test_usage_errors_exit_2(site, tmp_path: Path) -> None:
    _, _, index_dir, _ = site
    assert invoke("query", "--index", index_dir).exit_code == 2  # no IMAGE
    assert invoke("index", "--index", index_dir).exit_code == 2  # no FOLDER
    assert invoke("index", tmp_path / "does-not-exist", "--index", index_dir).exit_code == 2
    assert invoke("cluster", "-k", "0", "--index", index_dir).exit_code == 2
    assert invoke("query", "x.jpg", "-k", "0", "--index", index_dir).exit_code == 2
    assert invoke("index", tmp_path, "--device", "tpu").exit_code == 2
    assert invoke("frobnicate").exit_code == 2


def test_cluster_outputs(site, capfd) -> None:
    _, _, index_dir, _ = site
    result = invoke("cluster", "-k", "2", "--seed", "3", "-r", "2", "--index", index_dir)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"2 clusters of {N} images (seed 3, 25 iterations")
    headers = [line for line in lines if line.startswith("cluster ")]
    assert len(headers) == 2
    assert sum(int(h.split(": ")[1].split()[0]) for h in headers) == N
    assert result.stderr == ""
    assert "WARNING" not in capfd.readouterr().err  # faiss writes to fd 2 directly; no small-collection warning
    data = json.loads(invoke("cluster", "--index", index_dir, "--json").stdout)  # stored result, no -k
    assert (data["k"], data["n"], data["seed"]) == (2, N, 3)
    assert sum(c["size"] for c in data["clusters"]) == N
    for c in data["clusters"]:
        dists = [m["distance"] for m in c["representatives"]]
        assert dists == sorted(dists)
    show = invoke("cluster", "--show", "0", "--index", index_dir)
    assert show.exit_code == 0
    size0 = next(c["size"] for c in data["clusters"] if c["cluster"] == 0)
    assert len(show.stdout.strip().splitlines()) == size0
    members = json.loads(invoke("cluster", "--show", "0", "--index", index_dir, "--json").stdout)
    assert len(members) == size0 and {"path", "distance"} <= set(members[0])
    assert_one_line_error(invoke("cluster", "--show", "7", "--index", index_dir), "no cluster 7")
    assert_one_line_error(invoke("cluster", "-k", str(N + 1), "--index", index_dir), f"cannot make {N + 1} clusters")


def test_info_text_and_json(site) -> None:
    _, photos, index_dir, _ = site
    text = invoke("info", "--index", index_dir)
    assert text.exit_code == 0
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.stdout.splitlines())}
    assert fields["index"] == str(index_dir.resolve())
    assert fields["model"] == "resnet18 (random:seed=0)"
    assert fields["dim"] == "512" and fields["indexed"] == str(N) and fields["failed"] == "2"
    assert fields["consistent"] == "yes" and fields["computed in"] == "fp32"
    assert fields["size on disk"].endswith("iB") or fields["size on disk"].endswith(" B")
    data = json.loads(invoke("info", "--index", index_dir, "--json").stdout)
    assert (data["model"], data["dim"], data["indexed"], data["failed"], data["faiss_vectors"]) == ("resnet18", 512, N, 2, N)
    assert data["consistent"] is True and data["size_bytes"] > 0 and data["updated_at"]
    assert data["roots"] == [str(photos)] and data["precisions"] == ["fp32"]


def test_precision_option_reaches_the_model_and_is_recorded(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_collection(photos, n=3)
    index_dir = tmp_path / "idx"
    assert invoke("index", photos, "--index", index_dir, *FAST_ARGS, "--precision", "bf16", "-q").exit_code == 0
    make_image(photos / "late.png", color=(10, 200, 10), seed=9)
    assert invoke("index", photos, "--index", index_dir, *FAST_ARGS, "--precision", "fp32", "-q").exit_code == 0
    assert json.loads(invoke("info", "--index", index_dir, "--json").stdout)["precisions"] == ["bf16", "fp32"]
    for cmd in ("index", "query"):
        assert invoke(cmd, photos, "--index", index_dir, "--precision", "fp8").exit_code == 2
    hit = json.loads(invoke("query", photos / "late.png", "--index", index_dir, "--precision", "bf16", "-k", "1", "--json").stdout)
    assert len(hit[0]["results"]) == 1


def test_models_listing() -> None:
    text = invoke("models")
    assert text.exit_code == 0
    rows = {line.split()[0]: line.split()[1] for line in text.stdout.splitlines()}
    assert rows["resnet18"] == "512-d" and rows["resnet34"] == "512-d"
    assert rows["resnet50"] == rows["resnet101"] == rows["resnet152"] == "2048-d"
    data = {d["model"]: d for d in json.loads(invoke("models", "--json").stdout)}
    assert data["resnet50"]["dim"] == 2048 and data["resnet18"]["crop"] == 224


def test_model_mismatch_refused_unless_rebuild(tmp_path: Path) -> None:
    make_collection(tmp_path / "p", n=2)
    base = ["index", tmp_path / "p", "--index", tmp_path / "idx", "--weights", "random", "--workers", "0", "--device", "cpu", "-q"]
    assert invoke(*base, "--model", "resnet18").exit_code == 0
    refused = invoke(*base, "--model", "resnet34")
    assert_one_line_error(refused, "--rebuild", "resnet18", "resnet34")
    assert invoke(*base, "--model", "resnet18", "--seed", "1").exit_code == 1  # other random weights: also a mismatch
    rebuilt = invoke(*base, "--model", "resnet34", "--rebuild")
    assert rebuilt.exit_code == 0 and rebuilt.stdout.startswith("added 2,")
    assert json.loads(invoke("info", "--index", tmp_path / "idx", "--json").stdout)["model"] == "resnet34"


def test_index_location_env_var_and_override(tmp_path: Path, monkeypatch) -> None:
    make_collection(tmp_path / "p", n=1)
    monkeypatch.chdir(tmp_path)
    # default: ./index_data relative to the working directory
    assert invoke("index", "p", *FAST_ARGS, "-q").exit_code == 0
    assert (tmp_path / "index_data" / "catalog.db").exists()
    # SIMSEARCH_INDEX moves it
    env_dir = tmp_path / "from_env"
    assert invoke("index", "p", *FAST_ARGS, "-q", env={"SIMSEARCH_INDEX": str(env_dir)}).exit_code == 0
    assert json.loads(invoke("info", "--json", env={"SIMSEARCH_INDEX": str(env_dir)}).stdout)["index"] == str(env_dir)
    # --index wins over the environment
    flag_dir = tmp_path / "from_flag"
    assert invoke("index", "p", "--index", flag_dir, *FAST_ARGS, "-q", env={"SIMSEARCH_INDEX": str(env_dir)}).exit_code == 0
    info = json.loads(invoke("info", "--json", "--index", flag_dir, env={"SIMSEARCH_INDEX": str(env_dir)}).stdout)
    assert info["index"] == str(flag_dir)


def test_index_repair(tmp_path: Path) -> None:
    make_collection(tmp_path / "p", n=3)
    index_dir = tmp_path / "idx"
    assert invoke("index", tmp_path / "p", "--index", index_dir, *FAST_ARGS, "-q").exit_code == 0
    with IndexStore.open(index_dir) as store:
        store.ann.remove(store.ann.ids()[:2])
        store.ann.save(store.ann_path)
    info = invoke("info", "--index", index_dir)
    assert "NO - run: simsearch index --repair" in info.stdout
    repaired = invoke("index", "--repair", "--index", index_dir)
    assert repaired.exit_code == 0 and repaired.stdout.startswith("repaired 2 ids; 3 images indexed")
    assert json.loads(invoke("info", "--json", "--index", index_dir).stdout)["consistent"] is True


def test_version_and_help() -> None:
    assert invoke("--version").stdout.startswith("simsearch")
    for cmd in ("index", "query", "cluster", "info", "models"):
        assert invoke(cmd, "--help").exit_code == 0


def test_os_errors_are_one_line(tmp_path: Path) -> None:
    make_collection(tmp_path / "p", n=1)
    (tmp_path / "a_file").write_text("")
    result = invoke("index", tmp_path / "p", "--index", tmp_path / "a_file" / "idx", *FAST_ARGS, "-q")
    assert_one_line_error(result, "a_file")
