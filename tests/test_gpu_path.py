"""The GPU decode path: JPEG routing, metadata, geometry and fallbacks on CPU; nvJPEG itself on CUDA.

Everything except the ``cuda`` tests runs on a machine without a GPU: the routing and metadata
are host code, the geometry is device-agnostic torch code, and the whole decode stage runs with
torchvision's CPU JPEG decoder standing in for nvJPEG (``Embedder.decode = "gpu"`` on CPU).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synth_images import natural_array  # noqa: E402

from simsearch.embed import CropDecoder, DecodedItem, Embedder, preprocess_pil  # noqa: E402
from simsearch.embed.batches import read_batch  # noqa: E402
from simsearch.embed.gpu_decode import GpuBatchDecoder, apply_orientation, resize_crop_images  # noqa: E402
from simsearch.embed.jpeg import gpu_route, probe_jpeg  # noqa: E402
from simsearch.images import content_hash  # noqa: E402
from simsearch.models import Preprocessing  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PREP = Preprocessing()
DECODER = CropDecoder(PREP, max_pixels=None)  # what the tests read and decode with


def jpeg_bytes(arr: np.ndarray, mode: str = "RGB", **save) -> bytes:
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(arr, exif=exif.tobytes())


def adobe_rgb_jpeg(arr: np.ndarray) -> bytes:
    """A JPEG with an Adobe APP14 segment saying 'transform 0' (channels stored as RGB)."""
    data = jpeg_bytes(arr)
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
    return data[:2] + app14 + data[2:]


@pytest.fixture(scope="module")
def arr() -> np.ndarray:
    return natural_array(320, 240, seed=3)


@pytest.fixture(scope="module")
def variants(tmp_path_factory, arr) -> dict[str, Path]:
    """One file per case the router must handle."""
    root = tmp_path_factory.mktemp("variants")
    files: dict[str, bytes] = {
        "baseline420": jpeg_bytes(arr),
        "baseline444": jpeg_bytes(arr, subsampling=0),
        "progressive": jpeg_bytes(arr, progressive=True),
        "gray": jpeg_bytes(arr, mode="L"),
        "cmyk": jpeg_bytes(arr, mode="CMYK"),
        "exif6": with_orientation(arr, 6),
        "exif3": with_orientation(arr, 3),
        "exif8": with_orientation(arr, 8),
        "trailing": jpeg_bytes(arr) + b"trailing bytes after EOI",
        "truncated": jpeg_bytes(arr)[:5000],
        "adobe_rgb": adobe_rgb_jpeg(arr),
        "empty": b"",
        "text": b"this is not an image at all",
    }
    # orientation only in XMP (Pillow reads it from there too); segment written by hand: any Pillow
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    payload = b"http://ns.adobe.com/xap/1.0/\x00" + xmp
    plain = jpeg_bytes(arr)
    files["xmp6"] = plain[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + plain[2:]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    files["png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "MPO", save_all=True, append_images=[Image.fromarray(arr[::2, ::2].copy())])
    files["mpo"] = buf.getvalue()
    # corrupt scan data (EOI intact): bytes in the middle of the entropy-coded segment overwritten
    bad = bytearray(jpeg_bytes(arr))
    bad[len(bad) // 2 : len(bad) // 2 + 400] = b"\xff\x00" * 200
    files["corrupt_scan"] = bytes(bad)
    out = {}
    for name, data in files.items():
        ext = ".png" if name == "png" else ".jpg"
        p = root / f"{name}{ext}"
        p.write_bytes(data)
        out[name] = p
    return out


# -- routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, to_gpu",
    [
        ("baseline420", True), ("baseline444", True), ("progressive", False), ("gray", True), ("exif6", True),
        ("trailing", True), ("mpo", True), ("xmp6", True),
        ("cmyk", False), ("truncated", False), ("adobe_rgb", False), ("png", False), ("text", False),
    ],
)
def test_routing(variants, name, to_gpu) -> None:
    data = variants[name].read_bytes()
    assert (gpu_route(data, None) is not None) is to_gpu


def test_progressive_jpegs_go_to_the_cpu_workers(arr, tmp_path) -> None:
    """Progressive JPEGs (SOF2), which nvJPEG's hardware decoder rejects, are decoded by the workers
    (crops in the batch), baseline ones travel as bytes to the GPU; rows stay in input order."""
    kinds = ["baseline", "progressive", "baseline", "progressive", "baseline422"]
    paths = []
    for i, kind in enumerate(kinds):
        save = {"progressive": True} if kind == "progressive" else ({"subsampling": 1} if kind == "baseline422" else {})
        p = tmp_path / f"{i}_{kind}.jpg"
        p.write_bytes(jpeg_bytes(np.roll(arr, 17 * i, axis=1), **save))
        paths.append(str(p))
    assert [probe_jpeg(Path(p).read_bytes()).sof for p in paths] == [0xC0, 0xC2, 0xC0, 0xC2, 0xC0]
    raw = read_batch(paths, DECODER, gpu=True)
    assert [r.slot for r in raw.jpegs] == [0, 2, 4] and raw.crop_slots == [1, 3]
    meta, ref = _cpu_reference(paths)
    out = GpuBatchDecoder(torch.device("cpu"), DECODER, torch.float32, channels_last=False)(raw)
    assert [(i.path, i.hash, i.width, i.height, i.error) for i in out.items] == meta
    from simsearch.embed import normalize_batch

    assert float((out.x - normalize_batch(ref, PREP)).abs().mean(dim=(1, 2, 3)).max()) < 0.05


def test_uncommon_chroma_subsampling_goes_to_the_cpu(arr) -> None:
    """Only the subsamplings the hardware decoder takes go to the GPU (the probe reads them from SOF)."""
    for subsampling, factors in ((0, (1, 1)), (1, (2, 1)), (2, (2, 2))):
        probe = probe_jpeg(jpeg_bytes(arr, subsampling=subsampling))
        assert probe.sampling == (factors, (1, 1), (1, 1)) and probe.gpu_ok
    data = bytearray(jpeg_bytes(arr, subsampling=2))
    sof = data.index(b"\xff\xc0")
    cb = sof + 4 + 6 + 3 + 1  # second component's sampling byte
    assert data[cb] == 0x11
    data[cb] = 0x21  # chroma sampled 2x1: not a hardware format
    assert probe_jpeg(bytes(data)).gpu_ok is False


def test_probe_reads_header(arr) -> None:
    data = jpeg_bytes(arr, progressive=True)
    probe = probe_jpeg(data)
    assert probe is not None
    assert (probe.sof, probe.precision, probe.width, probe.height, probe.components) == (0xC2, 8, 320, 240, 3)
    assert probe.end == len(data)
    assert probe_jpeg(data + b"junk").end == len(data)  # the primary image ends at its EOI
    assert probe_jpeg(data[: len(data) - 2]) is None  # no EOI: maybe truncated, let Pillow decide
    assert probe_jpeg(b"\xff\xd8\xff") is None
    assert probe_jpeg(b"") is None


def test_route_respects_max_pixels(variants) -> None:
    data = variants["baseline420"].read_bytes()
    assert gpu_route(data, 320 * 240) is not None
    assert gpu_route(data, 320 * 240 - 1) is None  # the CPU path raises the over-the-limit error


def test_metadata_equals_cpu_path(variants) -> None:
    """Width/height/hash/error of every routed file are exactly what the CPU path records."""
    for name, path in variants.items():
        data = path.read_bytes()
        cpu = DecodedItem(str(path))
        if data:
            cpu.hash = content_hash(data)
            DECODER.decode_item(cpu, data)
        route = gpu_route(data, None) if data else None
        if route is not None:
            assert cpu.ok, name
            _, _, (w, h) = route
            assert (w, h) == (cpu.width, cpu.height), name
    # and through read_batch, as the workers do it
    paths = [str(p) for p in variants.values()]
    cpu_batch = read_batch(paths, DECODER, gpu=False)
    gpu_batch = read_batch(paths, DECODER, gpu=True)
    as_tuple = lambda b: [(i.path, i.hash, i.width, i.height, i.error) for i in b.items]  # noqa: E731
    assert as_tuple(gpu_batch) == as_tuple(cpu_batch)
    errors = {Path(i.path).stem for i in cpu_batch.items if not i.ok}
    assert {"empty", "text", "truncated"} <= errors
    assert {Path(gpu_batch.items[gpu_batch.slots[r.slot]].path).stem for r in gpu_batch.jpegs} == {
        "baseline420", "baseline444", "gray", "exif6", "exif3", "exif8", "trailing", "mpo", "xmp6",
        "corrupt_scan",
    }
    assert gpu_batch.crops.shape[0] == len(gpu_batch.crop_slots)
    assert sorted(gpu_batch.crop_slots + [r.slot for r in gpu_batch.jpegs]) == list(range(len(gpu_batch.slots)))


# -- geometry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil(arr, orientation) -> None:
    img = Image.open(io.BytesIO(with_orientation(arr, orientation)))
    expected = pil_to_tensor(ImageOps.exif_transpose(img))
    raw = pil_to_tensor(Image.open(io.BytesIO(with_orientation(arr, orientation))))
    assert torch.equal(apply_orientation(raw, orientation), expected)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_crop_geometry_matches_pil(interpolation) -> None:
    prep = Preprocessing(interpolation=interpolation)
    sizes = [(500, 375), (375, 500), (257, 300), (1000, 240), (224, 224), (200, 150), (500, 375)]
    images = [Image.fromarray(natural_array(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    ref = torch.stack([preprocess_pil(im, prep) for im in images]).float()
    got = resize_crop_images([pil_to_tensor(im) for im in images], prep)  # grouped by size, order kept
    assert got.shape == ref.shape == (len(sizes), 3, 224, 224)
    diff = (got - ref).abs()
    assert diff.mean() < 0.5
    # bilinear: rounding only; bicubic: Pillow clips its intermediate pass to uint8, overshoots differ
    assert diff.max() <= (1.5 if interpolation == "bilinear" else 20)
    # a different image is far away: the comparison can fail
    assert (got[0] - ref[1]).abs().mean() > 10


def test_resize_crop_groups_split_by_budget() -> None:
    images = [pil_to_tensor(Image.fromarray(natural_array(300, 200, seed=i))) for i in range(5)]
    whole = resize_crop_images(images, PREP)
    split = resize_crop_images(images, PREP, budget=300 * 200 * 2)  # two images per resize call
    assert torch.allclose(whole, split)


def test_grayscale_expands_to_rgb(arr) -> None:
    gray = pil_to_tensor(Image.fromarray(arr).convert("L"))
    out = resize_crop_images([gray], PREP)
    assert out.shape == (1, 3, 224, 224)
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])


# -- the decode stage, with torchvision's CPU decoder standing in for nvJPEG ----------------------


def _cpu_reference(paths: list[str]) -> tuple[list[tuple], torch.Tensor]:
    batch = read_batch(paths, DECODER, gpu=False)
    return [(i.path, i.hash, i.width, i.height, i.error) for i in batch.items], batch.crops.float()


def test_decode_stage_matches_cpu_crops(variants) -> None:
    paths = [str(p) for p in variants.values()]
    meta, ref = _cpu_reference(paths)
    raw = read_batch(paths, DECODER, gpu=True)
    decoder = GpuBatchDecoder(torch.device("cpu"), DECODER, torch.float32, channels_last=False)
    out = decoder(raw)
    assert [(i.path, i.hash, i.width, i.height, i.error) for i in out.items] == meta
    from simsearch.embed import normalize_batch

    assert out.x.shape == ref.shape
    diff = (out.x - normalize_batch(ref, PREP)).abs().mean(dim=(1, 2, 3))
    assert float(diff.max()) < 0.05  # in normalised units (~1/58 of a grey level per 0.017)
    assert decoder.gpu_decoded == len(raw.jpegs)


def test_decode_leaves_the_warning_filters_alone(variants, monkeypatch) -> None:
    """The prepare thread never swaps the process-wide warning filters (catch_warnings is not
    thread-safe): they are the same during every decode call as before it."""
    import torchvision.io
    import warnings

    decoder = GpuBatchDecoder(torch.device("cpu"), DECODER, torch.float32, channels_last=False)
    raw = read_batch([str(variants[n]) for n in ("baseline420", "gray", "exif6")], DECODER, gpu=True)
    before = list(warnings.filters)
    during: list[list] = []
    real = torchvision.io.decode_jpeg

    def spy(views, **kw):
        during.append(list(warnings.filters))
        return real(views, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    decoder(raw)
    assert during and all(f == before for f in during)


def test_torchvision_deprecation_warning_is_silenced_from_a_thread(tmp_path, arr) -> None:
    """torchvision's per-call deprecation warning stays quiet when a pipeline thread decodes, even
    with DeprecationWarnings turned into errors on the command line."""
    import subprocess

    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes(arr))
    code = (
        "import threading, torch\n"
        "from simsearch.embed import CropDecoder\n"
        "from simsearch.embed.batches import read_batch\n"
        "from simsearch.embed.gpu_decode import GpuBatchDecoder\n"
        "from simsearch.models import Preprocessing\n"
        "dec = CropDecoder(Preprocessing(), max_pixels=None)\n"
        "g = GpuBatchDecoder(torch.device('cpu'), dec, torch.float32)\n"
        f"raw = read_batch([{str(path)!r}], dec, gpu=True)\n"
        "out = []\n"
        "t = threading.Thread(target=lambda: out.append(g(raw)))\n"
        "t.start(); t.join()\n"
        "print(g.gpu_decoded, tuple(out[0].x.shape))\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True,
                         text=True, timeout=120, cwd=root, env={**__import__("os").environ, "PYTHONPATH": root})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "(1,", "3,", "224,", "224)"]
    assert "deprecated" not in res.stderr


def test_decoder_rejection_falls_back_to_cpu(variants, monkeypatch) -> None:
    """A file the GPU decoder refuses (the whole batched call fails) is bisected out and decoded by Pillow."""
    import torchvision.io

    paths = [str(variants[n]) for n in ("baseline420", "exif6", "gray", "progressive", "png")]
    meta, ref = _cpu_reference(paths)
    real = torchvision.io.decode_jpeg
    refused_size = variants["exif6"].stat().st_size

    def picky(views, **kw):
        if any(int(v.numel()) == refused_size for v in views):
            raise RuntimeError("nvjpeg: unsupported")
        return real(views, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    raw = read_batch(paths, DECODER, gpu=True)
    decoder = GpuBatchDecoder(torch.device("cpu"), DECODER, torch.float32, channels_last=False)
    out = decoder(raw)
    assert decoder.cpu_fallbacks == 1 and decoder.gpu_decoded == 2  # (progressive: decoded by the workers)
    assert [(i.path, i.hash, i.width, i.height, i.error) for i in out.items] == meta
    from simsearch.embed import normalize_batch

    diff = (out.x - normalize_batch(ref, PREP)).abs().mean(dim=(1, 2, 3))
    assert float(diff.max()) < 0.05  # rows in input order, the fallback row included


def test_fallback_failure_is_recorded_like_cpu(variants, monkeypatch) -> None:
    """nvJPEG refuses and Pillow fails too: the item fails with the CPU path's error, rows stay aligned."""
    import torchvision.io

    paths = [str(variants[n]) for n in ("baseline420", "corrupt_scan", "gray")]
    raw = read_batch(paths, DECODER, gpu=True)
    refused = raw.jpegs[1].jpeg_size
    real = torchvision.io.decode_jpeg

    def picky(views, **kw):
        if any(int(v.numel()) == refused for v in views):
            raise RuntimeError("nvjpeg: corrupt")
        return real(views, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    # make Pillow fail on it as well
    import simsearch.embed.decode as embed_mod

    real_decode = embed_mod.decode_image_sized

    def failing(data, name="<bytes>", **kw):
        if name.endswith("corrupt_scan.jpg"):
            from simsearch.errors import ImageError

            raise ImageError(f"{name} is not a readable image: broken data stream")
        return real_decode(data, name, **kw)

    monkeypatch.setattr(embed_mod, "decode_image_sized", failing)
    out = GpuBatchDecoder(torch.device("cpu"), DECODER, torch.float32, channels_last=False)(raw)
    assert [i.ok for i in out.items] == [True, False, True]
    assert "broken data stream" in out.items[1].error and out.items[1].width is None
    assert out.x.shape[0] == 2
    ref = read_batch([paths[0], paths[2]], DECODER, gpu=False).crops.float()
    from simsearch.embed import normalize_batch

    assert float((out.x - normalize_batch(ref, PREP)).abs().mean(dim=(1, 2, 3)).max()) < 0.05


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_pipeline_on_cpu_matches_cpu_pipeline(variants, tiny_model, workers) -> None:
    """The whole embed_files pipeline with the GPU decode stage (CPU decoder standing in) equals the CPU one
    (with worker processes: the JPEG blob travels through shared memory)."""
    paths = [str(p) for p in variants.values()] * 2
    emb = Embedder(tiny_model, device="cpu", batch_size=5, workers=workers)
    ref = list(emb.embed_files(paths))
    emb.decode = "gpu"
    got = list(emb.embed_files(paths))
    assert [(i.path, i.hash, i.width, i.height, i.error) for b in got for i in b.items] == [
        (i.path, i.hash, i.width, i.height, i.error) for b in ref for i in b.items
    ]
    a, b = np.concatenate([x.vectors for x in ref]), np.concatenate([x.vectors for x in got])
    assert a.shape == b.shape
    assert float((a * b).sum(1).min()) > 0.999


def test_decode_gpu_without_cuda_is_an_input_error(tiny_model) -> None:
    from simsearch.errors import InputError

    with pytest.raises(InputError, match="--decode gpu"):
        Embedder(tiny_model, device="cpu", decode="gpu")
    assert Embedder(tiny_model, device="cpu", decode="auto").decode == "cpu"
    with pytest.raises(InputError, match="unknown decoder"):
        Embedder(tiny_model, device="cpu", decode="nvjpeg")


# -- on a CUDA machine ------------------------------------------------------------------------------


@cuda
def test_cuda_nvjpeg_available() -> None:
    from simsearch.embed.device import nvjpeg_unavailable_reason

    assert nvjpeg_unavailable_reason(torch.device("cuda")) is None


@cuda
def test_cuda_decode_stage_matches_cpu_crops(variants) -> None:
    """nvJPEG + GPU resize give (nearly) the pixels the CPU path gives, for every routed variant."""
    from simsearch.embed import normalize_batch

    paths = [str(p) for p in variants.values()]
    meta, ref = _cpu_reference(paths)
    raw = read_batch(paths, DECODER, gpu=True)
    decoder = GpuBatchDecoder(torch.device("cuda"), DECODER, torch.float32, channels_last=False)
    with torch.cuda.stream(decoder.stream):
        out = decoder(raw)
    out.event.synchronize()
    assert [(i.path, i.hash, i.width, i.height, i.error) for i in out.items] == meta
    x = out.x.float().cpu()
    per_image = (x - normalize_batch(ref, PREP)).abs().mean(dim=(1, 2, 3))
    names = [Path(out.items[s].path).stem for s in raw.slots]
    report = dict(zip(names, [round(float(v), 4) for v in per_image]))
    print("mean |gpu - cpu| per image (normalised units; 1 grey level = 0.017):", report)
    # nvJPEG upsamples chroma without libjpeg's "fancy" filter: a few grey levels at most on average.
    # (corrupt data decodes to whatever each decoder makes of it: metadata only for that one)
    assert max(v for k, v in report.items() if k != "corrupt_scan") < 0.1, report


@cuda
def test_cuda_embeddings_match_cpu_decode(tmp_path, variants, tiny_model) -> None:
    """Same images through --decode gpu and --decode cpu on CUDA: same metadata, near-identical vectors."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from synth_images import write_jpeg

    paths = [str(p) for p in variants.values()]
    for i, (w, h) in enumerate([(500, 375), (375, 500), (1024, 768), (3000, 2000), (640, 480)]):
        paths.append(str(tmp_path / f"photo{i}.jpg"))
        write_jpeg(paths[-1], w, h, seed=100 + i)
    import copy

    gpu = Embedder(copy.deepcopy(tiny_model), device="cuda", batch_size=8, workers=2, decode="gpu")
    cpu = Embedder(copy.deepcopy(tiny_model), device="cuda", batch_size=8, workers=2, decode="cpu")
    g, c = list(gpu.embed_files(paths)), list(cpu.embed_files(paths))
    key = lambda bs: [(i.path, i.hash, i.width, i.height, i.error) for b in bs for i in b.items]  # noqa: E731
    assert key(g) == key(c)
    a, b = np.concatenate([x.vectors for x in g]), np.concatenate([x.vectors for x in c])
    # a random-weight net maps all images close together (raw cosines ~0.98 between different
    # photos): compare after removing the mean embedding of unrelated photos, as test_draft does
    others = [str(tmp_path / f"other{i}.jpg") for i in range(6)]
    for i, p in enumerate(others):
        write_jpeg(p, 320, 240, seed=200 + i)
    mu = np.concatenate([x.vectors for x in cpu.embed_files(others)]).mean(0)
    raw = (a * b).sum(1)
    ac, bc = a - mu, b - mu
    centred = (ac * bc).sum(1) / np.linalg.norm(ac, axis=1) / np.linalg.norm(bc, axis=1)
    ok_names = [Path(i.path).stem for x in g for i in x.items if i.ok]
    print("cosine gpu vs cpu decode (raw, centred):", {n: (round(float(r), 4), round(float(cc), 4)) for n, r, cc in zip(ok_names, raw, centred)})
    keep = [i for i, n in enumerate(ok_names) if n != "corrupt_scan"]
    assert float(raw[keep].min()) >= 0.99
    assert float(centred[keep].min()) >= 0.98
    # and two different photos are far apart, so the check can fail
    assert float((ac[-1] * ac[-2]).sum() / np.linalg.norm(ac[-1]) / np.linalg.norm(ac[-2])) < 0.9


@cuda
def test_cuda_index_folders_gpu_vs_cpu_decode(tmp_path, variants) -> None:
    from simsearch.indexer import EmbedOptions, index_folders
    from simsearch.store import IndexStore

    root = Path(next(iter(variants.values()))).parent
    rows = {}
    for decode in ("gpu", "cpu"):
        opts = EmbedOptions(model="resnet18", weights="random", device="cuda", batch_size=4, workers=2, decode=decode)
        summary = index_folders([root], tmp_path / decode, opts)
        assert summary.embedded == len(list(root.iterdir()))
        with IndexStore.open(tmp_path / decode) as store:
            rows[decode] = sorted((r.path, r.hash, r.width, r.height, r.status, r.error) for r in store.catalog.rows())
    assert rows["gpu"] == rows["cpu"]


@cuda
def test_cuda_kmeans_matches_cpu_torch() -> None:
    from simsearch.embed.gpu_ops import init_centroids, spherical_kmeans

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xt = torch.from_numpy(x)
    init = init_centroids(xt, 20, seed=1)
    c_cpu, l_cpu, o_cpu = spherical_kmeans(xt, 20, niter=10, init=init)
    c_gpu, l_gpu, o_gpu = spherical_kmeans(xt.cuda(), 20, niter=10, init=init.cuda())
    agree = float((l_cpu == l_gpu.cpu()).float().mean())
    assert agree > 0.99
    assert abs(o_cpu - o_gpu) / abs(o_cpu) < 1e-3


@cuda
def test_cuda_cluster_kmeans_uses_gpu() -> None:
    from simsearch.cluster import _kmeans_backend, kmeans

    assert _kmeans_backend("auto") in ("torch", "faiss-gpu")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c, assign, dist, obj = kmeans(x, 10, device="cuda")
    assert c.shape == (10, 32) and assign.shape == (3000,) and np.isfinite(dist).all()
    np.testing.assert_allclose(dist, np.linalg.norm(x - c[assign], axis=1), atol=1e-4)


@cuda
def test_cuda_query_searches_on_the_gpu(tmp_path: Path) -> None:
    from conftest import make_collection, run_index
    from simsearch.embed.device_search import DeviceExactIndex
    from simsearch.search import Searcher

    paths = make_collection(tmp_path / "photos", n=8)
    run_index(tmp_path / "photos", tmp_path / "idx")
    with Searcher(tmp_path / "idx", device="cuda") as gpu, Searcher(tmp_path / "idx", device="cuda", search="faiss") as cpu:
        gpu.embedder  # noqa: B018 (the model, and with it the GPU search, is built on first use)
        assert isinstance(gpu.vector_search, DeviceExactIndex) and gpu.vector_search.device.type == "cuda"
        a, b = gpu.query(paths[:3], k=4), cpu.query(paths[:3], k=4)
    for ra, rb in zip(a, b):
        assert [h.path for h in ra.results] == [h.path for h in rb.results]
        np.testing.assert_allclose([h.score for h in ra.results], [h.score for h in rb.results], atol=1e-5)


@cuda
def test_cuda_precision_choices(tiny_model) -> None:
    import copy

    from simsearch.embed import Embedder

    crops = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    fp32 = Embedder(copy.deepcopy(tiny_model), device="cuda", batch_size=4, workers=0, precision="fp32")
    auto = Embedder(copy.deepcopy(tiny_model), device="cuda", batch_size=4, workers=0)
    assert fp32.precision == "fp32" and all(p.dtype == torch.float32 for p in fp32.model.parameters())
    assert auto.precision in ("bf16", "fp16") and all(p.dtype != torch.float32 for p in auto.model.parameters())
    a, b = fp32.embed_uint8(crops), auto.embed_uint8(crops)
    assert a.dtype == b.dtype == np.float32 and float((a * b).sum(1).min()) > 0.99


@cuda
def test_cuda_chunked_decode_of_12mp_photos_matches_cpu(tmp_path, monkeypatch) -> None:
    """Batches of 12 MP photos are decoded in several nvJPEG calls (DECODE_PIXEL_BUDGET); each call
    is ordered against the stream's earlier work, so every crop equals the CPU path's, run after run
    (unordered, a chunk's output could land in memory the previous chunk's resize still reads)."""
    import simsearch.embed.gpu_decode as gpu_decode_mod
    from simsearch.embed import normalize_batch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from synth_images import write_jpeg

    paths = []
    for i in range(8):
        w, h = (4000, 3000) if i % 3 else (3000, 4000)
        paths.append(str(tmp_path / f"photo{i}.jpg"))
        write_jpeg(paths[-1], w, h, seed=300 + i)
    monkeypatch.setattr(gpu_decode_mod, "DECODE_PIXEL_BUDGET", 2 * 4000 * 3000)  # 4 decode calls a batch
    meta, ref = _cpu_reference(paths)
    ref = normalize_batch(ref, PREP)
    raw = read_batch(paths, DECODER, gpu=True)
    assert len(raw.jpegs) == 8
    decoder = GpuBatchDecoder(torch.device("cuda"), DECODER, torch.float32, channels_last=False)
    for run in range(3):
        with torch.cuda.stream(decoder.stream):
            out = decoder(raw)
        out.event.synchronize()
        assert [(i.path, i.hash, i.width, i.height, i.error) for i in out.items] == meta
        per_image = (out.x.float().cpu() - ref).abs().mean(dim=(1, 2, 3))
        print(f"run {run}: mean |gpu - cpu| per 12 MP photo:", [round(float(v), 4) for v in per_image])
        assert float(per_image.max()) < 0.1, per_image
    assert decoder.gpu_decoded == 24 and decoder.cpu_fallbacks == 0
