"""`mmadapter convert KIND SRC DST`: bring official checkpoints into mmadapter's formats."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmadapter.cli.options import announce_loading, positive_count
from mmadapter.cli.ptuning_commands import export_official_ptuning, import_official_ptuning

#: The base of the released LLaMA-Adapter files (V1, V2 multimodal) when `--base` is not given.
LLAMA_ADAPTER_BASE = "llama-7b"


def _meta_llama(args: argparse.Namespace) -> str:
    """Meta-layout LLaMA folder -> Hugging Face layout folder (weights, config, tokenizer)."""
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.adapters.backbones.loading import load_base_model, load_tokenizer

    model = load_base_model(args.src)
    model.save_pretrained(args.dst)
    try:
        load_tokenizer(args.src).save_pretrained(args.dst)
    except FileNotFoundError as error:
        return f"wrote {args.dst} (no tokenizer: {error})"
    return f"wrote {args.dst}"


def _official_v1(args: argparse.Namespace) -> str:
    """Released LLaMA-Adapter V1 `.pth` -> mmadapter adapter folder."""
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.adapters.backbones.loading import read_base_config
    from mmadapter.adapters.backbones.presets import build_base_model
    from mmadapter.adapters.io.checkpoint import load_adapter_tensors, save_adapter
    from mmadapter.adapters.io.official_v1 import convert_official_v1, load_official_state
    from mmadapter.adapters.methods.base import attach_adapter

    base = read_base_config(args.base or LLAMA_ADAPTER_BASE)
    config, tensors = convert_official_v1(
        load_official_state(args.src),
        base.num_attention_heads,
        prompt_length=args.prompt_length,
        gate_tanh=not args.no_tanh,
        source=str(args.src),
    )
    model = build_base_model(base, device="meta")
    attach_adapter(model, config)
    load_adapter_tensors(model, tensors, str(args.src))
    save_adapter(model, args.dst, prompt_template="alpaca")
    gates = {k: v for k, v in tensors.items() if k.endswith("adapter_gate")}
    largest = max(v.abs().max().item() for v in gates.values())
    return (
        f"wrote {args.dst}: {config.adapted_layers} layers x {config.prompt_length} prompts, "
        f"{len(gates)} gate vectors (largest |gate| {largest:.4f})"
    )


def _official_v2(args: argparse.Namespace) -> str:
    """Released LLaMA-Adapter V2 `.pth` (multimodal BIAS-7B / LORA-BIAS-7B, or chat-65B) -> mmadapter adapter folder."""
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.adapters.io.official_v2 import convert_official_v2_file

    return convert_official_v2_file(
        args.src,
        args.dst,
        args.base or LLAMA_ADAPTER_BASE,
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained,
    )


def _clip_tower(args: argparse.Namespace) -> str:
    """CLIP weights (OpenAI's TorchScript .pt, open_clip .bin/.safetensors) -> vision-tower-only safetensors folder."""
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.vision.clip_encoder import FrozenCLIPEncoder

    encoder = FrozenCLIPEncoder(args.clip_model, args.src)
    encoder.save(args.dst)
    return (
        f"wrote {args.dst}: {encoder.model_name} vision tower (quick_gelu={encoder.quick_gelu}, "
        f"{encoder.num_tokens} tokens x {encoder.output_dim}); load it with pretrained={args.dst}"
    )


#: kind -> (help, function(args) -> message). Other modules add their converters here.
CONVERTERS = {
    "meta-llama": ("Meta-layout LLaMA (consolidated.*.pth + params.json) to Hugging Face layout", _meta_llama),
    "official-v1": ("released LLaMA-Adapter V1 .pth to an mmadapter adapter folder", _official_v1),
    "official-v2": (
        "released LLaMA-Adapter V2 .pth to an mmadapter adapter folder: multimodal (BIAS-7B, LORA-BIAS-7B) or "
        "chat-65B bias/scale/norm (--base llama-65b), told apart by the keys",
        _official_v2,
    ),
    "clip-tower": (
        "CLIP weights (e.g. OpenAI's TorchScript ViT-L-14.pt) to a safetensors vision-tower folder",
        _clip_tower,
    ),
    "official-ptuning": (
        "official ChatGLM-6B P-Tuning v2 checkpoint (folder or pytorch_model.bin) to an mmadapter adapter folder "
        "(base: --base, else the checkpoint's config.json, else chatglm-6b)",
        import_official_ptuning,
    ),
    "to-official-ptuning": (
        "mmadapter P-Tuning v2 folder to the official layout (pytorch_model.bin + config.json)",
        export_official_ptuning,
    ),
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert official checkpoints into mmadapter's formats")
    parser.add_argument(
        "kind", choices=sorted(CONVERTERS), help="; ".join(f"{k}: {v[0]}" for k, v in CONVERTERS.items())
    )
    parser.add_argument("src", type=Path, help="source file or folder")
    parser.add_argument("dst", type=Path, help="destination folder")
    parser.add_argument(
        "--base",
        help=f"base the adapter belongs to (preset or folder; default {LLAMA_ADAPTER_BASE}, and for official-ptuning "
        "the checkpoint's config.json, else chatglm-6b)",
    )
    parser.add_argument(
        "--prompt-length", type=positive_count, default=10, help="K of the released V1 file (default 10)"
    )
    parser.add_argument(
        "--no-tanh",
        action="store_true",
        help="use the raw gate as the official example.py does (default: tanh, as in training)",
    )
    parser.add_argument(
        "--clip-model",
        default="ViT-L-14-quickgelu",
        help="official-v2, clip-tower: open_clip architecture of the frozen CLIP",
    )
    parser.add_argument("--clip-pretrained", help="official-v2: local CLIP weights (e.g. OpenAI's ViT-L-14.pt)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    announce_loading()
    print(CONVERTERS[args.kind][1](args))
    return 0
