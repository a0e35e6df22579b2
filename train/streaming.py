"""Streamed training data (`data.streaming: true`): rows are read while training runs, tokenized on the fly.

For data that does not fit in memory (caption pretraining on millions of image-text pairs). A source's
`path` is a file, a folder of shards or a glob; shards are JSON/JSONL files (read with the in-memory
path's readers, one shard in memory at a time), Parquet files (read a record batch at a time, rows
parsed by the same row parsers) or WebDataset-style tar files of image + caption samples (read member by
member; what img2dataset writes for LAION or CC3M: `000012.jpg` beside `000012.txt` and/or `000012.json`).
The main process reads and validates rows; tokenizing and image decoding happen in DataLoader workers
(`data.num_workers`; 0 does it in the main process), with the in-memory path's encoder and image loading.

Order: the stream is cut into windows of `data.shuffle_window` usable rows, in shard order (sorted names).
A window is shuffled and batched exactly as the in-memory path batches a whole epoch (batching.py,
without length grouping, which needs token lengths before tokenizing), from a generator seeded by
(seed, epoch, window); window 0 uses the in-memory path's seed. So a stream whose first window holds
every row gives the in-memory path's batches (with `data.group_by_length: false`).

Exact resume: the data position (`Progress.stream`, a `StreamState`) is the shard and row where the
current window starts plus the micro-batches already consumed in it. Permutations are a function of
(seed, epoch, window), so there is no shuffle-buffer RNG state to save: a resumed run re-reads that
window and skips what was consumed. The batch order does not depend on the number of workers.

Bad rows follow `data.on_bad_sample`: a row that does not parse is logged (`file:line` or `file[row]`)
or fails the run when read; one that does not encode, or whose image does not load, is masked out of
its batch in the worker and counted by the step like an unreadable image (step.py `check_step`);
`data.max_bad_fraction` applies per shard.

The tar reader is the standard library's `tarfile` (in stream mode) rather than the `webdataset` package: a
sample's row index is its data position, so exact resume and the bad-sample policy work as for other shards.

Hugging Face `datasets` streaming is not used: its JSON reader fails a block of a shard at a malformed line
without naming the line, and its shuffle buffer is refilled rather than restored on resume, so neither the
bad-sample policy nor exact resume would hold.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mmadapter.core.encoding import IGNORE_INDEX
from mmadapter.core.examples import DataError, Example, ImageBytes, check_encodable
from mmadapter.train.batching import epoch_batches, process_batches
from mmadapter.train.data import (
    BadSampleLog,
    Collator,
    Encoder,
    ImageLoader,
    Sample,
    SupervisedDataset,
    check_token_ids,
    load_samples,
    no_visual_input,
    source_encoder,
)
from mmadapter.train.multimodal import image_loader_for
from mmadapter.train.readers import ROW_PARSERS, BadSample, ImageRoot, read_examples
from mmadapter.train.recipe import DataSection, DataSource, StageSection
from mmadapter.train.state import Progress, Run

SHARD_SUFFIXES = (".jsonl", ".json", ".parquet", ".tar")
#: Extensions of a tar sample's image member (WebDataset names them by format).
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
#: The members a caption sample is read from; others (.npy, .mp4, ...) are passed over unread.
TAR_MEMBER_EXTENSIONS = (*TAR_IMAGE_EXTENSIONS, "txt", "json")
#: Mixed into the batching seed of window w > 0 (window 0 keeps the in-memory path's seed).
WINDOW_SEED_STRIDE = 1_000_000_007
PARQUET_BATCH_ROWS = 1024


def source_shards(source: DataSource) -> list[Path]:
    """The shard files of a streamed source, in name order: the file itself, a folder's *.jsonl/*.json/*.parquet/
    *.tar files, or a glob's matches; empty when there are none."""
    path = Path(source.path)
    if any(c in source.path for c in "*?["):
        matches = [Path(p) for p in glob.glob(source.path, recursive=True)]
    elif path.is_dir():
        matches = list(path.iterdir())
    else:
        matches = [path] if path.is_file() else []
    return sorted(p for p in matches if p.is_file() and p.suffix in SHARD_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class StreamPosition:
    """A place in the stream: before row `row` of shard `shard` of source `source`."""

    source: int = 0
    shard: int = 0
    row: int = 0
    """Rows (good or bad) already read from the shard."""
    source_rows: int = 0
    """Rows already read from the source (for `max_samples`)."""


@dataclasses.dataclass(frozen=True)
class StreamState:
    """The data position after a micro-batch; saved in checkpoints as `Progress.stream`."""

    epoch: int = 0
    window: int = 0
    window_start: StreamPosition = StreamPosition()
    offset: int = 0
    """Usable rows of this epoch before the window (a sample's index, as the in-memory path numbers them)."""
    micro_batch: int = 0
    """This process's micro-batches of the window already consumed."""
    epoch_micro_batch: int = 0
    """This process's micro-batches of the epoch already consumed."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StreamState:
        return cls(**{**values, "window_start": StreamPosition(**values["window_start"])})


@dataclasses.dataclass(frozen=True)
class Window:
    """Up to `data.shuffle_window` usable rows, shuffled and batched together."""

    index: int
    start: StreamPosition
    offset: int
    rows: list[tuple[Example, int]]
    """(example, source index)."""


@dataclasses.dataclass(frozen=True)
class MicroBatchRef:
    """What the main process sends a worker: a micro-batch's rows (sample index, example, source) and the
    data position after it."""

    rows: list[tuple[int, Example, int]]
    state: StreamState


class StreamedDataset(torch.utils.data.Dataset):
    """A stage's streamed training data. The main process reads rows (`windows`); workers turn a
    `MicroBatchRef` into samples (`__getitems__`) with the in-memory path's encoder and image loading."""

    def __init__(
        self,
        sources: list[DataSource],
        tokenizer: Any,
        data: DataSection,
        kinds: list[int],
        bad: BadSampleLog,
        image_loader: ImageLoader | None,
        seed: int,
        pad_id: int,
    ) -> None:
        self.sources, self.tokenizer, self.data, self.kinds = sources, tokenizer, data, kinds
        self.bad, self.image_loader, self.seed, self.pad_id = bad, image_loader, seed, pad_id
        self.shards = [source_shards(source) for source in sources]
        self.rows_read = 0
        self.embedding_rows: int | None = None
        """Rows of the base model's embedding: every batch's token ids are checked against it."""
        self._encoders: dict[int, Encoder] = {}
        self._logged: set[str] = set()

    def __len__(self) -> int:
        """Rows read so far in this stage (the denominator of the unreadable-sample fraction)."""
        return self.rows_read

    # ------------------------------------------------------------ main process: reading

    def rows(self, start: StreamPosition) -> Iterator[tuple[StreamPosition, int, Example | BadSample]]:
        """(position after the row, source index, row) from `start` to the end of the stream; each shard's
        bad-row fraction is checked when the shard ends."""
        for s in range(start.source, len(self.sources)):
            source, limit = self.sources[s], self.sources[s].max_samples
            taken = start.source_rows if s == start.source else 0
            for k in range(start.shard if s == start.source else 0, len(self.shards[s])):
                row = start.row if (s, k) == (start.source, start.shard) else 0
                counts = [0, 0]  # rows, bad rows of this shard
                for item in read_shard(source, self.shards[s][k], row):
                    if limit is not None and taken >= limit:
                        break
                    taken, row = taken + 1, row + 1
                    counts[0] += 1
                    counts[1] += isinstance(item, BadSample)
                    yield StreamPosition(s, k, row, taken), s, item
                self.bad.check_fraction(str(self.shards[s][k]), counts[1], counts[0])
                if limit is not None and taken >= limit:
                    break

    def windows(self, state: StreamState) -> Iterator[Window]:
        """The windows of `state.epoch` from `state`'s window on; bad rows go to the bad-sample log."""
        index, start, offset, rows = state.window, state.window_start, state.offset, []
        size = self.data.shuffle_window
        for after, source, item in self.rows(state.window_start):
            self.rows_read += 1
            if isinstance(item, BadSample):
                if item.source not in self._logged:  # once, not again every epoch
                    self._logged.add(item.source)
                    self.bad.add(item, upfront=False)  # raises under on_bad_sample=fail
                continue
            if item.image is not None and self.image_loader is None:
                raise no_visual_input(item.source)
            rows.append((item, source))
            if len(rows) == size:
                yield Window(index, start, offset, rows)
                index, start, offset, rows = index + 1, after, offset + size, []
        if rows:
            yield Window(index, start, offset, rows)

    # ------------------------------------------------------------ workers: encoding

    def __getitems__(self, ref: MicroBatchRef) -> tuple[list[dict[str, Any]], StreamState]:
        """The samples of one micro-batch (tokenized, images loaded) and the data position after it."""
        return [self._item(index, example, source, ref.state.epoch) for index, example, source in ref.rows], ref.state

    def _item(self, index: int, example: Example, source: int, epoch: int) -> dict[str, Any]:
        kind = self.kinds[source]
        if source not in self._encoders:
            self._encoders[source] = source_encoder(self.sources[source], self.tokenizer, self.data)
        try:
            encoded = self._encoders[source](example)
        except DataError as error:  # masked out of its batch like an unreadable image, and counted
            unusable = Sample(example.source, [self.pad_id], [IGNORE_INDEX], None, kind)
            return {"sample": unusable, "image": None, "bad": BadSample(example.source, str(error))}
        sample = Sample(example.source, encoded.input_ids, encoded.labels, example.image, kind)
        # The in-memory path's item code, so augmentation draws from the same (seed, epoch, index) generator.
        one = SimpleNamespace(samples={index: sample}, image_loader=self.image_loader, seed=self.seed, epoch=epoch)
        return SupervisedDataset.__getitem__(one, index)  # type: ignore[arg-type]


def read_shard(source: DataSource, path: Path, skip: int) -> Iterator[Example | BadSample]:
    """A shard's rows from row `skip` on: JSON/JSONL by the in-memory readers, Parquet by record batches, tar
    files sample by sample."""
    if path.suffix == ".parquet":
        return read_parquet(source, path, skip)
    if path.suffix == ".tar":
        return read_tar(source, path, skip)
    rows = read_examples(
        source.format, path, source.images, source.options, allow_outside_root=source.allow_outside_root
    )
    return itertools.islice(rows, skip, None)


def read_parquet(source: DataSource, path: Path, skip: int) -> Iterator[Example | BadSample]:
    """Rows of a Parquet shard as examples (columns are the format's fields); `file[row]` names a bad one."""
    if source.format not in ROW_PARSERS:
        raise DataError(
            f"{path}: format {source.format!r} cannot be read from Parquet; Parquet shards hold "
            f"{', '.join(ROW_PARSERS)} rows (use JSONL shards for {source.format})"
        )
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: Parquet shards need pyarrow: pip install 'mmadapter[streaming]'") from None
    parse = ROW_PARSERS[source.format]
    images = ImageRoot(Path(source.images or path.parent).resolve(), source.allow_outside_root)
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
    except Exception as error:  # pyarrow's ArrowInvalid/OSError for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    index = 0
    for batch in batches:
        if index + batch.num_rows <= skip:
            index += batch.num_rows
            continue
        for row in batch.to_pylist()[max(0, skip - index) :]:
            location = f"{path}[{max(index, skip)}]"
            index = max(index, skip) + 1
            try:
                yield parse(location, row, images)
            except DataError as error:
                yield BadSample(location, str(error))


def read_tar(source: DataSource, path: Path, skip: int) -> Iterator[Example | BadSample]:
    """Image + caption samples of a WebDataset-style tar shard, from sample `skip` on.

    Members are grouped by key, the member name up to the first dot of its file name (`a/000012.jpg` and
    `a/000012.txt` are sample `a/000012`), and a sample's members are adjacent, as WebDataset writes them. The
    image is the member with an image extension; the caption is the `.txt` member, else the `.json` member's
    "caption" (surrounding whitespace, such as a trailing newline, stripped). `file[index:key]` names a bad
    sample; a shard cut short counts as one bad sample where it ends; a damaged header mid-shard stops the run.
    """
    if source.format != "caption-jsonl":
        raise DataError(
            f"{path}: tar shards hold image + caption samples, read as format caption-jsonl, not {source.format!r}"
        )
    with path.open("rb") as file:
        if file.read(2) == b"\x1f\x8b":
            raise DataError(f"{path}: a gzip-compressed tar; mmadapter reads plain tar shards: gunzip it")
    try:
        archive = tarfile.open(path, mode="r|")  # stream mode: one pass, nothing but the current member held
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"{path}: not a readable tar shard ({error})") from None
    index, key, parts = -1, None, {}
    with archive:
        try:
            for member in archive:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, _, extension = name.partition(".")
                sample = f"{folder}/{stem}" if folder else stem
                if sample != key:
                    if index >= skip:  # skip >= 0: never before the first sample
                        yield tar_sample(path, index, key, parts)
                    index, key, parts = index + 1, sample, {}
                extension = extension.lower()
                if index >= skip and extension in TAR_MEMBER_EXTENSIONS:  # skipped samples are passed over, unread
                    parts[extension] = (member.name, archive.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError) as error:
            if max(index, 0) >= skip:
                yield BadSample(tar_location(path, max(index, 0), key), f"the shard ends inside this sample ({error})")
            return
    if index >= skip:
        yield tar_sample(path, index, key, parts)
    yield from tar_ending(path, archive.offset, index + 1, skip)


def tar_ending(path: Path, offset: int, index: int, skip: int) -> Iterator[BadSample]:
    """tarfile ends quietly at a header it cannot read; a whole archive ends there with two zero blocks. A shard
    cut short inside a header is one bad sample; a damaged header with data after it stops the run, since the
    samples behind it would be lost without a count."""
    with path.open("rb") as file:
        file.seek(offset)
        ending = file.read(2 * tarfile.BLOCKSIZE)
        left = path.stat().st_size - offset
    if ending and not ending.strip(b"\0"):  # the end-of-archive blocks (or what is left of them)
        return
    if left <= tarfile.BLOCKSIZE:
        if index >= skip:
            yield BadSample(f"{path}[{index}]", "the shard ends inside a member's header (truncated?)")
        return
    raise DataError(
        f"{path}: an unreadable tar header at byte {offset:,} with {left:,} bytes after it (sample {index} on); "
        "the shard is damaged: write it again, or leave it out of the data"
    )


def tar_location(path: Path, index: int, key: str | None) -> str:
    """How a tar sample is named in messages: `shard.tar[index:key]`."""
    return f"{path}[{index}:{key or ''}]"


def tar_sample(path: Path, index: int, key: str, parts: dict[str, tuple[str, bytes]]) -> Example | BadSample:
    """One tar sample's members (extension -> (member name, bytes)) as a caption example."""
    location = tar_location(path, index, key)
    images = [extension for extension in TAR_IMAGE_EXTENSIONS if extension in parts]
    if not images:
        return BadSample(location, f"no image member ({', '.join('.' + e for e in TAR_IMAGE_EXTENSIONS)})")
    try:
        if "txt" in parts:
            caption = parts["txt"][1].decode("utf-8")
        elif "json" in parts:
            caption = json.loads(parts["json"][1]).get("caption")
        else:
            return BadSample(location, "no caption member (.txt, or .json with a 'caption' field)")
        if not isinstance(caption, str) or not caption.strip():
            return BadSample(location, "the caption is empty or not text")
        check_encodable(caption, "caption")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, DataError) as error:
        return BadSample(location, f"unreadable caption ({error})")
    name, data = parts[images[0]]
    return Example(location, (("", caption.strip()),), image=ImageBytes(f"{path}[{name}]", data), caption=True)


@dataclasses.dataclass
class WithState:
    """The collate function of a stream: the batch, and the data position after it."""

    collate: Collator

    def __call__(self, items: tuple[list[dict[str, Any]], StreamState]) -> tuple[dict[str, Any], StreamState]:
        return self.collate(items[0]), items[1]


class StreamBatches:
    """The batch sampler of one epoch, from a data position: reads windows, shuffles and batches each one
    as the in-memory path batches an epoch, and yields this process's micro-batches as `MicroBatchRef`s."""

    def __init__(self, dataset: StreamedDataset, stage: StageSection, state: StreamState, processes: int, index: int):
        self.dataset, self.config, self.state = dataset, stage.train, state
        self.processes, self.index = processes, index

    def __iter__(self) -> Iterator[MicroBatchRef]:
        state, consumed = self.state, self.state.epoch_micro_batch
        for window in self.dataset.windows(state):
            batches = epoch_batches(
                [0] * len(window.rows),
                batch_size=self.config.batch_size,
                grad_accum=self.config.grad_accum,
                num_processes=self.processes,
                seed=self.config.seed,
                epoch=state.epoch + window.index * WINDOW_SEED_STRIDE,
                group_by_length=False,
            )
            mine = process_batches(batches, self.index, self.processes)
            skip = state.micro_batch if window.index == state.window else 0
            for done, batch in enumerate(mine[skip:], start=skip + 1):
                consumed += 1
                after = StreamState(state.epoch, window.index, window.start, window.offset, done, consumed)
                rows = [(window.offset + i, *window.rows[i]) for i in batch]
                yield MicroBatchRef(rows, after)


def stream_steps(
    dataset: StreamedDataset,
    collate: Collator,
    stage: StageSection,
    progress: Progress,
    processes: int,
    process_index: int,
) -> Iterator[tuple[list[dict[str, Any]], int, int]]:
    """Like step.py's `step_batches` for a streamed stage: (micro-batches of one optimizer step, epoch,
    micro-batches consumed in it), forever. Before yielding a step it sets `progress.stream` to the data
    position after that step, which the checkpoint written after the step saves."""
    state = StreamState.from_dict(progress.stream) if progress.stream else StreamState(epoch=progress.epoch)
    grad_accum = stage.train.grad_accum
    while True:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=StreamBatches(dataset, stage, state, processes, process_index),
            collate_fn=WithState(collate),
            num_workers=stage.data.num_workers,
            generator=torch.Generator(),  # never draw from the global RNG (exact resume)
        )
        group, after = [], state
        for batch, after in loader:
            check_batch_ids(batch, dataset)
            group.append(batch)
            if len(group) == grad_accum:
                progress.stream = dataclasses.asdict(after)
                yield group, after.epoch, after.epoch_micro_batch
                group = []
        if group:  # the epoch's last step may be short, as in the in-memory path
            progress.stream = dataclasses.asdict(after)
            yield group, after.epoch, after.epoch_micro_batch
        if after == state and state == StreamState(epoch=state.epoch):
            raise DataError(
                f"stage {stage.name!r}: the stream has no usable training samples ({dataset.bad.summary(3)})"
            )
        state = StreamState(epoch=state.epoch + 1)


def check_batch_ids(batch: dict[str, Any], dataset: StreamedDataset) -> None:
    """A token id without a row in the embedding stops the run naming model.tokenizer and the sample (the
    in-memory path checks every sample before the first step; a stream checks each batch as it comes)."""
    rows = dataset.embedding_rows
    if rows is not None and int(batch["input_ids"].max()) >= rows:
        samples = [
            SimpleNamespace(source=source, input_ids=ids.tolist())
            for source, ids in zip(batch["sources"], batch["input_ids"], strict=True)
        ]
        check_token_ids(samples, dataset.tokenizer, dataset.pad_id, rows)


def load_streamed_data(
    run: Run, stage: StageSection, kinds: list[str | None], pad_id: int
) -> tuple[StreamedDataset, SupervisedDataset | None, BadSampleLog]:
    """(streamed training set, in-memory eval set or None, bad-sample log) of a streamed stage."""
    data = stage.data
    bad = BadSampleLog(data.on_bad_sample, data.max_bad_fraction)
    for j, source in enumerate(data.train):
        if not source_shards(source):
            raise DataError(f"data.train.{j}.path: {source.path}: no data shards ({', '.join(SHARD_SUFFIXES)})")
    if data.group_by_length:
        run.print("note: a streamed stage does not group batches by length (lengths are known only once tokenized)")
    rows = run.model.get_input_embeddings().weight.shape[0]  # peft wraps a LoRA-tuned embedding
    show = run.accelerator.is_local_main_process
    eval_samples = load_samples(data.eval, run.tokenizer, data, kinds, stage.trains, bad, show_progress=show)
    check_token_ids(eval_samples, run.tokenizer, pad_id, rows)
    loader = image_loader_for(run.model, None, [], show)[0]
    eval_loader = image_loader_for(run.model, None, [], show, train=False)[0]
    source_kinds = [kinds.index(source.trains or stage.trains) for source in data.train]
    dataset = StreamedDataset(data.train, run.tokenizer, data, source_kinds, bad, loader, stage.train.seed, pad_id)
    dataset.embedding_rows = rows
    shards = sum(len(s) for s in dataset.shards)
    run.print(f"data: streaming {shards} shard(s), window {data.shuffle_window} rows; {len(eval_samples)} eval samples")
    return dataset, (SupervisedDataset(eval_samples, eval_loader) if eval_samples else None), bad
