"""End to end: ``simsearch serve`` in a subprocess, driven by Debian's Chromium through Playwright.

Screenshots of each step are saved under the test's tmp dir (``screenshots/``). Without Chromium
or Playwright the test is skipped, except on CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import make_collection, run_index

from simsearch.store import IndexStore

LOADED = "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nearest(index_dir: Path, query_id: int) -> list[int]:
    """Every other indexed image by cosine similarity to ``query_id``'s stored vector (numpy brute force)."""
    with IndexStore.open(index_dir) as store:
        ids, vectors = store.all_vectors()
    row = list(ids).index(query_id)
    order = np.argsort(-(vectors @ vectors[row]), kind="stable")
    return [int(ids[i]) for i in order if int(ids[i]) != query_id]


@contextlib.contextmanager
def _serving(index_dir: Path):
    """``simsearch serve`` over ``index_dir`` in a subprocess; yields its base URL."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "simsearch", "serve", "--index", str(index_dir), "--port", str(port),
         "--device", "cpu", "--precision", "fp32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/api/info", timeout=2) as r:
                    json.load(r)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                    pytest.fail(f"simsearch serve did not start: {out}")
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def server(tmp_path):
    pytest.importorskip("fastapi")
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    make_collection(root, n=16)
    run_index(root, index_dir)
    from simsearch.cluster import cluster_index

    cluster_index(index_dir, 3, device="cpu")
    with _serving(index_dir) as base:
        yield base, index_dir


@pytest.fixture
def curated_server(tmp_path):
    """An index with byte-identical copies, given and predicted labels, and a recorded duplicates threshold."""
    pytest.importorskip("fastapi")
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    paths = make_collection(root, n=12)
    for n in (0, 3):
        shutil.copy(paths[n], paths[n].with_name(f"copy-{paths[n].name}"))
    shutil.copy(paths[3], paths[3].with_name(f"second-copy-{paths[3].name}"))
    run_index(root, index_dir)
    with IndexStore.open(index_dir) as store:
        ids = {Path(r.path).name: r.id for r in store.catalog.rows("status = 'ok'")}
        store.import_labels({ids[f"img{n:03d}.jpg"]: ("circle" if n % 2 else "square") for n in range(6)})
        store.write_predictions(
            {ids[f"img{n:03d}.jpg"]: ("circle" if n % 2 else "square") for n in range(6, 12)},
            {ids[f"img{n:03d}.jpg"]: 0.5 + n / 30 for n in range(6, 12)},
        )
        store.record_duplicates_calibration({"threshold": 0.9999, "identity": store.catalog.identity(), "precision_target": 0.99})
    with _serving(index_dir) as base:
        yield base, index_dir, ids


def test_search_click_back_and_clusters_in_a_real_browser(browser, server, tmp_path) -> None:
    from playwright.sync_api import expect
    base, index_dir = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with IndexStore.open(index_dir) as store:
        rows = store.catalog.rows("status = 'ok'")
    query = rows[5]
    expected = _nearest(index_dir, query.id)

    page = browser.new_page(viewport={"width": 1100, "height": 760})
    try:
        page.goto(base + "/")
        expect(page.locator("#info")).to_contain_text("16 images")

        # 1. upload an indexed image: its own row is left out, its nearest neighbour comes first
        page.set_input_files("#file", query.path)
        results = page.locator("#grid li.result a")
        expect(results).to_have_count(15)
        page.wait_for_function(LOADED)
        first = [int(x) for x in results.evaluate_all("els => els.map(e => e.dataset.id)")]
        assert first[0] == expected[0] and first == expected[:15]
        page.screenshot(path=str(shots / "1-upload.png"))

        # 2. click a result: the URL says so and the results are that image's neighbours
        target = expected[0]
        results.first.click()
        page.wait_for_url(f"**/?id={target}")
        expect(page.locator("#query .path")).to_have_text([r.path for r in rows if r.id == target][0])
        second = page.locator("#grid li.result a")
        expect(second.first).to_have_attribute("data-id", str(_nearest(index_dir, target)[0]))
        ids = [int(x) for x in second.evaluate_all("els => els.map(e => e.dataset.id)")]
        assert ids == _nearest(index_dir, target)[:15] and ids != first
        page.screenshot(path=str(shots / "2-clicked.png"))

        # 3. back: the upload's results again, at the bare URL
        page.go_back()
        page.wait_for_url(base + "/")
        expect(page.locator("#grid li.result a").first).to_have_attribute("data-id", str(first[0]))
        ids = [int(x) for x in page.locator("#grid li.result a").evaluate_all("els => els.map(e => e.dataset.id)")]
        assert ids == first
        page.screenshot(path=str(shots / "3-back.png"))

        # 4. clusters: representatives, then a cluster's members (keyboard: focus + Enter)
        page.get_by_role("link", name="Clusters").click()
        page.wait_for_url("**/?view=clusters")
        cards = page.locator("#grid li.cluster a")
        expect(cards).to_have_count(3)
        page.wait_for_function(LOADED)
        page.screenshot(path=str(shots / "4-clusters.png"))
        with IndexStore.open(index_dir) as store:
            sizes = store.catalog.cluster_sizes()
        biggest = max(sizes, key=lambda c: (sizes[c], -c))
        page.locator(f'#grid li.cluster a[href*="cluster={biggest}"]').focus()
        page.keyboard.press("Enter")
        page.wait_for_url(f"**/?cluster={biggest}")
        members = page.locator("#grid li.member a")
        expect(members).to_have_count(sizes[biggest])
        with IndexStore.open(index_dir) as store:
            want = [r.id for r, _ in store.catalog.cluster_members(biggest)]
        assert [int(x) for x in members.evaluate_all("els => els.map(e => e.dataset.id)")] == want
        page.wait_for_function(LOADED)
        page.screenshot(path=str(shots / "5-cluster.png"))

        # 5. at a phone's width the grid still fits the screen
        page.set_viewport_size({"width": 390, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(shots / "6-phone.png"))
    finally:
        page.close()
    assert len(list(shots.glob("*.png"))) == 6


def test_duplicates_and_labels_views_in_a_real_browser(browser, curated_server, tmp_path) -> None:
    from playwright.sync_api import expect

    base, index_dir, ids = curated_server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with urllib.request.urlopen(base + "/api/duplicates?limit=200") as r:
        dups = json.load(r)
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    try:
        page.goto(base + "/")
        expect(page.locator("#info")).to_contain_text("15 images")

        # 1. duplicates: one group per set of copies, the keeper first and marked
        page.get_by_role("link", name="Duplicates").click()
        page.wait_for_url("**/?view=duplicates")
        groups = page.locator("#grid li.group")
        expect(groups).to_have_count(dups["total"])
        assert dups["total"] >= 2
        shown = [[int(x) for x in g.locator("li a").evaluate_all("els => els.map(e => e.dataset.id)")] for g in groups.all()]
        assert shown == [[m["id"] for m in g["members"]] for g in dups["groups"]]
        assert {ids["img003.jpg"], ids["copy-img003.jpg"], ids["second-copy-img003.jpg"]} in [set(g) for g in shown]
        expect(groups.first.locator("li").first).to_have_class("member keeper")
        page.wait_for_function(LOADED)
        page.screenshot(path=str(shots / "1-duplicates.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(shots / "2-duplicates-phone.png"), full_page=True)
        page.set_viewport_size({"width": 1100, "height": 760})

        # 2. labels: the classes, then one class's images (given first), then only its predictions
        page.get_by_role("link", name="Labels").click()
        page.wait_for_url("**/?view=labels")
        classes = page.locator("#grid li.class a")
        expect(classes).to_have_count(2)
        page.wait_for_function(LOADED)
        page.screenshot(path=str(shots / "3-labels.png"), full_page=True)
        page.locator('#grid li.class a[href*="label=circle"]').focus()
        page.keyboard.press("Enter")
        page.wait_for_url("**/?label=circle")
        members = page.locator("#grid li.member a")
        expect(members).to_have_count(6)
        with IndexStore.open(index_dir) as store:
            _, want = store.catalog.label_members("circle")
        assert [int(x) for x in members.evaluate_all("els => els.map(e => e.dataset.id)")] == [r.id for r, _, _ in want]
        expect(page.locator("#grid li.given")).to_have_count(3)
        page.wait_for_function(LOADED)
        page.screenshot(path=str(shots / "4-label.png"), full_page=True)
        page.get_by_role("link", name="predicted", exact=True).click()
        page.wait_for_url("**/?label=circle&source=predicted")
        expect(page.locator("#grid li.predicted")).to_have_count(3)
        expect(page.locator("#grid li.given")).to_have_count(0)
        page.set_viewport_size({"width": 390, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.wait_for_function(LOADED)
        page.screenshot(path=str(shots / "5-label-phone.png"), full_page=True)
    finally:
        page.close()
    assert len(list(shots.glob("*.png"))) == 5
