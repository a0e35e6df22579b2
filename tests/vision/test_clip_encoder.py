"""The frozen CLIP encoder: token features, open_clip agreement, weight loading, QuickGELU, freezing."""

from __future__ import annotations

import hashlib
import shutil
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import nn

from mmadapter.vision import FrozenCLIPEncoder

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _reference_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """All tokens from open_clip itself: pooled class token and `output_tokens` patch tokens, both projected."""
    visual = model.visual
    visual.output_tokens = True
    try:
        pooled, patches = visual(pixels)
    finally:
        visual.output_tokens = False
    return torch.cat([pooled.unsqueeze(1), patches @ visual.proj], dim=1)


def test_token_shapes_and_attributes(tiny_clip):
    encoder = tiny_clip()
    tokens = encoder(PIXELS)
    assert tokens.shape == (2, 17, 32) and encoder.num_tokens == 17 and encoder.output_dim == 32
    assert encoder.image_size == (32, 32) and encoder.width == 64
    assert tiny_clip(model_name="mmadapter-tiny-vit-64")(torch.zeros(1, 3, 64, 64)).shape == (1, 65, 64)


def test_class_token_equals_open_clip_pooled_features(tiny_clip, reference_clip):
    reference = reference_clip(seed=3)
    encoder = tiny_clip()
    encoder.visual.load_state_dict(reference.visual.state_dict())
    tokens = encoder(PIXELS)
    with torch.no_grad():
        pooled = reference.encode_image(PIXELS)
        expected = _reference_tokens(reference, PIXELS)
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)


def test_stays_frozen_under_parent_train_and_backward(tiny_clip):
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = tiny_clip()
            self.head = nn.Linear(32, 1)

        def forward(self, pixels):
            return self.head(self.clip(pixels)).sum()

    parent = Parent()
    parent.train()
    parent.requires_grad_(True)  # a careless parent: the encoder's forward still builds no graph
    assert parent.training and parent.head.training
    assert not any(module.training for module in parent.clip.modules())
    loss = parent(PIXELS)
    loss.backward()
    assert parent.head.weight.grad is not None
    assert all(p.grad is None for p in parent.clip.parameters())
    assert not parent.clip(PIXELS).requires_grad
    parent.clip.requires_grad_(True)
    assert not any(p.requires_grad for p in parent.clip.parameters())


def test_half_precision_encoder(tiny_clip):
    full, half = tiny_clip(), tiny_clip(dtype=torch.bfloat16)
    tokens = half(PIXELS)  # float32 pixels are cast to the encoder's dtype
    assert tokens.dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    torch.testing.assert_close(tokens.float(), full(PIXELS), rtol=0.05, atol=0.1)  # bf16 keeps ~3 digits


def test_input_shape_is_checked(tiny_clip):
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tiny_clip()(torch.zeros(1, 3, 64, 64))


def test_random_init_is_seeded_and_leaves_global_rng_alone(tiny_clip):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, again, other = tiny_clip(seed=0), tiny_clip(seed=0), tiny_clip(seed=1)
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(first(PIXELS), again(PIXELS)) and not torch.equal(first(PIXELS), other(PIXELS))
    assert first.identity == "mmadapter-tiny-vit;quick_gelu=0;random-init:seed=0" != other.identity


@pytest.mark.parametrize("layout", ["full-safetensors", "full-pt", "tower-pt", "wrapped-ddp-pt"])
def test_loads_local_weight_files(tmp_path, reference_clip, layout):
    reference = reference_clip(seed=5)
    full = reference.state_dict()
    tower = {k.removeprefix("visual."): v for k, v in full.items() if k.startswith("visual.")}
    if layout == "full-safetensors":
        path = tmp_path / "clip.safetensors"
        save_file({k: v.contiguous() for k, v in full.items()}, path)
    elif layout == "full-pt":
        path = tmp_path / "clip.pt"
        torch.save(full, path)
    elif layout == "tower-pt":
        path = tmp_path / "visual.bin"
        torch.save(tower, path)
    else:
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in full.items()}}, path)
    encoder = FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=path)
    with torch.no_grad():
        expected = _reference_tokens(reference, PIXELS)
    torch.testing.assert_close(encoder(PIXELS), expected, rtol=0, atol=1e-5)
    assert encoder.identity == f"mmadapter-tiny-vit;quick_gelu=0;sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    copy = tmp_path / "renamed" / path.name
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=copy).identity == encoder.identity


def test_save_and_reload_folder(tmp_path, reference_clip):
    path = tmp_path / "clip.pt"
    torch.save(reference_clip(seed=6).state_dict(), path)
    encoder = FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=path, quick_gelu=True)
    folder = encoder.save(tmp_path / "saved")
    reloaded = FrozenCLIPEncoder("ignored-name", pretrained=folder)  # the folder's config names the architecture
    assert reloaded.model_name == "mmadapter-tiny-vit" and reloaded.quick_gelu  # remembered from the config
    assert torch.equal(reloaded(PIXELS), encoder(PIXELS))
    assert reloaded.preprocess_cfg == encoder.preprocess_cfg


def test_quick_gelu_option_and_openai_torchscript_detection(tmp_path, reference_clip):
    reference = reference_clip(seed=7, quick_gelu=True)  # how OpenAI's CLIP was trained
    with torch.no_grad():
        expected = _reference_tokens(reference, PIXELS)
    plain = tmp_path / "openai-as-safetensors.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, plain)

    forced = FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=plain, quick_gelu=True)
    assert any(isinstance(m, QuickGELU) for m in forced.modules())
    torch.testing.assert_close(forced(PIXELS), expected, rtol=0, atol=1e-5)
    silent_trap = FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=plain)  # nothing in the file says QuickGELU
    assert not silent_trap.quick_gelu and not torch.allclose(silent_trap(PIXELS), expected, atol=1e-3)

    # OpenAI's own release is a TorchScript archive: it is read without running code, QuickGELU switched on.
    archive = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(reference).save(str(archive))
    detected = FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=archive)
    assert detected.quick_gelu and "quick_gelu=1" in detected.identity
    torch.testing.assert_close(detected(PIXELS), expected, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="TorchScript archive.*wrong"):
        FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=archive, quick_gelu=False)


def test_open_clip_tag_resolution(tmp_path, reference_clip, monkeypatch):
    path = tmp_path / "downloaded.bin"
    torch.save(reference_clip(seed=8, quick_gelu=True).state_dict(), path)
    tag = {"hf_hub": "org/tiny/", "quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, t: tag if t == "tiny-tag" else {})
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, cache_dir=None: str(path))
    encoder = FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained="tiny-tag")
    assert encoder.quick_gelu and encoder.weights_path == path
    assert encoder.preprocess_cfg["mean"] == (0.5, 0.5, 0.5) and encoder.preprocess_cfg["std"] == (0.25, 0.25, 0.25)

    def no_download(cfg, cache_dir=None):
        raise AssertionError("a meta build must not download weights")

    monkeypatch.setattr(open_clip, "download_pretrained", no_download)
    shapes_only = FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained="tiny-tag", device="meta")
    assert shapes_only.quick_gelu and shapes_only.identity == "mmadapter-tiny-vit;quick_gelu=1;tag:tiny-tag"


def test_clear_errors(tmp_path, reference_clip):
    with pytest.raises(ValueError, match="unknown open_clip architecture 'no-such-arch'"):
        FrozenCLIPEncoder("no-such-arch")
    with pytest.raises(FileNotFoundError, match="missing.pt: no such weights file or folder"):
        FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save(reference_clip(model_name="mmadapter-tiny-vit-64").state_dict(), wrong)
    with pytest.raises(ValueError, match="wrong.pt: weights do not fit mmadapter-tiny-vit"):
        FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=wrong)
    with pytest.raises(ValueError, match="RN50: token features need a ViT tower, not ModifiedResNet; .*SigLIP"):
        FrozenCLIPEncoder("RN50", device="meta")


def test_meta_device_counts_vit_l14_without_memory():
    encoder = FrozenCLIPEncoder("ViT-L-14", device="meta")
    assert all(p.is_meta for p in encoder.parameters())
    assert sum(p.numel() for p in encoder.parameters()) == 303_966_208
    assert (encoder.num_tokens, encoder.output_dim, encoder.width) == (257, 768, 1024)
    assert encoder(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 257, 768)
    assert encoder.preprocess_cfg["size"] == (224, 224)


def test_encode_images_applies_the_eval_transform(tiny_clip):
    from PIL import Image

    encoder = tiny_clip()
    images = [Image.new("RGB", (48, 40), (200, 30, 10)), Image.new("RGB", (40, 60), (0, 90, 250))]
    pixels = torch.stack([encoder.transform()(image) for image in images])
    assert torch.equal(encoder.encode_images(images), encoder(pixels))


def test_convert_command_writes_a_tower_folder(tmp_path, reference_clip):
    from mmadapter.cli.main import main

    source = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(reference_clip(seed=9, quick_gelu=True)).save(str(source))
    assert (
        main(["convert", "clip-tower", str(source), str(tmp_path / "tower"), "--clip-model", "mmadapter-tiny-vit"]) == 0
    )
    converted = FrozenCLIPEncoder(pretrained=tmp_path / "tower")
    assert converted.quick_gelu and converted.model_name == "mmadapter-tiny-vit"
    assert torch.equal(converted(PIXELS), FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=source)(PIXELS))
    assert main(["convert", "clip-tower", str(tmp_path / "nope.pt"), str(tmp_path / "x")]) == 2


def test_transformers_clip_folder_gives_the_same_tokens(tmp_path):
    """The HF equivalent of the official visual path (spec §3.2): post_layernorm and projection on every token."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": "quick_gelu",
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "hf-clip")
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=PIXELS).last_hidden_state
        expected = model.visual_projection(model.vision_model.post_layernorm(hidden))
    encoder = FrozenCLIPEncoder("mmadapter-tiny-vit", pretrained=tmp_path / "hf-clip")
    assert encoder.quick_gelu  # read from config.json's hidden_act
    torch.testing.assert_close(encoder(PIXELS), expected, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_fp16_on_cuda_matches_fp32_on_cpu(tiny_clip):
    """The official setting (CLIP in fp16 on a GPU); seeded weights are identical on every device."""
    cpu, gpu = tiny_clip(), tiny_clip(device="cuda", dtype=torch.float16)
    tokens = gpu(PIXELS)  # CPU pixels are moved to the encoder's device and dtype
    assert tokens.device.type == "cuda" and tokens.dtype == torch.float16
    torch.testing.assert_close(tokens.float().cpu(), cpu(PIXELS), rtol=0.01, atol=0.02)
