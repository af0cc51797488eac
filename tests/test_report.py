"""HTML pages (duplicates, query, cluster) opened in headless Chromium, and the thumbnail cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from conftest import run_index
from simsearch.cli import cli
from simsearch.store import IndexStore
from test_duplicates import dup_index  # noqa: F401 (the fixture: a small index holding copies)



def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def open_page(browser, path: Path, shot: Path):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    page.screenshot(path=str(shot), full_page=True)
    return page, images


def test_duplicates_page_matches_json(browser, dup_index, tmp_path):
    root, index, paths = dup_index
    html = tmp_path / "dups.html"
    out = invoke("duplicates", "--index", index, "--threshold", "0.999", "--verify", "off", "--json", "--html", html)
    data = json.loads(out.stdout)
    assert data["groups"]
    text = html.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    page, images = open_page(browser, html, tmp_path / "duplicates.png")
    members = sum(len(g["members"]) for g in data["groups"])
    assert len(images) == members
    assert all(complete and width > 0 for complete, width in images), images
    shown = page.eval_on_selector_all(
        "section.group",
        """els => els.map(s => ({keeper: s.dataset.keeper,
              members: [...s.querySelectorAll('figure')].map(f => [f.dataset.path, f.dataset.keeper === 'true'])}))""",
    )
    expected = [{"keeper": g["keeper"], "members": [[m["path"], m["keeper"]] for m in g["members"]]} for g in data["groups"]]
    assert shown == expected
    badges = page.eval_on_selector_all("figure.keeper .badge", "els => els.map(e => e.textContent)")
    assert badges == ["KEEP"] * len(data["groups"])
    page.close()
    assert (tmp_path / "duplicates.png").stat().st_size > 1000


def test_query_and_cluster_pages(browser, dup_index, tmp_path):
    root, index, paths = dup_index
    outside = tmp_path / "outside.png"
    Image.open(paths[1]).save(outside)
    qhtml = tmp_path / "query.html"
    out = invoke("query", str(paths[0]), str(outside), "--index", index, "-k", "3", "--json", "--device", "cpu", "--html", qhtml)
    results = json.loads(out.stdout)
    page, images = open_page(browser, qhtml, tmp_path / "query.png")
    assert len(images) == sum(1 + len(r["results"]) for r in results)
    assert all(complete and width > 0 for complete, width in images)
    shown = page.eval_on_selector_all("section.query", "els => els.map(s => [...s.querySelectorAll('figure')].map(f => f.dataset.path))")
    assert shown == [[r["query"]] + [h["path"] for h in r["results"]] for r in results]
    page.close()
    chtml = tmp_path / "clusters.html"
    out = invoke("cluster", "--index", index, "-k", "3", "-r", "2", "--json", "--html", chtml)
    clusters = json.loads(out.stdout)
    page, images = open_page(browser, chtml, tmp_path / "clusters.png")
    assert len(images) == sum(len(c["representatives"]) for c in clusters["clusters"])
    assert all(complete and width > 0 for complete, width in images)
    page.close()


def test_thumbnails_cached_bounded_and_dropped(dup_index, tmp_path):
    src_root, _, _ = dup_index
    root = tmp_path / "photos"
    shutil.copytree(src_root, root)
    index = tmp_path / "index"
    run_index(root, index)
    invoke("duplicates", "--index", index, "--threshold", "0.999", "--verify", "off", "--html", tmp_path / "a.html")
    thumbs = sorted((index / "thumbs").iterdir())
    assert thumbs
    for t in thumbs:
        assert max(Image.open(t).size) <= 256
    stamps = {t.name: t.stat().st_mtime_ns for t in thumbs}
    invoke("duplicates", "--index", index, "--threshold", "0.999", "--verify", "off", "--html", tmp_path / "b.html")
    assert {t.name: t.stat().st_mtime_ns for t in (index / "thumbs").iterdir()} == stamps  # made once
    # moved duplicates leave the index, and their thumbnails with them
    invoke("duplicates", "--index", index, "--threshold", "0.999", "--verify", "off", "--move-to", tmp_path / "moved", "--apply")
    with IndexStore.open(index) as store:
        ok = {f"{r.id}-" for r in store.catalog.rows("status = 'ok'")}
    left = [t.name for t in (index / "thumbs").iterdir()]
    assert left and all(any(name.startswith(p) for p in ok) for name in left)
    # a file deleted and re-indexed away: its thumbnail is pruned on the next page
    victim = root / "a" / "img000.jpg"
    victim.unlink()
    run_index(root, index)
    invoke("duplicates", "--index", index, "--threshold", "0.999", "--verify", "off", "--html", tmp_path / "c.html")
    with IndexStore.open(index) as store:
        ok = {f"{r.id}-{r.hash[:16]}.jpg" for r in store.catalog.rows("status = 'ok'")}
    assert set(t.name for t in (index / "thumbs").iterdir()) <= ok
