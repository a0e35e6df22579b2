"""Prompt length, checked in the request handler before a request reaches the generation queue.

Tokenizing is CPU work that grows with the prompt: on the generation thread a 15.7 MB prompt stalled every other
client for 33 s (issue 13). The HTTP layer calls `count_prompt_tokens` on a threadpool thread instead, and a prompt
far over the limit is refused after tokenizing only as much of it as proves that: the texts are counted piece by
piece (the conversation rendered with its template, cut before whitespace) and counting stops as soon as even a
lower bound on the total exceeds the limit, so a request of many short messages is refused as fast as one long one.
Only a prompt that may fit is tokenized whole, exactly as generation will (`chat.prompt_ids`, with
the template of the turn's adapter).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from transformers import PreTrainedTokenizerBase

from mmadapter.serve.chat import ChatTurn, prompt_ids, prompt_text
from mmadapter.serve.generate import PromptTooLongError
from mmadapter.serve.loader import ServedModel

#: Characters tokenized at a time while looking for a lower bound.
PIECE_CHARS = 4096
#: Tokens that cutting a text (or joining it into a template) can add to a piece's own count: a word split in two,
#: a second word-start marker. Subtracted per piece, so the sum stays a lower bound on the whole prompt's tokens.
CUT_SLACK = 4


def _pieces(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(len(text), start + PIECE_CHARS)
        if end < len(text):
            cut = max(text.rfind(space, start + PIECE_CHARS // 2, end) for space in " \n\t")
            end = cut if cut > start else end
        yield text[start:end]
        start = end


def tokens_at_least(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], stop_above: int) -> int:
    """A lower bound on the tokens of `texts` together; stops counting once it exceeds `stop_above`."""
    total = 0
    for text in texts:
        for piece in _pieces(text):
            total += len(tokenizer.encode(piece, add_special_tokens=False)) - CUT_SLACK
            if total > stop_above:
                return total
    return total


def count_prompt_tokens(served: ServedModel, turn: ChatTurn, max_prompt_tokens: int | None = None) -> list[int]:
    """The prompt ids of `turn`, or `PromptTooLongError` if they exceed `max_prompt_tokens` or leave no room to
    answer in the model's context. Pure CPU work on the tokenizer: call it off the event loop."""
    context = served.engine.context_length
    limit = min(context - 1, max_prompt_tokens or context)
    text = prompt_text(served, turn)  # the whole prompt with its template: each turn's headers count too
    if (bound := tokens_at_least(served.tokenizer, [text], limit)) > limit:
        raise PromptTooLongError(f"the prompt has more than {bound} tokens; {_accepts(limit, context)}")
    ids = prompt_ids(served, turn)
    if len(ids) > limit:
        raise PromptTooLongError(f"the prompt has {len(ids)} tokens; {_accepts(limit, context)}")
    return ids


def _accepts(limit: int, context: int) -> str:
    where = "the model's context" if limit == context - 1 else "this server (--max-prompt-tokens)"
    return f"{where} allows at most {limit} prompt tokens (context {context}); shorten the conversation"
