"""Turning a growing list of token ids into streamed text, cut at stop strings.

Decoding one token at a time is wrong for byte-level BPE and SentencePiece: a character can span
several tokens, and a word's leading space depends on the token before it. `IncrementalDecoder`
decodes a short window that ends at the new tokens and emits only what is new and complete (the
approach vLLM and text-generation-inference use). `StopStringFilter` holds back text that might
be the start of a stop string, so a stop string is never streamed to the client and then retracted.
`StablePostprocessor` applies a whole-text clean-up (ChatGLM's `process_response`) while streaming.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase

_INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """Streams the text of a token sequence as tokens are appended."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix_offset = 0  # start of the context window that fixes spacing
        self._read_offset = 0  # tokens up to here have been emitted

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        after = self._decode(self.tokens[self._prefix_offset :])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""  # a multi-token character is still incomplete
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.tokens)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still pending at the end (e.g. an incomplete character, decoded as-is)."""
        before = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        after = self._decode(self.tokens[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.tokens)
        return after[len(before) :] if after.startswith(before) else ""


class StopStringFilter:
    """Passes text through, withholding any tail that could begin a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text) - self._emitted), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def push(self, new_text: str) -> str:
        """Add decoded text; return what can safely be shown. Sets `stopped` at a stop string."""
        if self.stopped or not new_text:
            return ""
        self.text += new_text
        # A stop string cannot begin inside shown text: its start would have been held back.
        hits = [i for i in (self.text.find(stop, self._emitted) for stop in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
            self.text = self.text[:end]
        else:
            end = len(self.text) - self._held_back()
        shown = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return shown

    def flush(self) -> str:
        """At the end of generation nothing can complete a stop string any more: release the rest."""
        shown = self.text[self._emitted :]
        self._emitted = len(self.text)
        return shown


class StablePostprocessor:
    """Streams `process(text so far)`, holding back the part that later text could still change.

    `unstable_tail(processed)` says how many final characters may change; what was shown is never
    retracted, so only a prefix of the final cleaned text is ever emitted.
    """

    def __init__(self, process: Callable[[str], str], unstable_tail: Callable[[str], int]) -> None:
        self.process = process
        self.unstable_tail = unstable_tail
        self.raw = ""
        self.shown = ""

    def _emit(self, processed: str, end: int) -> str:
        if end <= len(self.shown) or not processed.startswith(self.shown):
            return ""
        new = processed[len(self.shown) : end]
        self.shown += new
        return new

    def push(self, text: str) -> str:
        if not text:
            return ""
        self.raw += text
        processed = self.process(self.raw)
        return self._emit(processed, len(processed) - self.unstable_tail(processed))

    def flush(self) -> str:
        processed = self.process(self.raw)
        return self._emit(processed, len(processed))
