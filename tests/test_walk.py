"""Finding image files (simsearch.images.iter_image_files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from simsearch.images import iter_image_files


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for rel in [
        "top.jpg",
        "a/x.JPG",
        "a/y.Png",
        "b/z.TIFF",
        "b/deep/w.webp",
        "b/deep/v.jpeg",
        "b/deep/u.bmp",
        "b/deep/t.gif",
        "b/deep/s.tif",
        # skipped
        ".hidden.jpg",
        ".hiddendir/inside.jpg",
        "a/.cache/thumb.png",
        "._top.jpg",
        "a/._x.JPG",
        "Thumbs.db",
        ".DS_Store",
        "a/notes.txt",
        "a/archive.jpg.bak",
        "a/raw.cr2",
    ]:
        touch(root / rel, rel.encode())
    return root


def rels(root: Path, **kwargs) -> list[str]:
    return [os.path.relpath(e.path, root) for e in iter_image_files([root], **kwargs)]


EXPECTED = {"top.jpg", "a/x.JPG", "a/y.Png", "b/z.TIFF", "b/deep/w.webp", "b/deep/v.jpeg", "b/deep/u.bmp", "b/deep/t.gif", "b/deep/s.tif"}


def test_recursive_case_insensitive_and_skips_hidden_and_junk(tree: Path) -> None:
    found = rels(tree)
    assert sorted(found) == sorted(EXPECTED)
    assert len(found) == len(set(found))
    assert found == rels(tree)  # stable order


def test_entries_carry_absolute_path_size_and_mtime(tree: Path) -> None:
    entry = next(e for e in iter_image_files([tree]) if e.path.endswith("y.Png"))
    st = (tree / "a/y.Png").stat()
    assert os.path.isabs(entry.path)
    assert (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_exclude_by_name(tree: Path) -> None:
    assert set(rels(tree, exclude=["*.webp", "deep"])) == EXPECTED - {
        "b/deep/w.webp", "b/deep/v.jpeg", "b/deep/u.bmp", "b/deep/t.gif", "b/deep/s.tif"
    }
    assert set(rels(tree, exclude=["*.webp"])) == EXPECTED - {"b/deep/w.webp"}
    assert set(rels(tree, exclude=["a"])) == EXPECTED - {"a/x.JPG", "a/y.Png"}


def test_exclude_by_relative_path(tree: Path) -> None:
    assert set(rels(tree, exclude=["b/deep"])) == EXPECTED - {
        "b/deep/w.webp", "b/deep/v.jpeg", "b/deep/u.bmp", "b/deep/t.gif", "b/deep/s.tif"
    }
    assert set(rels(tree, exclude=["a/x.*"])) == EXPECTED - {"a/x.JPG"}
    assert set(rels(tree, exclude=["a/x.*", "b/*"])) == {"top.jpg", "a/y.Png"}


def test_directory_symlink_loop_terminates_without_duplicates(tree: Path) -> None:
    (tree / "a" / "up").symlink_to("..", target_is_directory=True)  # a/up -> root
    (tree / "b" / "deep" / "self").symlink_to(".", target_is_directory=True)
    found = rels(tree)
    assert len(found) == len(set(found))
    assert sorted(found) == sorted(EXPECTED)


def test_file_symlink_to_seen_file_is_not_duplicated(tree: Path) -> None:
    (tree / "a" / "z_link.jpg").symlink_to(tree / "a" / "x.JPG")
    os.link(tree / "top.jpg", tree / "b" / "hardlink.jpg")
    found = rels(tree)
    assert sorted(found) == sorted(EXPECTED)


def test_symlinked_folder_outside_root_is_followed_once(tmp_path: Path, tree: Path) -> None:
    outside = tmp_path / "elsewhere"
    touch(outside / "far.png")
    (tree / "link1").symlink_to(outside, target_is_directory=True)
    (tree / "link2").symlink_to(outside, target_is_directory=True)
    (tree / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    found = rels(tree)
    assert len(found) == len(set(found)) == len(EXPECTED) + 1
    assert "link1/far.png" in found


def test_single_file_root_and_overlapping_roots(tree: Path) -> None:
    single = [e.path for e in iter_image_files([tree / "a" / "x.JPG"])]
    assert single == [str(tree / "a" / "x.JPG")]
    both = [e.path for e in iter_image_files([tree / "a", tree, tree / "a" / "x.JPG"])]
    assert len(both) == len(set(both)) == len(EXPECTED)


def test_hidden_root_itself_is_walked(tmp_path: Path) -> None:
    root = tmp_path / ".photos"
    touch(root / "in.jpg")
    assert [os.path.basename(e.path) for e in iter_image_files([root])] == ["in.jpg"]
