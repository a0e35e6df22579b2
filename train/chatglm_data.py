"""ChatGLM-6B P-Tuning v2 data exactly as the official recipe builds it (THUDM/ChatGLM-6B ptuning/main.py).

Spec chatglm-6b-ptuning-v2 §5.5. Rows are JSON lines (AdvertiseGen: `{"content", "summary"}`; chat
data: `{"prompt", "response", "history": [[q, r], …]}`) with configurable column names. Training
examples are `encode(prompt) + [gMASK] <sop> + encode(answer) + <eop>` with the prompt truncated to
max_source_length − 1 and the answer to max_target_length − 2 tokens, labels −100 before `<sop>`,
right-padded to max_source_length + max_target_length, pads −100 in the labels. Evaluation examples
are the prompt (ending in `[gMASK] <sop>`) and the reference ids, as the official eval function.

The tokenizer only needs `encode(text, add_special_tokens=False)`, `build_inputs_with_special_tokens(a, b)`,
`bos_token_id` (`<sop>`) and `pad_token_id` — the interface of ChatGLM-6B's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmadapter.core.encoding import IGNORE_INDEX
from mmadapter.core.examples import check_encodable
from mmadapter.core.templates import chatglm_rounds


class MalformedRowError(ValueError):
    """A data row that cannot be used; names the file and line so the user can fix it."""

    def __init__(self, path: str | Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


@dataclasses.dataclass(kw_only=True)
class ChatGLMDataConfig:
    """The official `DataTrainingArguments` that shape examples (defaults: the ADGEN train.sh)."""

    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: str | None = None
    """Column with earlier [question, answer] turns; when set, prompts use the `[Round i]` template."""
    source_prefix: str = ""
    """Text put in front of every prompt."""
    max_source_length: int = 64
    max_target_length: int = 64
    ignore_pad_token_for_loss: bool = True

    def __post_init__(self) -> None:
        if self.max_source_length < 1 or self.max_target_length < 2:
            raise ValueError(
                "max_source_length must be >= 1 and max_target_length >= 2 (room for [gMASK] and <sop>/<eop>), "
                f"got {self.max_source_length} and {self.max_target_length}"
            )


@dataclasses.dataclass(frozen=True)
class ChatGLMRow:
    query: str
    response: str
    history: tuple[tuple[str, str], ...]
    source: str
    """`file:line`, for messages about this row."""


def training_prompt(row: ChatGLMRow, config: ChatGLMDataConfig) -> str:
    """Official training rule: the template whenever a history column is configured, even with no history."""
    prompt = chatglm_rounds(row.query, row.history) if config.history_column else row.query
    return config.source_prefix + prompt


def eval_prompt(row: ChatGLMRow, config: ChatGLMDataConfig) -> str:
    """Official evaluation rule (and `chat()`'s): the raw query when there is no history."""
    prompt = chatglm_rounds(row.query, row.history) if config.history_column and row.history else row.query
    return config.source_prefix + prompt


def _string(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"column {column!r} must be a string, got {type(value).__name__}")
    check_encodable(value, column)
    return value


def _history(row: dict[str, Any], column: str) -> tuple[tuple[str, str], ...]:
    value = row.get(column)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"column {column!r} must be a list of [question, answer] pairs, got {type(value).__name__}")
    turns = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ValueError(f"{column}[{i}] must be a [question, answer] pair of strings, got {pair!r}")
        for text in pair:
            check_encodable(text, f"{column}[{i}]")
        turns.append((pair[0], pair[1]))
    return tuple(turns)


def parse_row(line: str, config: ChatGLMDataConfig, path: str | Path, number: int) -> ChatGLMRow | None:
    """One JSON line -> a row; None for rows the official code drops (empty prompt or response)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise MalformedRowError(path, number, f"invalid JSON ({error.msg} at column {error.colno})") from None
    try:
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        if config.prompt_column not in row or config.response_column not in row:
            missing = [c for c in (config.prompt_column, config.response_column) if c not in row]
            raise ValueError(f"missing column(s) {missing}; the row has {sorted(row)}")
        query, response = _string(row, config.prompt_column), _string(row, config.response_column)
        history = _history(row, config.history_column) if config.history_column else ()
    except ValueError as error:
        raise MalformedRowError(path, number, str(error)) from None
    if not query or not response:
        return None
    return ChatGLMRow(query, response, history, f"{path}:{number}")


def read_rows(
    path: str | Path,
    config: ChatGLMDataConfig,
    on_error: Callable[[MalformedRowError], None] | None = None,
) -> Iterator[ChatGLMRow]:
    """The usable rows of a JSON-lines file.

    A malformed row raises MalformedRowError unless `on_error` is given; then `on_error(error)` is
    called and the row is skipped (the caller's skip/fail policy: it may log, count, or re-raise).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = parse_row(line, config, path, number)
            except MalformedRowError as error:
                if on_error is None:
                    raise
                on_error(error)
                continue
            if row is not None:
                yield row


def build_training_example(tokenizer, prompt: str, answer: str, config: ChatGLMDataConfig) -> dict[str, list[int]]:
    """input_ids and labels of one training example, padded to max_source_length + max_target_length."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)[: config.max_source_length - 1]
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)[: config.max_target_length - 2]
    input_ids = list(tokenizer.build_inputs_with_special_tokens(prompt_ids, answer_ids))
    context_length = input_ids.index(tokenizer.bos_token_id)
    labels = [IGNORE_INDEX] * context_length + input_ids[context_length:]
    padding = config.max_source_length + config.max_target_length - len(input_ids)
    pad = tokenizer.pad_token_id
    input_ids += [pad] * padding
    labels += [pad] * padding
    if config.ignore_pad_token_for_loss:
        # As official: every label equal to the pad id is ignored (also one inside the answer).
        labels = [IGNORE_INDEX if label == pad else label for label in labels]
    return {"input_ids": input_ids, "labels": labels}


def build_eval_example(tokenizer, prompt: str, answer: str, config: ChatGLMDataConfig) -> dict[str, list[int]]:
    """Unpadded prompt ids (ending `[gMASK] <sop>`) and reference ids, as `tokenizer(..., truncation=True)`.

    Hugging Face truncation counts the two special tokens, so texts keep max_length − 2 tokens; the
    reference also ends in `[gMASK] <sop>` (official quirk; decoding with skip_special_tokens drops them).
    Left padding, mask and positions come from the tokenizer's batch padding.
    """
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)[: max(config.max_source_length - 2, 0)]
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)[: max(config.max_target_length - 2, 0)]
    return {
        "input_ids": list(tokenizer.build_inputs_with_special_tokens(prompt_ids)),
        "labels": list(tokenizer.build_inputs_with_special_tokens(answer_ids)),
    }


class ChatGLMTrainingDataset(torch.utils.data.Dataset):
    """Official training examples of a JSON-lines file, as LongTensors of equal length (default collate works)."""

    def __init__(
        self,
        path: str | Path,
        tokenizer,
        config: ChatGLMDataConfig,
        on_error: Callable[[MalformedRowError], None] | None = None,
        progress: bool = True,
    ) -> None:

        rows = tqdm(read_rows(path, config, on_error), desc=f"tokenizing {Path(path).name}", disable=not progress)
        self.examples = [
            build_training_example(tokenizer, training_prompt(row, config), row.response, config) for row in rows
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: torch.tensor(value) for key, value in self.examples[index].items()}
