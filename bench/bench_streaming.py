"""Rows per second of the training data path: streamed (data.streaming) against in memory, on the same rows.

One pass over an Alpaca data set from its file to collated micro-batches, as the training loop receives them:
in memory, `load_samples` reads and tokenizes every row, then the length-free batch order feeds a DataLoader;
streamed, `stream_steps` reads a JSONL or Parquet shard window by window and tokenizes each micro-batch as it
is asked for. Both run in this process (`data.num_workers: 0`), one torch thread, timed by this process's CPU
time (other processes on a shared machine do not skew it); variants run in interleaved rounds and the median
is kept. The last two rows tokenize in 2 DataLoader workers: the training process's own CPU time (reading,
batching, collating: what stays on the training process), and wall time, which depends on the cores free
(the load average is recorded). The rows are synthetic instructions of 20-120 words over a
byte-level BPE vocabulary trained here on the same words (no downloads).

A second table does the same for image + caption rows, where decoding the pictures is most of the work: in
memory (a caption JSONL file and one JPEG file per row, headers checked up front as that path does) against
WebDataset-style tar shards (the JPEG and caption of each row as members), both through the pixel loader of a
LLaMA-Adapter V2 with the demo's tiny CLIP tower (random 224 x 224 JPEGs of ~20 KB, resized to its 64 pixels).

    python bench/bench_streaming.py [--quick] [--rows N] [--out bench/results/streaming.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from benchlib import RESULTS, Table, write_results
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmadapter.adapters import attach_adapter, build_base_model, make_config
from mmadapter.adapters.backbones.presets import base_config
from mmadapter.adapters.methods.llama_adapter_v2 import visual_prompter_of
from mmadapter.train.data import BadSampleLog, Collator, SupervisedDataset, load_samples
from mmadapter.train.recipe import StageSection, parse_recipe
from mmadapter.train.state import Progress
from mmadapter.train.step import step_batches
from mmadapter.train.streaming import StreamedDataset, stream_steps

WORDS = [f"w{i}" for i in range(3000)]
BATCH = 8


def make_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows of random words: instruction 20-40, input 0-40, output 30-120 words."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))

    return [{"instruction": text(20, 40), "input": text(0, 40), "output": text(30, 120)} for _ in range(count)]


def make_tokenizer(rows: list[dict[str, str]]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (LLaMA-style specials) trained on the rows' words."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator((row["output"] for row in rows[:2000]), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def stage_for(path: Path, streaming: bool, workers: int = 0, **source: str) -> StageSection:
    """The one stage of a recipe reading `path` (Alpaca unless `source` says otherwise; no model is loaded)."""
    source = {"format": "alpaca", "path": str(path), **source}
    data = {"train": [source], "group_by_length": False, "num_workers": workers}
    data |= {"streaming": streaming, "shuffle_window": 10_000}
    recipe = parse_recipe(
        {
            "model": {"base": "tiny-llama"},
            "adapter": {"method": "lora"},
            "train": {"batch_size": BATCH, "max_steps": 1, "lr": 1e-3},
            "data": data,
        }
    )
    return recipe.stages[0]


def in_memory_pass(path: Path, tokenizer, rows: int) -> int:
    stage = stage_for(path, streaming=False)
    bad = BadSampleLog()
    samples = load_samples(stage.data.train, tokenizer, stage.data, [None], None, bad, show_progress=False)
    steps = step_batches(SupervisedDataset(samples), Collator(0), stage, Progress(), 1, 0)
    return count_rows(steps, rows)


def streamed_pass(path: Path, tokenizer, rows: int, workers: int = 0) -> int:
    stage = stage_for(path, streaming=True, workers=workers)
    data = stage.data
    dataset = StreamedDataset(data.train, tokenizer, data, [0], BadSampleLog(), None, 0, 0)
    return count_rows(stream_steps(dataset, Collator(0), stage, Progress(), 1, 0), rows)


def write_captions(folder: Path, count: int) -> tuple[Path, Path]:
    """`count` random 224 x 224 JPEGs with captions, as a caption JSONL beside image files and as a tar shard."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    rows = []
    with tarfile.open(folder / "captions.tar", "w") as shard:
        for i in range(count):
            name = f"{i:06d}.jpg"
            pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
            Image.fromarray(pixels).save(folder / "images" / name, quality=90)
            caption = " ".join(rng.choice(WORDS, size=12))
            rows.append({"image": name, "caption": caption})
            shard.add(folder / "images" / name, arcname=name)
            text = folder / f"{i:06d}.txt"
            text.write_text(caption)
            shard.add(text, arcname=text.name)
            text.unlink()
    (folder / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / "captions.jsonl", folder / "captions.tar"


def pixel_loader():
    """A LLaMA-Adapter V2's training pixel loader with the demo's tiny CLIP tower (no weights needed)."""
    model = build_base_model(base_config("tiny-llama"))
    tower = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip"
    options = {"clip_model": "mmadapter-tiny-vit-64", "clip_pretrained": str(tower), "visual_width": 32}
    attach_adapter(model, make_config("llama-adapter-v2", **options))
    return visual_prompter_of(model).pixel_loader(train=True)


def captions_in_memory(path: Path, images: Path, tokenizer, rows: int, loader) -> int:
    stage = stage_for(path, streaming=False, format="caption-jsonl", images=str(images))
    bad = BadSampleLog()
    samples = load_samples(stage.data.train, tokenizer, stage.data, [None], None, bad, show_progress=False)
    steps = step_batches(SupervisedDataset(samples, loader), Collator(0), stage, Progress(), 1, 0)
    return count_rows(steps, rows)


def captions_streamed(path: Path, tokenizer, rows: int, loader) -> int:
    stage = stage_for(path, streaming=True, format="caption-jsonl")
    dataset = StreamedDataset(stage.data.train, tokenizer, stage.data, [0], BadSampleLog(), loader, 0, 0)
    return count_rows(stream_steps(dataset, Collator(0), stage, Progress(), 1, 0), rows)


def count_rows(steps, rows: int) -> int:
    """Rows in the batches of one epoch (the step iterators go on forever)."""
    seen = 0
    while seen < rows:
        group, _, _ = next(steps)
        seen += sum(len(batch["sources"]) for batch in group)
    if seen != rows:
        raise RuntimeError(f"one epoch gave {seen} rows, not {rows}")
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and rounds (a smoke run)")
    parser.add_argument("--rows", type=int, default=None, help="rows in the data set (default 1000, quick 400)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, quick 3)")
    parser.add_argument("--out", type=Path, default=RESULTS / "streaming.json")
    args = parser.parse_args(argv)
    count = args.rows or (400 if args.quick else 1000)
    rounds = args.rounds or (3 if args.quick else 15)
    count -= count % BATCH  # whole batches: every pass yields every row
    torch.set_num_threads(1)

    rows = make_rows(count)
    tokenizer = make_tokenizer(rows)
    folder = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    jsonl = folder / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    parquet = folder / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=4096)

    cpu, wall = time.process_time, time.perf_counter
    variants: dict[str, tuple[Callable[[], int], str]] = {
        "in memory (JSONL)": (lambda: in_memory_pass(jsonl, tokenizer, count), "CPU"),
        "streamed JSONL": (lambda: streamed_pass(jsonl, tokenizer, count), "CPU"),
        "streamed Parquet": (lambda: streamed_pass(parquet, tokenizer, count), "CPU"),
        "streamed JSONL, 2 workers": (lambda: streamed_pass(jsonl, tokenizer, count, workers=2), "CPU+wall"),
    }
    captions_jsonl, captions_tar = write_captions(folder, count)
    loader = pixel_loader()
    variants |= {
        "captions in memory (JSONL + JPEG files)": (
            lambda: captions_in_memory(captions_jsonl, folder / "images", tokenizer, count, loader),
            "CPU",
        ),
        "captions streamed (tar shard)": (lambda: captions_streamed(captions_tar, tokenizer, count, loader), "CPU"),
    }
    speeds: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, (run, clocks) in variants.items():
            cpu_started, wall_started = cpu(), wall()
            rows_done = run()
            speeds.setdefault(f"{name}|CPU", []).append(rows_done / (cpu() - cpu_started))
            if clocks == "CPU+wall":
                speeds.setdefault(f"{name}|wall", []).append(rows_done / (wall() - wall_started))
    median = {key: statistics.median(values) for key, values in speeds.items()}
    caption_keys = [key for key in median if key.startswith("captions")]
    baselines = {"text": median["in memory (JSONL)|CPU"], "captions": median[caption_keys[0]]}

    tables = {"streaming": Table(["data path", "timed by", "rows", "rows/s", "vs in memory"])}
    tables["captions"] = Table(["data path", "timed by", "rows", "rows/s", "vs in memory"])
    ratios = {}
    for key, value in median.items():
        name, clock = key.split("|")
        kind = "captions" if key in caption_keys else "text"
        ratios[key] = round(value / baselines[kind], 3)
        clock = "training process CPU" if "workers" in name and clock == "CPU" else clock
        tables["streaming" if kind == "text" else "captions"].add(
            name, clock, count, f"{value:,.0f}", f"{value / baselines[kind]:.2f}×"
        )
    print(f"{count} rows, batch {BATCH}, median of {rounds} interleaved rounds, one torch thread")
    for table in tables.values():
        table.print()
    document = {
        "benchmark": "streaming",
        "date": date.today().isoformat(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "rows": count,
        "batch_size": BATCH,
        "rounds": rounds,
        "rows_per_second": {key: round(value, 1) for key, value in median.items()},
        "all_rounds": {key: [round(v, 1) for v in values] for key, values in speeds.items()},
        "ratio_to_in_memory": ratios,
        "target": "streamed >= 0.9x in memory (same process, CPU time)",
        "meets_target": all(
            ratios[f"{name}|CPU"] >= 0.9
            for name in ("streamed JSONL", "streamed Parquet", "captions streamed (tar shard)")
        ),
    }
    write_results(document, args.out, tables=tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
