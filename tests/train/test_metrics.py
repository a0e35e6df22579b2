"""The official ChatGLM-6B metrics against values computed by hand on tiny strings."""

from __future__ import annotations

import math

import pytest

from mmadapter.train.metrics import JiebaTokenizer, char_bleu4, corpus_scores, sample_scores


def f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall)


def test_jieba_words_drop_whitespace():
    assert JiebaTokenizer().tokenize("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert JiebaTokenizer().tokenize("Hello  World\n北京") == ["Hello", "World", "北京"]


def test_character_bleu4_with_nist_smoothing_by_hand():
    # 'abce' vs 'abcd': 1-4-gram precisions 3/4, 2/3, 1/2, 0/1 -> method3 makes the zero 1/(2^1 * 1); BP = 1.
    assert char_bleu4("abce", "abcd") == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25, abs=1e-12)
    # Shorter prediction: precisions 3/3, 2/2, 1/1, no 4-gram -> 1/2 (k=1); brevity penalty exp(1 - 5/3).
    expected = math.exp(1 - 5 / 3) * (1 * 1 * 1 * 1 / 2) ** 0.25
    assert char_bleu4("北京天", "北京天安门") == pytest.approx(expected, abs=1e-12)
    assert char_bleu4("", "北京") == 0.0


def test_sample_scores_by_hand():
    # prediction words 我/爱/北京/天安门, reference 我/爱/北京
    scores = sample_scores("我爱北京天安门", "我爱北京")
    assert scores["rouge-1"] == round(100 * f1(3 / 4, 3 / 3), 4)
    assert scores["rouge-2"] == round(100 * f1(2 / 3, 2 / 2), 4)
    assert scores["rouge-l"] == round(100 * f1(3 / 4, 3 / 3), 4)  # LCS = 3 words
    # characters: 7 predicted vs 4 reference -> precisions 4/7, 3/6, 2/5, 1/4, no brevity penalty
    assert scores["bleu-4"] == round(100 * (4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25, 4)

    # Word order: LCS (2 of 3 words) differs from unigram overlap (3 of 3).
    swapped = sample_scores("北京我爱", "我爱北京")
    assert swapped["rouge-1"] == 100.0
    assert swapped["rouge-l"] == round(100 * f1(2 / 3, 2 / 3), 4)


def test_empty_prediction_scores_zero_and_corpus_is_the_mean():
    assert sample_scores("", "我爱北京") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    corpus = corpus_scores(["我爱北京", ""], ["我爱北京", "我爱北京"])
    assert corpus == {"rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0, "bleu-4": 50.0}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        corpus_scores(["a", "b"], ["a"])
