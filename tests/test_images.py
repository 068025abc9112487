"""Every image mode becomes RGB as a viewer shows it; every undecodable file becomes a reason, not a crash."""

import io

import numpy as np
import pytest
from PIL import Image

from vlmcache.images import BadImage, FileSource, decode


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_cmyk_jpeg_becomes_rgb():
    img = decode(io.BytesIO(_bytes(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG")))
    assert img.mode == "RGB" and img.size == (8, 6)
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta + yellow full = red


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    out = decode(io.BytesIO(_bytes(img, "PNG", transparency=0)))
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr[0, 0].tolist() == [255, 0, 0] and arr[3, 3].tolist() == [255, 255, 255]


def test_rgba_and_la_alpha_composited_on_white():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(decode(io.BytesIO(_bytes(rgba, "PNG")))).min() == 255
    la = Image.new("LA", (2, 2), (0, 255))
    assert np.asarray(decode(io.BytesIO(_bytes(la, "PNG")))).max() == 0


def test_16bit_png_is_rescaled_not_clipped():
    arr = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    img = decode(io.BytesIO(_bytes(Image.fromarray(arr), "PNG")))
    out = np.asarray(img)[..., 0]
    assert img.mode == "RGB" and out.tolist() == [[0, 128], [255, 4]]


def test_grayscale_and_bilevel_become_rgb():
    assert decode(io.BytesIO(_bytes(Image.new("L", (3, 3), 7), "PNG"))).getpixel((0, 0)) == (7, 7, 7)
    assert decode(io.BytesIO(_bytes(Image.new("1", (3, 3), 1), "PNG"))).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode(io.BytesIO(_bytes(img, "JPEG", exif=exif.tobytes())))
    assert out.size == (20, 40)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not a picture\n", "not an image"),
        ("truncated", "cannot decode"),
    ],
)
def test_undecodable_files_give_reasons(tmp_path, content, reason):
    if content == "truncated":
        full = _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
        content = full[: len(full) // 2]
    (tmp_path / "x.jpg").write_bytes(content)
    with pytest.raises(BadImage, match=reason):
        FileSource(tmp_path, ["x.jpg"]).load(0)


def test_missing_file_and_decompression_bomb(tmp_path, monkeypatch):
    with pytest.raises(BadImage, match="file not found"):
        FileSource(tmp_path, ["nope.jpg"]).load(0)
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImage, match="decompression bomb"):
        FileSource(tmp_path, ["big.png"]).load(0)


def test_wrong_root_is_detected(tmp_path):
    assert FileSource(tmp_path, ["a/1.jpg", "a/2.jpg"]).first_missing() == str(tmp_path / "a/1.jpg")
    (tmp_path / "a").mkdir()
    (tmp_path / "a/2.jpg").write_bytes(b"x")
    assert FileSource(tmp_path, ["a/1.jpg", "a/2.jpg"]).first_missing() is None
