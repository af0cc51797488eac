"""A duplicates threshold measured on the collection itself, not guessed.

:func:`calibrate_index` takes a seeded sample of the indexed images, makes synthetic copies of each
(the edits in :data:`EDITS`: re-compression, downscaling, crops, rotation, colour, borders, and
combinations), embeds them with the index's own model, and compares the similarity of each copy
to its original with the similarity of indexed images to their nearest *other* image (a non-copy:
what a false pair would score). It picks the lowest cosine threshold whose estimated precision
reaches the target, estimates the recall per kind of edit, and, when OpenCV is installed, the same
with geometric verification of candidate pairs below the threshold (:mod:`simsearch.verify`).
The result is recorded in the index's meta through the store, with the model identity it holds for.

Precision is estimated for a collection where every image has one copy: at threshold t,
``precision = R(t) / (R(t) + F(t))`` with R the fraction of copies found and F the fraction of
images whose nearest other image scores at least t. Copies the collection already holds count as
non-copies here, which only makes the threshold stricter.
"""

from __future__ import annotations

import io
import logging
import random
import time
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from .errors import ImageError
from .images import load_image
from .store import IndexStore, utc_now

log = logging.getLogger(__name__)

Edit = Callable[[Image.Image, random.Random], Image.Image]


# -- synthetic edits -------------------------------------------------------------------------
def jpeg(img: Image.Image, rnd: random.Random) -> Image.Image:
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=rnd.randint(20, 40))
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def half(img: Image.Image, rnd: random.Random) -> Image.Image:
    return img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.BILINEAR)


def _crop_keeping(img: Image.Image, rnd: random.Random, low: float, high: float) -> Image.Image:
    """A crop keeping a random ``low``-``high`` fraction of the area, at a random place."""
    keep = rnd.uniform(low, high)
    aspect = rnd.uniform(0.85, 1.15)
    w = min(img.width, max(1, round(img.width * np.sqrt(keep) * aspect)))
    h = min(img.height, max(1, round(img.width * img.height * keep / w)))
    x, y = rnd.randint(0, img.width - w), rnd.randint(0, img.height - h)
    return img.crop((x, y, x + w, y + h))


def crop(img: Image.Image, rnd: random.Random) -> Image.Image:
    """Cut 5-20 % of the area away."""
    return _crop_keeping(img, rnd, 0.80, 0.95)


def crop_large(img: Image.Image, rnd: random.Random) -> Image.Image:
    """Keep 50-80 % of the area."""
    return _crop_keeping(img, rnd, 0.50, 0.80)


def rotate(img: Image.Image, rnd: random.Random) -> Image.Image:
    return img.rotate(rnd.choice((-10, 10)), resample=Image.Resampling.BILINEAR, expand=True)


def mirror(img: Image.Image, rnd: random.Random) -> Image.Image:
    return ImageOps.mirror(img)


def gray(img: Image.Image, rnd: random.Random) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


def colour(img: Image.Image, rnd: random.Random) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(rnd.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rnd.uniform(0.7, 1.3))
    return ImageEnhance.Color(img).enhance(rnd.uniform(0.6, 1.4))


def text(img: Image.Image, rnd: random.Random) -> Image.Image:
    img = img.copy()
    draw = ImageDraw.Draw(img)
    size = max(10, img.height // 10)
    font = ImageFont.load_default(size=size)
    words = rnd.choice(("SAMPLE", "(c) 2024 photo", "sale -50%", "my holiday"))
    x, y = rnd.randint(0, max(0, img.width // 3)), rnd.randint(0, max(0, img.height - size - 2))
    draw.text((x + 1, y + 1), words, fill=(0, 0, 0), font=font)
    draw.text((x, y), words, fill=(255, 255, 255), font=font)
    return img


def border(img: Image.Image, rnd: random.Random) -> Image.Image:
    """Padding as in a screenshot: a flat border of 5-15 % of each side."""
    pad = max(1, round(max(img.size) * rnd.uniform(0.05, 0.15)))
    fill = rnd.choice(((0, 0, 0), (255, 255, 255), (32, 32, 32)))
    return ImageOps.expand(img, border=pad, fill=fill)


MILD: dict[str, Edit] = {"jpeg": jpeg, "half": half, "crop": crop, "rotate": rotate, "colour": colour, "border": border, "text": text}
SINGLE: dict[str, Edit] = dict(MILD, crop_large=crop_large, mirror=mirror, gray=gray)


def combined(count: int) -> Edit:
    """``count`` different mild edits in a random order."""

    def edit(img: Image.Image, rnd: random.Random) -> Image.Image:
        for name in rnd.sample(sorted(MILD), count):
            img = MILD[name](img, rnd)
        return img

    return edit


def six(img: Image.Image, rnd: random.Random) -> Image.Image:
    """Six edits at once: crop, rotate, colour, text, border, then JPEG."""
    for e in (crop, rotate, colour, text, border, jpeg):
        img = e(img, rnd)
    return img


EDITS: dict[str, Edit] = dict(SINGLE, combo2=combined(2), combo3=combined(3), six=six)
# what a calibration plants (the list); the benchmark plants all of EDITS
CALIBRATION_EDITS = ("jpeg", "half", "crop", "rotate", "colour", "border", "combo2", "combo3")


# -- the threshold ---------------------------------------------------------------------------
def threshold_for_precision(positives: np.ndarray, negatives: np.ndarray, target: float) -> float:
    """The lowest cosine t with R(t) / (R(t) + F(t)) >= target (R: fraction of ``positives`` >= t,
    F: fraction of ``negatives`` >= t); just above the highest negative when none reaches it."""
    pos = np.sort(np.asarray(positives, np.float64))
    neg = np.sort(np.asarray(negatives, np.float64))
    for t in np.unique(np.concatenate([pos, neg])):
        r = 1.0 - np.searchsorted(pos, t, side="left") / max(len(pos), 1)
        f = 1.0 - np.searchsorted(neg, t, side="left") / max(len(neg), 1)
        if r > 0 and r / (r + f) >= target:
            return float(t)
    return float(np.nextafter(neg[-1], 2.0)) if len(neg) else 1.0


def nearest_other_scores(store: IndexStore, ids: np.ndarray) -> np.ndarray:
    """For each id, the cosine of its nearest indexed image that is not a byte-identical copy."""
    ann = store.require_vectors()
    same: dict[int, set[int]] = {}
    for group in store.catalog.ok_ids_sharing_hash():
        for i in group:
            same[i] = set(group)
    out = np.full(len(ids), -1.0, np.float32)
    for start in range(0, len(ids), 1024):
        part = ids[start : start + 1024]
        depth = 2 + max((len(same.get(int(i), ())) for i in part), default=0)
        scores, found = ann.search(ann.index.reconstruct_batch(part), depth)
        for n, (i, s_row, f_row) in enumerate(zip(part.tolist(), scores, found)):
            skip = same.get(i, {i})
            for s, f in zip(s_row.tolist(), f_row.tolist()):
                if f >= 0 and f not in skip:
                    out[start + n] = s
                    break
    return out


def calibrate_index(
    store: IndexStore,
    precision_target: float = 0.99,
    sample: int = 100,
    seed: int = 0,
    negatives: int = 1000,
    edits: tuple[str, ...] = CALIBRATION_EDITS,
    device: str = "auto",
    verify: bool | None = None,
    record: bool = True,
) -> dict[str, Any]:
    """Measure and record a threshold for ``store`` (see the module docstring); returns the record.

    ``verify``: also measure verification of candidate pairs (default: when OpenCV is installed).
    """
    from .search import load_index_model
    from .verify import Verifier, verifier_available

    start = time.perf_counter()
    ann = store.require_vectors()
    all_ids = store.catalog.ok_ids()
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(all_ids, size=min(sample, len(all_ids)), replace=False))
    rows = store.catalog.rows_by_ids(picked)
    embedder = load_index_model(store, device=device)
    draft = int(store.meta["preprocessing"]["resize_size"]) * 2
    rnd = random.Random(seed)
    originals, copies, kinds, sources = [], [], [], []
    for i in picked.tolist():
        try:
            img = load_image(rows[i].real_path, draft_size=draft)
        except (ImageError, OSError) as exc:
            log.warning("calibration: skipping %s: %s", rows[i].path, exc)
            continue
        for name in edits:
            copies.append(EDITS[name](img, rnd))
            kinds.append(name)
            sources.append(i)
        originals.append(i)
    if not copies:
        raise ImageError("calibration: none of the sampled images could be read")
    vectors = np.concatenate([embedder.embed_images(copies[s : s + 64]) for s in range(0, len(copies), 64)])
    src = np.asarray(sources, np.int64)
    pos = np.einsum("nd,nd->n", vectors, ann.index.reconstruct_batch(src)).astype(np.float64)
    neg_ids = np.sort(rng.choice(all_ids, size=min(negatives, len(all_ids)), replace=False))
    neg = nearest_other_scores(store, neg_ids).astype(np.float64)
    if verify is None:
        verify = verifier_available()
    verifier = Verifier() if verify else None
    held = 0
    if verifier is not None:  # copies the collection already holds are not non-copies
        keep = _drop_held_copies(store, verifier, neg_ids, neg, float(np.quantile(pos, 0.01)))
        held = int((~keep).sum())
        neg_ids, neg = neg_ids[keep], neg[keep]
    threshold = threshold_for_precision(pos, neg, precision_target)
    kinds_arr = np.asarray(kinds)
    recall = {k: {"recall": round(float(np.mean(pos[kinds_arr == k] >= threshold)), 4)} for k in edits}
    f_plain = float(np.mean(neg >= threshold))
    r_plain = float(np.mean(pos >= threshold))
    record_: dict[str, Any] = {
        "threshold": round(threshold, 6),
        "precision_target": precision_target,
        "estimated_precision": round(r_plain / (r_plain + f_plain), 4) if r_plain else None,
        "estimated_recall": round(r_plain, 4),
        "recall": recall,
        "identity": store.catalog.identity(),
        "sample": len(originals),
        "copies": len(copies),
        "negatives": len(neg),
        "held_copies_dropped": held,
        "seed": seed,
        "edits": list(edits),
        "verify_default": False,
    }
    if verifier is not None:
        record_.update(_calibrate_verification(store, verifier, pos, neg, neg_ids, threshold, copies, src, kinds_arr, precision_target, rows_of=store.catalog.rows_by_ids))
    record_["created_at"] = utc_now()
    record_["seconds"] = round(time.perf_counter() - start, 2)
    if record:
        store.record_duplicates_calibration(record_)
    return record_


def _nearest_other(store: IndexStore, ids: np.ndarray) -> list[tuple[int, int]]:
    """(id, its nearest other indexed id) pairs."""
    ann = store.require_vectors()
    _, found = ann.search(ann.index.reconstruct_batch(ids), 2)
    return [(int(i), int(f[1] if f[0] == i else f[0])) for i, f in zip(ids.tolist(), found)]


def _drop_held_copies(store: IndexStore, verifier: Any, ids: np.ndarray, scores: np.ndarray, low: float) -> np.ndarray:
    """Mask of the negatives to keep: an image whose nearest other scores at least ``low`` (where
    copies start) and is verified as a copy of it is a copy the collection already holds, not a
    non-copy. Every negative in that band is checked: in a collection made mostly of copies (the
    kind people clean up) a capped check left hundreds of held copies counted as non-copies, which
    pushed the threshold to 0.999 and the candidate threshold up with it."""
    keep = np.ones(len(ids), bool)
    band = np.flatnonzero(scores >= low)
    if len(band) == 0:
        return keep
    pairs = _nearest_other(store, ids[band])
    rows = store.catalog.rows_by_ids([x for p in pairs for x in p])
    for j, (a, b) in zip(band.tolist(), pairs):
        if a in rows and b in rows and verifier.same_scene(rows[a].real_path, rows[b].real_path):
            keep[j] = False
    return keep


def _calibrate_verification(
    store: IndexStore, verifier: Any, pos: np.ndarray, neg: np.ndarray, neg_ids: np.ndarray, threshold: float,
    copies: list[Image.Image], src: np.ndarray, kinds: np.ndarray, target: float, rows_of: Callable[..., Any],
    check_limit: int = 300,
) -> dict[str, Any]:
    """Candidate threshold and per-edit recall with ORB+RANSAC verification of pairs below the threshold.

    The candidate threshold keeps 99 % of the copies as candidates, but no lower than where half
    the images would get a candidate (the cost of verification). Copies and non-copies between
    it and the threshold are verified (up to ``check_limit`` of each); verification becomes the
    default when its estimated precision still meets the target.
    """
    low = float(min(threshold, max(np.quantile(pos, 0.01), np.quantile(neg, 0.5))))
    rnd = np.random.default_rng(1)
    band_pos = np.flatnonzero((pos >= low) & (pos < threshold))
    checked_pos = band_pos if len(band_pos) <= check_limit else np.sort(rnd.choice(band_pos, check_limit, replace=False))
    rows = rows_of(src[checked_pos].tolist())
    ok_pos = np.zeros(len(pos), bool)
    for j in checked_pos.tolist():
        ok_pos[j] = verifier.same_scene(rows[int(src[j])].real_path, copies[j])
    pos_rate = ok_pos[checked_pos].mean() if len(checked_pos) else 0.0
    band_neg = np.flatnonzero((neg >= low) & (neg < threshold))
    checked_neg = band_neg if len(band_neg) <= check_limit else np.sort(rnd.choice(band_neg, check_limit, replace=False))
    fp = 0
    if len(checked_neg):
        pairs = _nearest_other(store, neg_ids[checked_neg])
        rows_n = rows_of([x for p in pairs for x in p])
        fp = sum(verifier.same_scene(rows_n[a].real_path, rows_n[b].real_path) for a, b in pairs if a in rows_n and b in rows_n)
    neg_rate = fp / len(checked_neg) if len(checked_neg) else 0.0
    # estimated rates with verification: pairs above the threshold, plus the verified share of the band
    r = float(np.mean(pos >= threshold) + len(band_pos) / len(pos) * pos_rate)
    f = float(np.mean(neg >= threshold) + len(band_neg) / len(neg) * neg_rate)
    per_edit = {}
    for k in np.unique(kinds).tolist():
        sel = kinds == k
        above = float(np.mean(pos[sel] >= threshold))
        in_band = np.flatnonzero(sel & (pos >= low) & (pos < threshold))
        checked = np.intersect1d(in_band, checked_pos)
        share = ok_pos[checked].mean() if len(checked) else 0.0
        per_edit[k] = round(above + len(in_band) / sel.sum() * share, 4)
    precision = r / (r + f) if r else 0.0
    return {
        "candidate_threshold": round(low, 6),
        "verified_recall": per_edit,
        "estimated_recall_verified": round(r, 4),
        "estimated_precision_verified": round(precision, 4),
        "verify_default": bool(precision >= target and r > float(np.mean(pos >= threshold))),
        "min_inliers": verifier.min_inliers,
    }
