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
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from benchlib import RESULTS, Table, write_results
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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


def stage_for(path: Path, streaming: bool, workers: int = 0) -> StageSection:
    """The one stage of a recipe reading `path` (the model is never loaded)."""
    data = {"train": [{"format": "alpaca", "path": str(path)}], "group_by_length": False, "num_workers": workers}
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
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 3)")
    parser.add_argument("--out", type=Path, default=RESULTS / "streaming.json")
    args = parser.parse_args(argv)
    count = args.rows or (400 if args.quick else 1000)
    rounds = args.rounds or (3 if args.quick else 9)
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
    speeds: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, (run, clocks) in variants.items():
            cpu_started, wall_started = cpu(), wall()
            rows_done = run()
            speeds.setdefault(f"{name}|CPU", []).append(rows_done / (cpu() - cpu_started))
            if clocks == "CPU+wall":
                speeds.setdefault(f"{name}|wall", []).append(rows_done / (wall() - wall_started))
    median = {key: statistics.median(values) for key, values in speeds.items()}
    baseline = median["in memory (JSONL)|CPU"]

    table = Table(["data path", "timed by", "rows", "rows/s", "vs in memory"])
    for key, value in median.items():
        name, clock = key.split("|")
        clock = "training process CPU" if "workers" in name and clock == "CPU" else clock
        table.add(name, clock, count, f"{value:,.0f}", f"{value / baseline:.2f}×")
    print(f"{count} Alpaca rows, batch {BATCH}, median of {rounds} interleaved rounds, one torch thread")
    table.print()
    ratios = {key: round(value / baseline, 3) for key, value in median.items()}
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
        "meets_target": all(ratios[f"{name}|CPU"] >= 0.9 for name in ("streamed JSONL", "streamed Parquet")),
    }
    write_results(document, args.out, tables={"streaming": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
