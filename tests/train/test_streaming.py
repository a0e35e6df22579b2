"""Streamed training data (train/streaming.py): the same batches and adapter as the in-memory path, exact
resume mid-stream, the bad-sample policy naming file and row, and JSONL and Parquet shards reading alike."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mmadapter.core.examples import DataError, Example, ImageBytes
from mmadapter.train.data import BadSampleLog, Collator, SupervisedDataset, load_samples
from mmadapter.train.loop import train
from mmadapter.train.readers import BadSample, read_examples
from mmadapter.train.recipe import parse_recipe
from mmadapter.train.state import Progress
from mmadapter.train.step import step_batches
from mmadapter.train.streaming import StreamedDataset, StreamPosition, StreamState, stream_steps
from tests.helpers.train_data import COLOURS, alpaca_rows, write_image, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def stream_of(recipe, tokenizer, bad: BadSampleLog | None = None) -> StreamedDataset:
    stage = recipe.stages[0]
    bad = bad or BadSampleLog(stage.data.on_bad_sample, stage.data.max_bad_fraction)
    kinds = [0] * len(stage.data.train)
    return StreamedDataset(stage.data.train, tokenizer, stage.data, kinds, bad, None, stage.train.seed, 0)


def ids_of(step: list[dict]) -> list[list[int]]:
    return [row.tolist() for batch in step for row in batch["input_ids"]]


def sources_of(step: list[dict]) -> list[str]:
    return [source for batch in step for source in batch["sources"]]


def take(steps, count: int) -> list[tuple[list[str], list[list[int]]]]:
    return [(sources_of(group), ids_of(group)) for group, _, _ in (next(steps) for _ in range(count))]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_whose_window_holds_the_data_batches_like_the_in_memory_path(
    make_recipe, tiny_tokenizer, tmp_path, workers
):
    # 18 rows, batch 4 x 2 accumulation: the epoch ends on a short step (9 rows' worth of micro-batches ... 5)
    data = [{"format": "alpaca", "path": str(write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(18, seed=3)))}]
    options = {"group_by_length": False, "num_workers": workers}
    recipe = make_recipe(data=data, data_options=options, train={"grad_accum": 2, "seed": 5})
    stage = recipe.stages[0]
    bad = BadSampleLog()
    samples = load_samples(stage.data.train, tiny_tokenizer, stage.data, [None], None, bad, show_progress=False)
    collate = Collator(pad_token_id=0)
    memory = step_batches(SupervisedDataset(samples), collate, stage, Progress(), 1, 0)
    stage.data.streaming = True
    streamed = stream_steps(stream_of(recipe, tiny_tokenizer), collate, stage, Progress(), 1, 0)
    # Two epochs: 5 micro-batches each, so steps of 2, 2, 1 micro-batches, then the next epoch's order.
    expected = take(memory, 6)
    assert take(streamed, 6) == expected
    assert [len(sources) for sources, _ in expected] == [8, 8, 2, 8, 8, 2]
    assert expected[0][0] != expected[3][0]  # each epoch is shuffled anew


@pytest.mark.slow
def test_a_run_resumed_mid_stream_ends_with_the_uninterrupted_runs_adapter(make_recipe, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = alpaca_rows(16, seed=4)
    write_jsonl(shards / "part-0.jsonl", rows[:7])
    write_jsonl(shards / "part-1.jsonl", rows[7:])
    # Windows of 6 rows (6, 6, 4), batch 4: micro-batches 2, 2, 1 per window, 5 per epoch. The checkpoint at
    # step 3 is in the middle of window 1 (which starts in part-0 and ends in part-1); 8 steps cross an epoch.
    document = make_recipe(
        data=[{"format": "alpaca", "path": str(shards)}],
        data_options={"streaming": True, "shuffle_window": 6},
        train={"max_steps": 8, "save_every": 3, "keep_checkpoints": 3, "seed": 3},
        parsed=False,
    )
    straight = train(parse_recipe(document, {"output_dir": str(tmp_path / "straight")}))
    checkpoint = tmp_path / "straight/checkpoints/ckpt-0000003"
    state = StreamState.from_dict(json.loads((checkpoint / "trainer_state.json").read_text())["stream"])
    assert (state.window, state.micro_batch, state.window_start) == (1, 1, StreamPosition(0, 0, 6, 6))

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed_dir / "checkpoints/ckpt-0000003")
    # The resumed run decodes in two workers: the batch order does not depend on them.
    recipe = parse_recipe(document, {"output_dir": str(resumed_dir), "data.num_workers": 2})
    resumed = train(recipe, resume=resumed_dir)
    weights = [load_file(r.adapter_dir / "adapter_model.safetensors") for r in (straight, resumed)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    history = [[h["loss"] for h in r.summary["stages"][0]["history"]] for r in (straight, resumed)]
    assert history[1] == history[0]  # steps 1-3 from the checkpoint, 4-8 trained again


def test_stream_steps_from_a_saved_position_continue_the_uninterrupted_order(make_recipe, tiny_tokenizer, tmp_path):
    data = [{"format": "alpaca", "path": str(write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(21, seed=2)))}]
    options = {"streaming": True, "shuffle_window": 10}
    recipe = make_recipe(data=data, data_options=options, train={"grad_accum": 2})
    stage, collate = recipe.stages[0], Collator(pad_token_id=0)
    progress = Progress()
    straight = stream_steps(stream_of(recipe, tiny_tokenizer), collate, stage, progress, 1, 0)
    # Windows of 10, 10, 1 rows: 3, 3, 1 micro-batches of 4; steps of 2 micro-batches cross windows.
    take(straight, 2)
    saved = dict(progress.stream)
    assert (saved["window"], saved["micro_batch"], saved["window_start"]["row"]) == (1, 1, 10)
    after = [next(straight) for _ in range(6)]
    assert [epoch for _, epoch, _ in after] == [0, 0, 1, 1, 1, 1]  # the epoch ends after a short step
    resumed = stream_steps(stream_of(recipe, tiny_tokenizer), collate, stage, Progress(stream=saved), 1, 0)
    assert take(resumed, 6) == [(sources_of(group), ids_of(group)) for group, _, _ in after]


def test_bad_rows_are_skipped_or_fail_naming_file_and_row(make_recipe, tiny_tokenizer, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = alpaca_rows(6)
    jsonl = shards / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n{not json\n")
    table = rows[2:]
    table[1] = {"instruction": "what colour", "input": "", "output": None}
    pq.write_table(pa.Table.from_pylist(table), shards / "b.parquet")
    data = [{"format": "alpaca", "path": str(shards)}]
    options = {"streaming": True, "max_bad_fraction": 1.0}
    recipe = make_recipe(data=data, data_options=options)
    stream = stream_of(recipe, tiny_tokenizer)
    (window,) = stream.windows(StreamState())
    assert len(window.rows) == 5  # 2 + 4 rows, one bad in each shard
    assert [str(b) for b in stream.bad.samples] == [
        f"{jsonl}:3: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{shards / 'b.parquet'}[1]: missing field 'output'",
    ]

    failing = make_recipe(data=data, data_options={**options, "on_bad_sample": "fail"})
    with pytest.raises(DataError, match=rf"{jsonl}:3: malformed JSON .*on_bad_sample=fail"):
        list(stream_of(failing, tiny_tokenizer).windows(StreamState()))


def test_a_row_that_does_not_encode_is_masked_out_of_its_batch_in_the_worker(make_recipe, tiny_tokenizer, tmp_path):
    rows = alpaca_rows(4)
    rows[2] = {**rows[2], "instruction": " ".join(["what colour is the circle"] * 40)}  # no reply fits max_length
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = make_recipe(data=[{"format": "alpaca", "path": str(path)}], data_options={"streaming": True})
    ((group, _, _),) = [
        next(stream_steps(stream_of(recipe, tiny_tokenizer), Collator(0), recipe.stages[0], Progress(), 1, 0))
    ]
    (batch,) = group
    assert [str(b).split(": ")[0] for b in batch["bad"]] == [f"{path}:3"]
    row = batch["sources"].index(f"{path}:3")
    assert (batch["labels"][row] == -100).all()


def test_jsonl_and_parquet_shards_read_the_same_rows(make_recipe, tiny_tokenizer, tmp_path):
    rows = alpaca_rows(10, seed=7)
    rows[3]["system"] = "answer in one word"
    write_jsonl(tmp_path / "rows.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet", row_group_size=3)
    read = {}
    for suffix in ("jsonl", "parquet"):
        recipe = make_recipe(
            data=[{"format": "alpaca", "path": str(tmp_path / f"rows.{suffix}")}], data_options={"streaming": True}
        )
        # From row 4 on, as a resume inside the second row group starts.
        start = StreamPosition(row=4, source_rows=4)
        read[suffix] = [
            dataclasses.replace(item, source="") for _, _, item in stream_of(recipe, tiny_tokenizer).rows(start)
        ]
    memory = [dataclasses.replace(e, source="") for e in read_examples("alpaca", tmp_path / "rows.jsonl")][4:]
    assert read["jsonl"] == read["parquet"] == memory
    assert len(memory) == 6


def test_a_streamed_stage_needs_max_steps(make_recipe):
    with pytest.raises(ValueError, match=r"train.max_steps: a streamed stage \(data.streaming: true\) has no length"):
        make_recipe(data_options={"streaming": True}, train={"max_steps": None, "epochs": 1})
    with pytest.raises(ValueError, match=r"data.clip_cache: "):
        make_recipe(data_options={"streaming": True, "clip_cache": "cache"})


@pytest.mark.slow
def test_a_streamed_v2_stage_mixing_parquet_captions_and_instructions_trains_the_in_memory_adapter(
    make_recipe, tmp_path
):
    images = tmp_path / "images"
    images.mkdir()
    captions = []
    for i, colour in enumerate(list(COLOURS) * 2):
        write_image(images / f"{i}.png", colour)
        captions.append({"image": f"{i}.png", "caption": f"a {colour} square"})
    write_jsonl(tmp_path / "captions.jsonl", captions)
    pq.write_table(pa.Table.from_pylist(captions), tmp_path / "captions.parquet")
    instructions = {
        "format": "alpaca",
        "path": str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(8))),
        "trains": "instruction",
    }

    def recipe(captions_file: str, streaming: bool):
        source = {
            "format": "caption-jsonl",
            "path": str(tmp_path / captions_file),
            "images": str(images),
            "trains": "caption",
        }
        return make_recipe(
            data=[source, instructions],
            method="llama-adapter-v2",
            train={"max_steps": 5, "batch_size": 4, "eps": 1e-6},  # 4 steps per epoch: the stream starts over
            data_options={"group_by_length": False, "streaming": streaming},
            output_dir=str(tmp_path / f"run-{captions_file}"),
        )

    # Random-crop augmentation draws from (seed, epoch, sample index) in both paths. Same batches, same float
    # operations in the same order: bit for bit.
    results = [train(recipe("captions.jsonl", False)), train(recipe("captions.parquet", True))]
    weights = [load_file(r.adapter_dir / "adapter_model.safetensors") for r in results]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    losses = [[h["loss"] for h in r.summary["stages"][0]["history"]] for r in results]
    assert losses[0] == losses[1] and len(losses[0]) == 5


def test_a_streamed_folder_without_shards_is_refused_naming_the_key(make_recipe, tmp_path):
    (tmp_path / "empty").mkdir()
    recipe = make_recipe(data=[{"format": "alpaca", "path": str(tmp_path / "empty")}], data_options={"streaming": True})
    with pytest.raises(FileNotFoundError, match=r"data.train.0.path: .*empty holds no data shards"):
        train(recipe)


@pytest.mark.slow
def test_two_processes_stream_the_adapter_of_one(make_recipe, tmp_path):
    # Windows of 8 rows, a multiple of the global batch: 1 x batch 8 and 2 x batch 4 take the same rows per step.
    # Tolerance as in test_distributed.py (DDP sums gradients in another order).
    data = [{"format": "alpaca", "path": str(write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(16, seed=6)))}]
    document = make_recipe(
        data=data,
        data_options={"streaming": True, "shuffle_window": 8},
        train={"lr": 0.3, "max_steps": 3, "batch_size": 8},  # 2 steps per epoch
        output_dir=str(tmp_path / "one"),
        parsed=False,
    )
    one = train(parse_recipe(document))
    document = dict(document, output_dir=str(tmp_path / "two"), train={**document["train"], "batch_size": 4})
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(document))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    driver = [str(REPO / "tests/train/ddp_driver.py"), str(tmp_path / "two.yaml")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *driver]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    weights = [
        load_file(folder / "adapter_model.safetensors") for folder in (one.adapter_dir, tmp_path / "two/adapter")
    ]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=5e-5)
    two = json.loads((tmp_path / "two/adapter/training_summary.json").read_text())
    assert one.summary["tokens"] == two["tokens"]


# --- WebDataset-style tar shards -----------------------------------------------------------------------------


TAR_OPTIONS = {"streaming": True, "max_bad_fraction": 1.0}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tar_shard_samples_bad_samples_and_resume(make_recipe, tiny_tokenizer, tmp_path):
    members = [
        ("s/a.png", png("red")), ("s/a.txt", b"a red square"),
        ("s/b.jpg.json", b"{}"), ("s/b.png", png("blue")), ("s/b.json", b'{"caption": "a blue square"}'),
        ("s/c.txt", b"no picture"),
        ("s/d.png", png("green")),
        ("s/e.png", png("green")), ("s/e.txt", b"\xff\xfe not utf-8"),
        ("s/f.png", png("red")), ("s/f.txt", b"the last one\n"), ("s/f.npy", b"passed over"),
    ]  # fmt: skip
    shard = write_tar(tmp_path / "shard.tar", members)
    recipe = make_recipe(
        data=[{"format": "caption-jsonl", "path": str(shard)}], data_options=TAR_OPTIONS, method="lora"
    )
    rows = [item for _, _, item in stream_of(recipe, tiny_tokenizer).rows(StreamPosition())]
    assert [row.source for row in rows] == [f"{shard}[{i}:s/{key}]" for i, key in enumerate("abcdef")]
    assert rows[-1].turns == (("", "the last one"),)  # the .txt's trailing newline is not the caption's
    good = [row for row in rows if isinstance(row, Example)]
    assert [(row.turns, row.caption) for row in good] == [
        ((("", "a red square"),), True),
        ((("", "a blue square"),), True),  # from the .json member; "b.jpg.json" is b's too, and not an image
        ((("", "the last one"),), True),
    ]
    assert good[0].image == ImageBytes(f"{shard}[s/a.png]", png("red"))
    reasons = {row.source.rsplit(":", 1)[1]: row.reason for row in rows if isinstance(row, BadSample)}
    assert reasons["s/c]"].startswith("no image member") and reasons["s/d]"].startswith("no caption member")
    assert reasons["s/e]"].startswith("unreadable caption")
    # Resuming at sample 4 reads what an uninterrupted pass reads from there.
    resumed = [item for _, _, item in stream_of(recipe, tiny_tokenizer).rows(StreamPosition(row=4, source_rows=4))]
    assert resumed == rows[4:]

    # Cut short: inside b's first member's data (tarfile raises), inside its header (tarfile ends quietly).
    for cut, source, reason in ((512 * 5 + 40, "[1:s/b]", "ends inside this sample"), (512 * 4 + 100, "[1]", "header")):
        truncated = tmp_path / f"truncated-{cut}.tar"
        truncated.write_bytes(shard.read_bytes()[:cut])
        recipe = make_recipe(
            data=[{"format": "caption-jsonl", "path": str(truncated)}], data_options=TAR_OPTIONS, method="lora"
        )
        rows = [item for _, _, item in stream_of(recipe, tiny_tokenizer).rows(StreamPosition())]
        assert isinstance(rows[0], Example) and len(rows) == 2, rows
        assert rows[1].source == f"{truncated}{source}" and reason in rows[1].reason


def test_a_tar_shard_without_streaming_or_in_another_format_is_refused(make_recipe, tmp_path):
    shard = write_tar(tmp_path / "shard.tar", [("a.png", png("red")), ("a.txt", b"a red square")])
    with pytest.raises(ValueError, match=r"data.train.0.path: .*shard.tar is a tar shard.*data.streaming: true"):
        make_recipe(data=[{"format": "caption-jsonl", "path": str(shard)}])
    with pytest.raises(ValueError, match=r"data.eval.0.path: .*shard.tar is a tar shard.*JSON/JSONL file"):
        make_recipe(data_options={"streaming": True, "eval": [{"format": "caption-jsonl", "path": str(shard)}]})
    recipe = make_recipe(data=[{"format": "alpaca", "path": str(shard)}], data_options={"streaming": True})
    with pytest.raises(DataError, match=r"shard.tar: tar shards hold image \+ caption samples.*not 'alpaca'"):
        train(recipe)


def test_a_damaged_or_compressed_tar_shard_stops_the_run_naming_it(make_recipe, tiny_tokenizer, tmp_path):
    members = [(f"{i}.{extension}", data) for i in range(4) for extension, data in (("png", png("red")), ("txt", b"x"))]
    damaged = bytearray(write_tar(tmp_path / "damaged.tar", members).read_bytes())
    damaged[4 * 1024 + 148] ^= 0xFF  # the checksum of sample 2's first header: tarfile would stop there quietly
    (tmp_path / "damaged.tar").write_bytes(damaged)
    gzipped = tmp_path / "gzipped.tar"
    with tarfile.open(gzipped, "w:gz") as archive:
        archive.add(tmp_path / "damaged.tar", arcname="x.png")
    for shard, message in (
        ("damaged.tar", r"damaged.tar: an unreadable tar header at byte 4,096 .*\(sample 2 on\); the shard is damaged"),
        ("gzipped.tar", r"gzipped.tar: a gzip-compressed tar; .*gunzip it"),
    ):
        recipe = make_recipe(
            data=[{"format": "caption-jsonl", "path": str(tmp_path / shard)}], data_options=TAR_OPTIONS, method="lora"
        )
        with pytest.raises(DataError, match=message):
            list(stream_of(recipe, tiny_tokenizer).rows(StreamPosition()))


@pytest.mark.slow
def test_tar_shards_train_the_adapter_of_the_same_captions_as_files(make_recipe, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows, shards = [], {0: [], 1: []}
    for i, colour in enumerate(list(COLOURS) * 2):
        write_image(images / f"{i:03d}.png", colour)
        rows.append({"image": f"{i:03d}.png", "caption": f"a {colour} square"})
        shards[i * 2 // (2 * len(COLOURS))] += [
            (f"{i:03d}.png", (images / f"{i:03d}.png").read_bytes()),
            (f"{i:03d}.txt", f"a {colour} square".encode()),
        ]
    write_jsonl(tmp_path / "captions.jsonl", rows)
    (tmp_path / "shards").mkdir()
    for n, members in shards.items():
        write_tar(tmp_path / "shards" / f"{n:05d}.tar", members)

    def recipe(path: str, streaming: bool, **source):
        return make_recipe(
            data=[{"format": "caption-jsonl", "path": path, "trains": "caption", **source}],
            method="llama-adapter-v2",
            train={"max_steps": 4, "batch_size": 4, "eps": 1e-6},
            data_options={"group_by_length": False, "streaming": streaming},
            stages=[{"name": "caption", "trains": "caption"}],
            output_dir=str(tmp_path / f"run-{streaming}"),
        )

    results = [
        train(recipe(str(tmp_path / "captions.jsonl"), False, images=str(images))),
        train(recipe(str(tmp_path / "shards"), True)),
    ]
    weights = [load_file(r.adapter_dir / "adapter_model.safetensors") for r in results]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert any(not torch.equal(w, torch.zeros_like(w)) for w in weights[1].values())
