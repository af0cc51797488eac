"""The HTTP API of ``simsearch serve``, in process (FastAPI's TestClient), over small generated indexes."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import make_collection, make_image, run_index  # noqa: E402
from simsearch.serve import create_app  # noqa: E402
from simsearch.store import IndexStore  # noqa: E402


def _build(root: Path, index_dir: Path, n: int = 12, clusters: int | None = 3) -> None:
    make_collection(root, n=n)
    run_index(root, index_dir)
    if clusters:
        from simsearch.cluster import cluster_index

        cluster_index(index_dir, clusters, device="cpu")


def _stored(index_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    with IndexStore.open(index_dir) as store:
        ids, vectors = store.all_vectors()
        paths = {r.id: r.path for r in store.catalog.rows("status = 'ok'")}
    return ids, vectors, paths


def _brute_force(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int, skip: set[int]) -> list[int]:
    scores = vectors @ query
    order = [int(ids[i]) for i in np.argsort(-scores, kind="stable") if int(ids[i]) not in skip]
    return order[:k]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    _build(base / "photos", base / "index")
    return base


@pytest.fixture(scope="module")
def client(site):
    with TestClient(create_app(site / "index", device="cpu")) as c:
        yield c


def _jpeg(path: Path) -> bytes:
    return path.read_bytes()


# -- search -----------------------------------------------------------------------------------


def test_search_by_id_matches_brute_force(site, client) -> None:
    ids, vectors, paths = _stored(site / "index")
    for row in (0, 5, 11):
        qid = int(ids[row])
        body = client.get("/api/search", params={"id": qid, "k": 5}).json()
        got = [r["id"] for r in body["results"]]
        assert got == _brute_force(ids, vectors, vectors[row], 5, {qid})
        assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
        assert body["query"]["id"] == qid and body["query"]["path"] == paths[qid]
        assert all(r["path"] == paths[r["id"]] for r in body["results"])
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, [float(vectors[list(ids).index(i)] @ vectors[row]) for i in got], atol=1e-5)


def test_search_include_self_and_threshold(site, client) -> None:
    ids, vectors, _ = _stored(site / "index")
    qid = int(ids[3])
    body = client.get("/api/search", params={"id": qid, "k": 3, "include_self": "true"}).json()
    assert body["results"][0]["id"] == qid and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    all_scores = sorted((vectors @ vectors[3]).tolist(), reverse=True)[1:]
    cut = all_scores[4]  # exactly five others reach it
    body = client.get("/api/search", params={"id": qid, "k": 50, "threshold": cut}).json()
    assert len(body["results"]) == 5 and all(r["score"] >= cut - 1e-6 for r in body["results"])


def test_search_by_path_is_search_by_id(site, client) -> None:
    ids, _, paths = _stored(site / "index")
    qid = int(ids[7])
    by_path = client.get("/api/search", params={"path": paths[qid], "k": 4}).json()
    by_id = client.get("/api/search", params={"id": qid, "k": 4}).json()
    assert by_path == by_id


@pytest.mark.parametrize(
    "params, status, fragment",
    [
        ({}, 400, "exactly one of id or path"),
        ({"id": 1, "path": "/x.jpg"}, 400, "exactly one"),
        ({"id": "abc"}, 400, "id"),
        ({"id": 1, "k": 0}, 400, "k"),
        ({"id": 1, "k": 100000}, 400, "k"),
        ({"id": 1, "threshold": 2}, 400, "threshold"),
        ({"id": 999999}, 404, "no indexed image with id 999999"),
        ({"id": -1}, 404, "no indexed image"),
        ({"path": "photos/a/img000.jpg"}, 400, "absolute path"),
        ({"path": "/nowhere/img000.jpg"}, 404, "no indexed image at"),
        ({"path": "/etc/passwd"}, 404, "no indexed image at"),
        ({"path": "/tmp/../etc/passwd"}, 400, ".."),
        ({"path": "/a\x00b.jpg"}, 400, "NUL"),
    ],
)
def test_search_bad_input(client, params, status, fragment) -> None:
    r = client.get("/api/search", params=params)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_search_by_path_with_dot_dot_to_an_indexed_file_is_refused(site, client) -> None:
    _, _, paths = _stored(site / "index")
    path = next(p for p in paths.values() if "/a/" in p)
    sneaky = path.replace("/a/", "/a/../a/")
    assert client.get("/api/search", params={"path": sneaky}).status_code == 400


def test_upload_finds_the_image_itself_and_its_neighbours(site, client) -> None:
    ids, vectors, paths = _stored(site / "index")
    qid = int(ids[4])
    data = Path(paths[qid]).read_bytes()
    files = {"image": ("q.jpg", data, "image/jpeg")}
    with_self = client.post("/api/search", params={"k": 3, "include_self": "true"}, files=files).json()
    assert with_self["results"][0]["id"] == qid
    assert with_self["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    without = client.post("/api/search", params={"k": 5}, files=files).json()
    assert qid not in [r["id"] for r in without["results"]]
    by_id = client.get("/api/search", params={"id": qid, "k": 5}).json()
    assert [r["id"] for r in without["results"]] == [r["id"] for r in by_id["results"]]
    assert without["query"] == {"upload": "q.jpg"}


def test_upload_of_an_image_from_outside_the_index(site, client, tmp_path) -> None:
    ids, vectors, paths = _stored(site / "index")
    outside = make_image(tmp_path / "new.png", color=(10, 200, 90), shape="triangle", seed=77)
    r = client.post("/api/search", params={"k": 12}, files={"image": ("new.png", outside.read_bytes(), "image/png")})
    assert r.status_code == 200
    assert sorted(x["id"] for x in r.json()["results"]) == sorted(int(i) for i in ids)  # k = everything


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")  # 9 MP of zeros, a few kB compressed
    return buf.getvalue()


@pytest.mark.parametrize(
    "files, status, fragment",
    [
        ({"image": ("notes.txt", b"hello, I am not a picture", "text/plain")}, 400, "not an image"),
        ({"image": ("empty.jpg", b"", "image/jpeg")}, 400, "empty"),
        ({"image": ("trunc.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg")}, 400, "trunc.jpg"),
        ({"other": ("x.jpg", b"123", "image/jpeg")}, 400, "image"),
        ({"image": ("bomb.png", _bomb(), "image/png")}, 400, "over the limit"),
    ],
)
def test_upload_bad_input(site, files, status, fragment) -> None:
    app = create_app(site / "index", device="cpu", max_pixels=4_000_000)
    with TestClient(app) as c:
        r = c.post("/api/search", files=files)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_upload_too_large_is_413(site) -> None:
    app = create_app(site / "index", device="cpu", max_upload_bytes=2000)
    with TestClient(app) as c:
        big = c.post("/api/search", files={"image": ("big.jpg", os.urandom(200_000), "image/jpeg")})
        assert big.status_code == 413 and "upload limit" in big.json()["error"]
        just_over = c.post("/api/search", files={"image": ("big.jpg", b"\xff" * 2500, "image/jpeg")})
        assert just_over.status_code == 413 and "limit" in just_over.json()["error"]

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(100):
                yield b"x" * 10_000

        streamed = c.post("/api/search", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert streamed.status_code == 413


# -- images -----------------------------------------------------------------------------------


def test_image_metadata_thumbnail_and_original(site, client) -> None:
    ids, _, paths = _stored(site / "index")
    qid = int(ids[2])
    meta = client.get(f"/api/images/{qid}").json()
    assert meta["path"] == paths[qid] and meta["width"] == 160 and meta["height"] == 120
    assert meta["cluster"] in (0, 1, 2) and meta["size"] == Path(paths[qid]).stat().st_size
    thumb = client.get(f"/api/images/{qid}/thumbnail", params={"size": 64})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(thumb.content))
    assert max(img.size) == 64 and img.size == (64, 48)
    original = client.get(f"/api/images/{qid}/file")
    assert original.status_code == 200 and original.content == Path(paths[qid]).read_bytes()
    assert original.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    "url, statuses",
    [
        ("/api/images/999999", (404,)),
        ("/api/images/999999/thumbnail", (404,)),
        ("/api/images/999999/file", (404,)),
        ("/api/images/-3/file", (400,)),
        ("/api/images/abc/file", (400,)),
        ("/api/images/1/thumbnail?size=0", (400,)),
        ("/api/images/1/thumbnail?size=99999", (400,)),
        ("/api/images/%2Fetc%2Fpasswd/file", (400, 404)),
        ("/api/images/..%2F..%2F..%2Fetc%2Fpasswd/file", (400, 404)),
        ("/api/images/%2e%2e/%2e%2e/etc/passwd", (400, 404)),
        ("/api/images/1/file/../../../../etc/passwd", (400, 404)),
        ("/api/images/1%00/file", (400, 404)),
        ("/static/..%2F..%2Fstate.py", (404,)),
        ("/static/%2e%2e%2fstate.py", (404,)),
        ("/static/../serve/state.py", (404,)),
        ("/static/..%252Fstate.py", (404,)),
        ("/static/index.html%00.js", (404,)),
        ("/etc/passwd", (404,)),
    ],
)
def test_no_path_reaches_the_disk(client, url, statuses) -> None:
    r = client.get(url)
    assert r.status_code in statuses, (url, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert "root:" not in r.text and "ServeIndex" not in r.text


def test_files_changed_or_swapped_for_symlinks_are_not_served(tmp_path) -> None:
    _build(tmp_path / "photos", tmp_path / "index", clusters=None)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0 the secret")
    outside = make_image(tmp_path / "elsewhere" / "out.jpg", seed=99)
    ids, _, paths = _stored(tmp_path / "index")
    victims = [int(i) for i in ids[:4]]
    os.remove(paths[victims[0]])
    os.symlink(secret, paths[victims[0]])  # an indexed file swapped for a link out of the folder
    os.remove(paths[victims[1]])
    os.symlink(outside, paths[victims[1]])  # ... to an image outside
    make_image(Path(paths[victims[2]]), seed=1234, color=(1, 2, 3))  # rewritten since indexing
    os.remove(paths[victims[3]])  # gone
    with TestClient(create_app(tmp_path / "index", device="cpu")) as c:
        for vid in victims:
            for what in ("file", "thumbnail"):
                r = c.get(f"/api/images/{vid}/{what}")
                assert r.status_code == 404, (vid, what, r.text)
                assert "root:" not in r.text and "changed since it was indexed" in r.json()["error"]
        fine = int(ids[5])
        assert c.get(f"/api/images/{fine}/file").content == Path(paths[fine]).read_bytes()


def test_a_symlinked_folder_outside_the_roots_is_not_served(tmp_path) -> None:
    """A catalog row whose path is not under a recorded root (a forged or stale row) is never read."""
    _build(tmp_path / "photos", tmp_path / "index", clusters=None)
    ids, _, paths = _stored(tmp_path / "index")
    with IndexStore.open(tmp_path / "index") as store:
        meta_roots = store.meta["roots"]
        store.catalog.set_meta({"roots": [str(tmp_path / "photos" / "b")]})
    try:
        with TestClient(create_app(tmp_path / "index", device="cpu")) as c:
            in_a = next(int(i) for i in ids if "/a/" in paths[int(i)])
            in_b = next(int(i) for i in ids if "/b/" in paths[int(i)])
            assert c.get(f"/api/images/{in_a}/file").status_code == 404
            assert c.get(f"/api/images/{in_b}/file").status_code == 200
    finally:
        with IndexStore.open(tmp_path / "index") as store:
            store.catalog.set_meta({"roots": meta_roots})


# -- clusters and info ------------------------------------------------------------------------


def test_clusters_sizes_representatives_and_paged_members(site, client) -> None:
    with IndexStore.open(site / "index") as store:
        sizes = store.catalog.cluster_sizes()
        full = {c: [r.id for r, _ in store.catalog.cluster_members(c)] for c in sizes}
    body = client.get("/api/clusters", params={"representatives": 2}).json()
    assert body["clustering"]["k"] == 3
    assert {c["cluster"]: c["size"] for c in body["clusters"]} == sizes
    assert sum(c["size"] for c in body["clusters"]) == 12
    assert [c["size"] for c in body["clusters"]] == sorted(sizes.values(), reverse=True)
    for c in body["clusters"]:
        assert [m["id"] for m in c["representatives"]] == full[c["cluster"]][:2]
    biggest = body["clusters"][0]["cluster"]
    pages, offset = [], 0
    while True:
        page = client.get(f"/api/clusters/{biggest}", params={"offset": offset, "limit": 2}).json()
        if not page["members"]:
            break
        pages.extend(m["id"] for m in page["members"])
        offset += 2
    assert pages == full[biggest]
    distances = [m["distance"] for m in client.get(f"/api/clusters/{biggest}").json()["members"]]
    assert distances == sorted(distances)


@pytest.mark.parametrize(
    "url, status", [("/api/clusters/7", 404), ("/api/clusters/-1", 400), ("/api/clusters/0?limit=0", 400), ("/api/clusters?representatives=-1", 400)]
)
def test_clusters_bad_input(client, url, status) -> None:
    assert client.get(url).status_code == status


def test_clusters_of_an_unclustered_index_is_404(tmp_path) -> None:
    _build(tmp_path / "photos", tmp_path / "index", n=4, clusters=None)
    with TestClient(create_app(tmp_path / "index", device="cpu")) as c:
        r = c.get("/api/clusters")
        assert r.status_code == 404 and "not been clustered" in r.json()["error"]


def test_info_page_assets_and_schema(site, client) -> None:
    info = client.get("/api/info").json()
    assert info["indexed"] == 12 and info["model"] == "resnet18" and info["serve"]["vectors_loaded"] in (0, 12)
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "/static/style.css" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    schema = client.get("/api/openapi.json").json()
    for route in ("/api/search", "/api/images/{image_id}", "/api/images/{image_id}/thumbnail",
                  "/api/images/{image_id}/file", "/api/clusters", "/api/clusters/{cluster}", "/api/info"):
        assert route in schema["paths"], route
    assert set(schema["paths"]["/api/search"]) == {"get", "post"}
    assert client.get("/docs").status_code == 404  # FastAPI's docs would load a CDN


# -- auth -------------------------------------------------------------------------------------


def test_token_is_required_when_set(site) -> None:
    with TestClient(create_app(site / "index", device="cpu", token="s3cret")) as c:
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/info?token=wrong").status_code == 401
        assert c.get("/api/openapi.json").status_code == 401
        assert c.get("/api/images/1/file").status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/info?token=s3cret").status_code == 200
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200


def test_non_local_host_needs_token_or_no_auth() -> None:
    from simsearch.errors import InputError
    from simsearch.serve.server import check_exposure, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "tok", False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(InputError, match="--token"):
        check_exposure("0.0.0.0", None, False)
    with pytest.raises(InputError, match="empty"):
        check_exposure("127.0.0.1", " ", False)


def test_cli_refuses_an_open_host_without_token(site) -> None:
    from click.testing import CliRunner

    from simsearch.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--index", str(site / "index"), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token" in result.output
    result = CliRunner().invoke(cli, ["serve", "--index", str(site / "nothing-here")])
    assert result.exit_code == 1 and "no index at" in result.output
    result = CliRunner().invoke(cli, ["serve", "--index", str(site / "index"), "--search", "gpu"])
    assert result.exit_code == 2 and "'auto', 'faiss'" in result.output


def test_cli_search_option_reaches_the_server(site, monkeypatch) -> None:
    from click.testing import CliRunner

    import simsearch.serve.server as server
    from simsearch.cli import cli

    seen: dict[str, object] = {}
    monkeypatch.setattr(server, "serve", lambda index_dir, **options: seen.update(options))
    for given, want in ((["--search", "faiss"], "faiss"), ([], "auto")):
        result = CliRunner().invoke(cli, ["serve", "--index", str(site / "index"), *given])
        assert result.exit_code == 0, result.output
        assert seen["vector_search"] == want


# -- live index: reloads, rebuilds, concurrent writers ----------------------------------------


def test_missing_vectors_file_is_503_then_recovers(tmp_path) -> None:
    _build(tmp_path / "photos", tmp_path / "index", n=6, clusters=None)
    faiss_file = tmp_path / "index" / "vectors.faiss"
    with TestClient(create_app(tmp_path / "index", device="cpu")) as c:
        ids, _, _ = _stored(tmp_path / "index")
        assert c.get("/api/search", params={"id": int(ids[0])}).status_code == 200
        faiss_file.rename(faiss_file.with_suffix(".away"))
        r = c.get("/api/search", params={"id": int(ids[0])})
        assert r.status_code == 503 and "try again" in r.json()["error"]
        faiss_file.with_suffix(".away").rename(faiss_file)
        assert c.get("/api/search", params={"id": int(ids[0])}).status_code == 200


def test_sees_a_writers_saved_results_without_restart(tmp_path) -> None:
    _build(tmp_path / "photos", tmp_path / "index", n=6, clusters=None)
    with TestClient(create_app(tmp_path / "index", device="cpu")) as c:
        ids, _, _ = _stored(tmp_path / "index")
        assert len(c.get("/api/search", params={"id": int(ids[0]), "k": 100}).json()["results"]) == 5
        generation = c.get("/api/info").json()["serve"]["generation"]
        make_collection(tmp_path / "photos" / "more", n=6, seed=5)
        run_index(tmp_path / "photos", tmp_path / "index")
        results = c.get("/api/search", params={"id": int(ids[0]), "k": 100}).json()["results"]
        assert len(results) == 11
        assert c.get("/api/info").json()["serve"]["generation"] == generation + 1
        new = next(r for r in results if "/more/" in r["path"])
        assert c.get(f"/api/images/{new['id']}/thumbnail").status_code == 200


def test_queries_during_an_index_run_never_see_a_half_written_state(tmp_path) -> None:
    """An index run adds and removes images, saving FAISS often, while threads query the server."""
    _build(tmp_path / "photos", tmp_path / "index", n=12, clusters=None)
    ids0, _, paths0 = _stored(tmp_path / "index")
    anchor = int(ids0[0])
    for p in list(paths0.values())[6:]:  # half the files go, 30 new ones come
        if int([i for i, q in paths0.items() if q == p][0]) != anchor:
            os.remove(p)
    make_collection(tmp_path / "photos" / "new", n=30, seed=9)
    errors: list[str] = []
    statuses: list[int] = []
    done = threading.Event()
    app = create_app(tmp_path / "index", device="cpu")
    upload = Path(paths0[anchor]).read_bytes()

    def reader(c: TestClient, n: int) -> None:
        while not done.is_set():
            if n % 2:
                r = c.get("/api/search", params={"id": anchor, "k": 50})
            else:
                r = c.post("/api/search", params={"k": 50}, files={"image": ("q.jpg", upload, "image/jpeg")})
            statuses.append(r.status_code)
            if r.status_code != 200:
                errors.append(r.text)
                continue
            hits = r.json()["results"]
            seen = [h["id"] for h in hits]
            if len(set(seen)) != len(seen) or anchor in seen:
                errors.append(f"duplicate or self in {seen}")
            for h in hits:
                if not os.path.exists(h["path"]) and h["path"] in paths0.values():
                    pass  # removed on disk but the writer has not got to it yet: still a catalog row
            scores = [h["score"] for h in hits]
            if scores != sorted(scores, reverse=True):
                errors.append("scores out of order")

    with TestClient(app) as c:
        threads = [threading.Thread(target=reader, args=(c, n)) for n in range(3)]
        for t in threads:
            t.start()
        try:
            run_index(tmp_path / "photos", tmp_path / "index", save_interval=0.0)
        finally:
            done.set()
            for t in threads:
                t.join()
        final = c.get("/api/search", params={"id": anchor, "k": 100}).json()["results"]
    assert not errors, errors[:3]
    assert len(statuses) >= 6 and set(statuses) == {200}
    ids1, vectors1, paths1 = _stored(tmp_path / "index")
    assert sorted(h["id"] for h in final) == sorted(int(i) for i in ids1 if int(i) != anchor)
    assert all(h["path"] == paths1[h["id"]] for h in final)


def test_server_follows_a_layout_rebuild(tmp_path) -> None:
    """A writer that rebuilds the layout switches to a new FAISS file: the server loads it, and an
    approximate layout still answers as brute force does on this small index."""
    from simsearch.store.layouts import AnnRequest, maintain_layout

    _build(tmp_path / "photos", tmp_path / "index", n=12, clusters=None)
    ids, vectors, _ = _stored(tmp_path / "index")
    qid = int(ids[2])
    want = _brute_force(ids, vectors, vectors[2], 4, {qid})
    with TestClient(create_app(tmp_path / "index", device="cpu")) as c:
        assert [r["id"] for r in c.get("/api/search", params={"id": qid, "k": 4}).json()["results"]] == want
        with IndexStore.open(tmp_path / "index") as store:
            store.lock_for_writing()
            old = store.ann_path
            assert maintain_layout(store, AnnRequest("hnsw"), force=True)["layout"] == "hnsw"
            assert store.ann_path != old and not old.exists()
        response = c.get("/api/search", params={"id": qid, "k": 4})
        assert response.status_code == 200, response.text
        assert [r["id"] for r in response.json()["results"]] == want
        serve = c.get("/api/info").json()["serve"]
        assert serve["vectors_loaded"] == 12
        assert serve["vector_search"]["using"] == "faiss" and "not flat" in serve["vector_search"]["why"]


# -- labels and duplicates ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """An index with given and predicted labels, a byte-identical copy and a re-encoded copy."""
    import shutil

    base = tmp_path_factory.mktemp("curated")
    paths = make_collection(base / "photos", n=8)
    shutil.copy(paths[0], base / "photos" / "a" / "copy-of-0.jpg")
    Image.open(paths[2]).resize((150, 112)).save(base / "photos" / "b" / "smaller-2.jpg", quality=80)
    run_index(base / "photos", base / "index")
    with IndexStore.open(base / "index") as store:
        rows = {Path(r.path).name: r.id for r in store.catalog.rows("status = 'ok'")}
        store.import_labels({rows["img000.jpg"]: "cat", rows["img001.jpg"]: "cat", rows["img002.jpg"]: "dog"})
        store.write_predictions(
            {rows["img003.jpg"]: "cat", rows["img004.jpg"]: "cat", rows["img005.jpg"]: "dog"},
            {rows["img003.jpg"]: 0.6, rows["img004.jpg"]: 0.9, rows["img005.jpg"]: 0.7},
        )
    return base, rows


def test_labels_classes_and_members(curated) -> None:
    base, rows = curated
    with TestClient(create_app(base / "index", device="cpu")) as c:
        body = c.get("/api/labels").json()
        assert (body["given"], body["predicted"], body["indexed"]) == (3, 3, 10)
        classes = {x["label"]: x for x in body["classes"]}
        assert [x["label"] for x in body["classes"]] == ["cat", "dog"]  # largest first
        assert (classes["cat"]["given"], classes["cat"]["predicted"]) == (2, 2)
        assert classes["cat"]["example"] == rows["img000.jpg"] and classes["dog"]["example"] == rows["img002.jpg"]

        cats = c.get("/api/labels/images", params={"label": "cat"}).json()
        assert cats["total"] == 4
        # given first (by id), then predictions by confidence
        assert [m["id"] for m in cats["members"]] == [rows["img000.jpg"], rows["img001.jpg"], rows["img004.jpg"], rows["img003.jpg"]]
        assert [m["source"] for m in cats["members"]] == ["given", "given", "predicted", "predicted"]
        assert [m["confidence"] for m in cats["members"][2:]] == [0.9, 0.6]
        page = c.get("/api/labels/images", params={"label": "cat", "offset": 1, "limit": 2}).json()
        assert [m["id"] for m in page["members"]] == [m["id"] for m in cats["members"][1:3]] and page["total"] == 4
        predicted = c.get("/api/labels/images", params={"label": "cat", "source": "predicted"}).json()
        assert [m["id"] for m in predicted["members"]] == [rows["img004.jpg"], rows["img003.jpg"]]

        for params, status, fragment in [
            ({"label": "horse"}, 404, "horse"),
            ({"label": "cat", "source": "guessed"}, 400, "source"),
            ({}, 400, "label"),
            ({"label": "cat", "limit": 0}, 400, "limit"),
        ]:
            r = c.get("/api/labels/images", params=params)
            assert r.status_code == status and fragment in r.json()["error"], r.text


def test_labels_of_an_unlabelled_index_is_an_empty_listing(site, client) -> None:
    body = client.get("/api/labels").json()
    assert body["classes"] == [] and body["given"] == 0 and body["indexed"] == 12


def test_duplicates_groups_match_the_library_and_follow_the_recorded_threshold(curated) -> None:
    from simsearch.duplicates import find_duplicates

    base, rows = curated
    with TestClient(create_app(base / "index", device="cpu")) as c:
        r = c.get("/api/duplicates")
        assert r.status_code == 404 and "simsearch duplicates" in r.json()["error"]  # nothing recorded, never calibrated here

        body = c.get("/api/duplicates", params={"threshold": 0.999}).json()
        want = find_duplicates(base / "index", threshold=0.999, verify="off")
        assert body["threshold_source"] == "given" and body["total"] == len(want.groups) >= 1
        assert [[m["id"] for m in g["members"]] for g in body["groups"]] == [
            [g.keeper.id] + [m.id for m in g.duplicates] for g in want.groups
        ]
        groups = [{m["id"] for m in g["members"]} for g in body["groups"]]
        assert any({rows["img000.jpg"], rows["copy-of-0.jpg"]} <= g for g in groups)  # byte-identical: always together
        first = body["groups"][0]
        assert first["keeper"] == first["members"][0]["id"] and first["members"][0]["keeper"] is True
        assert all(not m["keeper"] for m in first["members"][1:])

        with IndexStore.open(base / "index") as store:
            store.record_duplicates_calibration({"threshold": 0.999, "identity": store.catalog.identity(), "precision_target": 0.99})
        recorded = c.get("/api/duplicates", params={"limit": 1}).json()
        assert recorded["threshold_source"] == "calibrated" and recorded["threshold"] == 0.999
        assert recorded["total"] == body["total"] and len(recorded["groups"]) == 1
        assert recorded["groups"][0] == body["groups"][0]
        assert c.get("/api/duplicates", params={"threshold": 1.5}).status_code == 400
        assert c.get("/api/duplicates", params={"offset": -1}).status_code == 400


def test_concurrent_id_queries_are_batched_and_each_gets_its_own_answer(site) -> None:
    """Many threads query at once: the searches share FAISS calls, and every answer is brute force's."""
    ids, vectors, _ = _stored(site / "index")
    app = create_app(site / "index", device="cpu")
    state = app.state.index
    answers: dict[int, list[int]] = {}
    errors: list[str] = []

    def ask(c: TestClient, row: int) -> None:
        for _ in range(4):
            r = c.get("/api/search", params={"id": int(ids[row]), "k": 3})
            if r.status_code != 200:
                errors.append(r.text)
                return
            got = [h["id"] for h in r.json()["results"]]
            if answers.setdefault(row, got) != got:
                errors.append(f"row {row}: {got} then {answers[row]}")

    with TestClient(app) as c:
        threads = [threading.Thread(target=ask, args=(c, row)) for row in range(len(ids))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = c.get("/api/info").json()["serve"]["searches"]
    assert not errors, errors[:3]
    for row, got in answers.items():
        assert got == _brute_force(ids, vectors, vectors[row], 3, {int(ids[row])})
    assert served["queries"] == 4 * len(ids)
    assert state.searches.calls <= served["queries"]


def test_batcher_groups_by_target_and_key_and_passes_errors_to_their_callers() -> None:
    from simsearch.serve.batching import Batcher

    release = threading.Event()
    seen: list[tuple[str, object, list[int]]] = []

    def run(target: str, key: object, items: list[int]) -> list[int]:
        if target == "slow":
            release.wait(10)  # hold the thread so that the others queue up behind it
        if target == "bad":
            raise ValueError("no good")
        seen.append((target, key, items))
        return [i * 10 for i in items]

    b = Batcher(run, "test", max_batch=64)
    try:
        first = b.submit("slow", 0)
        a = [b.submit("x", i, key=1) for i in (1, 2, 3)]
        other = b.submit("x", 4, key=2)
        bad = b.submit("bad", 5)
        release.set()
        assert first.result(10) == 0
        assert [f.result(10) for f in a] == [10, 20, 30] and other.result(10) == 40
        with pytest.raises(ValueError, match="no good"):
            bad.result(10)
    finally:
        b.close()
    assert ("x", 1, [1, 2, 3]) in seen and ("x", 2, [4]) in seen  # one call for the three waiting together
    with pytest.raises(RuntimeError):
        b.submit("x", 1)


# -- the lean search route and the catalog view -------------------------------------------------


def _both(site, **options):
    """Test clients of the app with the lean GET /api/search in front of FastAPI, and without it,
    each searching through its packed float16 copy already: answers compared byte for byte must
    come from the same search (FAISS's float32 sums and the re-scoring's may differ in the last
    bit, and so in a score's sixth decimal)."""
    apps = (create_app(site / "index", device="cpu", **options),
            create_app(site / "index", device="cpu", lean_search=False, **options))
    for app in apps:
        assert _packed_ready(app.state.index)[1] is not None
    return tuple(TestClient(app) for app in apps)


def test_lean_search_route_answers_exactly_as_the_fastapi_route(site) -> None:
    ids, _, paths = _stored(site / "index")
    qid = int(ids[4])
    queries = [
        f"id={qid}", f"id={qid}&k=3", f"id={qid}&k=50&include_self=yes", f"id={qid}&threshold=0.5",
        f"id={qid}&k=2&k=4",  # a repeated name: the last one counts
        f"path={paths[qid]}", "", f"id={qid}&path=/x.jpg", "id=abc", f"id={qid}&k=0", f"id={qid}&k=100000",
        f"id={qid}&threshold=2", f"id={qid}&threshold=nan", f"id={qid}&include_self=maybe", "id=999999", "id=-1",
        "path=photos/a/img000.jpg", "path=/nowhere/img000.jpg", "path=/tmp/../etc/passwd", "path=/a%00b.jpg",
        "id=%20", f"id={qid}&token=unused",
    ]
    lean, plain = _both(site)
    with lean, plain:
        for query in queries:
            a, b = lean.get(f"/api/search?{query}"), plain.get(f"/api/search?{query}")
            assert (a.status_code, a.content) == (b.status_code, b.content), query
            assert a.headers["content-type"] == b.headers["content-type"] == "application/json", query
            assert a.headers["content-length"] == b.headers["content-length"], query
        # other methods and paths still go through FastAPI, alike
        for method, url in (("HEAD", "/api/search?id=1"), ("PUT", "/api/search?id=1"), ("GET", "/api/search/?id=1"),
                            ("GET", "/api/searchx?id=1")):
            a = lean.request(method, url, follow_redirects=False)
            b = plain.request(method, url, follow_redirects=False)
            assert (a.status_code, a.content) == (b.status_code, b.content), (method, url)
        upload = Path(paths[qid]).read_bytes()
        a = lean.post("/api/search", params={"k": 3}, files={"image": ("q.jpg", upload, "image/jpeg")})
        b = plain.post("/api/search", params={"k": 3}, files={"image": ("q.jpg", upload, "image/jpeg")})
        assert a.status_code == 200 and a.json() == b.json()
    assert "/api/search" in lean.app.openapi()["paths"] and lean.app.openapi() == plain.app.openapi()


def test_lean_search_route_needs_the_token_as_every_api_route(site) -> None:
    ids, _, _ = _stored(site / "index")
    url = f"/api/search?id={int(ids[0])}"
    lean, plain = _both(site, token="s3cret")
    with lean, plain:
        for headers, suffix in (({}, ""), ({"Authorization": "Bearer wrong"}, ""), ({}, "&token=wrong")):
            a, b = lean.get(url + suffix, headers=headers), plain.get(url + suffix, headers=headers)
            assert a.status_code == b.status_code == 401 and a.content == b.content
            assert a.headers["www-authenticate"] == b.headers["www-authenticate"] == "Bearer"
        for headers, suffix in (({"Authorization": "Bearer s3cret"}, ""), ({}, "&token=s3cret")):
            a, b = lean.get(url + suffix, headers=headers), plain.get(url + suffix, headers=headers)
            assert a.status_code == b.status_code == 200 and a.content == b.content


def test_lean_search_route_answers_an_unexpected_error_as_the_app_does(site, monkeypatch) -> None:
    from simsearch.serve.state import ServeIndex

    async def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ServeIndex, "query_id_async", broken)
    lean, plain = _both(site)
    with lean, TestClient(plain.app, raise_server_exceptions=False) as plain:
        a, b = lean.get("/api/search?id=1"), plain.get("/api/search?id=1")
    assert a.status_code == b.status_code == 500 and a.content == b.content
    assert "RuntimeError" in a.json()["error"] and "boom" not in a.text


def test_catalog_view_is_kept_until_a_commit_and_rows_follow_the_writer(tmp_path) -> None:
    """The rows a thread read are used again only while nothing was committed: a writer's removal
    shows at once (the id is gone, and no longer a result), and its saved additions too."""
    paths = make_collection(tmp_path / "photos", n=8)
    run_index(tmp_path / "photos", tmp_path / "index")
    _, _, stored = _stored(tmp_path / "index")
    app = create_app(tmp_path / "index", device="cpu")
    state = app.state.index
    gone = next(i for i, p in stored.items() if p == str(paths[3]))
    anchor = next(i for i, p in stored.items() if p == str(paths[0]))
    with TestClient(app) as c:
        first = c.get("/api/search", params={"id": anchor, "k": 100}).json()["results"]
        assert gone in [h["id"] for h in first] and c.get(f"/api/images/{gone}").status_code == 200
        state.query_id(anchor, k=100)  # in this thread too (a view is a thread's own)
        view = state.view()
        assert state.view() is view and gone in view.rows  # nothing committed: the same view, rows kept
        os.remove(paths[3])
        run_index(tmp_path / "photos", tmp_path / "index")
        assert state.view() is not view and gone not in state.view().rows  # the writer committed
        assert c.get("/api/search", params={"id": gone}).status_code == 404
        assert c.get(f"/api/images/{gone}").status_code == 404
        after = [h["id"] for h in c.get("/api/search", params={"id": anchor, "k": 100}).json()["results"]]
        assert gone not in after and sorted(after) == sorted(i for i in stored if i not in (gone, anchor))


def test_a_new_faiss_save_is_loaded_even_if_the_file_looks_the_same(tmp_path, monkeypatch) -> None:
    """A save renames a new file over the old one and may get its inode back, with a timestamp in
    the same clock tick (and, for a flat index of as many vectors, the same size); the catalog's
    record of the save changes all the same, and the server reloads."""
    from simsearch.serve.state import ServeIndex

    _build(tmp_path / "photos", tmp_path / "index", n=6, clusters=None)
    ids, _, _ = _stored(tmp_path / "index")
    app = create_app(tmp_path / "index", device="cpu")
    with TestClient(app) as c:
        assert len(c.get("/api/search", params={"id": int(ids[0]), "k": 100}).json()["results"]) == 5
        generation = c.get("/api/info").json()["serve"]["generation"]
        key = app.state.index._file_key()
        monkeypatch.setattr(ServeIndex, "_file_key", lambda self, view=None: key)  # the file "looks the same"
        make_collection(tmp_path / "photos" / "more", n=6, seed=5)
        run_index(tmp_path / "photos", tmp_path / "index")
        assert len(c.get("/api/search", params={"id": int(ids[0]), "k": 100}).json()["results"]) == 11
        assert c.get("/api/info").json()["serve"]["generation"] == generation + 1
        assert c.get("/api/search", params={"id": int(ids[1])}).status_code == 200
        assert c.get("/api/info").json()["serve"]["generation"] == generation + 1  # nothing new: no reload


# -- the float16 search of a flat index -------------------------------------------------------------


def _packed_ready(state, timeout: float = 120.0):
    snap = state.snapshot()
    return snap, state.packer.wait(snap, timeout)


def test_flat_index_is_searched_through_its_packed_copy_with_faiss_answers(site) -> None:
    """Once the float16 copy is packed, queries by id and by upload go through it, and answer as
    FAISS does (ids in the same order, the same scores); ``--search faiss`` never packs."""
    from simsearch.serve.state import ServeIndex

    ids, vectors, _ = _stored(site / "index")
    packed, plain = ServeIndex(site / "index", device="cpu"), ServeIndex(site / "index", device="cpu", vector_search="faiss")
    try:
        snap, copy = _packed_ready(packed)
        assert copy is not None and len(copy) == len(ids)
        assert packed.info()["serve"]["vector_search"] == {
            "mode": "auto", "using": "float16", "packed_bytes": 2 * len(ids) * vectors.shape[1], "widened": 0,
            "faiss_fallbacks": 0,
        }
        plain.snapshot()
        assert plain.info()["serve"]["vector_search"] == {"mode": "faiss", "using": "faiss", "why": "asked for (--search faiss)"}
        assert plain.packer.get(plain.snapshot()) is None
        for row in range(len(ids)):
            for options in ({"k": 4}, {"k": 100, "include_self": True}, {"k": 5, "threshold": 0.0}):
                a = packed.query_id(int(ids[row]), **options)["results"]
                b = plain.query_id(int(ids[row]), **options)["results"]
                assert [h["id"] for h in a] == [h["id"] for h in b]
                np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=2e-6)
            assert [h["id"] for h in packed.query_id(int(ids[row]), k=3)["results"]] == _brute_force(
                ids, vectors, vectors[row], 3, {int(ids[row])}
            )
        _, _, paths = _stored(site / "index")
        data = Path(paths[int(ids[3])]).read_bytes()
        a, b = packed.query_upload(data, k=5), plain.query_upload(data, k=5)
        assert [h["id"] for h in a["results"]] == [h["id"] for h in b["results"]]
        assert packed.packer.get(snap) is copy  # the copy searched all along
    finally:
        packed.close()
        plain.close()


def test_packed_copy_follows_a_writers_save(tmp_path) -> None:
    """A save loads new vectors: FAISS answers until they are packed in turn, and the old copy goes."""
    from simsearch.serve.state import ServeIndex

    _build(tmp_path / "photos", tmp_path / "index", n=6, clusters=None)
    state = ServeIndex(tmp_path / "index", device="cpu")
    try:
        first, copy = _packed_ready(state)
        assert copy is not None and len(copy) == 6
        make_collection(tmp_path / "photos" / "more", n=6, seed=5)
        run_index(tmp_path / "photos", tmp_path / "index")
        ids, vectors, _ = _stored(tmp_path / "index")
        row = 0
        got = [h["id"] for h in state.query_id(int(ids[row]), k=100)["results"]]
        assert got == _brute_force(ids, vectors, vectors[row], 100, {int(ids[row])})  # packed or not yet
        second, copy2 = _packed_ready(state)
        assert second is not first and state.packer.get(first) is None
        assert copy2 is not None and len(copy2) == 12
        assert [h["id"] for h in state.query_id(int(ids[row]), k=100)["results"]] == got
    finally:
        state.close()


def test_no_packed_copy_past_the_limit_without_fbgemm_or_when_faiss_is_faster(tmp_path, monkeypatch) -> None:
    """Too big a copy, a torch without FBGEMM, or scores too crowded for the float16 search to
    prove its results: FAISS searches, and /api/info says why."""
    from simsearch.embed import half_search
    from simsearch.serve.state import ServeIndex

    _build(tmp_path / "photos", tmp_path / "index", n=6, clusters=None)
    ids, vectors, _ = _stored(tmp_path / "index")
    want = _brute_force(ids, vectors, vectors[1], 3, {int(ids[1])})
    small = ServeIndex(tmp_path / "index", device="cpu", pack_limit=1024)
    try:
        assert _packed_ready(small)[1] is None
        search = small.info()["serve"]["vector_search"]
        assert search["using"] == "faiss" and "over the limit of" in search["why"]
        assert [h["id"] for h in small.query_id(int(ids[1]), k=3)["results"]] == want
    finally:
        small.close()
    monkeypatch.setattr(half_search, "_quantized_engines", lambda: ["qnnpack"])
    bare = ServeIndex(tmp_path / "index", device="cpu")
    try:
        assert _packed_ready(bare)[1] is None
        search = bare.info()["serve"]["vector_search"]
        assert search["using"] == "faiss" and "not packed" in search["why"] and "FBGEMM" in search["why"]
        assert [h["id"] for h in bare.query_id(int(ids[1]), k=3)["results"]] == want
    finally:
        bare.close()
    monkeypatch.undo()
    monkeypatch.setattr(half_search.HalfPackedIndex, "_calibrate", lambda self, k=10: 0.5)
    crowded = ServeIndex(tmp_path / "index", device="cpu")
    try:
        assert _packed_ready(crowded)[1] is None
        search = crowded.info()["serve"]["vector_search"]
        assert search["using"] == "faiss" and "crowd too close" in search["why"] and "50%" in search["why"]
    finally:
        crowded.close()
    with pytest.raises(Exception, match="unknown vector search"):
        ServeIndex(tmp_path / "index", vector_search="gpu")


def test_latest_packer_keeps_only_the_newest_sources_result() -> None:
    """A pack asked for while another runs replaces it (the running one's result is dropped); one
    running when packing is called off (clear) is dropped too; a failure is kept, with its text."""
    from simsearch.serve.packing import LatestPacker

    started, release = threading.Event(), threading.Event()
    packed: list[str] = []

    def pack(source: str) -> str:
        if source == "slow":
            started.set()
            assert release.wait(30)
        if source == "bad":
            raise ValueError("cannot pack this")
        packed.append(source)
        return source.upper()

    packer = LatestPacker(pack)
    try:
        packer.want("slow")
        assert started.wait(30)
        packer.want("new")  # while "slow" runs
        release.set()
        assert packer.wait("new", 30) == "NEW" and packer.get("slow") is None
        started.clear()
        release.clear()
        packer.want("slow")
        assert started.wait(30)
        packer.clear()  # the loaded vectors are not to be packed after all
        release.set()
        assert packer.wait("slow", 30) is None and packed[-1] == "slow" and packer.failure is None
        packer.want("bad")
        assert packer.wait("bad", 30) is None and packer.failure == "cannot pack this"
    finally:
        packer.close()
