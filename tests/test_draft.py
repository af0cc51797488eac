"""Big photos on the CPU: JPEG draft (DCT-domain) downscaling before the resize, without changing the embedding.

A random-weight ResNet maps every image to nearly the same direction (raw cosines between
*different* images are ~0.98), so raw cosine alone could not fail; the embeddings are also
compared after subtracting the mean embedding of unrelated images, where different images are
far apart and the same image decoded two ways must stay together.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synth_images import natural_array, write_jpeg  # noqa: E402

from conftest import run_index  # noqa: E402
from simsearch.embed import Embedder  # noqa: E402
from simsearch.images import decode_image  # noqa: E402


@pytest.fixture
def draft_calls(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append((self.size, size))
        return real(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory) -> list[Path]:
    """Two 12 MP photo-like JPEGs, one of them stored sideways with EXIF orientation 6."""
    root = tmp_path_factory.mktemp("big")
    a = root / "landscape.jpg"
    write_jpeg(a, 4000, 3000, seed=11)
    b = root / "portrait_exif6.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(natural_array(4000, 3000, seed=12)).save(b, "JPEG", quality=92, exif=exif.tobytes())
    return [a, b]


def _centered_cos(a: np.ndarray, b: np.ndarray, mu: np.ndarray) -> np.ndarray:
    a, b = a - mu, b - mu
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_draft_embedding_matches_full_decode(big_photos, tiny_model) -> None:
    emb = Embedder(tiny_model, device="cpu", batch_size=4, workers=0)
    full, draft = [], []
    for p in big_photos:
        data = p.read_bytes()
        full.append(decode_image(data, str(p)))
        draft.append(decode_image(data, str(p), draft_size=256))
    assert [im.size for im in full] == [(4000, 3000), (3000, 4000)]
    assert all(min(im.size) < 1000 for im in draft)  # decoded at 1/8 scale, then made upright
    assert [im.size[0] < im.size[1] for im in draft] == [False, True]
    vf, vd = emb.embed_images(full), emb.embed_images(draft)
    mu = emb.embed_images([Image.fromarray(natural_array(640, 480, seed=100 + i)) for i in range(6)]).mean(0)
    raw = (vf * vd).sum(1)
    centered = _centered_cos(vf, vd, mu)
    assert raw.min() >= 0.99 and centered.min() >= 0.99, (raw, centered)
    # the check can fail: two different photos are far apart once centred
    assert _centered_cos(vf[0], vf[1], mu) < 0.9


def test_draft_is_used_when_indexing(tmp_path, draft_calls, tiny_model) -> None:
    big = tmp_path / "photos" / "big.jpg"
    write_jpeg(big, 1600, 1200, seed=5)
    small = tmp_path / "photos" / "small.jpg"
    write_jpeg(small, 400, 300, seed=6)  # shorter side < 2 x 256: decoded at full size
    emb = Embedder(tiny_model, device="cpu", batch_size=4, workers=0)
    (batch,) = list(emb.embed_files([str(big), str(small)]))
    assert draft_calls == [((1600, 1200), (256, 256))]
    assert [(i.width, i.height) for i in batch.items] == [(1600, 1200), (400, 300)]  # full size recorded
    draft_calls.clear()
    no_draft = Embedder(tiny_model, device="cpu", batch_size=4, workers=0, draft=False)
    (batch2,) = list(no_draft.embed_files([str(big), str(small)]))
    assert draft_calls == []
    assert float((batch.vectors[0] * batch2.vectors[0]).sum()) > 0.99


def test_draft_is_used_for_queries(tmp_path, draft_calls) -> None:
    from simsearch.search import query_images

    root = tmp_path / "photos"
    for i in range(3):
        write_jpeg(root / f"p{i}.jpg", 320, 240, seed=20 + i)
    run_index(root, tmp_path / "idx")
    draft_calls.clear()
    query = tmp_path / "query.jpg"
    write_jpeg(query, 2000, 1500, seed=30)
    (result,) = query_images([query], tmp_path / "idx", k=2, device="cpu")
    assert len(result.results) == 2
    assert ((2000, 1500), (256, 256)) in draft_calls


def test_mpo_first_frame_is_drafted() -> None:
    """Many phone photos are MPO (a JPEG plus extra frames); they take the draft path too."""
    a = Image.fromarray(natural_array(1600, 1200, seed=1))
    b = Image.fromarray(natural_array(800, 600, seed=2))
    buf = io.BytesIO()
    a.save(buf, "MPO", save_all=True, append_images=[b])
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert decode_image(data, draft_size=256).size == (400, 300)
    assert decode_image(data).size == (1600, 1200)


@pytest.mark.parametrize("orientation, expected", [(1, (1600, 1200)), (3, (1600, 1200)), (6, (1200, 1600)), (8, (1200, 1600))])
def test_recorded_size_is_upright_full_size(tmp_path, draft_calls, tiny_model, orientation, expected) -> None:
    # a draft-decoded rotated photo: the catalog gets the file's size, turned as the viewer sees it
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(natural_array(1600, 1200, seed=8)).save(path, format="JPEG", quality=90, exif=exif.tobytes())
    emb = Embedder(tiny_model, device="cpu", batch_size=2, workers=0)
    (batch,) = list(emb.embed_files([str(path)]))
    assert draft_calls  # decoded at a reduced scale
    assert (batch.items[0].width, batch.items[0].height) == expected
