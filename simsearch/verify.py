"""Geometric verification of a candidate duplicate pair with local features (OpenCV ORB + RANSAC).

A global embedding scores a 60 % crop or a 10 degree rotation of a photo barely above a different
photo of the same kind of scene, so one cosine threshold cannot separate them. Copy detection
checks such pairs the way it is done in practice: match ORB keypoints between the two images
(Hamming distance, Lowe's ratio test) and count the matches consistent with one homography
(RANSAC). A copy, however cropped, scaled, rotated, recoloured or re-compressed, keeps dozens of
consistent matches; two different photos keep a handful. Only pairs the neighbour graph already
proposes are checked, so the cost is a few milliseconds per candidate pair, not per image pair.

A homography alone is not enough: two photos of the same rigid scene taken moments apart (the same
face in the same pose, a product on the same backdrop) also give a hundred consistent matches. So
the pair is then compared pixel by pixel (:func:`pixel_shift`): one image warped onto the other,
both blurred to the resolution of the smaller, one tone curve fitted (an edit changes brightness,
contrast, colour or gray levels globally), and the remaining difference expressed as the shift that
would explain it. A copy's pixels agree to well under a pixel; another shot's lighting, expression
and background do not. Fill an edit added (the corners a rotation fills, a flat border) is left out
where it covers the other image's picture (:func:`picture_area`): after a crop, those corners
cover what the crop cut away, and they are no difference between the pictures.

OpenCV comes with the ``dedup`` extra (``pip install 'simsearch[dedup]'``) and is imported only
here, only when a verifier is built.
"""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .errors import ImageError
from .images import load_image

MIN_INLIERS = 20  # homography-consistent matches that make a pair the same scene
MAX_SIDE = 512  # images are matched at this size (longer side; small ones are enlarged, so scale differences shrink)
FEATURES = 1000  # ORB keypoints per image
RATIO = 0.8  # Lowe's ratio test
CACHE = 256  # images whose features and pixels are kept (a keeper is checked against each of its candidates)


MAX_SCALE = 8.0  # a copy is at most this much larger or smaller in area (after both are matched at MAX_SIDE)
MAX_PERSPECTIVE = 0.002  # projective terms of the homography, per pixel at MAX_SIDE: copies are near-affine
MIN_SPREAD = 0.04  # inliers must spread over this share of the image on both axes (std of their positions)
MAX_SHIFT = 1.25  # pixels (at MAX_SIDE): the median misalignment the pixel comparison allows a copy
SHIFT_FLOOR = 2.0  # gray levels per pixel added to the gradient, so flat areas measure noise, not infinity
TONE_BINS = 32  # points of the fitted tone curve
FILL_RANGE = 4  # gray levels: fill stays this close to one level (even re-compressed), and so do its 3x3 neighbourhoods
FILL_FLAT = 0.9  # share of an area's pixels that must be flat for it to be fill
FILL_MIN = 0.01  # share of the image flat areas must cover to count as fill
FILL_INLIERS = 2  # and only when the homography has this many times the inliers a match needs
FILL_SKEW = 1.25  # fill is left out only under an alignment this close to a similarity (an edit's)
EDGE = 3  # pixels (at MAX_SIDE) dropped along the edge of fill, beyond the blur's reach


def plausible_copy(h: np.ndarray, points: np.ndarray, side: int) -> bool:
    """Whether a RANSAC homography can be an edit of one picture: not degenerate, not flipped, no
    strong perspective, and its inliers spread over the image. Spurious matches between two
    different photos can agree with a collapsed or wildly projective homography (a few dozen
    matches packed in one spot); a crop, resize, rotation or recolouring never needs one."""
    if not np.all(np.isfinite(h)) or abs(h[2, 2]) < 1e-9:
        return False
    h = h / h[2, 2]
    det = float(np.linalg.det(h[:2, :2]))
    if not (1 / MAX_SCALE <= det <= MAX_SCALE):  # also rejects a flip (negative determinant)
        return False
    if max(abs(h[2, 0]), abs(h[2, 1])) > MAX_PERSPECTIVE:
        return False
    return len(points) > 0 and bool(np.all(points.std(axis=0) >= MIN_SPREAD * side))


def _tone_residual(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|y - f(x)| for the monotone tone curve f fitted as the median of ``y`` over equal-count bins
    of ``x``: brightness, contrast, gamma, saturation, clipping and grayscale are all such curves,
    and a median ignores the few pixels a caption or logo covers."""
    order = np.argsort(x, kind="stable")
    per = len(x) // TONE_BINS
    if per < 8:
        return np.abs(y - np.median(y))
    xs, ys = x[order][: per * TONE_BINS].reshape(TONE_BINS, per), y[order][: per * TONE_BINS].reshape(TONE_BINS, per)
    curve_x, curve_y = xs.mean(axis=1), np.median(ys, axis=1)
    curve_x, first = np.unique(curve_x, return_index=True)  # np.interp needs increasing x
    return np.abs(y - np.interp(x, curve_x, curve_y[first]))


def picture_area(gray: np.ndarray) -> np.ndarray | None:
    """Where a gray image shows a picture rather than fill an edit added, or ``None`` when it all
    does: the corners a rotation fills, the flat padding of a border or screenshot.

    Fill is a flat area of one gray level (within :data:`FILL_RANGE`, so a re-compressed or
    recoloured fill still counts) that reaches the image's edge, or the edge of other fill (a
    rotation's corners inside a border added after it). It is grown from those edges with a fixed
    range around the level it starts from, so it stops at the picture even where a dark photo meets
    a black border. The picture is the convex hull of the rest: a rotated, cropped or padded
    rectangle is convex, and a photo's own flat area inside it is compared like any other pixels."""
    import cv2

    g = np.array(gray, np.uint8)  # a writable copy: floodFill takes its image as an output
    height, width = g.shape
    square = np.ones((3, 3), np.uint8)
    flat = (cv2.dilate(g, square) - cv2.erode(g, square)) <= FILL_RANGE
    fill = np.zeros((height + 2, width + 2), np.uint8)  # floodFill's mask: one pixel wider on every side
    tried = np.zeros((height, width), bool)
    flags = 4 | cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (1 << 8)

    def grow(ys: np.ndarray, xs: np.ndarray) -> bool:
        grown = False
        for y, x in zip(ys.tolist(), xs.tolist()):
            if tried[y, x] or not flat[y, x]:
                continue
            region = np.zeros_like(fill)
            cv2.floodFill(g, region, (x, y), 0, FILL_RANGE, FILL_RANGE, flags)
            part = region[1:-1, 1:-1] > 0
            tried[part] = True
            if part.sum() >= 64 and flat[part].mean() >= FILL_FLAT:
                fill[1:-1, 1:-1] |= part
                grown = True
        return grown

    step = 4
    edge_x = np.arange(0, width, step)
    edge_y = np.arange(0, height, step)
    grow(
        np.concatenate([np.zeros_like(edge_x), np.full_like(edge_x, height - 1), edge_y, edge_y]),
        np.concatenate([edge_x, edge_x, np.zeros_like(edge_y), np.full_like(edge_y, width - 1)]),
    )
    inner = np.ones((2 * EDGE + 1, 2 * EDGE + 1), np.uint8)
    for _ in range(3):  # fill next to fill
        ring = (cv2.dilate(fill[1:-1, 1:-1], inner) > 0) & flat & ~tried
        ys, xs = np.nonzero(ring)
        if not len(ys) or not grow(ys[::step], xs[::step]):
            break
    picture = fill[1:-1, 1:-1] == 0
    if picture.all() or (~picture).mean() < FILL_MIN:
        return None
    hull = np.zeros((height, width), np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(picture.astype(np.uint8))), 1)
    return hull > 0


def pixel_shift(
    a: np.ndarray, b: np.ndarray, h: np.ndarray, resolution: float,
    area_a: np.ndarray | None = None, area_b: np.ndarray | None = None,
) -> float:
    """Median misalignment, in pixels of ``a``, between gray image ``a`` and gray image ``b``
    warped onto it by ``h`` (a's coordinates to b's), after one tone curve; ``inf`` when they
    barely overlap. ``area_a``, ``area_b``: where each shows its picture (:func:`picture_area`;
    ``None``: everywhere); only pixels both show are compared, so the corners a rotation filled
    after a crop are not counted as differences.

    Both are blurred to ``resolution`` (native pixels per pixel of ``a``, at most 1: a half-size
    copy cannot agree on detail it no longer has). At each pixel the tone-mapped difference is
    divided by the local gradient (plus :data:`SHIFT_FLOOR`): the shift that would explain it. A
    copy, however recoloured, re-compressed or captioned, stays well under a pixel at the median;
    another photo of the same scene does not (measured on Caltech-101 faces: copies at most 1.07
    pixels, different shots of one person in one pose 1.4 and more).
    """
    import cv2

    a = a.astype(np.float32)
    size = (a.shape[1], a.shape[0])
    warped = cv2.warpPerspective(b.astype(np.float32), h, size, flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR)
    inside = cv2.warpPerspective(np.ones(b.shape, np.uint8), h, size, flags=cv2.WARP_INVERSE_MAP | cv2.INTER_NEAREST)
    inside = cv2.erode(inside, np.ones((7, 7), np.uint8))  # off the edges, where interpolation mixes in the outside
    sigma = 1.0 / max(min(resolution, 1.0), 0.05)
    if area_b is not None:
        area_b = _warp(area_b, h, size)
    if area_a is not None or area_b is not None:  # and off the fill, as far as the blur below carries it
        shown = np.ones(a.shape, np.uint8) if area_a is None else area_a.astype(np.uint8)
        if area_b is not None:
            shown &= area_b.astype(np.uint8)
        side = 2 * (EDGE + int(np.ceil(2 * sigma))) + 1
        inside &= cv2.erode(shown, np.ones((side, side), np.uint8))
    inside = inside > 0
    if inside.sum() < 1000:
        return float("inf")
    a = cv2.GaussianBlur(a, (0, 0), sigma)
    warped = cv2.GaussianBlur(warped, (0, 0), sigma)
    gradient = np.maximum(_gradient(a), _gradient(warped))[inside]
    residual = _tone_residual(a[inside], warped[inside])
    return float(np.median(residual / (gradient + SHIFT_FLOOR)))


def _skew(h: np.ndarray) -> float:
    """How far the homography's linear part is from a similarity: the ratio of its singular values
    (1 for a rotation and uniform scaling; a spurious match between two pictures can skew)."""
    low_high = np.linalg.svd(h[:2, :2] / h[2, 2], compute_uv=False)
    return float(low_high[0] / max(low_high[1], 1e-9))


def _warp(mask: np.ndarray, h: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.warpPerspective(mask.astype(np.uint8), h, size, flags=cv2.WARP_INVERSE_MAP | cv2.INTER_NEAREST) > 0


def _gradient(img: np.ndarray) -> np.ndarray:
    import cv2

    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3) / 8
    return np.hypot(gx, gy)


def verifier_available() -> bool:
    """True when OpenCV (the ``dedup`` extra) is installed."""
    return importlib.util.find_spec("cv2") is not None


@dataclass
class Match:
    """What verifying one pair found: homography inliers (of ``b`` or its mirror image) and, when
    there were enough, the pixel comparison's median shift."""

    inliers: int
    mirrored: bool = False
    shift: float = float("inf")
    min_inliers: int = MIN_INLIERS

    @property
    def same(self) -> bool:
        return self.inliers >= self.min_inliers and self.shift <= MAX_SHIFT


@dataclass
class _Image:
    points: np.ndarray  # keypoint coordinates (n, 2) at max_side
    descriptors: Any  # ORB descriptors, or None
    gray: np.ndarray | None  # the image at max_side
    side: int  # the decoded image's longer side: its resolution
    area: np.ndarray | None = None  # where it shows its picture, not an edit's fill (None: everywhere)


_UNREADABLE = _Image(np.zeros((0, 2), np.float32), None, None, 0)


class Verifier:
    """Checks a candidate pair (paths or PIL images): ORB matches consistent with a plausible
    homography, then pixels that agree once aligned (:func:`pixel_shift`)."""

    def __init__(self, min_inliers: int | None = None, max_side: int = MAX_SIDE, features: int = FEATURES) -> None:
        import cv2

        self.cv2 = cv2
        self.min_inliers = min_inliers or MIN_INLIERS
        self.max_side = max_side
        self.orb = cv2.ORB_create(nfeatures=features)
        self.matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self.cache: OrderedDict[str, _Image] = OrderedDict()

    def _gray(self, image: Image.Image) -> np.ndarray:
        image = image.convert("L")
        scale = self.max_side / max(image.size)
        if abs(scale - 1) > 0.05:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR)
        return np.asarray(image)

    def _image(self, image: str | os.PathLike[str] | Image.Image, mirrored: bool = False) -> _Image:
        name = None if isinstance(image, Image.Image) else os.fspath(image)
        key = f"{name}|{mirrored}"
        if name is not None and key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        try:
            pil = image if isinstance(image, Image.Image) else load_image(name, draft_size=self.max_side)  # type: ignore[arg-type]
        except (ImageError, OSError):
            found = _UNREADABLE
        else:
            gray = self._gray(pil)
            if mirrored:
                gray = gray[:, ::-1].copy()
            keypoints, descriptors = self.orb.detectAndCompute(gray, None)
            found = _Image(np.float32([k.pt for k in keypoints]).reshape(-1, 2), descriptors, gray, max(pil.size), picture_area(gray))
        if name is not None:
            self.cache[key] = found
            if len(self.cache) > CACHE:
                self.cache.popitem(last=False)
        return found

    def features(self, image: str | os.PathLike[str] | Image.Image, mirrored: bool = False) -> tuple[Any, Any]:
        """(keypoint coordinates (n, 2), ORB descriptors) of an image, or of its mirror image; cached by path."""
        found = self._image(image, mirrored)
        return found.points, found.descriptors

    def match(self, a: str | os.PathLike[str] | Image.Image, b: str | os.PathLike[str] | Image.Image) -> Match:
        """Verify ``a`` against ``b`` and, when that fails, against ``b``'s mirror image (a mirrored
        copy is a copy); the pixel comparison runs only where the homography has enough inliers."""
        best = Match(0, min_inliers=self.min_inliers)
        ia = self._image(a)
        for mirrored in (False, True):
            ib = self._image(b, mirrored)
            count, h = self._homography(ia, ib)
            found = Match(count, mirrored, min_inliers=self.min_inliers)
            if count >= self.min_inliers and h is not None and ia.gray is not None and ib.gray is not None:
                scale = float(np.sqrt(abs(np.linalg.det(h[:2, :2] / h[2, 2]))))
                resolution = min(ia.side / self.max_side, ib.side / self.max_side * scale)
                found.shift = pixel_shift(ia.gray, ib.gray, h, resolution, *self._areas(ia, ib, h, count))
                if found.same:
                    return found
            if (found.shift, -found.inliers) < (best.shift, -best.inliers):
                best = found
        return best

    def _areas(self, ia: _Image, ib: _Image, h: np.ndarray, count: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The picture areas to compare (:func:`picture_area`), or none: leaving pixels out trusts
        the alignment, so only one an edit makes (:data:`FILL_SKEW`) and matched well beyond the
        inlier minimum (:data:`FILL_INLIERS` times it). A 20-match alignment of two clip-art stop
        signs, fill left out, let their flat insides agree."""
        if count < FILL_INLIERS * self.min_inliers or _skew(h) > FILL_SKEW:
            return None, None
        return ia.area, ib.area

    def inliers(self, a: str | os.PathLike[str] | Image.Image, b: str | os.PathLike[str] | Image.Image) -> int:
        """How many ORB matches between ``a`` and ``b`` (or ``b`` mirrored, when that matches more)
        agree with one plausible homography; 0 when too few match. Geometry only: see :meth:`match`."""
        found = self._homography(self._image(a), self._image(b))[0]
        if found >= self.min_inliers:
            return found
        return max(found, self._homography(self._image(a), self._image(b, mirrored=True))[0])

    def _homography(self, ia: _Image, ib: _Image) -> tuple[int, np.ndarray | None]:
        """(inliers, homography from a's coordinates to b's), or (0, None) when implausible."""
        (pa, da), (pb, db) = (ia.points, ia.descriptors), (ib.points, ib.descriptors)
        if da is None or db is None or len(da) < 2 or len(db) < 2:
            return 0, None
        pairs = self.matcher.knnMatch(da, db, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
        if len(good) < max(8, self.min_inliers // 2):
            return 0, None
        src = pa[[m.queryIdx for m in good]].reshape(-1, 1, 2)
        dst = pb[[m.trainIdx for m in good]].reshape(-1, 1, 2)
        h, mask = self.cv2.findHomography(src, dst, self.cv2.RANSAC, 5.0)
        if h is None or mask is None:
            return 0, None
        inside = mask.ravel().astype(bool)
        if not plausible_copy(h, src.reshape(-1, 2)[inside], self.max_side):
            return 0, None
        return int(inside.sum()), h

    def same_scene(self, a: str | os.PathLike[str] | Image.Image, b: str | os.PathLike[str] | Image.Image) -> bool:
        """True when ``b`` (or its mirror image) is a copy of ``a``: enough homography-consistent
        matches and pixels that agree once aligned."""
        return self.match(a, b).same
