"""Loading users' real image files: unusual formats convert to 8-bit RGB, bad files fail naming the file."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from mmadapter.vision import ImageLoadError, decode_base64_image, load_image, load_image_bytes, swap_red_blue

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _assert_rgb8(image: Image.Image) -> None:
    assert image.mode == "RGB" and np.asarray(image).dtype == np.uint8


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 tall, left half red, right half blue; EXIF 6 = "rotate 90 degrees clockwise to view".
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(Image.new("RGB", (20, 20), BLUE), (20, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "camera.jpg"
    stored.save(path, quality=95, exif=exif)
    image = load_image(path)
    _assert_rgb8(image)
    assert image.size == (20, 40)  # portrait as displayed
    top, bottom = _pixels(image)[5, 10], _pixels(image)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red ends up on top


def test_rgba_png_is_composited_on_white_or_a_chosen_fill(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((1, 0), (255, 0, 0, 0))  # fully transparent
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    path = tmp_path / "alpha.png"
    rgba.save(path)
    on_white = _pixels(load_image(path))[0]
    assert on_white[0].tolist() == [255, 0, 0] and on_white[1].tolist() == [255, 255, 255]
    assert np.all(np.abs(on_white[2] - 127) <= 1)
    assert _pixels(load_image(path, background=(0, 0, 0)))[0, 1].tolist() == [0, 0, 0]


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.png")
    Image.new("1", (4, 4), 1).save(tmp_path / "bits.png")
    gray, bits = load_image(tmp_path / "gray.png"), load_image(tmp_path / "bits.png")
    _assert_rgb8(gray)
    assert _pixels(gray)[0, 0].tolist() == [77, 77, 77] and _pixels(bits)[0, 0].tolist() == [255, 255, 255]


def test_palette_images_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 200, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png")
    palette.save(tmp_path / "palette-transparent.png", transparency=1)
    assert _pixels(load_image(tmp_path / "palette.png"))[0].tolist() == [[0, 200, 0], [10, 20, 30]]
    assert _pixels(load_image(tmp_path / "palette-transparent.png"))[0].tolist() == [[0, 200, 0], [255, 255, 255]]


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    _assert_rgb8(image)
    red, green, blue = _pixels(image)[4, 4]
    assert red > 230 and green < 25 and blue < 25


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth16.png"
    Image.fromarray(np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    image = load_image(path)
    _assert_rgb8(image)
    assert _pixels(image)[0, :, 0].tolist() == [0, 128, 255, 4]  # value / 257, rounded


def test_webp_and_multi_frame_files_give_the_first_frame(tmp_path):
    picture = Image.new("RGB", (6, 6), (12, 34, 56))
    picture.save(tmp_path / "still.webp", lossless=True)
    assert _pixels(load_image(tmp_path / "still.webp"))[3, 3].tolist() == [12, 34, 56]
    frames = [Image.new("RGB", (6, 6), RED), Image.new("RGB", (6, 6), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    frames[0].save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=frames[1:])  # multi-picture
    for name in ("anim.gif", "anim.webp", "camera.jpg"):
        image = load_image(tmp_path / name)
        _assert_rgb8(image)
        red, green, blue = _pixels(image)[3, 3]
        assert red > 245 and green < 10 and blue < 10


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("truncated.jpg", "truncated", "corrupt or truncated image"),
        ("noise.png", "random", "not a supported image"),
        ("empty.jpg", b"", "empty file"),
        ("missing.jpg", None, "file not found"),
    ],
)
def test_bad_files_raise_image_load_error_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    if content == "truncated":
        buffer = io.BytesIO()
        Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as caught:
        load_image(path)
    assert str(path) in str(caught.value) and caught.value.source == str(path)
    assert isinstance(caught.value, ValueError)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_pixel_limit_and_pil_decompression_bomb_checks(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 60)).save(path)
    with pytest.raises(ImageLoadError, match=r"big.png: 100x60 pixels exceeds the limit of 5,000 pixels"):
        load_image(path, max_pixels=5_000)
    assert load_image(path, max_pixels=6_000).size == (100, 60)
    # PIL's own guard (warning above MAX_IMAGE_PIXELS, error above twice that) becomes our error too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)
    for limit_hit in (5_000, 9_000):
        Image.new("RGB", (limit_hit // 50, 50)).save(path)
        with pytest.raises(ImageLoadError, match="decompression bomb"):
            load_image(path, max_pixels=None)


def test_bytes_and_base64_uploads():
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5), (1, 2, 3)).save(buffer, format="PNG")
    data = buffer.getvalue()
    text = base64.b64encode(data).decode()
    assert decode_base64_image(text) == data == decode_base64_image(f"data:image/png;base64,{text}")
    wrapped = base64.encodebytes(data).decode()  # 76-character lines, as the `base64` tool writes them
    assert "\n" in wrapped and decode_base64_image(f"data:image/png;base64,{wrapped}") == data
    assert _pixels(load_image_bytes(data, source="upload 0"))[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ImageLoadError, match="upload 1: not a supported image"):
        load_image_bytes(b"GIF89a-not-really", source="upload 1")
    with pytest.raises(ImageLoadError, match="invalid base64"):
        decode_base64_image("not base64 !!")
    with pytest.raises(ImageLoadError, match="not base64-encoded"):
        decode_base64_image("data:image/png,rawbytes")


def test_bgr_quirk_swaps_red_and_blue(tmp_path):
    path = tmp_path / "colour.png"
    Image.new("RGB", (2, 2), (10, 20, 30)).save(path)
    assert _pixels(load_image(path, bgr_quirk=True))[0, 0].tolist() == [30, 20, 10]
    assert _pixels(swap_red_blue(load_image(path)))[0, 0].tolist() == [30, 20, 10]
