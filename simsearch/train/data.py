"""Labelled image sets for training and evaluation: folders of classes or a CSV, splits, loaders.

A labelled folder has one sub-folder per class (images found recursively below it, with the same
walk and junk-skipping as indexing); a CSV has ``path,label`` rows (paths relative to the CSV).
Everything that can be wrong with the data is found here, before any training starts: empty class
folders (skipped), classes with one image (warned: such an image can never be a positive),
unreadable images (skipped and counted), fewer than two classes (an error).
"""

from __future__ import annotations

import csv
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..embed import CropDecoder, build_loader
from ..errors import ImageError, InputError
from ..images import DEFAULT_MAX_PIXELS, is_image_name, iter_image_files, read_bytes
from ..models import Preprocessing

log = logging.getLogger(__name__)


@dataclass
class LabelledSet:
    """Image paths with integer labels indexing ``class_names``; ``warnings`` says what was skipped."""

    source: str
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.class_names))

    def subset(self, indices: Sequence[int] | np.ndarray) -> "LabelledSet":
        """The chosen items, classes renumbered to those still present (names kept in order)."""
        idx = np.asarray(indices, dtype=np.int64)
        present = sorted(set(self.labels[idx].tolist()))
        remap = {old: new for new, old in enumerate(present)}
        return LabelledSet(
            self.source,
            [self.paths[i] for i in idx],
            np.asarray([remap[int(self.labels[i])] for i in idx], dtype=np.int64),
            [self.class_names[c] for c in present],
            list(self.warnings),
        )


def _warn(warnings: list[str], message: str) -> None:
    log.warning("%s", message)
    warnings.append(message)


def load_labelled(source: str | os.PathLike[str], exclude: Sequence[str] = ()) -> LabelledSet:
    """Read a labelled folder (one sub-folder per class) or a ``path,label`` CSV."""
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"no such file or folder: {source}")
    if path.is_dir():
        data = _load_folder(path, exclude)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
        data = _load_csv(path)
    else:
        raise InputError(f"{source} is neither a folder of class sub-folders nor a CSV of path,label")
    if not data.class_names:
        raise InputError(
            f"{source} holds no labelled images: give a folder with one sub-folder of images per class, "
            "or a CSV of path,label"
        )
    return data


def _load_folder(root: Path, exclude: Sequence[str]) -> LabelledSet:
    warnings: list[str] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise InputError(f"cannot list {root}: {exc}") from exc
    loose = [e.name for e in entries if e.is_file() and is_image_name(e.name) and not e.name.startswith(".")]
    if loose:
        _warn(warnings, f"{len(loose)} image(s) directly in {root} are in no class folder; ignored")
    paths: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        files = [f.path for f in iter_image_files([entry.path], exclude)]
        if not files:
            _warn(warnings, f"class folder {entry.name!r} has no images; skipped")
            continue
        names.append(entry.name)
        paths.extend(files)
        labels.extend([len(names) - 1] * len(files))
    return LabelledSet(str(root), paths, np.asarray(labels, dtype=np.int64), names, warnings)


def _load_csv(path: Path) -> LabelledSet:
    warnings: list[str] = []
    base = path.parent
    rows: list[tuple[str, str]] = []
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f, delimiter=delimiter)):
                if not row or not "".join(row).strip() or row[0].startswith("#"):
                    continue
                if len(row) < 2:
                    raise InputError(f"{path}:{n + 1}: expected path,label, got {row!r}")
                p, label = row[0].strip(), row[1].strip()
                if n == 0 and p.lower() in ("path", "file", "filename", "image") and label.lower() in (
                    "label",
                    "class",
                    "category",
                ):
                    continue  # header
                if not label:
                    raise InputError(f"{path}:{n + 1}: empty label for {p}")
                rows.append((p if os.path.isabs(p) else str(base / p), label))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(names)}
    return LabelledSet(
        str(path), [p for p, _ in rows], np.asarray([index[l] for _, l in rows], dtype=np.int64), names, warnings
    )


def drop_items(data: LabelledSet, bad: set[int], reason: str) -> LabelledSet:
    """Remove items (e.g. unreadable images); classes left empty go, with a warning."""
    if not bad:
        return data
    keep = [i for i in range(len(data)) if i not in bad]
    before = set(data.labels.tolist())
    out = data.subset(keep) if keep else LabelledSet(data.source, [], np.zeros(0, np.int64), [], list(data.warnings))
    gone = sorted(data.class_names[c] for c in before - set(data.labels[keep].tolist()))
    _warn(out.warnings, f"{len(bad)} {reason} image(s) skipped")
    for name in gone:
        _warn(out.warnings, f"class {name!r} has no readable images; skipped")
    return out


def check_classes(data: LabelledSet) -> None:
    """Warn about classes of one image; refuse fewer than two classes (nothing to tell apart)."""
    counts = data.counts()
    singles = [data.class_names[c] for c in np.flatnonzero(counts == 1)]
    if singles:
        shown = ", ".join(repr(s) for s in singles[:5]) + (" ..." if len(singles) > 5 else "")
        _warn(
            data.warnings,
            f"{len(singles)} class(es) have a single image ({shown}): it can never be a positive for retrieval",
        )
    if len(data.class_names) < 2:
        only = f" (only {data.class_names[0]!r})" if data.class_names else ""
        raise InputError(f"{data.source}: metric learning needs at least 2 classes with images{only}")


def split_by_image(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a fraction of each class's images (at least 2 so they can find each other).

    Classes of fewer than 4 images stay whole in training (a 1-image validation class is useless).
    """
    if not 0.0 <= fraction < 1.0:
        raise InputError("--val-fraction must be in [0, 1)")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = 0
        if fraction > 0 and len(idx) >= 4:
            n_val = min(max(2, int(round(len(idx) * fraction))), len(idx) - 2)
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def split_by_class(
    labels: np.ndarray, class_names: Sequence[str], spec: str | int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Hold out whole classes (open-set validation): ``spec`` is a count or comma-separated names."""
    counts = np.bincount(labels, minlength=len(class_names))
    spec_s = str(spec).strip()
    if spec_s.isdigit():
        n = int(spec_s)
        eligible = [c for c in range(len(class_names)) if counts[c] >= 2]
        if n < 1:
            raise InputError("--val-classes must be at least 1")
        if n > len(eligible) or len(class_names) - n < 2:
            raise InputError(
                f"--val-classes {n}: only {len(class_names)} classes ({len(eligible)} with 2+ images); "
                "at least 2 must stay for training"
            )
        chosen = sorted(random.Random(seed).sample(eligible, n))
    else:
        wanted = [s.strip() for s in spec_s.split(",") if s.strip()]
        index = {name: i for i, name in enumerate(class_names)}
        missing = [w for w in wanted if w not in index]
        if missing:
            raise InputError(f"--val-classes: unknown class(es) {', '.join(missing)}")
        chosen = sorted({index[w] for w in wanted})
        if len(class_names) - len(chosen) < 2:
            raise InputError("--val-classes leaves fewer than 2 classes for training")
    mask = np.isin(labels, chosen)
    return np.flatnonzero(~mask), np.flatnonzero(mask), [class_names[c] for c in chosen]


# -- decoding for training --------------------------------------------------------------------


def build_augmentation(prep: Preprocessing, scale: tuple[float, float] = (0.25, 1.0)) -> Callable[[Any], Any]:
    """Random resized crop, horizontal flip and colour jitter, ending in a uint8 CHW tensor."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    return T.Compose(
        [
            T.RandomResizedCrop(prep.crop_size, scale=scale, interpolation=InterpolationMode(prep.interpolation), antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
            T.Lambda(F.pil_to_tensor),
        ]
    )


class ImageDataset(torch.utils.data.Dataset):
    """Decode (robustly) and crop: random augmentation for training, centre crop otherwise.

    Items are ``(uint8 CHW tensor or None, label, index, error or None)``; a file that fails is
    returned with its error instead of killing the worker.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        prep: Preprocessing,
        augment: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.prep = prep
        self.max_pixels = max_pixels
        self.transform = build_augmentation(prep) if augment else None
        # the one decode path (its centre crop, or the augmentation in its place)
        self.decoder = CropDecoder(prep, max_pixels=max_pixels, crop=self.transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int, str | None]:
        path = self.paths[i]
        try:
            x, _ = self.decoder.decode(read_bytes(path), path)
            return x, int(self.labels[i]), i, None
        except ImageError as exc:  # unexpected failures arrive as ImageError too
            return None, int(self.labels[i]), i, str(exc)


def collate(samples: list[tuple[torch.Tensor | None, int, int, str | None]]) -> dict[str, Any]:
    ok = [s for s in samples if s[0] is not None]
    return {
        "images": torch.stack([s[0] for s in ok]) if ok else torch.zeros((0, 3, 1, 1), dtype=torch.uint8),
        "labels": torch.tensor([s[1] for s in ok], dtype=torch.int64),
        "index": torch.tensor([s[2] for s in ok], dtype=torch.int64),
        "errors": [(s[2], s[3]) for s in samples if s[0] is None],
    }


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    sampler: Any = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """Batches of :class:`ImageDataset` items (see :func:`collate`), from the shared loader builder."""
    return build_loader(
        dataset, workers, batch_size=batch_size, sampler=sampler, shuffle=shuffle, collate_fn=collate,
        pin_memory=pin_memory, drop_last=drop_last, seed=seed,
    )
