"""The ``ngram`` drafter (prompt lookup): exact drafts for small sequences."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenmill
from tokenmill.components import DRAFTER
from tokenmill.plugins.spec_decode import NgramDrafter
from tokenmill.testing.conformance import CHECKS


def make_drafter(k=4, lo=2, hi=3):
    return NgramDrafter({"prompt_lookup_min": lo, "prompt_lookup_max": hi}, num_speculative_tokens=k)


def propose_one(tokens, limit=100, **config):
    return make_drafter(**config).propose([tokens], [limit])[0]


def reference_propose(tokens, limit, k, lo, hi):
    """The definition, scanned directly: longest suffix first, earliest occurrence first."""
    tokens, limit = list(tokens), min(k, limit)
    for n in range(hi, lo - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n):  # occurrences that end before the last token
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + limit] if limit else []
    return []


# ---------------------------------------------------------------- the definition


def test_example_continuation_runs_into_suffix_and_stops_at_end():
    assert propose_one([1, 2, 3, 4, 2, 3], k=4, lo=2, hi=3) == [4, 2, 3]


def test_no_repeated_suffix_proposes_nothing():
    assert propose_one([1, 2, 3, 4, 5, 6], lo=1, hi=3) == []


def test_repeat_shorter_than_min_proposes_nothing():
    # [3] repeats, but [2, 3] does not and min is 2.
    assert propose_one([3, 9, 2, 3], lo=2, hi=3) == []


def test_repeat_of_exactly_min_is_used():
    assert propose_one([2, 3, 9, 2, 3], lo=2, hi=3) == [9, 2, 3]


def test_longest_suffix_preferred_over_earlier_shorter_one():
    # [5, 6] first occurs at 0 (followed by 7); [4, 5, 6] only at 3 (followed by 8).
    tokens = [5, 6, 7, 4, 5, 6, 8, 0, 4, 5, 6]
    assert propose_one(tokens, k=2, lo=2, hi=3) == [8, 0]
    assert propose_one(tokens, k=2, lo=2, hi=2) == [7, 4]


def test_matches_longer_than_max_are_capped_at_max():
    # The whole [1, 2, 3, 4] suffix repeats at 5, but with max 2 only [3, 4] is looked up,
    # and its earliest occurrence is at 0.
    tokens = [3, 4, 9, 0, 0, 1, 2, 3, 4, 7, 1, 2, 3, 4]
    assert propose_one(tokens, k=1, lo=1, hi=2) == [9]
    assert propose_one(tokens, k=1, lo=1, hi=4) == [7]


def test_earliest_occurrence_chosen():
    tokens = [7, 8, 1, 7, 8, 2, 7, 8, 3, 7, 8]
    assert propose_one(tokens, k=1, lo=2, hi=2) == [1]


def test_sequence_of_one_repeated_token():
    assert propose_one([1, 1, 1, 1], k=4, lo=1, hi=3) == [1]


# ---------------------------------------------------------------- periodic text (the KMP path)


def test_run_of_one_token_with_long_lookup():
    assert propose_one([1] * 100, k=3, lo=1, hi=64) == [1, 1, 1]


def test_periodic_text_with_long_lookup():
    # The longest suffix (60 tokens, ending in 2) first occurs at 0..59.
    assert propose_one([1, 2] * 50, k=3, lo=1, hi=60) == [1, 2, 1]


def test_long_run_broken_once():
    tokens = [1] * 30 + [2] + [1] * 30
    assert propose_one(tokens, k=2, lo=1, hi=50) == [2, 1]
    assert propose_one(tokens, k=2, lo=40, hi=50) == []


# ---------------------------------------------------------------- bounds


def test_at_most_k_tokens():
    assert propose_one([1, 2, 3, 4, 5, 6, 1, 2], k=3, lo=2, hi=2) == [3, 4, 5]


def test_at_most_max_num_tokens():
    assert propose_one([1, 2, 3, 4, 5, 6, 1, 2], limit=2, k=4, lo=2, hi=2) == [3, 4]


def test_max_num_tokens_zero_proposes_nothing():
    assert propose_one([1, 2, 3, 4, 5, 6, 1, 2], limit=0, k=4, lo=2, hi=2) == []


@pytest.mark.parametrize("tokens", [[], [5], [5, 5]])
def test_too_short_for_an_earlier_occurrence(tokens):
    # min 2 needs at least 3 tokens: a length-2 suffix plus one token before it.
    assert propose_one(tokens, lo=2, hi=3) == []


def test_length_one_sequence_with_min_one():
    assert propose_one([5], lo=1, hi=3) == []
    assert propose_one([5, 5], lo=1, hi=3) == [5]


# ---------------------------------------------------------------- batches and inputs


def test_numpy_input_gives_python_ints():
    draft = propose_one(np.array([1, 2, 3, 4, 2, 3], dtype=np.int32), k=4, lo=2, hi=3)
    assert draft == [4, 2, 3] and all(type(t) is int for t in draft)


def test_batch_one_draft_per_request():
    drafter = make_drafter(k=2, lo=1, hi=2)
    token_ids = [[1, 2, 3, 4, 2, 3], [], np.array([9, 8, 7]), [5, 6, 5], [4, 4, 4, 4]]
    assert drafter.propose(token_ids, [4, 4, 4, 0, 1]) == [[4, 2], [], [], [], [4]]


def test_empty_batch():
    assert make_drafter().propose([], []) == []


def test_mismatched_batch_lengths_are_an_error():
    with pytest.raises(ValueError, match="token_ids has 2 requests but max_num_tokens has 1"):
        make_drafter().propose([[1], [2]], [1])


def test_negative_max_num_tokens_is_an_error():
    with pytest.raises(ValueError, match=r"max_num_tokens\[0\] must be >= 0, got -1"):
        make_drafter().propose([[1, 2]], [-1])


def test_two_dimensional_tokens_are_an_error():
    with pytest.raises(ValueError, match=r"token_ids\[0\] must be a 1-D token sequence"):
        make_drafter().propose([np.zeros((2, 3), dtype=np.int64)], [1])


# ---------------------------------------------------------------- against the definition


@settings(max_examples=400, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), max_size=40), limit=st.integers(0, 6),
       k=st.integers(1, 5), lo=st.integers(1, 4), extra=st.integers(0, 3))
def test_matches_reference(tokens, limit, k, lo, extra):
    hi = lo + extra
    expected = reference_propose(tokens, limit, k, lo, hi)
    assert propose_one(tokens, limit, k=k, lo=lo, hi=hi) == expected
    assert propose_one(np.array(tokens, dtype=np.int64), limit, k=k, lo=lo, hi=hi) == expected


small_lists = st.lists(st.integers(0, 2), max_size=6)
periodic_text = st.builds(lambda head, period, reps, tail: head + period * reps + tail,
                          small_lists, st.lists(st.integers(0, 2), min_size=1, max_size=3),
                          st.integers(10, 40), small_lists)


@settings(max_examples=300, deadline=None)
@given(tokens=periodic_text, limit=st.integers(1, 6), k=st.integers(1, 5), lo=st.integers(1, 8),
       extra=st.integers(0, 40))
def test_matches_reference_on_periodic_text_with_long_lookup(tokens, limit, k, lo, extra):
    hi = lo + extra
    assert propose_one(tokens, limit, k=k, lo=lo, hi=hi) == reference_propose(tokens, limit, k, lo, hi)


# ---------------------------------------------------------------- registration


def test_registry_lists_ngram():
    assert tokenmill.Registry(entry_points=False).get("drafter", "ngram") is NgramDrafter


def test_capabilities_name_the_options():
    assert NgramDrafter.capabilities() == {
        "method": "ngram", "options": ["num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"]}


@pytest.mark.parametrize("check", CHECKS[DRAFTER], ids=lambda check: check.__name__)
def test_conformance(check):
    check(NgramDrafter)
