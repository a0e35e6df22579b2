"""On-disk cache of frozen-CLIP token features, so later epochs never run CLIP.

Keys: an image's content (sha256 of the file bytes: a renamed or copied file hits, an edited one
misses), inside a namespace derived from the encoder identity (architecture, activation, weights
hash), its eval preprocessing, the loader options and the stored dtype, so a different encoder or
preprocessing never reads stale features.

Trade-off: features are computed with the deterministic eval transform (resize + center crop), so
the training-time random resized crop is not applied to cached images. The official V2 crop is mild
(scale 0.9-1.0); train without the cache where that augmentation matters.

Layout: `<directory>/<namespace>/index.json` lists complete shards; each shard is a safetensors
file whose tensor names are the content keys. Shards and the index are written to a temporary file
and renamed, and a shard is listed only after it is complete, so a crash loses at most the shard in
progress. Size: ViT-L/14 gives 257 x 768 values per image (790 KB in fp32, half in fp16).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm

from mmadapter.core.files import atomic_save_tensors, atomic_write_bytes
from mmadapter.vision.clip_encoder import FrozenCLIPEncoder
from mmadapter.vision.images import DEFAULT_MAX_PIXELS, WHITE, ImageLoadError, load_image_bytes, read_image_file

try:
    import fcntl
except ImportError:  # Windows: one writer per cache directory
    fcntl = None

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
ImageItem = str | Path | Image.Image


@dataclass
class WarmResult:
    """What `CLIPFeatureCache.warm` did: counts, and the files skipped with `skip_errors=True`."""

    computed: int = 0
    cached: int = 0
    failed: list[ImageLoadError] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    """Each item's cache key, in the order given (None for a skipped file): look-ups need no second hash."""


def content_key(item: ImageItem, data: bytes | None = None) -> str:
    """`sha256-<hex>` of a file's bytes, or `pixels-<hex>` of an in-memory image's mode, size and pixels."""
    if isinstance(item, Image.Image):
        digest = hashlib.sha256(f"{item.mode}:{item.size}:".encode())
        digest.update(item.tobytes())
        return f"pixels-{digest.hexdigest()}"
    return f"sha256-{hashlib.sha256(read_image_file(item) if data is None else data).hexdigest()}"


class CLIPFeatureCache:
    """Token features of `encoder` for image files (or PIL images), computed once and kept on disk.

    `bgr_quirk`, `background` and `max_pixels` are the loader options (`mmadapter.vision.load_image`)
    for files; PIL images are used as given. `dtype` is the stored precision (default: the encoder's).
    """

    def __init__(
        self,
        directory: str | Path,
        encoder: FrozenCLIPEncoder,
        *,
        bgr_quirk: bool = False,
        background: tuple[int, int, int] = WHITE,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        dtype: torch.dtype | None = None,
        shard_size: int = 1024,
    ) -> None:
        self.encoder = encoder
        self.dtype = dtype or encoder.dtype
        self.shard_size = shard_size
        self._load_options = {"bgr_quirk": bgr_quirk, "background": background, "max_pixels": max_pixels}
        self.key = {
            "format": FORMAT_VERSION,
            "encoder": encoder.identity,
            "preprocess": json.loads(json.dumps(encoder.preprocess_cfg)),
            "transform": "eval",
            "loader": {"bgr_quirk": bgr_quirk, "background": list(background)},
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        namespace = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(directory) / namespace
        self._shard_of: dict[str, str] = {}
        self._shards: set[str] = set()
        self._handles: dict[str, Any] = {}
        self.refresh()

    # --- index ------------------------------------------------------------------------------------
    def _read_index(self) -> list[str]:
        path = self.root / INDEX_FILE
        if not path.is_file():
            return []
        document = json.loads(path.read_text())
        if document.get("key") != self.key:
            raise ValueError(f"{path}: index belongs to another encoder/preprocessing ({document.get('key')})")
        return document["shards"]

    def refresh(self) -> None:
        """Re-read the index (e.g. after another process added shards)."""
        for shard in self._read_index():
            if shard not in self._shards:
                with safe_open(self.root / shard, framework="pt") as reader:
                    self._shard_of.update(dict.fromkeys(reader.keys(), shard))
                self._shards.add(shard)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _commit(self, features: dict[str, torch.Tensor]) -> None:
        """Write one complete shard, then list it in the index (merged with other writers' shards)."""
        if not features:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        atomic_save_tensors(features, self.root / name)
        with self._locked():  # read-modify-write of the index only; shards are written in parallel
            document = {"key": self.key, "shards": [*self._read_index(), name]}
            atomic_write_bytes(self.root / INDEX_FILE, (json.dumps(document, indent=1) + "\n").encode())
        self.refresh()  # our shard, and any another process listed meanwhile

    # --- lookup -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._shard_of)

    def __contains__(self, key: str) -> bool:
        return key in self._shard_of

    def get(self, key: str) -> torch.Tensor:
        """Features (num_tokens, dim) stored under a content key."""
        shard = self._shard_of[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.root / shard, framework="pt")
        return self._handles[shard].get_tensor(key)

    # --- compute ----------------------------------------------------------------------------------
    def _encode(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """One (num_tokens, dim) tensor per image, each with its own storage (as safetensors requires)."""
        transform = self.encoder.transform(train=False)
        features = self.encoder(torch.stack([transform(image) for image in images])).to(self.dtype).cpu()
        return [row.clone() for row in features]

    def _ensure(
        self, items: Sequence[ImageItem], batch_size: int, progress: bool, skip_errors: bool
    ) -> tuple[list[str | None], WarmResult]:
        """Compute the features of every item not yet cached; return each item's key (None if skipped)."""
        keys: list[str | None] = []
        result = WarmResult()
        pending: dict[str, torch.Tensor] = {}
        bar = tqdm(total=len(items), desc="CLIP features", unit="img", disable=not progress)
        try:
            for start in range(0, len(items), batch_size):
                todo: dict[str, Image.Image] = {}
                for item in items[start : start + batch_size]:
                    try:
                        key, data = self._key(item)
                        if key not in self and key not in pending and key not in todo:
                            todo[key] = self._decode(item, data)
                    except ImageLoadError as error:
                        if not skip_errors:
                            raise
                        result.failed.append(error)
                        key = None
                    keys.append(key)
                if todo:
                    pending.update(zip(todo, self._encode(list(todo.values())), strict=True))
                result.computed += len(todo)
                if len(pending) >= self.shard_size:
                    self._commit(pending)
                    pending.clear()
                bar.update(min(batch_size, len(items) - start))
        finally:  # keep what was computed even when a file fails: it is complete and correct
            bar.close()
            self._commit(pending)
        result.cached = sum(key is not None for key in keys) - result.computed
        result.keys = keys
        return keys, result

    @staticmethod
    def _key(item: ImageItem) -> tuple[str, bytes | Image.Image]:
        """The item's content key, and what to decode it from (file bytes are read once)."""
        if isinstance(item, Image.Image):
            return content_key(item), item
        data = read_image_file(item)
        return content_key(item, data), data

    def _decode(self, item: ImageItem, data: bytes | Image.Image) -> Image.Image:
        if isinstance(data, Image.Image):
            return data
        return load_image_bytes(data, source=str(item), **self._load_options)

    def get_or_compute(self, items: Sequence[ImageItem], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Features (len(items), num_tokens, dim), running the encoder only on images not cached yet."""
        keys, _ = self._ensure(items, batch_size, progress, skip_errors=False)
        return torch.stack([self.get(key) for key in keys])

    def warm(
        self, items: Sequence[ImageItem], batch_size: int = 32, progress: bool = True, skip_errors: bool = False
    ) -> WarmResult:
        """Precompute features for a dataset (shard by shard, with a progress bar); returns counts."""
        return self._ensure(items, batch_size, progress, skip_errors)[1]
