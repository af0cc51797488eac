"""Decoding real-world files into upright 8-bit RGB (simsearch.images.decode_image / load_image / to_rgb)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.errors import ImageError
from simsearch.images import decode_image, load_image, to_rgb


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def close(pixel, expected, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


def test_exif_orientation_6_rotates_upright(tmp_path: Path) -> None:
    # stored 80x40, left half red, right half blue; Orientation=6 means "rotate 90 deg clockwise to view"
    stored = Image.new("RGB", (80, 40), BLUE)
    stored.paste(RED, (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())

    img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == (40, 80)  # width and height swapped
    # rotating clockwise brings the stored left (red) half to the top
    assert close(img.getpixel((20, 10)), RED)
    assert close(img.getpixel((20, 70)), BLUE)


def test_exif_orientation_3_upside_down() -> None:
    stored = Image.new("RGB", (60, 40), BLUE)
    stored.paste(RED, (0, 0, 60, 20))  # top half red
    exif = Image.Exif()
    exif[0x0112] = 3
    img = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert img.size == (60, 40)
    assert close(img.getpixel((30, 35)), RED)  # now at the bottom
    assert close(img.getpixel((30, 5)), BLUE)


def _palette_image() -> Image.Image:
    img = Image.new("P", (20, 10), 1)
    palette = [0, 0, 0, *RED, *BLUE] + [0] * (256 * 3 - 9)
    img.putpalette(palette)
    img.paste(0, (0, 0, 5, 10))  # index 0 (black) on the left quarter
    img.paste(2, (15, 0, 20, 10))  # index 2 (blue) on the right quarter
    return img


def test_palette_without_transparency() -> None:
    data = encode(_palette_image(), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    img = decode_image(data)
    assert img.mode == "RGB"
    assert img.getpixel((2, 5)) == (0, 0, 0)
    assert img.getpixel((10, 5)) == RED
    assert img.getpixel((17, 5)) == BLUE


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_composited_on_white(fmt: str) -> None:
    data = encode(_palette_image(), fmt, transparency=0)
    raw = Image.open(io.BytesIO(data))
    assert raw.mode == "P" and "transparency" in raw.info
    img = decode_image(data)
    assert img.mode == "RGB"
    assert img.getpixel((2, 5)) == (255, 255, 255)  # the transparent index, not black
    assert img.getpixel((10, 5)) == RED
    assert img.getpixel((17, 5)) == BLUE


def test_rgba_alpha_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: white, whatever its colour
    rgba.putpixel((1, 0), (200, 10, 10, 255))  # opaque: unchanged
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half black over white: mid grey
    img = decode_image(encode(rgba, "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (200, 10, 10)
    assert close(img.getpixel((2, 0)), (127, 127, 127), tol=2)


def test_la_alpha_composited_on_white() -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (50, 0))
    la.putpixel((1, 0), (50, 255))
    data = encode(la, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    img = decode_image(data)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (50, 50, 50)


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image(data)
    assert img.mode == "RGB"
    assert close(img.getpixel((8, 8)), (255, 0, 0))


@pytest.mark.parametrize("value16, gray8", [(100 * 257, 100), (65535, 255), (0, 0), (200, 1)])
def test_16bit_png_maps_to_the_right_gray_level(value16: int, gray8: int) -> None:
    # (200, 1): a very dark 16-bit image must stay dark, not be read as 8-bit values
    data = encode(Image.fromarray(np.full((4, 4), value16, np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    img = decode_image(data)
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == (gray8, gray8, gray8)


def test_16bit_tiff() -> None:
    data = encode(Image.fromarray(np.full((4, 4), 30 * 257, np.uint16)), "TIFF")
    assert decode_image(data).getpixel((0, 0)) == (30, 30, 30)


def test_32bit_int_mode_to_rgb() -> None:
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert [wide.mode, to_rgb(wide).getpixel((1, 0))] == ["I", (255, 255, 255)]
    narrow = Image.fromarray(np.array([[7, 200]], dtype=np.int32), mode="I")  # 8-bit values held wide
    assert to_rgb(narrow).getpixel((1, 0)) == (200, 200, 200)


def test_grayscale_and_1bit() -> None:
    gray = decode_image(encode(Image.new("L", (4, 4), 77), "PNG"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    bits = Image.new("1", (4, 1), 0)
    bits.putpixel((3, 0), 1)
    img = decode_image(encode(bits, "PNG"))
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((3, 0)) == (255, 255, 255)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    img = decode_image(data)
    assert img.mode == "RGB" and close(img.getpixel((5, 5)), RED)


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "PNG"])
def test_other_formats_decode(fmt: str) -> None:
    img = decode_image(encode(Image.new("RGB", (12, 8), GREEN), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert img.mode == "RGB" and img.size == (12, 8) and close(img.getpixel((6, 4)), GREEN)


def test_truncated_jpeg_raises_image_error(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert "cut.jpg" in str(err.value)


def test_zero_byte_file_raises_image_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path)
    with pytest.raises(ImageError):
        decode_image(b"", "empty.png")


def test_missing_file_raises_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "nope.jpg")


def test_non_image_bytes_give_a_readable_message(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are not the pixels you are looking for\n" * 20)
    with pytest.raises(ImageError) as err:
        load_image(path)
    message = str(err.value)
    assert "notes.jpg" in message
    assert "BytesIO" not in message and "<_io" not in message
    assert "\n" not in message


def test_too_many_pixels_refused_with_hint() -> None:
    data = encode(Image.new("RGB", (50, 40), RED), "PNG")
    with pytest.raises(ImageError) as err:
        decode_image(data, "big.png", max_pixels=1999)
    assert "--max-pixels" in str(err.value) and "50x40" in str(err.value)
    assert decode_image(data, "big.png", max_pixels=2000).size == (50, 40)  # the limit itself is allowed
    assert decode_image(data, "big.png", max_pixels=None).size == (50, 40)


def test_draft_decoding_shrinks_large_jpegs_but_not_below_draft_size() -> None:
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8)), "JPEG")
    full = decode_image(data)
    assert full.size == (1200, 900)
    small = decode_image(data, draft_size=256)
    assert small.mode == "RGB"
    assert min(small.size) >= 256
    assert small.size[0] < 1200 and small.size[1] < 900  # it really decoded at a reduced scale
    assert abs(small.size[0] / small.size[1] - 4 / 3) < 0.01
    # an image not at least twice the draft size is decoded in full
    mid = encode(Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)), "JPEG")
    assert decode_image(mid, draft_size=256).size == (400, 300)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_exif_does_not_lose_the_image() -> None:
    for exif in (b"Exif\x00\x00II*\x00\xff\xff\xff\x7f", b"Exif\x00\x00garbage-garbage-garbage"):
        img = decode_image(encode(Image.new("RGB", (20, 10), RED), "JPEG", exif=exif))
        assert img.size == (20, 10) and close(img.getpixel((10, 5)), RED)
