"""`mmadapter convert KIND SRC DST`: bring official checkpoints into mmadapter's formats."""

from __future__ import annotations

import argparse
from pathlib import Path


def _meta_llama(args: argparse.Namespace) -> str:
    """Meta-layout LLaMA folder -> Hugging Face layout folder (weights, config, tokenizer)."""
    from mmadapter.adapters.loading import load_base_model, load_tokenizer

    model = load_base_model(args.src)
    model.save_pretrained(args.dst)
    try:
        load_tokenizer(args.src).save_pretrained(args.dst)
    except FileNotFoundError as error:
        return f"wrote {args.dst} (no tokenizer: {error})"
    return f"wrote {args.dst}"


def _official_v1(args: argparse.Namespace) -> str:
    """Released LLaMA-Adapter V1 `.pth` -> mmadapter adapter folder."""
    from mmadapter.adapters.base import attach_adapter
    from mmadapter.adapters.checkpoint import save_adapter
    from mmadapter.adapters.loading import read_base_config
    from mmadapter.adapters.official_v1 import convert_official_v1, load_official_state
    from mmadapter.adapters.presets import build_base_model

    base = read_base_config(args.base)
    config, tensors = convert_official_v1(
        load_official_state(args.src),
        base.num_attention_heads,
        prompt_length=args.prompt_length,
        gate_tanh=not args.no_tanh,
        source=str(args.src),
    )
    model = build_base_model(base, device="meta")
    attach_adapter(model, config)
    model.load_state_dict(tensors, strict=False, assign=True)
    save_adapter(model, args.dst, prompt_template="alpaca")
    gates = {k: v for k, v in tensors.items() if k.endswith("adapter_gate")}
    largest = max(v.abs().max().item() for v in gates.values())
    return (
        f"wrote {args.dst}: {config.adapted_layers} layers x {config.prompt_length} prompts, "
        f"{len(gates)} gate vectors (largest |gate| {largest:.4f})"
    )


#: kind -> (help, function(args) -> message). Other modules add their converters here.
CONVERTERS = {
    "meta-llama": ("Meta-layout LLaMA (consolidated.*.pth + params.json) to Hugging Face layout", _meta_llama),
    "official-v1": ("released LLaMA-Adapter V1 .pth to an mmadapter adapter folder", _official_v1),
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert official checkpoints into mmadapter's formats")
    parser.add_argument(
        "kind", choices=sorted(CONVERTERS), help="; ".join(f"{k}: {v[0]}" for k, v in CONVERTERS.items())
    )
    parser.add_argument("src", type=Path, help="source file or folder")
    parser.add_argument("dst", type=Path, help="destination folder")
    parser.add_argument("--base", default="llama-7b", help="base the adapter belongs to (preset or folder)")
    parser.add_argument("--prompt-length", type=int, default=10, help="K of the released V1 file (default 10)")
    parser.add_argument(
        "--no-tanh",
        action="store_true",
        help="use the raw gate as the official example.py does (default: tanh, as in training)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(CONVERTERS[args.kind][1](args))
    return 0
