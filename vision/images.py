"""Loading users' image files (and uploaded bytes) into 8-bit RGB PIL images, or a clear error.

Real files are messy: camera JPEGs carry an EXIF rotation, PNGs have alpha or 16-bit depth, GIFs
and WebPs are animated, downloads are truncated, and a small file can decode to gigapixels. Every
failure becomes an `ImageLoadError` naming the file, so a data loader can skip or stop per policy.

`swap_red_blue` reproduces the official LLaMA-Adapter V2 input (`specs/llama-adapter.md` §3.8): it
reads images with OpenCV (BGR) and hands the array to PIL as if it were RGB, so the released
weights were trained on red and blue swapped.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Decoders tried (PIL format names); the JPEG decoder also opens camera MPO files.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: Default pixel limit (width x height) against decompression bombs: 64 megapixels.
DEFAULT_MAX_PIXELS = 64_000_000
WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(ValueError):
    """An image that cannot be used, with the file (or upload) it came from and why."""

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited on `background`, 16-bit scaled (not clipped) to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own convert clips 16-bit values at 255; scale the 0..65535 range instead.
        values = np.asarray(image, dtype=np.float64) / 257.0
        gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def swap_red_blue(image: Image.Image) -> Image.Image:
    """RGB -> BGR presented as RGB, the input the official V2 checkpoints were trained on."""
    red, green, blue = image.split()
    return Image.merge("RGB", (blue, green, red))


def load_image_bytes(
    data: bytes,
    *,
    source: str = "<bytes>",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
    bgr_quirk: bool = False,
) -> Image.Image:
    """Decode an encoded image (first frame), apply its EXIF orientation, and convert it to RGB.

    `source` names the data in errors. `max_pixels=None` leaves only PIL's own bomb limit.
    """
    if not data:
        raise ImageLoadError(source, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageLoadError(
                    source, f"{image.width}x{image.height} pixels exceeds the limit of {max_pixels:,} pixels"
                )
            image.seek(0)
            image.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(source, f"too many pixels, possible decompression bomb ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(source, f"not a supported image ({', '.join(SUPPORTED_FORMATS)})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(source, f"corrupt or truncated image ({error})") from error
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        pass  # a broken EXIF block: keep the pixels as stored rather than reject a decodable image
    try:
        rgb = to_rgb(image, background)
    except ValueError as error:
        raise ImageLoadError(source, f"unsupported pixel mode {image.mode} ({error})") from error
    return swap_red_blue(rgb) if bgr_quirk else rgb


def read_image_file(path: str | Path) -> bytes:
    """The bytes of an image file, or an `ImageLoadError` saying why there are none."""
    path = Path(path)
    try:
        return path.read_bytes()
    except OSError as error:
        raise _file_error(path, error) from error


def _file_error(path: Path, error: OSError) -> ImageLoadError:
    if isinstance(error, FileNotFoundError):
        return ImageLoadError(path, "file not found")
    if isinstance(error, IsADirectoryError):
        return ImageLoadError(path, "is a directory, not an image file")
    return ImageLoadError(path, f"cannot read ({error.strerror or error})")


def check_image_header(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from an image file's header, no pixels decoded: cheap enough to check a whole data
    set before training (a supported format within the pixel limit). A body truncated after the header
    passes; only decoding (`load_image`) finds that."""
    path = Path(path)
    try:
        file = path.open("rb")
    except OSError as error:
        raise _file_error(path, error) from error
    with file, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(file, formats=SUPPORTED_FORMATS) as image:
                width, height = image.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageLoadError(path, f"too many pixels, possible decompression bomb ({error})") from error
        except UnidentifiedImageError as error:
            raise ImageLoadError(path, f"not a supported image ({', '.join(SUPPORTED_FORMATS)})") from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageLoadError(path, f"corrupt image header ({error})") from error
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(path, f"{width}x{height} pixels exceeds the limit of {max_pixels:,} pixels")
    return width, height


def load_image(
    path: str | Path,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
    bgr_quirk: bool = False,
) -> Image.Image:
    """Load an image file as 8-bit RGB (see `load_image_bytes`); errors name the file."""
    return load_image_bytes(
        read_image_file(path), source=str(path), max_pixels=max_pixels, background=background, bgr_quirk=bgr_quirk
    )


def decode_base64_image(text: str, *, source: str = "<base64 image>") -> bytes:
    """Bytes of a base64 image, also as a `data:image/...;base64,` URL (as chat APIs send them)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ImageLoadError(source, "data URL is not base64-encoded")
    try:  # line breaks, as `base64` and Python's encodebytes write them, are not part of the data
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageLoadError(source, f"invalid base64 ({error})") from error
