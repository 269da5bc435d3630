"""The persistent input batch: per-row sampling state written once when a row is added and
moved with it when rows fill a hole, so a step only gathers its rows."""
import numpy as np
import pytest

from tokenmill.input_batch import InputBatch
from tokenmill.sampling_params import SamplingParams
from tokenmill.step import NewRequestData

VOCAB_SIZE = 8


def add(batch: InputBatch, req_id: str, prompt: list[int], **params) -> int:
    return batch.add_request(NewRequestData(req_id, prompt, [], SamplingParams(**params), [1], 0), None)


def make_batch() -> InputBatch:
    return InputBatch(max_num_reqs=4, max_model_len=16, max_blocks_per_req=2, vocab_size=VOCAB_SIZE)


def test_no_mask_is_allocated_until_a_request_restricts_its_tokens():
    batch = make_batch()
    add(batch, "a", [1, 2])

    assert batch.disallowed is None


def test_allowed_token_ids_rows_follow_their_request_when_rows_move():
    batch = make_batch()
    add(batch, "a", [1, 2])
    add(batch, "b", [3], allowed_token_ids=[2, 5])
    add(batch, "c", [4, 4, 4], allowed_token_ids=[7])

    batch.remove_requests({"a"})  # c (the last row) moves into row 0

    assert [state.req_id for state in batch.rows] == ["c", "b"]
    assert np.flatnonzero(~batch.disallowed[0].numpy()).tolist() == [7]
    assert np.flatnonzero(~batch.disallowed[1].numpy()).tolist() == [2, 5]


def test_a_row_without_allowed_token_ids_allows_every_token():
    batch = make_batch()
    add(batch, "b", [3], allowed_token_ids=[2])
    add(batch, "a", [1, 2])

    assert not batch.disallowed[1].any()


def test_prompt_token_ids_are_padded_with_the_vocabulary_size():
    batch = make_batch()
    add(batch, "a", [1, 2])
    add(batch, "b", [3, 4, 5])
    batch.append_token(0, 6)  # output tokens are not part of the prompt

    assert batch.prompt_token_ids(np.array([0, 1, 0])).tolist() == [[1, 2, 8], [3, 4, 5], [1, 2, 8]]


def test_ragged_features_name_their_rows_and_follow_them_when_rows_move():
    batch = make_batch()
    add(batch, "a", [1], logit_bias={3: 1.0})
    add(batch, "b", [2], min_tokens=2, logprobs=1)
    add(batch, "c", [3], bad_words=None, seed=None)
    add(batch, "d", [4], logit_bias={1: -1.0}, logprobs=0)

    assert batch.rows_using["logit_bias"] == {0, 3} and batch.rows_using["logprobs"] == {1, 3}
    batch.remove_requests({"a"})  # d moves into row 0

    assert [s.req_id for s in batch.rows] == ["d", "b", "c"]
    assert batch.rows_using["logit_bias"] == {0}
    assert batch.rows_using["logprobs"] == {0, 1} and batch.rows_using["min_tokens"] == {1}
    batch.remove_requests({"d", "b", "c"})
    assert not any(batch.rows_using.values())


def test_sampling_columns_gather_their_rows_and_skip_the_unused_ones():
    batch = make_batch()
    add(batch, "a", [1], temperature=0.5, top_p=0.9)
    add(batch, "b", [2], temperature=0.0)
    add(batch, "c", [3], temperature=1.0, top_k=4)

    columns, index = batch.sampling_columns(np.array([2, 0, 0]))
    assert index.tolist() == [2, 0, 0]
    assert columns["temperature"].tolist() == [1.0, 0.5, 0.5]
    assert columns["top_k"].tolist() == [4, 0, 0] and columns["top_p"].tolist() == pytest.approx([1.0, 0.9, 0.9])
    assert columns["min_p"] is None and columns["repetition_penalty"] is None  # no row uses them

    columns, _ = batch.sampling_columns(np.array([1]))
    assert columns["top_k"] is None and columns["top_p"] is None and columns["temperature"].tolist() == [0.0]
    batch.remove_requests({"a"})  # c moves into row 0: its parameters move with it
    columns, _ = batch.sampling_columns(np.arange(2))
    assert columns["temperature"].tolist() == [1.0, 0.0] and columns["top_k"].tolist() == [4, 0]
