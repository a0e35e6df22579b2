"""Sampling settings and the next-token choice, built on transformers' logits processors.

The order is the usual one (and the official LLaMA-Adapter one for temperature then top-p):
repetition penalty -> temperature -> top-k -> top-p -> multinomial draw. Temperature 0 means
greedy. Each request draws from its own `torch.Generator`, so a seed makes a request repeatable
without touching the process-wide random state that other threads may be using.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Defaults are LLaMA-Adapter's (spec §1.7, §3.9)."""

    max_new_tokens: int = 256
    temperature: float = 0.1
    """0 picks the most likely token (greedy); higher values flatten the distribution."""
    top_p: float = 0.75
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the prompt or answer (1 = off)."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer; they are not part of the returned text."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the answer besides the model's end-of-sequence tokens."""
    seed: int | None = None
    """Makes sampling repeatable; None draws a fresh seed."""

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "repetition_penalty": self.repetition_penalty > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid sampling setting {name}={getattr(self, name)!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def logits_processors(params: SamplingParams) -> LogitsProcessorList:
    """The transformers processors for `params` (empty list for plain greedy decoding)."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.greedy:
        return processors
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    return processors


class TokenChooser:
    """Picks the next token of every row from the last position's logits.

    `guards` run before the sampling settings (e.g. ChatGLM's NaN/Inf guard); `vocab_limit` keeps
    the choice to ids the tokenizer can decode.
    """

    def __init__(
        self,
        params: SamplingParams,
        device: torch.device,
        guards: Sequence[LogitsProcessor] = (),
        vocab_limit: int | None = None,
    ) -> None:
        self.params = params
        self.processors = LogitsProcessorList([*guards, *logits_processors(params)])
        self.vocab_limit = vocab_limit
        #: Whether the processors look at earlier tokens (the repetition penalty does; the others only at scores).
        self.reads_history = params.repetition_penalty != 1.0
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    @property
    def plain_greedy(self) -> bool:
        """Whether the choice is the argmax of the raw logits (no processors), so rows can share one argmax."""
        return self.generator is None and len(self.processors) == 0

    def __call__(self, sequences: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """sequences (B, T) so far, logits (B, V) -> next tokens (B,)."""
        if self.vocab_limit is not None:  # embedding rows without a token (ChatGLM pads its vocab) can't be decoded
            logits = logits[:, : self.vocab_limit]
        scores = self.processors(sequences, logits.float())
        if self.generator is None:
            return scores.argmax(dim=-1)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
