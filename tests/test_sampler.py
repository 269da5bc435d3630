"""The sampler: vLLM V1 processing order, truncation, seeding, penalties and logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from builders import make_metadata
from tokenmill.logprobs import LogprobsTensors, compute_logprobs, compute_logprobs_tensors, to_logprobs
from tokenmill.sampler import NO_TOKEN, Sampler, apply_logits_processors
from tokenmill.config import EngineConfig
from tokenmill.sampling_metadata import SamplingMetadata
from tokenmill.step import Logprobs

NEG_INF = float("-inf")


def logits_of(probs: list[float], num_rows: int = 1) -> torch.Tensor:
    """[num_rows, V] logits whose softmax is ``probs``."""
    return torch.tensor(probs, dtype=torch.float32).log().repeat(num_rows, 1)


def support(tokens: torch.Tensor) -> set[int]:
    return set(tokens.tolist())


def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    return Sampler()(logits, metadata).sampled_token_ids


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# ---------------------------------------------------------------- greedy and truncation

def test_greedy_rows_take_the_argmax_and_ignore_temperature_and_truncation():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 1.0, 0.0, 4.9]])
    metadata = make_metadata([0.0, 0.0], top_k=torch.tensor([3, 2]), top_p=torch.tensor([0.01, 0.5]),
                             min_p=torch.tensor([0.9, 0.9]))
    assert sample(logits, metadata).tolist() == [1, 0]


def test_greedy_rows_in_a_mixed_batch_take_the_argmax():
    logits = torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [2.0, 1.0, 3.0]])
    for _ in range(20):
        tokens = sample(logits, make_metadata([0.0, 1.0, 0.0]))
        assert tokens[0] == 1 and tokens[2] == 2
        assert tokens.dtype == torch.int64


def test_top_k_1_is_the_argmax_at_any_temperature():
    logits = torch.randn(64, 50)
    metadata = make_metadata([5.0] * 64, top_k=torch.full((64,), 1))
    assert torch.equal(sample(logits, metadata), logits.argmax(dim=-1))


def test_tiny_top_p_keeps_only_the_best_token():
    logits = torch.randn(64, 50)
    metadata = make_metadata([2.0] * 64, top_p=torch.full((64,), 1e-6))
    assert torch.equal(sample(logits, metadata), logits.argmax(dim=-1))


def test_min_p_keeps_exactly_the_tokens_with_p_at_least_min_p_times_p_max():
    # p_max = 0.4, min_p = 0.25 -> threshold 0.1: token 3 (p = 0.08) is the only one dropped.
    logits = logits_of([0.4, 0.2, 0.12, 0.08, 0.2], num_rows=4000)
    metadata = make_metadata([1.0] * 4000, min_p=torch.full((4000,), 0.25))
    assert support(sample(logits, metadata)) == {0, 1, 2, 4}


def test_top_k_keeps_exactly_the_k_best_tokens_and_0_or_minus_1_is_off():
    logits = logits_of([0.1, 0.3, 0.05, 0.25, 0.2, 0.1], num_rows=3000)
    top_k = torch.tensor([3, 0, -1]).repeat(1000)
    tokens = sample(logits, make_metadata([1.0] * 3000, top_k=top_k))
    assert support(tokens[0::3]) == {1, 3, 4}
    assert support(tokens[1::3]) == support(tokens[2::3]) == set(range(6))


def test_top_p_keeps_the_smallest_best_set_that_reaches_p():
    logits = logits_of([0.5, 0.3, 0.15, 0.05], num_rows=4000)
    top_p = torch.tensor([0.75, 0.85, 1.0, 0.5]).repeat(1000)
    tokens = sample(logits, make_metadata([1.0] * 4000, top_p=top_p))
    assert support(tokens[0::4]) == {0, 1}  # 0.5 + 0.3 >= 0.75
    assert support(tokens[1::4]) == {0, 1, 2}  # 0.8 < 0.85 <= 0.95
    assert support(tokens[2::4]) == {0, 1, 2, 3}
    assert support(tokens[3::4]) == {0}  # the best token alone reaches 0.5


def test_top_k_and_top_p_together_apply_both():
    logits = logits_of([0.5, 0.3, 0.15, 0.05], num_rows=4000)
    top_k = torch.tensor([3, 0]).repeat(2000)
    top_p = torch.tensor([0.99, 0.7]).repeat(2000)
    tokens = sample(logits, make_metadata([1.0] * 4000, top_k=top_k, top_p=top_p))
    assert support(tokens[0::2]) == {0, 1, 2}
    assert support(tokens[1::2]) == {0, 1}


# ---------------------------------------------------------------- randomness

def test_unseeded_sampling_frequencies_match_the_softmax():
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0]).repeat(20000, 1)
    for temperature in (1.0, 2.0):
        tokens = sample(logits, make_metadata([temperature] * 20000))
        frequencies = torch.bincount(tokens, minlength=4).float() / 20000
        expected = torch.softmax(logits[0] / temperature, dim=-1)
        # The std of a frequency is at most sqrt(0.25 / 20000) = 0.0035; allow 4 of them.
        assert (frequencies - expected).abs().max() < 0.014


def seeded_draws(seed: int, row: int, num_rows: int, steps: int = 20) -> list[int]:
    """The tokens a request with ``seed`` gets at ``row`` of a batch of random rows."""
    request_logits = torch.randn(100, generator=torch.Generator().manual_seed(99))
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(steps):
        logits = torch.randn(num_rows, 100)
        logits[row] = request_logits
        metadata = make_metadata([0.8] * num_rows, generators={row: generator})
        tokens.append(sample(logits, metadata)[row].item())
    return tokens


def test_a_seeded_row_gets_the_same_tokens_whatever_its_batch_and_row():
    alone = seeded_draws(seed=1234, row=0, num_rows=1)
    assert seeded_draws(seed=1234, row=3, num_rows=5) == alone
    assert len(set(alone)) > 1  # really random, not a fixed token


def test_different_seeds_give_different_tokens():
    assert seeded_draws(seed=1, row=0, num_rows=1) != seeded_draws(seed=2, row=0, num_rows=1)


def test_the_sampler_does_not_modify_the_callers_logits():
    logits = torch.randn(3, 10)
    before = logits.clone()
    metadata = make_metadata([0.0, 0.7, 1.0], top_k=torch.tensor([0, 2, 3]),
                             presence_penalties=torch.tensor([1.0, 1.0, 1.0]),
                             output_token_ids=[[1], [2], [3]])
    sample(logits, metadata)
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- penalties, bias, masks

def processed(logits: list[list[float]], metadata: SamplingMetadata) -> list[list[float]]:
    tensor = torch.tensor(logits, dtype=torch.float32)
    apply_logits_processors(tensor, metadata)
    return tensor.tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    # Row 0 saw token 0 in its prompt and token 1 in its output; token 4 pads the prompt.
    metadata = make_metadata([1.0, 1.0], repetition_penalties=torch.tensor([2.0, 1.0]),
                             prompt_token_ids=torch.tensor([[0, 4], [0, 1]]), output_token_ids=[[1], [2]])
    logits = [[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]]
    assert processed(logits, metadata) == [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]]


def test_frequency_penalty_subtracts_per_occurrence_in_the_output_only():
    metadata = make_metadata([1.0], frequency_penalties=torch.tensor([0.5]),
                             prompt_token_ids=torch.tensor([[0, 0]]), output_token_ids=[[2, 2, 3]])
    assert processed([[1.0, 1.0, 1.0, 1.0]], metadata) == [[1.0, 1.0, 0.0, 0.5]]


def test_presence_penalty_subtracts_once_per_token_in_the_output():
    metadata = make_metadata([1.0], presence_penalties=torch.tensor([0.25]), output_token_ids=[[2, 2, 3]])
    assert processed([[1.0, 1.0, 1.0, 1.0]], metadata) == [[1.0, 1.0, 0.75, 0.75]]


def test_penalties_apply_in_order_repetition_frequency_presence():
    metadata = make_metadata([1.0], repetition_penalties=torch.tensor([2.0]),
                             frequency_penalties=torch.tensor([0.5]), presence_penalties=torch.tensor([0.25]),
                             prompt_token_ids=torch.tensor([[4]]), output_token_ids=[[1, 1]])
    # token 1: 3.0 / 2 - 0.5 * 2 - 0.25 = 0.25
    assert processed([[3.0, 3.0, 3.0, 3.0]], metadata) == [[3.0, 0.25, 3.0, 3.0]]


def test_a_repetition_penalty_can_change_the_greedy_token():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    metadata = make_metadata([0.0], repetition_penalties=torch.tensor([2.0]),
                             prompt_token_ids=torch.tensor([[0]]))
    assert sample(logits, metadata).tolist() == [1]


def test_logit_bias_adds_to_the_named_tokens_of_its_row():
    metadata = make_metadata([1.0, 1.0], logit_bias=[{1: 2.5, 3: -1.0}, None])
    logits = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert processed(logits, metadata) == [[0.0, 2.5, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]
    assert sample(torch.zeros(1, 4), make_metadata([0.0], logit_bias=[{2: 1.0}])).tolist() == [2]


def test_allowed_token_ids_mask_forbids_every_other_token():
    mask = torch.ones(2000, 6, dtype=torch.bool)
    mask[:, [1, 4]] = False
    logits = torch.tensor([5.0, 0.0, 5.0, 0.0, 0.5, 5.0]).repeat(2000, 1)
    assert support(sample(logits, make_metadata([1.0] * 2000, allowed_token_ids_mask=mask))) == {1, 4}
    assert sample(logits[:1], make_metadata([0.0], allowed_token_ids_mask=mask[:1])).tolist() == [4]


def test_a_single_token_bad_word_is_always_forbidden():
    metadata = make_metadata([1.0], bad_words_token_ids={0: [[2]]})
    assert processed([[1.0, 1.0, 1.0, 1.0]], metadata) == [[1.0, 1.0, NEG_INF, 1.0]]


def test_a_multi_token_bad_word_forbids_its_last_token_after_the_rest_of_it():
    words = {0: [[3, 1, 2]], 1: [[3, 1, 2]], 2: [[3, 1, 2]], 3: [[3, 1, 2]]}
    outputs = [[0, 3, 1], [3, 0, 1], [1], []]
    metadata = make_metadata([1.0] * 4, bad_words_token_ids=words, output_token_ids=outputs)
    result = processed([[1.0] * 4] * 4, metadata)
    assert result[0] == [1.0, 1.0, NEG_INF, 1.0]
    assert result[1] == result[2] == result[3] == [1.0] * 4


def test_min_tokens_forbids_the_stop_ids_until_the_output_reaches_it():
    metadata = make_metadata([1.0, 1.0], min_tokens={0: (3, {0, 2}), 1: (3, {0, 2})},
                             output_token_ids=[[1, 1], [1, 1, 1]])
    result = processed([[1.0] * 4, [1.0] * 4], metadata)
    assert result == [[NEG_INF, 1.0, NEG_INF, 1.0], [1.0] * 4]


def test_an_out_of_range_token_id_is_a_clear_error():
    with pytest.raises(ValueError, match="logit_bias token id 7 is out of range for vocab size 4"):
        processed([[0.0] * 4], make_metadata([1.0], logit_bias=[{7: 1.0}]))


def test_logits_and_metadata_must_agree_on_the_batch():
    with pytest.raises(ValueError, match=r"logits must be \[B, V\]"):
        sample(torch.zeros(4), make_metadata([1.0]))
    with pytest.raises(ValueError, match="metadata.temperature has 2 rows, logits have 1"):
        sample(torch.zeros(1, 4), make_metadata([1.0, 1.0]))


# ---------------------------------------------------------------- logprobs

def test_raw_logprobs_are_the_log_softmax_of_the_input_logits():
    logits = torch.randn(2, 8)
    metadata = make_metadata([0.0, 0.5], max_num_logprobs=8, repetition_penalties=torch.tensor([3.0, 3.0]),
                             prompt_token_ids=torch.tensor([[0, 1], [2, 3]]), logit_bias=[{5: 4.0}, {6: 4.0}])
    output = Sampler()(logits, metadata)
    raw = torch.log_softmax(logits, dim=-1)
    sampled_raw = raw.gather(1, output.sampled_token_ids[:, None])  # [2, 1]
    assert torch.equal(output.logprobs.logprobs[:, :1], sampled_raw)
    assert torch.equal(output.logprobs.logprobs[:, 1:], raw.sort(dim=-1, descending=True).values)


def test_processed_logprobs_reflect_penalties_bias_and_temperature_but_not_truncation():
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0]])
    metadata = make_metadata([0.0, 0.5], max_num_logprobs=4, logprobs_mode="processed",
                             logit_bias=[{3: 3.0}, {3: 3.0}], top_k=torch.tensor([0, 1]))
    output = Sampler()(logits, metadata)
    biased = torch.tensor([1.0, 2.0, 0.0, 2.0])
    greedy_row = torch.log_softmax(biased, dim=-1)  # greedy rows carry no temperature
    random_row = torch.log_softmax(biased / 0.5, dim=-1)  # top-k 1 did not make the rest -inf
    assert torch.allclose(output.logprobs.logprobs[0, 1:], greedy_row.sort(descending=True).values)
    assert torch.allclose(output.logprobs.logprobs[1, 1:], random_row.sort(descending=True).values)


@pytest.mark.parametrize("mode", ["raw_logits", "processed_logits"])
def test_logits_modes_report_the_logits_themselves(mode):
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0]])
    metadata = make_metadata([0.0, 0.5], max_num_logprobs=4, logprobs_mode=mode, logit_bias=[{3: 3.0}, {3: 3.0}])

    reported = Sampler()(logits, metadata).logprobs.logprobs[:, 1:]

    if mode == "raw_logits":
        expected = logits
    else:  # biased; the random row divided by its temperature
        expected = torch.tensor([[1.0, 2.0, 0.0, 2.0], [2.0, 4.0, 0.0, 4.0]])
    assert torch.equal(reported, expected.sort(dim=-1, descending=True).values)


@pytest.mark.parametrize("alias,mode", [("raw", "raw_logprobs"), ("processed", "processed_logprobs")])
def test_the_short_logprobs_modes_are_aliases(alias, mode):
    assert make_metadata([1.0], logprobs_mode=alias).logprobs_mode == mode
    assert EngineConfig.build(logprobs_mode=alias).model.logprobs_mode == mode


def test_column_0_is_the_sampled_token_and_its_rank_counts_better_tokens():
    # Only token 2 is allowed: greedy picks it, though 2 raw tokens beat it.
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False, True]])
    raw = Sampler()(logits, make_metadata([0.0], allowed_token_ids_mask=mask, max_num_logprobs=2)).logprobs
    assert raw.token_ids.tolist() == [[2, 0, 1]]
    assert raw.ranks.tolist() == [3]
    assert raw.logprobs[0, 0].item() == pytest.approx(torch.log_softmax(logits, -1)[0, 2].item())
    processed_lp = Sampler()(logits, make_metadata([0.0], allowed_token_ids_mask=mask, max_num_logprobs=2,
                                                   logprobs_mode="processed")).logprobs
    assert processed_lp.ranks.tolist() == [1]
    assert processed_lp.logprobs[0, 0].item() == 0.0


def test_top_k_logprob_columns_are_sorted_best_first():
    logits = torch.randn(6, 40)
    tensors = Sampler()(logits, make_metadata([1.0] * 6, max_num_logprobs=5)).logprobs
    top = tensors.logprobs[:, 1:]
    assert tensors.token_ids.shape == tensors.logprobs.shape == (6, 6)
    assert torch.equal(top, top.sort(dim=-1, descending=True).values)
    assert torch.equal(tensors.token_ids[:, 1:], logits.topk(5, dim=-1).indices)


def test_no_logprobs_are_computed_when_no_row_asks():
    assert Sampler()(torch.randn(2, 5), make_metadata([0.0, 1.0])).logprobs is None


def test_compute_logprobs_tensors_serves_prompt_logprobs():
    # Positions of one prompt: logits at each position, scored against the next prompt token.
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    next_tokens = torch.tensor([1, 1])
    tensors = compute_logprobs_tensors(compute_logprobs(logits), next_tokens, k=1)
    log_z = math.log(1 + math.e + math.e ** 2)
    assert tensors.token_ids.tolist() == [[1, 2], [1, 0]]
    assert tensors.logprobs.flatten().tolist() == pytest.approx([1 - log_z, 2 - log_z, -log_z, 2 - log_z])
    assert tensors.ranks.tolist() == [2, 3]
    merged = to_logprobs(tensors, [0, 1], merge=True)  # one request's positions, each cut to its k
    assert merged.token_ids == [[1], [1, 0]] and merged.ranks == [2, 3]
    assert merged.logprobs[0] == pytest.approx([1 - log_z])
    assert merged.logprobs[1] == pytest.approx([-log_z, 2 - log_z])


def test_k_must_fit_the_vocabulary():
    with pytest.raises(ValueError, match=r"k must be in \[0, vocab size 3\], got 4"):
        compute_logprobs_tensors(torch.zeros(1, 3), torch.tensor([0]), k=4)


def test_to_logprobs_cuts_each_row_to_its_own_k():
    tensors = LogprobsTensors(token_ids=torch.tensor([[5, 1, 2, 3], [6, 4, 5, 6], [7, 7, 8, 9]]),
                              logprobs=torch.tensor([[-1.0, -0.5, -1.0, -2.0]] * 3),
                              ranks=torch.tensor([2, 3, 1]))
    rows = to_logprobs(tensors, [0, 2, 3])
    assert rows == [
        Logprobs(token_ids=[[5]], logprobs=[[-1.0]], ranks=[2]),
        Logprobs(token_ids=[[6, 4, 5]], logprobs=[[-1.0, -0.5, -1.0]], ranks=[3]),
        Logprobs(token_ids=[[7, 7, 8, 9]], logprobs=[[-1.0, -0.5, -1.0, -2.0]], ranks=[1]),
    ]
    with pytest.raises(ValueError, match=r"num_per_row entries must be in \[0, 3\]"):
        to_logprobs(tensors, [0, 4, 1])


# ---------------------------------------------------------------- rows with no token to sample

@pytest.mark.parametrize("temperatures", [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
def test_a_row_whose_masks_exclude_every_token_samples_no_token(temperatures):
    logits = torch.randn(2, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1] = True  # row 1 allows nothing
    metadata = make_metadata(temperatures, allowed_token_ids_mask=mask)

    sampled = Sampler()(logits, metadata).sampled_token_ids.tolist()

    assert sampled[1] == NO_TOKEN and 0 <= sampled[0] < 8


def test_nan_logits_sample_no_token():
    logits = torch.randn(2, 8)
    logits[0] = float("nan")

    sampled = Sampler()(logits, make_metadata([1.0, 0.0])).sampled_token_ids.tolist()

    assert sampled[0] == NO_TOKEN and sampled[1] == int(logits[1].argmax())
