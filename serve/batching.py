"""Continuous batching: requests share decoding steps, joining after their prefill and leaving when done.

Every `step()` runs at most one prefill chunk for the requests that are joining (all waiting ones
that fit, padded together, in chunks of about `prefill_tokens` tokens so a long prompt does not
stall the running streams) and one decoding step for every running request. A request's first
token comes from its prefill; it then joins the running batch, whose KV cache is one transformers
`DynamicCache` (layers growing in place, `serve.kv_cache`): rows are right-aligned (left padding),
with an attention mask over the cached columns and position ids counted over each row's real tokens,
so a row's logits equal the row alone up to float rounding. A finished or cancelled row leaves at
once (its cache row is dropped, and columns that are padding for every remaining row are cut).

Sampling is per request: its own settings, its own `torch.Generator` (seeded or fresh), its own
history for the repetition penalty, so what a request draws never depends on its neighbours.
Rows may use different adapters at different strengths (`adapters.methods.routing`).

Why not transformers' continuous-batching manager (`generate_batch`, paged KV cache): it accepts
only its own attention kernels (sdpa, paged|eager, flash), so the LLaMA-Adapter prompt branch,
which lives in our registered attention function, would be switched off; it flattens all requests
into one packed row, so neither a per-row adapter route nor a per-row visual prompt has a batch
row to attach to; P-Tuning v2 prefixes enter through `past_key_values`, which its paged cache
replaces; and it samples every request from the process-wide RNG with one generation config, so
per-request seeds and settings would not be exact.

Models that cannot share a cache this way (ChatGLM-6B's 2-D positions, P-Tuning v2 prefixes; see
`GenerationEngine.batchable`) run one request at a time through `GenerationEngine.stream`. A request
that brings its own engine (a P-Tuning v2 adapter served beside others: its prefix lives in the
request's KV cache, on a shell sharing the base weights) runs alone in a lane of its own, one token
per step beside the shared batch, so the others keep batching while it streams.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache

from mmadapter.adapters.methods.prompt_attention import VISUAL_PROMPT_KWARG
from mmadapter.adapters.methods.routing import RowRouting, routed
from mmadapter.serve.generate import GenerationEngine, RowText, TextDelta
from mmadapter.serve.kv_cache import new_kv_cache
from mmadapter.serve.sampling import SamplingParams, TokenChooser


@dataclasses.dataclass
class GenerationRequest:
    """One prompt to answer, with everything that is particular to it."""

    prompt_ids: list[int]
    params: SamplingParams
    route: str | None = None
    """Adapter name in the base model's routing (None: the model as loaded, no routing)."""
    strength: float = 1.0
    """The request's adapter_scale (routed adapters only)."""
    visual_prompt: torch.Tensor | None = None
    """(1, K, D) from the adapter's visual prompter, computed once; None for text."""
    engine: GenerationEngine | None = None
    """Its own engine (a P-Tuning v2 adapter beside others): it runs alone, beside the shared batch."""


class Sequence:
    """A request inside the scheduler: its text state, sampler and token history."""

    def __init__(self, engine: GenerationEngine, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        engine.check_prompt_length(len(request.prompt_ids))
        self.request = request
        self.text: RowText = engine.new_row(request.params)
        self.chooser: TokenChooser = engine.new_chooser(request.params)
        self.history = list(request.prompt_ids)
        self.budget = min(request.params.max_new_tokens, engine.context_length - len(request.prompt_ids))
        self.stop_ids = engine.eos_token_ids | set(request.params.stop_token_ids)
        self.cancelled = False
        self._exclusive: Iterator[TextDelta] | None = None
        self._routing: RowRouting | None = None

    @property
    def finished(self) -> bool:
        return self.cancelled or self.text.finish_reason is not None

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits (1, V)."""
        history = torch.tensor([self.history], device=logits.device) if self.chooser.reads_history else None
        return int(self.chooser(history, logits)[0])

    def accept(self, token: int) -> TextDelta | None:
        self.history.append(token)
        text = self.text.accept(token, self.stop_ids, self.budget)
        if not text and self.text.finish_reason is None:
            return None
        delta = TextDelta(0, text, self.text.finish_reason, self.text.generated, self.text.pending)
        self.text.pending = []
        return delta


class _Prefill:
    """The joining requests, left-padded together and pushed through the model a chunk at a time."""

    def __init__(self, sequences: list[Sequence], pad_token_id: int, device: torch.device, config: Any) -> None:
        self.sequences = sequences
        width = max(len(s.request.prompt_ids) for s in sequences)
        self.ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
        self.mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            prompt = sequence.request.prompt_ids
            self.ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            self.mask[row, width - len(prompt) :] = 1
        self.ids, self.mask = self.ids.to(device), self.mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = new_kv_cache(config)
        self.done = 0

    @property
    def width(self) -> int:
        return self.ids.shape[1]


class BatchScheduler:
    """Admits requests, runs shared steps, and hands each request its text deltas (one generation thread)."""

    def __init__(self, engine: GenerationEngine, max_batch: int = 16, prefill_tokens: int = 512) -> None:
        if max_batch < 1 or prefill_tokens < 1:
            raise ValueError(f"max_batch and prefill_tokens must be at least 1, got {max_batch} and {prefill_tokens}")
        self.engine = engine
        self.max_batch = max_batch if engine.batchable else 1
        self.prefill_tokens = prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.waiting_alone: deque[Sequence] = deque()  # requests with their own engine, one at a time
        self.alone: Sequence | None = None
        self._prefill: _Prefill | None = None
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, cached columns): 1 for a real token
        self._padded = False  # whether any running row has padding columns (see _batch_changed)
        self._next: torch.Tensor | None = None  # (B,) tokens to feed
        self._positions: torch.Tensor | None = None  # (B,) their position ids
        self._extra: dict[str, Any] = {}
        self._routing: RowRouting | None = None

    def add(self, request: GenerationRequest) -> Sequence:
        """Queue a request (raises PromptTooLongError / ValueError at once for a bad prompt)."""
        sequence = Sequence(self.engine, request)
        (self.waiting_alone if request.engine is not None else self.waiting).append(sequence)
        return sequence

    @property
    def idle(self) -> bool:
        return (
            not self.waiting
            and not self.running
            and self._prefill is None
            and not self.waiting_alone
            and self.alone is None
        )

    @property
    def active(self) -> int:
        """Requests being prefilled or decoded."""
        prefilling = 0 if self._prefill is None else len(self._prefill.sequences)
        return len(self.running) + prefilling + (self.alone is not None)

    def step(self) -> list[tuple[Sequence, TextDelta]]:
        """One prefill chunk (if requests are joining) and one decoding step of the running batch."""
        self._drop_finished()
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        self.waiting_alone = deque(s for s in self.waiting_alone if not s.cancelled)
        self.alone, events = self._step_alone(self.waiting_alone, self.alone)
        if not self.engine.batchable:
            current = self.running[0] if self.running else None
            current, more = self._step_alone(self.waiting, current)
            self.running = [] if current is None else [current]
            return events + more
        if self._prefill is None and self.waiting and len(self.running) < self.max_batch:
            joining = [
                self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.running)))
            ]
            self._prefill = _Prefill(joining, self.engine.pad_token_id, self.engine.device, self.engine.model.config)
        if self._prefill is not None:
            events += self._prefill_chunk()
        if self.running:
            events += self._decode()
        self._drop_finished()
        return events

    # -- prefill -----------------------------------------------------------------------------------

    def _prefill_chunk(self) -> list[tuple[Sequence, TextDelta]]:
        prefill = self._prefill
        columns = max(1, self.prefill_tokens // len(prefill.sequences))
        start, end = prefill.done, min(prefill.width, prefill.done + columns)
        mask = prefill.mask[:, :end]
        logits = self._forward(
            prefill.sequences,
            input_ids=prefill.ids[:, start:end],
            attention_mask=None if bool(mask.all()) else mask,
            position_ids=prefill.positions[:, start:end],
            past_key_values=prefill.cache,
        )
        prefill.done = end
        if end < prefill.width:
            return []
        self._prefill = None
        first, events = self._sample(prefill.sequences, logits)
        self._join(prefill, first, prefill.positions[:, -1] + 1)
        return events

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Each row's next token from its own sampler (padding for finished rows) and the text that became visible."""
        events, tokens = [], []
        greedy = None
        if any(s.chooser.plain_greedy for s in sequences):  # one argmax for every plain greedy row
            limit = self.engine.vocab_limit
            greedy = (logits if limit is None else logits[:, :limit]).argmax(-1).tolist()
        for row, sequence in enumerate(sequences):
            if sequence.finished:
                tokens.append(self.engine.pad_token_id)
                continue
            token = greedy[row] if sequence.chooser.plain_greedy else sequence.choose(logits[row : row + 1])
            tokens.append(token)
            delta = sequence.accept(token)
            if delta is not None:
                events.append((sequence, delta))
        return torch.tensor(tokens, device=self.engine.device), events

    def _join(self, prefill: _Prefill, first: torch.Tensor, positions: torch.Tensor) -> None:
        """Right-align the new rows' cache with the running batch's and stack them under it."""
        if not self.running:
            self._cache, self._mask, self._next, self._positions = prefill.cache, prefill.mask, first, positions
        else:
            width = max(self._mask.shape[1], prefill.mask.shape[1])
            for old, new in zip(self._cache.layers, prefill.cache.layers, strict=True):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(prefill.mask, width, dim=1)])
            self._next = torch.cat([self._next, first])
            self._positions = torch.cat([self._positions, positions])
        self.running += prefill.sequences
        self._batch_changed()

    # -- decode ------------------------------------------------------------------------------------

    def _decode(self) -> list[tuple[Sequence, TextDelta]]:
        mask = torch.cat([self._mask, self._mask.new_ones(len(self.running), 1)], dim=1)
        logits = self._forward(
            self.running,
            input_ids=self._next[:, None],
            attention_mask=mask if self._padded else None,
            position_ids=self._positions[:, None],
            past_key_values=self._cache,
        )
        self._mask = mask
        self._positions = self._positions + 1
        self._next, events = self._sample(self.running, logits)
        return events

    def _drop_finished(self) -> None:
        if self._prefill is not None and all(s.cancelled for s in self._prefill.sequences):
            self._prefill = None
        keep = [row for row, sequence in enumerate(self.running) if not sequence.finished]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[row] for row in keep]
        if not keep:
            self._cache = self._mask = self._next = self._positions = None
            self._batch_changed()
            return
        index = torch.tensor(keep, device=self.engine.device)
        self._cache.batch_select_indices(index)
        self._mask, self._next, self._positions = self._mask[index], self._next[index], self._positions[index]
        unused = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns padding for every row
        if unused:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self._mask = self._mask[:, unused:]
        self._batch_changed()

    # -- model calls -------------------------------------------------------------------------------

    def _batch_changed(self) -> None:
        """Rebuild the per-row routing and visual prompts once per change of the running rows, and note whether
        any row is padded: decoding adds only real columns, so that holds until the next change, and the check
        (a device sync on a GPU) runs once per change instead of once per token."""
        self._routing, self._extra = self._row_inputs(self.running)
        self._padded = self._mask is not None and not bool(self._mask.all())

    def _row_inputs(self, sequences: list[Sequence]) -> tuple[RowRouting | None, dict[str, Any]]:
        if not sequences:
            return None, {}
        requests = [s.request for s in sequences]
        prompts = [r.visual_prompt for r in requests]
        if any(r.route is not None for r in requests):
            routing = RowRouting.build(
                [r.route for r in requests], [r.strength for r in requests], self.engine.device, prompts
            )
            return routing, {}
        if all(p is None for p in prompts):
            return None, {}
        like = next(p for p in prompts if p is not None)
        # A row without a picture adds zeros to its learned prompt: exactly the prompt alone.
        return None, {VISUAL_PROMPT_KWARG: torch.cat([like.new_zeros(like.shape) if p is None else p for p in prompts])}

    def _forward(self, sequences: list[Sequence], **inputs: Any) -> torch.Tensor:
        routing, extra = (self._routing, self._extra) if sequences is self.running else self._row_inputs(sequences)
        with torch.inference_mode(), routed(routing):
            output = self.engine.model(use_cache=True, logits_to_keep=1, **inputs, **extra)
        return output.logits[:, -1]

    # -- one request at a time ---------------------------------------------------------------------

    def _step_alone(
        self, waiting: deque[Sequence], current: Sequence | None
    ) -> tuple[Sequence | None, list[tuple[Sequence, TextDelta]]]:
        """One token of a request that runs alone through `GenerationEngine.stream` (its own engine, or this
        one when the model cannot share a batch), starting the oldest waiting one if none runs.
        Returns the request still running (None once it ended) and its event."""
        if current is not None and current.cancelled:
            current = None
        if current is None and waiting:
            current = waiting.popleft()
            current._routing, extra = self._row_inputs([current])
            engine = current.request.engine or self.engine
            current._exclusive = engine.stream([current.request.prompt_ids], current.request.params, extra)
        if current is None:
            return None, []
        with routed(current._routing):  # the stream runs its forwards inside next()
            delta = next(current._exclusive, None)
        if delta is None or delta.finish_reason is not None:
            current.text.finish_reason = "stop" if delta is None else delta.finish_reason
            current._exclusive.close()
            return None, [] if delta is None else [(current, delta)]
        return current, [(current, delta)]

    def cancel(self, sequence: Sequence) -> None:
        """Stop a request; its row leaves at the next step."""
        sequence.cancelled = True
        if sequence._exclusive is not None:
            sequence._exclusive.close()

    def close(self) -> None:
        lone = [] if self.alone is None else [self.alone]
        for sequence in [*self.waiting, *self.running, *self.waiting_alone, *lone]:
            self.cancel(sequence)
        self.waiting.clear()
        self.waiting_alone.clear()
        self.running = []
        self.alone = self._prefill = self._cache = None


def _left_pad(tensor: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """Zeros in front along `dim` up to `width` (cache keys/values: the sequence axis; masks: dim 1)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
