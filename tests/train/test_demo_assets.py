"""The demo's shipped assets: small enough for git, reproducible, and what the README says they are."""

from __future__ import annotations

import hashlib
import json

import torch

from mmadapter.adapters.backbones.loading import load_base_model, load_tokenizer
from mmadapter.cli.demo import assets as demo_assets
from mmadapter.cli.demo import world
from mmadapter.vision.clip_encoder import FrozenCLIPEncoder

ASSETS = demo_assets.ASSETS_DIR
LM_DIR = ASSETS / demo_assets.LANGUAGE_MODEL_DIR
CLIP_DIR = ASSETS / demo_assets.VISION_TOWER_DIR
MB = 1_000_000


def test_assets_are_small_enough_for_git():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert files
    assert max(p.stat().st_size for p in files) < 10 * MB
    assert sum(p.stat().st_size for p in files) < 8 * MB


def test_manifest_describes_the_files_on_disk():
    manifest = json.loads((ASSETS / demo_assets.MANIFEST_FILE).read_text())
    for name, entry in manifest["files"].items():
        data = (ASSETS / name).read_bytes()
        assert len(data) == entry["bytes"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name} changed; rebuild the assets"
    assert manifest["language_model"]["config"] == demo_assets.LANGUAGE_MODEL
    assert manifest["vision_tower"]["architecture"] == demo_assets.VISION_TOWER


def test_tokenizer_is_llama_style_and_rebuilds_identically():
    tokenizer = load_tokenizer(LM_DIR)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer("a red star").input_ids[0] == tokenizer.bos_token_id  # like LLaMA's, it adds <s>
    fresh = demo_assets.train_tokenizer(demo_assets.TEXT_WORLD_SEED, demo_assets.LANGUAGE_MODEL["vocab_size"])
    assert fresh.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_encodes_world_words_whole():
    """Answers start right after "### Response:" (no space); caption words follow a space."""
    tokenizer = load_tokenizer(LM_DIR)
    for word in [*world.COLOURS, *world.SHAPES, *world.SIZES, *world.NUMBERS]:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    for word in [*world.COLOURS, *world.SHAPES, *world.SIZES, *world.POSITIONS]:
        assert len(tokenizer.encode(f" {word}", add_special_tokens=False)) == 1, word
    text = "What colour do you get by mixing red and blue? purple"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_base_model_was_pretrained_on_world_text():
    """The frozen base already knows the world's text: far lower loss than the same model untrained."""
    tokenizer = load_tokenizer(LM_DIR)
    model = load_base_model(LM_DIR)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (128, 4, len(tokenizer))
    batch = demo_assets._lm_batch(tokenizer, list(demo_assets.text_examples(seed=99, count=32)))
    torch.manual_seed(0)
    untrained = type(model)(config).eval()
    with torch.no_grad():
        pretrained_loss = model(**batch).loss.item()
        untrained_loss = untrained(**batch).loss.item()
    assert pretrained_loss < 0.5 < 5.0 < untrained_loss


def _nearest_centroid_accuracy(encoder: FrozenCLIPEncoder, attribute: str) -> float:
    fit = [world.make_scene(123, i) for i in range(240)]
    test = [world.make_scene(456, i) for i in range(120)]
    with torch.no_grad():
        fit_features = encoder(demo_assets.scene_pixels(encoder, fit, 64))[:, 0]
        test_features = encoder(demo_assets.scene_pixels(encoder, test, 64))[:, 0]
    values = sorted({getattr(s, attribute) for s in fit})
    labels = torch.tensor([values.index(getattr(s, attribute)) for s in fit])
    centroids = torch.stack([fit_features[labels == k].mean(0) for k in range(len(values))])
    predicted = torch.cdist(test_features, centroids).argmin(1)
    truth = torch.tensor([values.index(getattr(s, attribute)) for s in test])
    return float((predicted == truth).float().mean())


def test_vision_tower_loads_and_was_pretrained_on_shapes():
    encoder = FrozenCLIPEncoder(demo_assets.VISION_TOWER, CLIP_DIR)
    assert encoder.num_tokens == 65 and encoder.output_dim == 64
    random_tower = FrozenCLIPEncoder(demo_assets.VISION_TOWER, None, seed=0)
    # Its class token separates shapes, which a random tower's hardly does.
    assert _nearest_centroid_accuracy(encoder, "shape") > 0.9
    assert _nearest_centroid_accuracy(random_tower, "shape") < 0.6
