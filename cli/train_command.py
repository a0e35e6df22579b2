"""`mmadapter train` (run or resume a recipe) and `mmadapter eval` (loss, perplexity, ROUGE/BLEU).

Cheap to import: torch and the loop load inside `run_*`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from mmadapter.cli.options import (
    add_quantize_option,
    announce_loading,
    parse_assignments,
    positive_count,
    quantization_option,
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train an adapter from a YAML recipe (or resume a run)",
        description=(
            "Run a training recipe: a YAML file, or the name of a built-in recipe (see --list). "
            "Several processes: torchrun --nproc_per_node N -m mmadapter.cli.main train RECIPE, "
            "or accelerate launch --config_file assets/accelerate/<config>.yaml -m mmadapter.cli.main train RECIPE."
        ),
    )
    train.add_argument("recipe", nargs="?", help="recipe file or built-in name (optional with --resume)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. train.lr=1e-3")
    train.add_argument("--resume", metavar="DIR", help="continue a run: its output folder or one of its checkpoints")
    train.add_argument(
        "--on-bad-sample",
        choices=("skip", "fail"),
        help="bad rows and unreadable images: skip and count them (default), or stop at the first",
    )
    train.add_argument("--max-bad-fraction", type=float, metavar="F", help="with skip: stop above this fraction")
    train.add_argument("--list", action="store_true", help="list the built-in recipes and exit")
    train.add_argument(
        "--schema",
        action="store_true",
        help="print the recipe JSON schema (for editor completion: # yaml-language-server: $schema=FILE) and exit",
    )
    train.add_argument("--json", action="store_true", help="print the training summary as JSON")
    train.set_defaults(run=run_train)

    evaluate = subparsers.add_parser(
        "eval",
        help="loss and perplexity of an adapter on a dataset (and ROUGE/BLEU of generated answers)",
        description="Evaluate ADAPTER on --data; the base, tokenizer and data settings default to its training recipe.",
    )
    evaluate.add_argument("adapter", help="adapter folder (e.g. runs/NAME/adapter)")
    evaluate.add_argument("--data", required=True, action="append", help="data file (repeatable)")
    evaluate.add_argument(
        "--format",
        choices=("alpaca", "conversation", "coco-captions", "caption-jsonl", "chatglm"),
        help="how to read the data (default: the format the adapter trained on, if it trained on one; else alpaca)",
    )
    evaluate.add_argument("--images", help="image folder for relative image paths")
    evaluate.add_argument("--option", action="append", metavar="KEY=VALUE", help="format option (chatglm columns)")
    evaluate.add_argument("--base", help="base model preset or folder (default: the one it was trained on)")
    evaluate.add_argument("--tokenizer", help="tokenizer folder (default: the training recipe's)")
    evaluate.add_argument(
        "--clip-weights", help="local CLIP weights for a multimodal adapter (overrides the saved path)"
    )
    add_quantize_option(evaluate)
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE", help="data setting, e.g. max_length=256")
    evaluate.add_argument("--batch-size", type=positive_count, default=4)
    evaluate.add_argument("--limit", type=positive_count, help="use only the first N samples of each file")
    evaluate.add_argument("--generate", action="store_true", help="also generate answers and score ROUGE/BLEU-4")
    evaluate.add_argument("--greedy", action="store_true", help="greedy decoding instead of the official sampling")
    evaluate.add_argument("--max-new-tokens", type=positive_count, help="default: data.max_target_length")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", action="store_true", help="print JSON for machines")
    evaluate.set_defaults(run=run_eval)


def _after_interrupt(output_dir: Path) -> str:
    """What Ctrl-C leaves: the checkpoint `--resume` continues from, or that there is none."""
    from mmadapter.train.checkpointing import find_checkpoint

    try:
        checkpoint = find_checkpoint(output_dir).checkpoint
    except (ValueError, FileNotFoundError):
        return (
            f"note: {output_dir} has no checkpoint yet, so this run cannot be resumed; set train.save_every "
            "to keep progress"
        )
    return f"note: continue with `mmadapter train --resume {output_dir}` (from {checkpoint.name})"


def run_train(args: argparse.Namespace) -> int:
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.train.recipe import builtin_recipes, load_recipe, recipe_schema

    if args.schema and args.list:
        raise ValueError("--schema and --list: give one of them (each prints and exits)")
    if (args.schema or args.list) and (args.recipe or args.resume):
        flag = "--schema" if args.schema else "--list"
        raise ValueError(f"{flag} prints and exits, so it takes no RECIPE or --resume; run it on its own")
    if args.schema:
        print(json.dumps(recipe_schema(), indent=2))
        return 0
    if args.list:
        for name, path in sorted(builtin_recipes().items()):
            print(f"{name:<32} {path}")
        return 0
    overrides = parse_assignments(args.set)
    if args.on_bad_sample is not None:
        overrides["data.on_bad_sample"] = args.on_bad_sample
    if args.max_bad_fraction is not None:
        overrides["data.max_bad_fraction"] = args.max_bad_fraction
    if args.recipe is None and args.resume is None:
        raise ValueError("give a RECIPE, or --resume DIR to continue a run")
    if args.recipe is None:
        from mmadapter.train.checkpointing import RECIPE_FILE, find_checkpoint

        checkpoint = find_checkpoint(args.resume).checkpoint  # train() says which damaged ones it skips
        recipe = load_recipe(checkpoint / RECIPE_FILE, overrides)
        if "output_dir" not in overrides:  # the run's folder, wherever it was started from
            recipe.output_dir = str(checkpoint.parent.parent)
        announce_loading()  # the recipe is checked; what follows loads models
    else:
        recipe = load_recipe(args.recipe, overrides)
        announce_loading()  # the recipe is checked; what follows imports torch and loads models
        if args.resume is not None:  # a checkpoint of another adapter is refused before the base loads
            from mmadapter.train.checkpointing import find_checkpoint
            from mmadapter.train.resume import check_same_adapter

            check_same_adapter(recipe.adapter, find_checkpoint(args.resume).checkpoint)

    from accelerate import PartialState

    from mmadapter.train.loop import TrainingStopped, train

    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():  # stdout: JSON only
            result = train(recipe, resume=args.resume)
    except TrainingStopped as error:  # the data or the settings (a non-finite loss, too many bad samples)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_after_interrupt(Path(recipe.output_dir)), file=sys.stderr)
        raise
    finally:
        PartialState().destroy_process_group()  # a no-op in a single process
    summary = {k: v for k, v in result.summary.items() if k != "stages"}
    if not result.main_process:
        return 0
    if args.json:
        print(json.dumps({"adapter_dir": str(result.adapter_dir), **summary}, indent=2))
    else:
        print(
            f"adapter: {result.adapter_dir}\nsteps {summary['steps']}, tokens {summary['tokens']:,}, "
            f"{summary['wall_time_seconds']:.1f} s ({summary['tokens_per_second']:.0f} tokens/s), "
            f"final loss {summary['final_loss']:.4f}"
            + (f", best eval loss {summary['best_eval_loss']:.4f}" if summary["best_eval_loss"] is not None else "")
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    if not args.generate and (args.greedy or args.max_new_tokens):
        raise ValueError("--greedy and --max-new-tokens set how --generate writes answers; add --generate")
    announce_loading()
    # Imported on use, not at the top: the command line starts without loading what other commands need.
    from mmadapter.train.evaluate import (
        NoUsableSamples,
        generation_scores,
        load_for_eval,
        loss_and_perplexity,
        training_formats,
    )
    from mmadapter.train.recipe import DataSection, DataSource, build_section

    quantization = quantization_option(args.quantize, None)
    model, tokenizer, data = load_for_eval(
        args.adapter, args.base, args.tokenizer, quantization=quantization, clip_weights=args.clip_weights
    )
    # `data.` as training's --set writes it is optional here: every key is a data setting
    settings = {key.removeprefix("data."): value for key, value in parse_assignments(args.set).items()}
    if settings:  # checked like a recipe's data section
        data = build_section(DataSection, {**dataclasses.asdict(data), **settings}, "data")
    options = parse_assignments(args.option)
    formats = training_formats(args.adapter)
    data_format = args.format or (formats[0] if len(formats) == 1 else "alpaca")
    sources = [DataSource(format=data_format, path=p, images=args.images, options=options) for p in args.data]
    if args.limit:
        sources = [dataclasses.replace(s, max_samples=args.limit) for s in sources]
    try:
        scores = loss_and_perplexity(model, tokenizer, sources, data, args.batch_size)
    except NoUsableSamples as error:
        trained = f"; the adapter trained on {', '.join(formats)}" if formats else ""
        raise NoUsableSamples(f"{error}; the data was read as --format {data_format}{trained}") from error
    result = {"adapter": str(args.adapter), **scores}
    if args.generate:
        result["generation"] = generation_scores(
            model,
            tokenizer,
            sources,
            data,
            max_new_tokens=args.max_new_tokens,
            greedy=args.greedy,
            seed=args.seed,
            limit=args.limit,
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{Path(args.adapter)}: loss {result['eval_loss']:.4f}, perplexity {result['eval_perplexity']:.3f} "
            f"over {result['eval_tokens']:,} response tokens of {result['samples']} samples"
        )
        if result["bad_samples"]:  # rows left out change the score: never silently
            print(result["bad_summary"], file=sys.stderr)
            print(
                "  (relative image paths are looked up under --images, by default beside the data file)",
                file=sys.stderr,
            )
        for name, value in result.get("generation", {}).items():
            if isinstance(value, float):
                print(f"  {name:<8} {value:.2f}")
    return 0
