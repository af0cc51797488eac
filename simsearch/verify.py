"""Geometric verification of a candidate duplicate pair with local features (OpenCV ORB + RANSAC).

A global embedding scores a 60 % crop or a 10 degree rotation of a photo barely above a different
photo of the same kind of scene, so one cosine threshold cannot separate them. Copy detection
checks such pairs the way it is done in practice: match ORB keypoints between the two images
(Hamming distance, Lowe's ratio test) and count the matches consistent with one homography
(RANSAC). A copy, however cropped, scaled, rotated, recoloured or re-compressed, keeps dozens of
consistent matches; two different photos keep a handful. Only pairs the neighbour graph already
proposes are checked, so the cost is a few milliseconds per candidate pair, not per image pair.

OpenCV comes with the ``dedup`` extra (``pip install 'simsearch[dedup]'``) and is imported only
here, only when a verifier is built.
"""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from .errors import ImageError
from .images import load_image

MIN_INLIERS = 20  # homography-consistent matches that make a pair the same picture
MAX_SIDE = 512  # images are matched at this size (longer side; small ones are enlarged, so scale differences shrink)
FEATURES = 1000  # ORB keypoints per image
RATIO = 0.8  # Lowe's ratio test
CACHE = 512  # images whose features are kept (a keeper is checked against each of its candidates)


MAX_SCALE = 8.0  # a copy is at most this much larger or smaller in area (after both are matched at MAX_SIDE)
MAX_PERSPECTIVE = 0.002  # projective terms of the homography, per pixel at MAX_SIDE: copies are near-affine
MIN_SPREAD = 0.04  # inliers must spread over this share of the image on both axes (std of their positions)


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


def verifier_available() -> bool:
    """True when OpenCV (the ``dedup`` extra) is installed."""
    return importlib.util.find_spec("cv2") is not None


class Verifier:
    """Counts the RANSAC-homography inliers among ORB matches of two images (paths or PIL images)."""

    def __init__(self, min_inliers: int | None = None, max_side: int = MAX_SIDE, features: int = FEATURES) -> None:
        import cv2

        self.cv2 = cv2
        self.min_inliers = min_inliers or MIN_INLIERS
        self.max_side = max_side
        self.orb = cv2.ORB_create(nfeatures=features)
        self.matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self.cache: OrderedDict[str, tuple[Any, Any]] = OrderedDict()

    def _gray(self, image: Image.Image) -> np.ndarray:
        image = image.convert("L")
        scale = self.max_side / max(image.size)
        if abs(scale - 1) > 0.05:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR)
        return np.asarray(image)

    def features(self, image: str | os.PathLike[str] | Image.Image, mirrored: bool = False) -> tuple[Any, Any]:
        """(keypoint coordinates (n, 2), ORB descriptors) of an image, or of its mirror image; cached by path."""
        name = None if isinstance(image, Image.Image) else os.fspath(image)
        key = f"{name}|{mirrored}"
        if name is not None and key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        try:
            pil = image if isinstance(image, Image.Image) else load_image(name, draft_size=self.max_side)  # type: ignore[arg-type]
        except (ImageError, OSError):
            found: tuple[Any, Any] = (np.zeros((0, 2), np.float32), None)
        else:
            gray = self._gray(pil)
            keypoints, descriptors = self.orb.detectAndCompute(gray[:, ::-1].copy() if mirrored else gray, None)
            found = (np.float32([k.pt for k in keypoints]).reshape(-1, 2), descriptors)
        if name is not None:
            self.cache[key] = found
            if len(self.cache) > CACHE:
                self.cache.popitem(last=False)
        return found

    def inliers(self, a: str | os.PathLike[str] | Image.Image, b: str | os.PathLike[str] | Image.Image) -> int:
        """How many ORB matches between ``a`` and ``b`` (or ``b`` mirrored, when that matches more:
        a mirrored copy is a copy) agree with one homography; 0 when too few match."""
        found = self._inliers(self.features(a), self.features(b))
        if found >= self.min_inliers:
            return found
        return max(found, self._inliers(self.features(a), self.features(b, mirrored=True)))

    def _inliers(self, fa: tuple[Any, Any], fb: tuple[Any, Any]) -> int:
        (pa, da), (pb, db) = fa, fb
        if da is None or db is None or len(da) < 2 or len(db) < 2:
            return 0
        pairs = self.matcher.knnMatch(da, db, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
        if len(good) < max(8, self.min_inliers // 2):
            return 0
        src = pa[[m.queryIdx for m in good]].reshape(-1, 1, 2)
        dst = pb[[m.trainIdx for m in good]].reshape(-1, 1, 2)
        h, mask = self.cv2.findHomography(src, dst, self.cv2.RANSAC, 5.0)
        if h is None or mask is None:
            return 0
        inside = mask.ravel().astype(bool)
        if not plausible_copy(h, src.reshape(-1, 2)[inside], self.max_side):
            return 0
        return int(inside.sum())

    def same_scene(self, a: str | os.PathLike[str] | Image.Image, b: str | os.PathLike[str] | Image.Image) -> bool:
        """True when ``a`` and ``b`` share at least ``min_inliers`` homography-consistent matches."""
        return self.inliers(a, b) >= self.min_inliers
