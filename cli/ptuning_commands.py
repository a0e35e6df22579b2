"""`mmadapter convert` kinds for official ChatGLM-6B P-Tuning v2 checkpoints (in and out).

Cheap to import: the work happens inside the functions (the CLI imports every command module).
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: The base of the official P-Tuning v2 checkpoints when neither `--base` nor their config.json names one.
PTUNING_BASE = "chatglm-6b"


def _base_for(args: argparse.Namespace) -> str | Path:
    """`--base` when given; else the base's config.json an official checkpoint folder carries; else ChatGLM-6B."""
    if args.base is not None:
        return args.base
    src = Path(args.src)
    config = src / "config.json" if src.is_dir() else src.parent / "config.json"
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.core.files import read_json

    document = read_json(config) if config.is_file() else {}
    if isinstance(document, dict) and document.get("model_type"):
        return config.parent
    return PTUNING_BASE


def import_official_ptuning(args: argparse.Namespace) -> str:
    """Official `pytorch_model.bin` (folder or file) -> mmadapter adapter folder."""
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.adapters.backbones.loading import read_base_config
    from mmadapter.adapters.backbones.presets import build_base_model
    from mmadapter.adapters.io.checkpoint import save_adapter
    from mmadapter.adapters.io.official_ptuning import load_official_ptuning

    base = _base_for(args)
    model = build_base_model(read_base_config(base), device="meta")
    load_official_ptuning(model, args.src)
    save_adapter(model, args.dst, prompt_template="chatglm")
    config = model.adapter_config
    return (
        f"wrote {args.dst}: pre_seq_len {config.pre_seq_len}, prefix_projection {config.prefix_projection} "
        f"(base {base})"
    )


def export_official_ptuning(args: argparse.Namespace) -> str:
    """mmadapter P-Tuning v2 folder -> official checkpoint folder (`pytorch_model.bin` + `config.json`)."""
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.adapters.io.official_ptuning import export_official_ptuning_folder

    export_official_ptuning_folder(args.src, args.dst)
    return f"wrote {Path(args.dst) / 'pytorch_model.bin'} (official transformer.prefix_encoder.* layout)"
