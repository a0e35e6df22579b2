"""Any open_clip ViT tower, CLIP or SigLIP: downloads in open_clip's folder layout, token layout, preprocessing, V2.

The towers are written by the tests the way users download them (open_clip_config.json with model_cfg and
preprocess_cfg, the whole model's state dict as open_clip_model.safetensors or open_clip_pytorch_model.bin),
and open_clip's own `local-dir:` loader reads the same folders for the reference features.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mmadapter.adapters import attach_adapter, load_adapter, mark_trainable, save_adapter
from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompt
from mmadapter.vision import FrozenCLIPEncoder, register_tiny_configs
from tests.helpers.llama_v2_setup import pixels, tiny_v2_config
from tests.helpers.tiny_llama import left_padded

PIXELS = pixels(2, seed=11)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
#: What the Hugging Face open_clip releases carry: laion/CLIP-* (CLIP constants, shortest-side resize) and
#: timm/ViT-*-SigLIP* (mean = std = 0.5, squash).
PREPROCESS = {
    "clip": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"},
    "siglip": {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic", "resize_mode": "squash"},
}
ARCHITECTURE = {"clip": "mmadapter-tiny-vit", "siglip": "mmadapter-tiny-siglip"}
#: (tokens, token width, transformer width): 16 patches of 8 px plus the pooled token.
SHAPES = {"clip": (17, 32, 64), "siglip": (17, 64, 64)}


def write_download(
    folder: Path, kind: str, seed: int = 0, file_name: str = "open_clip_model.safetensors", model_cfg=None
) -> Path:
    """A tiny open_clip release as users download it: the full model (both towers), config without model_name."""
    register_tiny_configs()
    model_cfg = model_cfg or open_clip.get_model_config(ARCHITECTURE[kind])
    arguments = {key: value for key, value in model_cfg.items() if key != "custom_text"}
    build = open_clip.model.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.model.CLIP
    torch.manual_seed(seed)
    state = {key: tensor.contiguous() for key, tensor in build(**arguments).state_dict().items()}
    folder.mkdir(parents=True)
    if file_name.endswith(".safetensors"):
        save_file(state, folder / file_name)
    else:
        torch.save(state, folder / file_name)
    document = {"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS[kind]}
    (folder / "open_clip_config.json").write_text(json.dumps(document, indent=2))
    return folder


def open_clip_reference(folder: Path):
    """The same download through open_clip's own loader (the independent reference)."""
    return open_clip.create_model(f"local-dir:{folder}").eval()


@pytest.mark.parametrize("file_name", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_downloaded_tower_gives_the_pooled_embedding_then_the_patch_tokens(tmp_path, kind, file_name):
    folder = write_download(tmp_path / f"ViT-tiny-{kind}", kind, file_name=file_name)
    encoder = FrozenCLIPEncoder(pretrained=folder)
    tokens = encoder(PIXELS)
    assert tokens.shape == (2, *SHAPES[kind][:2]) and (encoder.num_tokens, encoder.output_dim) == SHAPES[kind][:2]
    assert encoder.width == SHAPES[kind][2] and encoder.model_name == f"ViT-tiny-{kind}"  # the folder names it
    assert encoder.weights_path == folder / file_name
    reference = open_clip_reference(folder)
    with torch.no_grad():
        embedding = reference.encode_image(PIXELS)
        visual = reference.visual
        if kind == "clip":  # the official V2 layout: ln_post and proj on every token
            visual.output_tokens = True
            _, patches = visual(PIXELS)
            patches = patches @ visual.proj
        else:  # SigLIP: no class token; the trunk's normalised patch tokens, width unchanged (timm_proj none)
            patches = visual.trunk.forward_features(PIXELS)
    torch.testing.assert_close(tokens[:, 0], embedding, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], patches, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [{"pool_type": "avg"}, {"pool_type": "avg", "final_ln_after_pool": True, "no_ln_pre": True}],
    ids=["avg-pool", "avg-pool-final-ln-no-ln-pre"],
)
def test_open_clip_vit_pooling_variants(tmp_path, variant):
    """open_clip ViTs that pool by averaging: position 0 is still open_clip's image embedding, and every patch
    token passes ln_post and proj (written out plainly here)."""
    register_tiny_configs()
    model_cfg = open_clip.get_model_config("mmadapter-tiny-vit")
    model_cfg["vision_cfg"].update(variant)
    folder = write_download(tmp_path / "avg", "clip", model_cfg=model_cfg)
    encoder = FrozenCLIPEncoder(pretrained=folder)
    reference = open_clip_reference(folder)
    visual = reference.visual
    with torch.no_grad():
        embedding = reference.encode_image(PIXELS)
        x = visual.conv1(PIXELS).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1) + visual.positional_embedding
        hidden = visual.transformer(visual.ln_pre(x))
        patches = visual.ln_post(hidden[:, 1:]) @ visual.proj
    tokens = encoder(PIXELS)
    assert tokens.shape == (2, 17, 32)
    torch.testing.assert_close(tokens[:, 0], embedding, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], patches, rtol=0, atol=1e-5)


def _noise_image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_siglip_preprocessing_comes_from_the_download(tmp_path):
    """mean = std = 0.5 and a squash resize, from the folder's preprocess_cfg; CLIP's constants would differ."""
    encoder = FrozenCLIPEncoder(pretrained=write_download(tmp_path / "siglip", "siglip"))
    image = _noise_image(48, 40)
    squashed = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = torch.from_numpy((squashed - 0.5) / 0.5).permute(2, 0, 1)
    with_clip_constants = torch.from_numpy((squashed - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).permute(2, 0, 1)
    pixels_ = encoder.transform()(image)
    torch.testing.assert_close(pixels_, expected, rtol=0, atol=1e-5)
    assert (pixels_ - with_clip_constants).abs().max() > 0.1


def test_architecture_names_bring_their_tags_preprocessing():
    """A SigLIP architecture named without a folder (a bare weights file, a meta build) still gets SigLIP's
    preprocessing: every open_clip tag of it agrees on it. Real sizes, on the meta device (no weights)."""
    for name, tokens, width, size in [("ViT-B-16-SigLIP", 197, 768, 224), ("ViT-SO400M-14-SigLIP-384", 730, 1152, 384)]:
        encoder = FrozenCLIPEncoder(name, device="meta")
        assert (encoder.num_tokens, encoder.output_dim, encoder.image_size) == (tokens, width, (size, size))
        cfg = encoder.preprocess_cfg
        assert (cfg["mean"], cfg["std"], cfg["resize_mode"]) == ((0.5,) * 3, (0.5,) * 3, "squash")
    assert FrozenCLIPEncoder("ViT-L-14-quickgelu", device="meta").preprocess_cfg["mean"] == CLIP_MEAN
    assert FrozenCLIPEncoder("mmadapter-tiny-siglip").preprocess_cfg["std"] == (0.5,) * 3  # random init


def test_siglip_weights_files_and_save(tmp_path):
    """The same SigLIP tower from a bare weights file, a timm trunk-only file, and the folder `save` writes."""
    folder = write_download(tmp_path / "siglip", "siglip", seed=3)
    expected = FrozenCLIPEncoder(pretrained=folder)(PIXELS)
    bare = FrozenCLIPEncoder("mmadapter-tiny-siglip", pretrained=folder / "open_clip_model.safetensors")
    torch.testing.assert_close(bare(PIXELS), expected, rtol=0, atol=0)
    trunk = open_clip_reference(folder).visual.trunk.state_dict()
    save_file({key: tensor.contiguous() for key, tensor in trunk.items()}, tmp_path / "model.safetensors")
    timm_only = FrozenCLIPEncoder("mmadapter-tiny-siglip", pretrained=tmp_path / "model.safetensors")
    torch.testing.assert_close(timm_only(PIXELS), expected, rtol=0, atol=0)
    saved = FrozenCLIPEncoder(pretrained=bare.save(tmp_path / "saved"))
    assert torch.equal(saved(PIXELS), expected) and saved.preprocess_cfg == bare.preprocess_cfg


def _edit_config(folder: Path, change) -> None:
    document = json.loads((folder / "open_clip_config.json").read_text())
    change(document["model_cfg"])
    (folder / "open_clip_config.json").write_text(json.dumps(document))


def test_towers_open_clip_cannot_build_or_read_are_named(tmp_path):
    folder = write_download(tmp_path / "siglip", "siglip")
    config = folder / "open_clip_config.json"
    _edit_config(folder, lambda cfg: cfg["vision_cfg"].update(timm_model_name="vit_from_the_future_siglip_224"))
    with pytest.raises(
        ValueError, match=rf"{config}\): its vision tower is the timm model 'vit_from_the_future.*upgrade"
    ):
        FrozenCLIPEncoder(pretrained=folder)
    _edit_config(folder, lambda cfg: cfg["vision_cfg"].update(timm_model_name="resnet18", timm_pool="avg"))
    with pytest.raises(ValueError, match=rf"{config}\): its timm trunk is a ResNet.*pick such an architecture"):
        FrozenCLIPEncoder(pretrained=folder)
    _edit_config(folder, lambda cfg: cfg["vision_cfg"].update(timm_model_name=None, attentional_pool=True))
    with pytest.raises(ValueError, match=rf"{config}\): its attentional pooler.*SigLIP"):
        FrozenCLIPEncoder(pretrained=folder)
    _edit_config(folder, lambda cfg: cfg["vision_cfg"].update(attentional_pool=False, no_such_field=1))
    with pytest.raises(ValueError, match=rf"{config}\): open_clip .* cannot build its vision tower \(TypeError"):
        FrozenCLIPEncoder(pretrained=folder)
    config.write_text('{"model_cfg": {"embed_dim": 64}}')
    with pytest.raises(ValueError, match=rf"{config}: no model_cfg.vision_cfg; is this an open_clip model folder"):
        FrozenCLIPEncoder(pretrained=folder)
    config.write_text("{")
    with pytest.raises(ValueError, match=rf"{config}: not valid JSON"):
        FrozenCLIPEncoder(pretrained=folder)
    clip_file = write_download(tmp_path / "clip", "clip") / "open_clip_model.safetensors"
    with pytest.raises(ValueError, match="open_clip_model.safetensors: weights do not fit mmadapter-tiny-siglip"):
        FrozenCLIPEncoder("mmadapter-tiny-siglip", pretrained=clip_file)


def test_a_transformers_siglip_checkpoint_points_at_the_open_clip_release(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = SiglipConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 8})
    SiglipModel(config).save_pretrained(tmp_path / "hf-siglip")
    with pytest.raises(ValueError, match="a transformers SigLIP checkpoint.*timm/ViT-B-16-SigLIP"):
        FrozenCLIPEncoder("mmadapter-tiny-siglip", pretrained=tmp_path / "hf-siglip")


# --- LLaMA-Adapter V2 with each tower ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_llama_adapter_v2_with_each_tower(tiny_llama, tmp_path, kind):
    """Zero-init exact with an image, caption-stage steps lower the loss, save -> load gives identical logits."""
    folder = write_download(tmp_path / f"tower-{kind}", kind, seed=4)
    model = tiny_llama()
    ids, mask = left_padded()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
    attach_adapter(model, tiny_v2_config(clip_model="ViT-L-14-quickgelu", clip_pretrained=str(folder)))
    encoder = model.vision_encoder
    assert encoder.model_name == f"tower-{kind}" and not encoder.quick_gelu  # the folder's config, not the name
    assert model.visual_projector.clip_proj.in_features == encoder.output_dim == SHAPES[kind][1]
    with torch.no_grad():
        prompt = visual_prompt(model, PIXELS)
        assert prompt.abs().sum() > 0
        assert torch.equal(model(ids, attention_mask=mask, adapter_visual_prompt=prompt).logits, base)

    trainable = mark_trainable(model, "caption")
    projector_before = model.visual_projector.clip_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(ids, attention_mask=mask, adapter_visual_prompt=visual_prompt(model, PIXELS), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.visual_projector.clip_proj.weight, projector_before)  # the projector trained
    model.eval()
    with torch.no_grad():
        trained = model(ids, attention_mask=mask, adapter_visual_prompt=visual_prompt(model, PIXELS)).logits
    assert not torch.equal(trained, base)
    save_adapter(model, tmp_path / "adapter")

    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "adapter", clip_pretrained=str(folder))
    with torch.no_grad():
        logits = fresh(ids, attention_mask=mask, adapter_visual_prompt=visual_prompt(fresh, PIXELS)).logits
    assert torch.equal(logits, trained)
    assert fresh.adapter_config.clip_width == SHAPES[kind][1]  # saved, so the folder's shapes need no tower

    other = write_download(tmp_path / "other-tower", "siglip" if kind == "clip" else "clip")
    with pytest.raises(ValueError, match=rf"clip_width={SHAPES[kind][1]}, but the vision tower other-tower gives"):
        load_adapter(tiny_llama(), tmp_path / "adapter", clip_pretrained=str(other))


@pytest.mark.gpu
def test_siglip_tower_and_v2_zero_init_on_cuda(tiny_llama, tmp_path):
    """fp16 SigLIP on a GPU agrees with fp32 on the CPU; V2 in bf16 on the GPU is still exactly the base."""
    folder = write_download(tmp_path / "siglip", "siglip", seed=5)
    cpu = FrozenCLIPEncoder(pretrained=folder)
    gpu = FrozenCLIPEncoder(pretrained=folder, device="cuda", dtype=torch.float16)
    tokens = gpu(PIXELS)
    assert tokens.device.type == "cuda" and tokens.dtype == torch.float16
    torch.testing.assert_close(tokens.float().cpu(), cpu(PIXELS), rtol=0.01, atol=0.02)

    model = tiny_llama(dtype=torch.bfloat16).to("cuda")
    ids, mask = (tensor.to("cuda") for tensor in left_padded())
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        attach_adapter(model, tiny_v2_config(clip_pretrained=str(folder)))
        assert model.vision_encoder.device.type == "cuda" and model.vision_encoder.dtype == torch.bfloat16
        prompt = visual_prompt(model, PIXELS.to("cuda"))
        assert torch.equal(model(ids, attention_mask=mask, adapter_visual_prompt=prompt).logits, base)
