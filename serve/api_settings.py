"""The operator's settings of the API server (`mmadapter serve` flags), with defaults a single-host server needs."""

from __future__ import annotations

import dataclasses

from mmadapter.serve.images import ImagePolicy
from mmadapter.vision.images import DEFAULT_MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = dataclasses.field(default=None, repr=False)
    allow_remote_images: bool = False
    max_queue: int = 16
    """Requests that may wait while others generate; more are answered 429 with Retry-After."""
    max_batch: int = 16
    """Requests decoded together (the worker's running batch; 1 = one at a time)."""
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens; None: the model's context less one token for the answer."""
    max_connections: int = 128
    """Open connections; one more is answered 503 and closed."""
    header_timeout: float = 10.0
    """Seconds a client has to send a request's headers (slow senders are cut off: 408)."""
    body_timeout: float = 60.0
    """Seconds a client has to send a request's body once its headers arrived (408)."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle keep-alive connection stays open."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_pixels", "max_connections", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be at least 1, got {self.max_prompt_tokens}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")

    @property
    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(self.allow_remote_images, self.max_image_pixels, self.max_body_bytes)
