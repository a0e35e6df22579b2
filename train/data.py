"""Training datasets: read and tokenize every source up front, then load images lazily per sample.

Rows are validated and tokenized before the first step, so a malformed row, a missing field, a
missing image or a prompt too long for max_length is reported (file and line/index) before any
compute is spent, and length-grouped batching knows every length. Every image's header is read
then too (not its pixels), so an unsupported, unreadable or oversized file is found up front.
Images are decoded when a batch is built; one whose body turns out to be corrupt is masked out of
its batch (it contributes no loss) and counted, so nothing crashes mid-epoch. Policy
(`data.on_bad_sample`): `skip` counts and reports at the end, but stops when more than
`max_bad_fraction` of a file is bad; `fail` stops at the first bad sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmadapter.core.chat_templates import CHAT, chat_template_of
from mmadapter.core.encoding import IGNORE_INDEX, Encoded, encode
from mmadapter.core.examples import DataError, Example, ImageBytes
from mmadapter.core.progress import passing_bar
from mmadapter.core.templates import Template, concrete_template_name, resolve_template
from mmadapter.train.chatglm_data import ChatGLMDataConfig, ChatGLMRow, build_training_example, training_prompt
from mmadapter.train.readers import BadSample, read_examples
from mmadapter.train.recipe import DataSection, DataSource, Recipe
from mmadapter.vision.images import ImageLoadError, check_image_header

#: image path -> model inputs for that image, e.g. {"pixel_values": (3, H, W)}; raises ValueError/OSError.
ImageLoader = Callable[[Path | ImageBytes], dict[str, torch.Tensor]]
#: example -> Encoded; raises DataError for an unusable example.
Encoder = Callable[[Example], Encoded]


def resolve_recipe_templates(recipe: Recipe, tokenizer, model_type: str) -> None:
    """Decide every stage's `data.template: auto` for this tokenizer and base family, in place (the saved
    recipe and the adapter folder then name the template used), and check that a chat template can be
    trained with, before any data is read."""
    for stage in recipe.stages:
        name = concrete_template_name(stage.data.template, tokenizer, model_type)
        if name == CHAT:
            try:
                chat_template_of(tokenizer)
            except ValueError as error:
                raise ValueError(f"data.template: {stage.data.template}: {error}") from None
        stage.data.template = name


def data_template(data: DataSection, tokenizer) -> Template:
    """The prompt template of a data section (`auto` decided as for a LLaMA-style base: templates encode every
    format but ChatGLM's, which has its own layout)."""
    return resolve_template(data.template, tokenizer, "llama")


def source_encoder(source: DataSource, tokenizer, data: DataSection) -> Encoder:
    """How the examples of `source` become token ids: ChatGLM's own layout, or the data section's template."""
    if source.format == "chatglm":
        return lambda example: encode_chatglm(example, tokenizer, data, source)
    template = data_template(data, tokenizer)
    return lambda example: encode(
        example, tokenizer, template, max_length=data.max_length, caption_instruction=data.caption_instruction
    )


def encode_chatglm(example: Example, tokenizer, data: DataSection, source: DataSource) -> Encoded:
    """The official P-Tuning v2 layout (prompt [gMASK] <sop> answer <eop>), built by train/chatglm_data.py;
    its padding to max_source_length + max_target_length is dropped (batches are padded dynamically)."""

    config = chatglm_data_config(data, source)
    (*history, (query, response)) = example.turns
    row = ChatGLMRow(query, response, tuple(history), example.source)
    features = build_training_example(tokenizer, training_prompt(row, config), response, config)
    ids, labels = features["input_ids"], features["labels"]
    length = len(ids)
    while length and ids[length - 1] == tokenizer.pad_token_id and labels[length - 1] == IGNORE_INDEX:
        length -= 1
    return Encoded(ids[:length], labels[:length])


def chatglm_data_config(data: DataSection, source: DataSource):
    """The official data arguments from a recipe: lengths from `data`, columns from the source's options."""

    return ChatGLMDataConfig(
        max_source_length=data.max_source_length, max_target_length=data.max_target_length, **source.options
    )


@dataclasses.dataclass(frozen=True)
class Sample:
    source: str
    input_ids: list[int]
    labels: list[int]
    image: Path | ImageBytes | None
    kind: int
    """Index into the dataset's `kinds`: which adapter stage's parameters this sample updates."""


def supervised_view(tokenizer: Any, sample: Sample, max_chars: int = 1200) -> str:
    """The sample's text as the model reads it (special tokens included) with the trained tokens in [[ ]]: the
    one look that shows the template and that the loss falls on answers only."""
    pieces = []
    pairs = zip(sample.input_ids, sample.labels, strict=True)
    for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False)
        pieces.append(f"[[{text}]]" if trained else text)
    text = "".join(pieces)
    return text if len(text) <= max_chars else f"{text[: max_chars // 2]} … {text[-max_chars // 2 :]}"


def no_visual_input(first: str) -> DataError:
    """Image data for an adapter that cannot see it."""
    return DataError(
        f"the data has images but the adapter has no visual input (first: {first}); "
        "use llama-adapter-v2 with its visual projector (adapter.options.visual_projector: v2)"
    )


class BadSampleLog:
    """Counts bad samples, applies the skip/fail policy, and says what was skipped."""

    def __init__(self, policy: str = "skip", max_fraction: float = 0.05) -> None:
        self.policy, self.max_fraction = policy, max_fraction
        self.samples: list[BadSample] = []
        self.upfront = 0
        """How many were found before training (the rest turned up while loading images)."""

    def add(self, bad: BadSample, upfront: bool = True) -> None:
        self.upfront += upfront
        if self.policy == "fail":
            raise DataError(f"{bad} (data.on_bad_sample=fail; use skip to leave such samples out)")
        self.samples.append(bad)

    def check_fraction(self, what: str, bad: int, total: int) -> None:
        if total and bad / total > self.max_fraction:
            first = "; ".join(str(b) for b in self.samples[-bad:][:3])
            raise DataError(
                f"{what}: {bad} of {total} samples are bad ({bad / total:.1%} > data.max_bad_fraction "
                f"{self.max_fraction:.1%}); first: {first}"
            )

    def summary(self, limit: int = 10, done: str = "skipped") -> str:
        """The bad samples, `limit` of them listed; `done` says what became of them."""
        if not self.samples:
            return "no bad samples"
        lines = [f"{done} {len(self.samples)} bad sample(s):"] + [f"  {b}" for b in self.samples[:limit]]
        if len(self.samples) > limit:
            lines.append(f"  … and {len(self.samples) - limit} more")
        return "\n".join(lines)


def sample_kinds(sources: Sequence[DataSource], stage: str | None) -> list[str | None]:
    """The adapter stages a set of sources trains; more than one means a mixed run."""
    return sorted({source.trains or stage for source in sources}, key=lambda k: (k is None, k or ""))


def load_samples(
    sources: Sequence[DataSource],
    tokenizer,
    data: DataSection,
    kinds: list[str | None],
    stage: str | None,
    bad: BadSampleLog,
    *,
    show_progress: bool = True,
) -> list[Sample]:
    """Read, validate and tokenize every source, and check its images' headers; bad rows and images go to
    `bad` under its policy."""
    samples: list[Sample] = []
    for source in sources:
        bad_before = len(bad.samples)
        read, count = read_source(source, tokenizer, data, kinds.index(source.trains or stage), bad, show_progress)
        samples += check_images(read, bad, Path(source.path).name, show_progress)
        bad.check_fraction(source.path, len(bad.samples) - bad_before, count)
    return samples


def read_source(
    source: DataSource, tokenizer, data: DataSection, kind: int, bad: BadSampleLog, show_progress: bool
) -> tuple[list[Sample], int]:
    """(tokenized samples, rows read) of one source; bad rows go to `bad`."""
    encoder = source_encoder(source, tokenizer, data)
    samples: list[Sample] = []
    count = 0
    rows = read_examples(
        source.format,
        source.path,
        source.images,
        source.options,
        source.max_samples,
        allow_outside_root=source.allow_outside_root,
    )
    for item in passing_bar(rows, desc=f"reading {Path(source.path).name}", disable=not show_progress):
        count += 1
        if isinstance(item, BadSample):
            bad.add(item)
            continue
        try:
            encoded = encoder(item)
        except DataError as error:
            bad.add(BadSample(item.source, str(error)))
            continue
        samples.append(Sample(item.source, encoded.input_ids, encoded.labels, item.image, kind))
    return samples, count


def check_images(samples: list[Sample], bad: BadSampleLog, what: str, show_progress: bool) -> list[Sample]:
    """The samples whose image (if any) has a readable header within the pixel limit; the others go to `bad`
    now, so `fail` stops before any compute and `skip` reports them all up front. Each file is read once."""
    problems: dict[Path, str | None] = {}
    kept = []
    show = show_progress and any(s.image is not None for s in samples)
    for sample in passing_bar(samples, desc=f"checking images of {what}", disable=not show):
        if sample.image is not None and sample.image not in problems:
            problems[sample.image] = image_problem(sample.image)
        if problems.get(sample.image) is None:  # fine, or a text sample
            kept.append(sample)
        else:
            bad.add(BadSample(sample.source, problems[sample.image]))
    return kept


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used, from its header alone; None if it looks fine."""
    try:
        check_image_header(path)
    except ImageLoadError as error:
        return str(error)
    return None


def check_token_ids(samples: Sequence[Sample], tokenizer, pad_id: int, rows: int) -> None:
    """Every token id, padding included, needs a row in the base model's embedding; else the first batch
    holding one stops training with torch's bare `IndexError: index out of range in self`."""
    first = next((s for s in samples if max(s.input_ids, default=0) >= rows), None)
    if first is None and pad_id < rows:
        return
    where = f"its padding token id {pad_id}" if first is None else f"token id {max(first.input_ids)} in {first.source}"
    raise ValueError(
        f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the base model's embedding has {rows} "
        f"rows ({where}); use the base model's tokenizer"
    )


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized samples; images are loaded here (in DataLoader workers when num_workers > 0).

    Random image augmentation draws from a generator seeded by (seed, epoch, sample index), so a
    sample looks the same however many processes or workers share the data, and after a resume.
    """

    def __init__(self, samples: list[Sample], image_loader: ImageLoader | None = None, seed: int = 0) -> None:
        self.samples, self.image_loader, self.seed, self.epoch = samples, image_loader, seed, 0
        if image_loader is None and any(s.image is not None for s in samples):
            raise no_visual_input(next(s.source for s in samples if s.image is not None))

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        item: dict[str, Any] = {"sample": sample, "image": None, "bad": None}
        if sample.image is not None:
            try:
                with cpu_rng_seeded((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index):
                    item["image"] = self.image_loader(sample.image)
            except (ValueError, OSError) as error:  # the loader's ImageLoadError is a ValueError naming the file
                item["bad"] = BadSample(sample.source, str(error))
        return item


@contextlib.contextmanager
def cpu_rng_seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded to `seed`, then restore its state.

    Image transforms (torchvision's random resized crop) draw from the global CPU generator and take no
    generator of their own. `torch.manual_seed`/`fork_rng` would also seed every accelerator, which records a
    stack trace per call for lazy CUDA initialisation (a fifth of a CPU demo's time); this seeds the CPU alone.
    """
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


@dataclasses.dataclass
class Collator:
    """Dynamic right padding to the longest sample in the batch; bad images are masked out."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(item["sample"].input_ids) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            sample = item["sample"]
            n = len(sample.input_ids)
            input_ids[row, :n] = torch.tensor(sample.input_ids)
            attention_mask[row, :n] = 1
            if item["bad"] is None:  # a sample whose image failed stays in the batch with no loss
                labels[row, :n] = torch.tensor(sample.labels)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "kinds": torch.tensor([item["sample"].kind for item in items]),
            "sources": [item["sample"].source for item in items],
            "bad": [item["bad"] for item in items if item["bad"] is not None],
        }
        batch.update(stack_images([item["image"] for item in items]))
        return batch


def stack_images(images: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Stack per-sample image inputs; samples without one (text, bad image) get zeros and image_mask False."""
    present = [image for image in images if image is not None]
    if not present:
        return {}
    stacked = {}
    for key, example in present[0].items():
        stacked[key] = torch.stack([image[key] if image is not None else torch.zeros_like(example) for image in images])
    stacked["image_mask"] = torch.tensor([image is not None for image in images])
    return stacked
