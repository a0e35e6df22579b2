"""The CLIP feature cache: computed once per image content and encoder, safe against crashes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mmadapter.vision import CLIPFeatureCache, ImageLoadError, load_image


def _write_images(folder, count: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class CallCounter:
    """Counts encoder forward calls (and the images in them) through a forward hook."""

    def __init__(self, encoder, fail_on_call: int | None = None) -> None:
        self.calls = self.images = 0
        self.fail_on_call = fail_on_call
        encoder.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.images += args[0].shape[0]


def test_second_pass_never_runs_the_encoder(tmp_path, tiny_clip):
    paths = _write_images(tmp_path / "images", 5)
    encoder = tiny_clip()
    counter = CallCounter(encoder)
    first = CLIPFeatureCache(tmp_path / "cache", encoder).get_or_compute(paths, batch_size=2)
    assert (counter.calls, counter.images) == (3, 5) and first.shape == (5, 17, 32)

    fresh = CLIPFeatureCache(tmp_path / "cache", encoder)  # a later epoch / another process
    assert len(fresh) == 5
    again = fresh.get_or_compute(paths, batch_size=2)
    assert counter.calls == 3 and torch.equal(again, first)
    expected = encoder.encode_images([load_image(p) for p in paths])
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)  # batching may change rounding only


def test_keys_follow_content_not_file_names(tmp_path, tiny_clip):
    paths = _write_images(tmp_path / "images", 2)
    encoder = tiny_clip()
    counter = CallCounter(encoder)
    cache = CLIPFeatureCache(tmp_path / "cache", encoder)
    original = cache.get_or_compute(paths)
    renamed = tmp_path / "elsewhere" / "renamed.png"
    renamed.parent.mkdir()
    shutil.copy(paths[0], renamed)
    assert torch.equal(cache.get_or_compute([renamed])[0], original[0]) and counter.images == 2
    Image.new("RGB", (48, 40), (9, 9, 9)).save(paths[1])  # edited in place: same name, new content
    edited = cache.get_or_compute([paths[1]])
    assert counter.images == 3 and not torch.equal(edited[0], original[1])
    # Duplicates in one request are computed once; in-memory images are keyed by their pixels.
    image = Image.new("RGB", (48, 40), (1, 2, 3))
    assert cache.get_or_compute([image, image.copy()]).shape == (2, 17, 32) and counter.images == 4


def test_other_encoder_or_preprocessing_never_reads_stale_features(tmp_path, tiny_clip):
    paths = _write_images(tmp_path / "images", 2)
    base = CLIPFeatureCache(tmp_path / "cache", tiny_clip(seed=0))
    features = base.get_or_compute(paths)
    other_encoder = tiny_clip(seed=1)
    counter = CallCounter(other_encoder)
    other = CLIPFeatureCache(tmp_path / "cache", other_encoder)
    assert len(other) == 0 and other.root != base.root
    assert not torch.allclose(other.get_or_compute(paths), features) and counter.images == 2
    swapped = CLIPFeatureCache(tmp_path / "cache", tiny_clip(seed=0), bgr_quirk=True)
    assert len(swapped) == 0 and swapped.key["encoder"] == base.key["encoder"]
    half = CLIPFeatureCache(tmp_path / "cache", tiny_clip(seed=0), dtype=torch.float16)
    assert len(half) == 0 and half.get_or_compute(paths).dtype == torch.float16


def test_crash_mid_way_keeps_only_complete_shards(tmp_path, tiny_clip):
    paths = _write_images(tmp_path / "images", 4)
    encoder = tiny_clip()
    CallCounter(encoder, fail_on_call=3)
    cache = CLIPFeatureCache(tmp_path / "cache", encoder, shard_size=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.get_or_compute(paths, batch_size=1)
    (cache.root / "shard-orphan.safetensors").write_bytes(b"half written")  # left by a killed writer
    index = json.loads((cache.root / "index.json").read_text())
    assert len(index["shards"]) == 2 and all((cache.root / s).is_file() for s in index["shards"])

    resumed_encoder = tiny_clip()
    counter = CallCounter(resumed_encoder)
    resumed = CLIPFeatureCache(tmp_path / "cache", resumed_encoder)
    assert len(resumed) == 2
    features = resumed.get_or_compute(paths, batch_size=1)
    assert counter.images == 2  # only the two that were lost
    torch.testing.assert_close(features, tiny_clip().encode_images([load_image(p) for p in paths]), rtol=0, atol=1e-6)


def test_warm_reports_counts_and_skips_or_raises_on_bad_files(tmp_path, tiny_clip):
    paths = _write_images(tmp_path / "images", 3)
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"not an image")
    cache = CLIPFeatureCache(tmp_path / "cache", tiny_clip())
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        cache.warm([paths[0], broken], batch_size=1, progress=False)
    assert len(cache) == 1  # the batch before the bad file was kept
    result = cache.warm([*paths, broken, paths[0]], batch_size=2, progress=True, skip_errors=True)
    assert (result.computed, result.cached) == (2, 2)
    assert [error.source for error in result.failed] == [str(broken)]


def test_two_writers_on_one_directory_keep_each_others_shards(tmp_path, tiny_clip):
    paths = _write_images(tmp_path / "images", 2)
    encoder = tiny_clip()
    first, second = CLIPFeatureCache(tmp_path / "cache", encoder), CLIPFeatureCache(tmp_path / "cache", encoder)
    first.get_or_compute(paths[:1])
    second.get_or_compute(paths[1:])  # its index update merges the shard `first` listed meanwhile
    assert len(second) == 2 and len(json.loads((second.root / "index.json").read_text())["shards"]) == 2
    first.refresh()
    assert len(first) == 2
