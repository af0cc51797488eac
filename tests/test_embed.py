"""The embedding pipeline (bounded background stages), the Embedder's options, and the torch k-means/search."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from conftest import make_collection, make_image
from simsearch.embed import Embedder
from simsearch.errors import InputError
from simsearch.embed.pipeline import Stage

# -- pipeline stages ------------------------------------------------------------------------------


def test_stage_keeps_order_and_applies_fn() -> None:
    out = list(Stage(range(100), lambda x: x * x, maxsize=3))
    assert out == [x * x for x in range(100)]


def test_chained_stages_keep_order_with_uneven_speeds() -> None:
    def slow_odd(x: int) -> int:
        if x % 2:
            time.sleep(0.002)
        return x

    first = Stage(range(60), slow_odd, maxsize=2, name="a")
    second = Stage(first, lambda x: x + 1000, maxsize=1, name="b")
    assert list(second) == [x + 1000 for x in range(60)]


def test_stage_is_bounded() -> None:
    """A fast producer runs at most maxsize + 1 items ahead of a slow consumer (bounded memory)."""
    produced: list[int] = []

    def source():
        for i in range(50):
            produced.append(i)
            yield i

    stage = Stage(source(), maxsize=3)
    ahead = []
    for consumed, _ in enumerate(stage, 1):
        time.sleep(0.01)
        ahead.append(len(produced) - consumed)
    assert max(ahead) <= 3 + 1
    assert max(ahead) >= 2  # it did run ahead: the overlap is real


def test_stage_reraises_errors_in_the_consumer() -> None:
    def boom(x: int) -> int:
        if x == 5:
            raise ValueError("bad item 5")
        return x

    got = []
    with pytest.raises(ValueError, match="bad item 5"):
        for x in Stage(Stage(range(10), boom, maxsize=2), maxsize=2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]


def test_closing_early_stops_every_thread_and_closes_the_source() -> None:
    closed = threading.Event()

    def source():
        try:
            for i in range(10_000):
                yield i
        finally:
            closed.set()

    first = Stage(source(), maxsize=2, name="first")
    second = Stage(first, lambda x: x, maxsize=2, name="second")
    assert next(second) == 0
    second.close()
    assert not second.thread.is_alive()
    first.thread.join(5)
    assert not first.thread.is_alive()
    assert closed.wait(5)
    assert first.produced < 100


# -- the Embedder --------------------------------------------------------------------------------


def _flat(batches):
    items = [(i.path, i.hash, i.width, i.height, i.error) for b in batches for i in b.items]
    return items, np.concatenate([b.vectors for b in batches])


def test_embed_files_order_metadata_and_invariance(tmp_path, tiny_model) -> None:
    """Input order, exact metadata and the same vectors whatever the workers and batch size."""
    paths = [str(p) for p in make_collection(tmp_path / "c", n=9)]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    make_image(tmp_path / "wide.png", size=(300, 90), fmt="PNG")
    paths[2:2] = [str(tmp_path / "empty.jpg")]
    paths[6:6] = [str(tmp_path / "junk.png"), str(tmp_path / "wide.png")]
    runs = [
        _flat(list(Embedder(tiny_model, device="cpu", batch_size=bs, workers=w).embed_files(paths)))
        for bs, w in ((4, 0), (3, 2), (32, 1))
    ]
    items, vectors = runs[0]
    assert [p for p, *_ in items] == paths
    failed = {Path(p).name: e for p, _, _, _, e in items if e}
    assert set(failed) == {"empty.jpg", "junk.png"}
    assert "empty" in failed["empty.jpg"]
    assert vectors.shape == (len(paths) - 2, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    wide = next(i for i in items if i[0].endswith("wide.png"))
    assert (wide[2], wide[3]) == (300, 90)
    for other_items, other_vectors in runs[1:]:
        assert other_items == items
        np.testing.assert_allclose(other_vectors, vectors, atol=1e-5)


def test_embed_files_equals_embed_images(tmp_path, tiny_model) -> None:
    from simsearch.images import load_image

    paths = [str(p) for p in make_collection(tmp_path / "c", n=5)]
    emb = Embedder(tiny_model, device="cpu", batch_size=2, workers=0)
    _, vectors = _flat(list(emb.embed_files(paths)))
    direct = emb.embed_images([load_image(p, draft_size=256) for p in paths])
    np.testing.assert_allclose(vectors, direct, atol=1e-5)


def test_progress_counts_every_file(tmp_path, tiny_model) -> None:
    paths = [str(p) for p in make_collection(tmp_path / "c", n=7)]
    seen: list[int] = []
    list(Embedder(tiny_model, device="cpu", batch_size=3, workers=0).embed_files(paths, progress=seen.append))
    assert seen == [3, 3, 1]


def test_consumer_stopping_early_shuts_the_pipeline_down(tmp_path, tiny_model) -> None:
    paths = [str(p) for p in make_collection(tmp_path / "c", n=12)]
    before = {t.name for t in threading.enumerate()}
    gen = Embedder(tiny_model, device="cpu", batch_size=2, workers=2).embed_files(paths)
    next(gen)
    gen.close()
    leftover = [t for t in threading.enumerate() if t.name.startswith("simsearch-") and t.name not in before]
    assert not any(t.is_alive() for t in leftover)


def test_compile_pads_batches_to_one_shape(tmp_path, tiny_model, monkeypatch) -> None:
    """With --compile every forward sees the full batch shape (one compilation); results unchanged."""
    shapes: list[tuple] = []

    def fake_compile(module, **kwargs):
        assert kwargs.get("dynamic") is False

        def run(x):
            shapes.append(tuple(x.shape))
            return module(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    paths = [str(p) for p in make_collection(tmp_path / "c", n=5)]
    compiled = Embedder(tiny_model, device="cpu", batch_size=4, workers=0, compile=True)
    _, v1 = _flat(list(compiled.embed_files(paths)))
    assert shapes and set(shapes) == {(4, 3, 224, 224)}
    _, v2 = _flat(list(Embedder(tiny_model, device="cpu", batch_size=4, workers=0).embed_files(paths)))
    np.testing.assert_allclose(v1, v2, atol=1e-5)


def test_decode_option_errors(tiny_model) -> None:
    with pytest.raises(InputError, match="needs the model on a CUDA device"):
        Embedder(tiny_model, device="cpu", decode="gpu")
    with pytest.raises(InputError, match="unknown decoder"):
        Embedder(tiny_model, device="cpu", decode="fast")


def test_cli_decode_gpu_without_cuda_fails_cleanly(tmp_path) -> None:
    from click.testing import CliRunner

    from simsearch.cli import cli

    make_collection(tmp_path / "c", n=2)
    result = CliRunner().invoke(
        cli, ["index", str(tmp_path / "c"), "--index", str(tmp_path / "idx"), "--model", "resnet18", "--weights",
              "random", "--device", "cpu", "--decode", "gpu", "--quiet"],
    )
    assert result.exit_code == 1
    assert "--decode gpu" in result.output
    assert not (tmp_path / "idx").exists()  # nothing created before the check


# -- torch k-means and exact search, checked against FAISS / numpy on CPU -----------------------


def _blobs(n: int, d: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    x = centers[rng.integers(0, k, size=n)] + 0.35 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_torch_kmeans_equals_faiss_given_the_same_init() -> None:
    from simsearch.embed.gpu_ops import assign_nearest, init_centroids, spherical_kmeans

    x = _blobs(3000, 32, 12, seed=0)
    init = init_centroids(torch.from_numpy(x), 12, seed=3)
    c, labels, obj = spherical_kmeans(torch.from_numpy(x), 12, niter=15, init=init)
    km = faiss.Kmeans(32, 12, niter=15, spherical=True, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=1 << 30)
    km.train(x, init_centroids=init.numpy().copy())
    np.testing.assert_allclose(c.numpy(), km.centroids, atol=1e-4)
    _, faiss_labels = km.index.search(x, 1)  # by the final centroids, not the last iteration's labels
    assert (assign_nearest(torch.from_numpy(x), c)[0].numpy() == faiss_labels[:, 0]).mean() > 0.999
    assert abs(obj - float(km.obj[-1])) / abs(float(km.obj[-1])) < 1e-4


def test_torch_kmeans_contract_matches_cluster_kmeans() -> None:
    """Same shapes and meanings as the FAISS path."""
    from simsearch.cluster import kmeans
    from simsearch.embed.gpu_ops import kmeans_torch

    x = _blobs(2000, 16, 8, seed=1)
    c, assign, dist, obj = kmeans_torch(x, 8, niter=20, seed=5, device="cpu")
    fc, fassign, fdist, fobj = kmeans(x, 8, niter=20, seed=5, device="cpu")
    assert c.shape == fc.shape and assign.shape == fassign.shape and assign.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(dist, np.linalg.norm(x - c[assign], axis=1), atol=1e-5)
    brute = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    assert (brute == assign).all()
    assert obj > 0.97 * fobj  # sum of inner products: higher is better


@pytest.mark.parametrize("n, k, seed", [(1000, 10, 1234), (5000, 100, 7), (37, 37, 3), (2, 1, 0)])
def test_torch_kmeans_starts_from_faiss_rows(n, k, seed) -> None:
    """The initial rows are FAISS's for the same seed (its rand_perm, seeded seed + 1), in its order."""
    from simsearch.embed.gpu_ops import faiss_init_rows

    perm = np.zeros(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed + 1)
    assert faiss_init_rows(n, k, seed).tolist() == perm[:k].tolist()


@pytest.mark.parametrize("k, seed", [(12, 5), (40, 1), (150, 3)])
def test_torch_kmeans_equals_faiss_for_the_same_seed(k, seed) -> None:
    """--device cuda (torch) and cpu (FAISS) give the same clustering for a seed: torch run on the CPU."""
    from simsearch.cluster import kmeans
    from simsearch.embed.gpu_ops import kmeans_torch

    x = _blobs(3000, 32, 12, seed=0)
    c, assign, dist, obj = kmeans_torch(x, k, niter=20, seed=seed, device="cpu")
    fc, fassign, fdist, fobj = kmeans(x, k, niter=20, seed=seed, device="cpu")
    np.testing.assert_allclose(c, fc, atol=1e-5)
    assert (assign == fassign).mean() > 0.999
    np.testing.assert_allclose(dist, fdist, atol=1e-3)  # sqrt of a cancelling difference near 0
    assert abs(obj - fobj) / abs(fobj) < 1e-5
    other = kmeans_torch(x, k, niter=20, seed=seed + 1, device="cpu")[0]  # another seed: another start
    assert np.abs(other - c).max() > 1e-3


def test_torch_kmeans_splits_like_faiss() -> None:
    """Empty clusters are split as FAISS splits them (same random draws, same perturbation)."""
    from simsearch.embed.gpu_ops import assign_nearest, spherical_kmeans

    x = _blobs(400, 8, 3, seed=2)
    init = np.vstack([x[:3], -x[:1], -x[:1], -x[1:2]]).astype(np.float32)  # far-away seeds: empty clusters
    c, labels, obj = spherical_kmeans(torch.from_numpy(x), 6, niter=10, init=torch.from_numpy(init))
    km = faiss.Kmeans(8, 6, niter=10, spherical=True, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=1 << 30)
    km.train(x, init_centroids=init.copy())
    assert sum(s["nsplit"] for s in km.iteration_stats) > 0  # the check exercises the split
    np.testing.assert_allclose(c.numpy(), km.centroids, atol=1e-5)
    _, faiss_labels = km.index.search(x, 1)
    assert (assign_nearest(torch.from_numpy(x), c)[0].numpy() == faiss_labels[:, 0]).all()


def test_torch_kmeans_k_equals_n_copies_the_points_like_faiss() -> None:
    from simsearch.cluster import kmeans
    from simsearch.embed.gpu_ops import kmeans_torch

    x = _blobs(20, 8, 3, seed=4)
    c, assign, dist, _ = kmeans_torch(x, 20, seed=1, device="cpu")
    fc, fassign, _, _ = kmeans(x, 20, seed=1, device="cpu")
    np.testing.assert_allclose(c, fc, atol=1e-6)
    assert (assign == fassign).all() and np.abs(dist).max() < 1e-3


def test_torch_kmeans_splits_empty_clusters() -> None:
    from simsearch.embed.gpu_ops import spherical_kmeans

    x = _blobs(400, 8, 3, seed=2)
    init = torch.from_numpy(np.vstack([x[:3], -x[:1], -x[:1]]))  # two duplicate far-away seeds
    c, labels, _ = spherical_kmeans(torch.from_numpy(x), 5, niter=10, init=init)
    assert torch.isfinite(c).all()
    assert len(torch.unique(labels)) == 5  # the empty clusters were given points


def test_cluster_auto_does_not_import_torch_without_a_driver() -> None:
    code = (
        "import sys, numpy as np\n"
        "from simsearch.cluster import kmeans\n"
        "x = np.random.default_rng(0).normal(size=(200, 8)).astype('float32')\n"
        "x /= np.linalg.norm(x, axis=1, keepdims=True)\n"
        "kmeans(x, 4)\n"
        "print('torch' in sys.modules)\n"
    )
    from simsearch.embed.cuda_probe import cuda_maybe_present

    if cuda_maybe_present():
        pytest.skip("an NVIDIA driver is present here")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_cluster_kmeans_cuda_without_cuda_is_an_input_error() -> None:
    from simsearch.cluster import kmeans

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(InputError, match="no CUDA device"):
        kmeans(_blobs(100, 4, 2, seed=0), 2, device="cuda")


@pytest.mark.parametrize("k, chunk", [(5, None), (5, 7), (40, 16), (60, 9)])
def test_exact_search_matches_numpy(k, chunk) -> None:
    from simsearch.embed.gpu_ops import exact_search

    rng = np.random.default_rng(k)
    db = rng.normal(size=(50, 24)).astype(np.float32)
    q = rng.normal(size=(6, 24)).astype(np.float32)
    scores, idx = exact_search(torch.from_numpy(q), torch.from_numpy(db), k, chunk=chunk)
    full = q @ db.T
    kk = min(k, 50)
    expected = np.argsort(-full, axis=1)[:, :kk]
    np.testing.assert_array_equal(idx[:, :kk].numpy(), expected)
    np.testing.assert_allclose(scores[:, :kk].numpy(), np.take_along_axis(full, expected, 1), rtol=1e-5, atol=1e-5)
    if k > 50:
        assert (idx[:, 50:] == -1).all() and torch.isinf(scores[:, 50:]).all()


def test_warm_up_compiles_before_the_first_batch(tmp_path, tiny_model, monkeypatch) -> None:
    """warmup=True (what the indexer asks for) pays compilation / autotuning in the constructor."""
    calls: list[tuple] = []

    def fake_compile(module, **kwargs):
        def run(x):
            calls.append(tuple(x.shape))
            return module(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    Embedder(tiny_model, device="cpu", batch_size=3, workers=0, compile=True, warmup=False)
    assert calls == []
    Embedder(tiny_model, device="cpu", batch_size=3, workers=0, compile=True, warmup=True)
    assert calls == [(3, 3, 224, 224)]
    calls.clear()
    Embedder(tiny_model, device="cpu", batch_size=3, workers=0, warmup=True)  # eager CPU: nothing to pay
    assert calls == []


# -- precision and memory layout --------------------------------------------------------------------

from simsearch.embed.device import cpu_has_native_bf16 as real_cpu_has_native_bf16  # noqa: E402  (before the fixture patches it)


def test_resolve_precision_on_cpu(monkeypatch) -> None:
    import simsearch.embed.device as em

    cpu = torch.device("cpu")
    assert em.resolve_precision("fp32", cpu) is None
    assert em.resolve_precision("bf16", cpu) is torch.bfloat16
    assert em.resolve_precision("auto", cpu) is None  # (conftest: no bf16 units)
    monkeypatch.setattr(em, "cpu_has_native_bf16", lambda: True)
    assert em.resolve_precision("auto", cpu) is torch.bfloat16
    assert em.resolve_precision("fp32", cpu) is None
    with pytest.raises(InputError, match="unknown precision"):
        em.resolve_precision("fp8", cpu)


@pytest.mark.parametrize(
    "caps, expected",
    [({"avx512_bf16": True, "amx_bf16": False}, True), ({"avx512_bf16": False, "amx_bf16": True}, True),
     ({"avx512_bf16": False, "avx2": True}, False), ({}, False), (RuntimeError("cpuinfo"), False), (None, False)],
)
def test_native_bf16_is_read_from_torch_capabilities(monkeypatch, caps, expected) -> None:
    if caps is None:
        monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    elif isinstance(caps, Exception):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: (_ for _ in ()).throw(caps))
    else:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert real_cpu_has_native_bf16() is expected


def _centred_cos(a: np.ndarray, b: np.ndarray, mu: np.ndarray) -> np.ndarray:
    a, b = a - mu, b - mu
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_bf16_on_cpu_gives_nearly_the_fp32_embedding(tmp_path: Path, tiny_model) -> None:
    paths = [str(p) for p in make_collection(tmp_path / "p", n=8)]
    fp32 = Embedder(tiny_model, device="cpu", batch_size=4, workers=0, precision="fp32")
    bf16 = Embedder(tiny_model, device="cpu", batch_size=4, workers=0, precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    a = np.concatenate([b.vectors for b in fp32.embed_files(paths)])
    b = np.concatenate([b.vectors for b in bf16.embed_files(paths)])
    assert not np.array_equal(a, b)  # bf16 really ran
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)  # normalised in float32
    # random weights map every image close to one direction; compare around the mean
    mu = a.mean(0)
    same = _centred_cos(a, b, mu)
    assert same.min() > 0.99, same
    assert _centred_cos(a[0], a[1], mu) < 0.9  # the check could fail: different images are far apart
    # the query path (decoded images) runs under the same precision
    crops = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    q32, q16 = fp32.embed_uint8(crops), bf16.embed_uint8(crops)
    assert q16.dtype == np.float32 and not np.array_equal(q32, q16)


def test_model_runs_channels_last_on_cpu(tiny_model) -> None:
    emb = Embedder(tiny_model, device="cpu", workers=0, precision="fp32")
    convs = [m.weight for m in emb.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(p.dtype == torch.float32 for p in emb.model.parameters())  # bf16 on CPU is autocast, not converted weights


# -- the batch-size probe and query padding (CUDA policies, checked on the CPU) ------------------


def test_batch_size_probe_input_is_an_inference_tensor(tiny_model, monkeypatch) -> None:
    """The probe's input is built inside inference_mode, like every real batch: a compiled model
    then sees one kind of input (one guard set) and the first real batch does not recompile."""
    emb = Embedder(tiny_model, device="cpu", batch_size=4, workers=0)
    seen: list[tuple[int, bool]] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append((x.shape[0], x.is_inference()))
        return torch.zeros((x.shape[0], emb.dim))

    monkeypatch.setattr(emb, "_forward_module", forward)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr("simsearch.embed.embedder.CUDA_BATCH_CANDIDATES", (2,))
    assert emb._auto_batch_size() == 2
    emb.embed_uint8(torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8))  # a real (query) batch
    assert seen == [(2, True), (3, True)]


@pytest.mark.parametrize("n, step, size", [(1, 64, 1), (2, 64, 4), (4, 64, 4), (5, 64, 16), (17, 64, 64),
                                           (64, 64, 64), (3, 3, 3), (10, 12, 12), (40, 100, 64), (70, 100, 100)])
def test_query_pad_size(n, step, size) -> None:
    from simsearch.embed.embedder import query_pad_size

    assert query_pad_size(n, step) == size


def test_padded_query_batches_give_the_same_vectors(tiny_model, monkeypatch) -> None:
    """Query chunks padded to a few fixed sizes (as on CUDA): only those shapes reach the model, and
    the vectors equal the unpadded ones."""
    from simsearch.embed.embedder import QUERY_PAD_SIZES

    emb = Embedder(tiny_model, device="cpu", batch_size=20, workers=0, precision="fp32")
    crops = torch.randint(0, 256, (27, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert emb.pad_queries is False  # CPU: no cuDNN autotuning to avoid
    ref = np.concatenate([emb.embed_uint8(crops[i : i + 1]) for i in range(3)] + [emb.embed_uint8(crops[3:])])
    shapes: list[int] = []
    real = emb._forward_module
    monkeypatch.setattr(emb, "_forward_module", lambda x: (shapes.append(x.shape[0]), real(x))[1])
    emb.pad_queries = True
    got = np.concatenate([emb.embed_uint8(crops[i : i + 1]) for i in range(3)] + [emb.embed_uint8(crops[3:])])
    assert shapes == [1, 1, 1, 20, 4]  # 24 = one full chunk of 20, then 4 padded to 4
    emb.embed_uint8(crops[:6])
    assert shapes[-1] == 16 and set(shapes) <= set(QUERY_PAD_SIZES) | {20}
    assert got.shape == ref.shape == (27, emb.dim)
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_query_embedder_decodes_on_the_cpu(tmp_path, monkeypatch) -> None:
    """A query-only embedder asks for CPU decoding: it never initialises nvJPEG."""
    from conftest import run_index
    import simsearch.embed.embedder as embedder_mod
    from simsearch.search import Searcher

    make_collection(tmp_path / "photos", n=3)
    run_index(tmp_path / "photos", tmp_path / "idx")
    asked: list[str] = []
    real = embedder_mod.resolve_decode
    monkeypatch.setattr(embedder_mod, "resolve_decode", lambda decode, device: (asked.append(decode), real(decode, device))[1])
    with Searcher(tmp_path / "idx", device="cpu") as s:
        assert s.embedder.decode == "cpu"
    assert asked == ["cpu"]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_crop_is_torchvision_s_resize_and_center_crop(mode: str) -> None:
    """preprocess_pil gives exactly torchvision's pixels (without importing it), padding included."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from simsearch.embed.decode import preprocess_pil, trim_thin
    from simsearch.models import Preprocessing

    rng = np.random.default_rng(4)
    preps = [Preprocessing(), Preprocessing(232, 224, interpolation="bicubic"), Preprocessing(200, 224), Preprocessing(223, 224, interpolation="nearest")]
    for w, h in [(320, 240), (240, 320), (256, 256), (100, 37), (1001, 999), (3000, 20), (224, 225), (13, 500)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8), mode)
        for prep in preps:
            ref = F.resize(trim_thin(img), [prep.resize_size], interpolation=InterpolationMode(prep.interpolation), antialias=True)
            ref = F.pil_to_tensor(F.center_crop(ref, [prep.crop_size]))
            got = preprocess_pil(img, prep)
            assert got.dtype == ref.dtype and got.shape == ref.shape, (w, h, prep)
            assert torch.equal(got, ref), (w, h, prep)
