"""Finding image files and decoding them robustly into RGB.

Everything real collections throw at a decoder is handled here, once: EXIF orientation,
palette/alpha/LA/CMYK/16-bit/grayscale modes, animated files (first frame), truncated and
corrupt files, and decompression bombs. Failures raise :class:`ImageError`; callers decide
whether to record and carry on (indexing) or stop (querying).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import logging
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError, InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
JUNK_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini"})
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default bomb limit (about 179 MP)

# We enforce our own, configurable pixel limit in decode_image; Pillow's global one would
# otherwise refuse files above twice its default before we could apply the user's setting.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class FileEntry:
    """A candidate image file found by the walk, with the stat fields incremental indexing uses."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of a collection, for indexing it on several machines at once.

    A file belongs to the part picked by a hash of its path relative to the folder it was found
    under, so every machine puts the same file in the same part whatever the folder is mounted as;
    the parts are disjoint and together hold every file."""

    index: int  # 1-based
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``I/N``, with 1 <= I <= N."""
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise InputError(f"a shard is I/N (part I of N, from 1), not {text!r}") from None
        if not 1 <= i <= n:
            raise InputError(f"shard {text}: I must be between 1 and N")
        return cls(i, n)

    def holds(self, relative_path: str) -> bool:
        digest = hashlib.blake2b(os.fsencode(relative_path), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# What an OS error reading a file (permission, I/O) reads like in a stored error: such a failure
# says nothing about the file's content, so the next run retries it even if size and mtime did
# not change. Bad-image errors start with the file's (absolute) path instead, never with this.
READ_ERROR_PREFIX = "cannot read "

# Images more than this many times longer than wide (or wider than long) are centre-trimmed along
# their long side before resizing (see simsearch.embed.decode): resizing a 60000 x 1 strip's short
# side to 256 would otherwise allocate a 15,360,000 x 256 image (about 12 GB).
THIN_ASPECT = 32


def is_read_error(error: str | None) -> bool:
    """Whether a stored failure was an OS error reading the file (worth retrying), not a bad image."""
    return bool(error) and error.startswith(READ_ERROR_PREFIX)  # type: ignore[union-attr]


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, from its ``st_mode``."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def not_regular_reason(path: str, mode: int) -> str:
    """The one-line reason a non-regular file is skipped (it is never opened: a FIFO would block)."""
    return f"{path} is {file_kind(mode)}, not a regular file"


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading; anything else is refused without blocking.

    The open is non-blocking, so a FIFO swapped in after the walk cannot hang the run; the file
    is then checked to be regular before a byte is read. Raises OSError, or :class:`ImageError`
    for a FIFO, socket or device.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(not_regular_reason(os.fspath(path), mode))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or inside it (both absolute and normalised; no file system access)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_hidden_or_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def _excluded(path: str, rel: str, patterns: tuple[str, ...]) -> bool:
    name = os.path.basename(path)
    return any(
        fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(path, p) for p in patterns
    )


SkipCallback = Callable[[str, str], None]


def iter_image_files(
    roots: Iterable[str | os.PathLike[str]], exclude: Iterable[str] = (), on_skip: SkipCallback | None = None,
    shard: Shard | None = None,
) -> Iterator[FileEntry]:
    """Walk ``roots`` recursively and yield image files in a stable (sorted) order.

    Hidden files and folders, OS junk (``._*``, ``Thumbs.db``, ``.DS_Store``) and paths matching
    an ``exclude`` glob (tested against the name, the path relative to the root, and the absolute
    path) are skipped; with ``shard``, so are the files of the other parts (by their path relative
    to the root; a root that is a file, by its name). Symlinked folders are followed once: a loop
    or a second link to the same folder never repeats it, and a file reachable by two paths is
    yielded once.

    A FIFO, socket or device with an image name (or given as a root) is never opened (a FIFO
    would block); ``on_skip(path, reason)`` hears of it.
    """
    patterns = tuple(exclude)
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    skip = on_skip or (lambda path, reason: None)
    for root in roots:
        root_path = os.path.abspath(os.fspath(root))
        try:
            st = os.stat(root_path)
        except OSError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if not stat.S_ISREG(st.st_mode):
                skip(root_path, not_regular_reason(root_path, st.st_mode))
            elif (st.st_dev, st.st_ino) not in seen_files and (shard is None or shard.holds(os.path.basename(root_path))):
                seen_files.add((st.st_dev, st.st_ino))
                yield FileEntry(root_path, st.st_size, st.st_mtime_ns)
            continue
        yield from _walk(root_path, root_path, patterns, seen_dirs, seen_files, skip, shard)


def _walk(
    root: str,
    folder: str,
    patterns: tuple[str, ...],
    seen_dirs: set[tuple[int, int]],
    seen_files: set[tuple[int, int]],
    skip: SkipCallback,
    shard: Shard | None = None,
) -> Iterator[FileEntry]:
    try:
        st = os.stat(folder)
    except OSError as exc:
        log.warning("cannot read folder %s: %s", folder, exc)
        return
    key = (st.st_dev, st.st_ino)
    if key in seen_dirs:
        return
    seen_dirs.add(key)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        log.warning("cannot list folder %s: %s", folder, exc)
        return
    subdirs = []
    for entry in entries:
        if _is_hidden_or_junk(entry.name):
            continue
        rel = os.path.relpath(entry.path, root)
        if patterns and _excluded(entry.path, rel, patterns):
            continue
        try:
            if entry.is_dir(follow_symlinks=True):
                subdirs.append(entry.path)
                continue
            if not is_image_name(entry.name) or (shard is not None and not shard.holds(rel)):
                continue
            fst = entry.stat(follow_symlinks=True)
        except OSError:  # dangling link, permission denied
            continue
        if not stat.S_ISREG(fst.st_mode):
            skip(entry.path, not_regular_reason(entry.path, fst.st_mode))
            continue
        fkey = (fst.st_dev, fst.st_ino)
        if fkey in seen_files:
            continue
        seen_files.add(fkey)
        yield FileEntry(entry.path, fst.st_size, fst.st_mtime_ns)
    for sub in subdirs:
        yield from _walk(root, sub, patterns, seen_dirs, seen_files, skip, shard)


def content_hash(data: bytes) -> str:
    """The content identity used to detect moved and touched files."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: str | os.PathLike[str]) -> str:
    """Raises OSError (or ImageError for a file that is not regular)."""
    with open_regular(path) as f:
        return content_hash(f.read())


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as exc:
        raise ImageError(f"{READ_ERROR_PREFIX}{path}: {exc.strerror or exc}") from exc
    if not data:
        raise ImageError(f"{path} is empty (0 bytes)")
    return data


def decode_image(
    data: bytes,
    name: str = "<bytes>",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode encoded image bytes into an upright 8-bit RGB image.

    ``draft_size``: when set, JPEGs are decoded at a reduced DCT scale whose shorter side is still
    at least ``draft_size`` pixels (Pillow's ``Image.draft``), which is several times faster for
    large photos that are about to be shrunk anyway.
    """
    return decode_image_sized(data, name, max_pixels=max_pixels, draft_size=draft_size)[0]


def decode_image_sized(
    data: bytes,
    name: str = "<bytes>",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image`, plus the (width, height) of the upright image at full size.

    The size is what the catalog records: the file's, even when the pixels were decoded at a draft
    scale, and swapped when the EXIF orientation turns the picture by 90 degrees.
    """
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(
                f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                "(raise it with --max-pixels)"
            )
        # MPO = a JPEG with extra frames (many phone photos): its first frame drafts the same way
        if draft_size and img.format in ("JPEG", "MPO") and min(width, height) >= 2 * draft_size:
            img.draft("RGB", (draft_size, draft_size))
        img.seek(0)  # first frame of animated GIF/WebP/TIFF
        img.load()
        decoded = img.size
        img = ImageOps.exif_transpose(img)
        turned = img.size != decoded  # exif_transpose swapped the sides (orientation 5 to 8)
        return to_rgb(img), ((height, width) if turned else (width, height))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name} is not an image Pillow can read (unknown or unsupported format)") from exc
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ...
        raise ImageError(f"{name} is not a readable image: {exc}") from exc


def load_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Read and decode one file (see :func:`decode_image`)."""
    return decode_image(read_bytes(path), str(path), max_pixels=max_pixels, draft_size=draft_size)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_bit_depth_to_rgb(img)
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit modes always span 0..65535 (a dark 16-bit image must stay dark); "I" and "F" are
    guessed from their values: 0..1 floats, 8-bit values stored wide, or a 16-bit range."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0  # 0..65535 -> 0..255
    elif img.mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    elif arr.size and arr.max() > 65535:
        arr = arr * (255.0 / arr.max())
    elif arr.size and arr.max() > 255:
        arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
    gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")
