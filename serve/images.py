"""Images sent to the HTTP API: base64 data URLs always, remote http(s) URLs only if the operator allows.

Fetching a URL on a client's behalf lets any client make the server download anything it can
reach (internal services included), so it is off unless `--allow-remote-images` is given, and then
limited in size and time. Decoding and the pixel limit are `mmadapter.vision.images`'.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.error
import urllib.request

from PIL import Image

from mmadapter.serve.openai_api import APIError, invalid
from mmadapter.vision.images import DEFAULT_MAX_PIXELS, ImageLoadError, decode_base64_image, load_image_bytes

_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[^,;]*)*?;base64,", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    allow_remote: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = 20 * 1024 * 1024
    """Largest remote image download."""
    fetch_timeout: float = 10.0


def _fetch(url: str, policy: ImagePolicy, param: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mmadapter"})
    try:
        with urllib.request.urlopen(request, timeout=policy.fetch_timeout) as response:  # noqa: S310 (http/https only)
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise invalid(f"could not download the image ({error})", param, code="invalid_image_url") from error
    if len(data) > policy.max_bytes:
        raise invalid(f"the image is larger than {policy.max_bytes:,} bytes", param, code="image_too_large")
    return data


#: What a URL scheme can look like (RFC 3986), bounded: anything else is not a URL.
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")


def load_request_image(url: str, param: str, policy: ImagePolicy) -> Image.Image:
    """The RGB image of a content part's `image_url.url`, or an APIError (400) naming `param`."""
    scheme = url.split(":", 1)[0].lower()
    try:
        if scheme == "data":
            match = _DATA_URL.match(url)
            if match is None:
                raise invalid("a data URL image must be base64-encoded (data:image/png;base64,...)", param)
            if not (match.group("type") or "").lower().startswith("image/"):
                declared = match.group("type") or "no media type"
                raise invalid(
                    f"the data URL is not an image ({declared}); use data:image/png;base64,… (or jpeg, webp, …)",
                    param,
                    code="invalid_image",
                )
            data = decode_base64_image(url, source=param)
        elif scheme in ("http", "https"):
            if not policy.allow_remote:
                message = (
                    "remote image URLs are disabled on this server; send the image as a base64 data URL "
                    "(the operator can allow them with --allow-remote-images)"
                )
                raise APIError(400, message, param=param, code="remote_images_disabled")
            data = _fetch(url, policy, param)
        elif ":" not in url or not _SCHEME.fullmatch(scheme):  # bare base64, a path: never echo a payload back
            raise invalid(
                "not a URL; send the image as a base64 data URL (data:image/png;base64,…)",
                param,
                code="invalid_image_url",
            )
        else:
            raise invalid(
                f"unsupported image URL scheme {scheme!r}; send a base64 data URL", param, code="invalid_image_url"
            )
        return load_image_bytes(data, source=param, max_pixels=policy.max_pixels)
    except ImageLoadError as error:
        raise invalid(str(error), param, code="invalid_image") from error
