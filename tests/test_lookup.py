"""Prompt lookup: exact proposals from the n-gram index (longest n-gram first, most recent occurrence, loops)."""
import pytest

from inference.lookup import PromptLookup


def test_longest_suffix_ngram_wins_and_its_latest_occurrence():
    lookup = PromptLookup(max_ngram=3, min_ngram=2, num_tokens=3)
    lookup.reset([7, 1, 2, 9, 9, 5, 1, 2, 8, 8, 4, 1, 2])
    assert lookup.propose() == [8, 8, 4]       # "1 2": the latest earlier occurrence is followed by 8 8 4
    lookup.reset([3, 1, 2, 6, 6, 5, 1, 2, 8, 8, 4, 3, 1, 2])
    assert lookup.propose() == [6, 6, 5]       # "3 1 2" (n = 3) beats the later "1 2"


def test_no_match_below_min_ngram():
    lookup = PromptLookup(max_ngram=3, min_ngram=2, num_tokens=4)
    lookup.reset([5, 6, 7, 8, 6])
    assert lookup.propose() == []              # only the 1-gram "6" occurred before
    assert PromptLookup(3, 1, 2).propose() == []
    one = PromptLookup(3, 1, 2)
    one.reset([5, 6, 7, 8, 6])
    assert one.propose() == [7, 8]


def test_a_copy_reaching_the_present_repeats_as_a_loop():
    lookup = PromptLookup(max_ngram=3, min_ngram=2, num_tokens=7)
    lookup.reset([4, 1, 2, 3, 1, 2])
    assert lookup.propose() == [3, 1, 2, 3, 1, 2, 3]
    lookup.reset([9, 9, 9])
    assert lookup.propose() == [9] * 7


def test_extending_equals_resetting():
    tokens = [1, 2, 3, 1, 2, 4, 1, 2, 3, 5, 2, 3]
    step = PromptLookup(3, 2, 4)
    step.reset(tokens[:3])
    for i in range(3, len(tokens)):
        step.extend(tokens[i:i + 1])
        whole = PromptLookup(3, 2, 4)
        whole.reset(tokens[:i + 1])
        assert step.propose() == whole.propose() and step.index == whole.index


@pytest.mark.parametrize("kwargs, match", [(dict(max_ngram=1, min_ngram=2), "min_ngram <= max_ngram"),
                                          (dict(min_ngram=0), "1 <= min_ngram"),
                                          (dict(num_tokens=0), "num_tokens=0 must be >= 1")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptLookup(**kwargs)
