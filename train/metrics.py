"""ChatGLM-6B's official generation metrics: jieba-word ROUGE-1/2/L and character BLEU-4 (smoothed).

Spec chatglm-6b-ptuning-v2 §5.8 (THUDM/ChatGLM-6B ptuning/main.py `compute_metrics`): per sample,
ROUGE F-scores on jieba words and nltk `sentence_bleu` over characters with the default uniform 4-gram
weights and `SmoothingFunction().method3`, each ×100 and rounded to 4 decimals; the reported value is
the mean over samples. ROUGE comes from Google's `rouge-score` with a jieba tokenizer object instead of
`rouge_chinese` (both compute n-gram and LCS F-measures over the same words for one-sentence texts);
nothing is downloaded. Empty predictions score 0 instead of raising (official issue #1400).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
_ROUGE_TYPES = {"rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}


class JiebaTokenizer:
    """The tokenizer object rouge-score expects: jieba words, whitespace dropped, case kept.

    Dropping whitespace matches the official `" ".join(jieba.cut(text))` followed by a split on spaces.
    """

    def tokenize(self, text: str) -> list[str]:
        return [word for word in _jieba().cut(text) if word.strip()]


@cache
def _jieba():
    import jieba  # the optional `metrics` extra, like rouge_score and nltk below

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" chatter on every run
    return jieba


@cache
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(_ROUGE_TYPES.values()), tokenizer=JiebaTokenizer())


def char_bleu4(prediction: str, reference: str) -> float:
    """Character-level sentence BLEU-4 with NIST geometric smoothing (nltk method3), in [0, 1]."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not prediction or not reference:
        return 0.0
    return float(sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3))


def sample_scores(prediction: str, reference: str) -> dict[str, float]:
    """The four official scores of one prediction, ×100 and rounded to 4 decimals as official."""
    rouge = _rouge_scorer().score(reference, prediction)  # rouge-score takes (target, prediction)
    scores = {name: round(float(rouge[key].fmeasure) * 100, 4) for name, key in _ROUGE_TYPES.items()}
    scores["bleu-4"] = round(char_bleu4(prediction, reference) * 100, 4)
    return scores


def corpus_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean of the per-sample scores (the numbers the official README reports)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    samples = [sample_scores(p, r) for p, r in zip(predictions, references, strict=True)]
    return {name: sum(s[name] for s in samples) / len(samples) for name in METRIC_NAMES}
