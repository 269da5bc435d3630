"""The rejection sampler: exact greedy verification, the target distribution for sampled
rows, per-row processing (penalties see the earlier drafts) and logprobs of emitted tokens.

Logits are crafted; metadata is built directly, one row per logits row (a request with
k drafts has k + 1 rows, the last one its bonus row).
"""
from __future__ import annotations

import pytest
import torch

from builders import make_metadata
from tokenmill.logprobs import compute_logprobs, compute_logprobs_tensors
from tokenmill.rejection_sampler import RejectionSampler
from tokenmill.sampler import NO_TOKEN, Sampler, apply_logits_processors
from tokenmill.sampling_metadata import SAMPLING_EPS

NEG_INF = float("-inf")
V = 8


def peaked_logits(argmax: list[int], vocab_size: int = V, seed: int = 0) -> torch.Tensor:
    """[len(argmax), V] random logits in [-1, 1] whose row i peaks (by 3) at argmax[i]."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.rand(len(argmax), vocab_size, generator=generator) * 2 - 1
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 4.0
    return logits


def only(token: int, vocab_size: int = V) -> list[float]:
    """A logits row with all its mass on ``token``."""
    row = [NEG_INF] * vocab_size
    row[token] = 0.0
    return row


def reject(logits, metadata, drafts):
    return RejectionSampler()(logits, metadata, drafts)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# ---------------------------------------------------------------- greedy verification

def test_greedy_all_drafts_accepted_emits_them_plus_the_bonus_token():
    drafts = [5, 3, 7]
    logits = peaked_logits([5, 3, 7, 1])
    out = reject(logits, make_metadata([0.0] * 4), [drafts])
    assert out.token_ids == [[5, 3, 7, 1]]
    assert out.first_rows == [0]
    assert out.logprobs is None


def test_greedy_first_draft_rejected_emits_only_the_argmax():
    # rows 1 and 2 would accept their drafts, but nothing after a rejection counts
    out = reject(peaked_logits([4, 3, 7]), make_metadata([0.0] * 3), [[5, 3]])
    assert out.token_ids == [[4]]


def test_greedy_middle_draft_rejected_keeps_the_prefix_and_the_correction():
    out = reject(peaked_logits([5, 2, 7, 1, 6]), make_metadata([0.0] * 5), [[5, 3, 7, 1]])
    assert out.token_ids == [[5, 2]]


def test_greedy_last_draft_rejected_emits_no_bonus_token():
    out = reject(peaked_logits([5, 3, 0]), make_metadata([0.0] * 3), [[5, 4]])
    assert out.token_ids == [[5, 3]]


def test_greedy_rows_in_a_batch_with_random_rows_are_verified_by_argmax():
    # request 0 greedy (accept, reject), request 1 random: a mixed batch takes the non-greedy path
    logits = torch.cat([peaked_logits([2, 6, 1]), torch.tensor([only(4)])])
    metadata = make_metadata([0.0, 0.0, 0.0, 1.0], top_k=torch.tensor([0, 0, 0, 1]),
                             top_p=torch.tensor([1.0, 1.0, 1.0, 0.5]), min_p=torch.tensor([0.9, 0.9, 0.9, 0.0]))
    for _ in range(10):
        out = reject(logits, metadata, [[2, 5], []])
        assert out.token_ids == [[2, 6], [4]]


# ---------------------------------------------------------------- no drafts: the plain sampler

@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_requests_without_drafts_match_the_plain_sampler(temperature):
    num_rows = 6
    logits = torch.randn(num_rows, 50, generator=torch.Generator().manual_seed(3))

    def metadata():  # fresh generators: the same seed gives the same stream
        return make_metadata([temperature] * num_rows, max_num_logprobs=3,
                             top_k=torch.tensor([0, 5, 0, 3, 0, 10]),
                             frequency_penalties=torch.full((num_rows,), 0.4),
                             output_token_ids=[[1, 2, 2], [], [7], [3, 3, 3], [], [9]],
                             generators={row: torch.Generator().manual_seed(100 + row)
                                         for row in range(num_rows)})

    plain = Sampler()(logits, metadata())
    out = reject(logits, metadata(), [[] for _ in range(num_rows)])
    assert out.token_ids == [[t] for t in plain.sampled_token_ids.tolist()]
    assert out.first_rows == list(range(num_rows))
    for field in ("token_ids", "logprobs", "ranks"):
        assert torch.equal(getattr(out.logprobs, field), getattr(plain.logprobs, field)), field


# ---------------------------------------------------------------- a mixed batch

def test_mixed_batch_of_greedy_and_random_requests_with_different_draft_counts():
    # Random rows are made deterministic: all mass on the draft (always accepted), the draft
    # outside the row's top-k (never accepted) with one token left, or one token only.
    rows = [
        # request 0: greedy, 2 drafts, both accepted, bonus 6
        (0.0, peaked_logits([1])[0].tolist(), 0), (0.0, peaked_logits([2])[0].tolist(), 0),
        (0.0, peaked_logits([6])[0].tolist(), 0),
        # request 1: random, no drafts; one possible token
        (1.0, only(5), 0),
        # request 2: random, 3 drafts: accepted (p = 1), rejected (top-k 1 keeps only 0), -
        (0.8, only(3), 0), (0.8, [2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.5], 1),
        (0.8, only(4), 0), (0.8, only(4), 0),
        # request 3: greedy, 1 draft, rejected
        (0.0, peaked_logits([7])[0].tolist(), 0), (0.0, peaked_logits([0])[0].tolist(), 0),
        # request 4: random, 1 draft accepted (p = 1), bonus from a one-token row
        (1.3, only(2), 0), (1.3, only(1), 0),
    ]
    drafts = [[1, 2], [], [3, 7, 4], [6], [2]]
    logits = torch.tensor([r[1] for r in rows])
    metadata = make_metadata([r[0] for r in rows], top_k=torch.tensor([r[2] for r in rows]))
    for _ in range(20):
        out = reject(logits, metadata, drafts)
        assert out.token_ids == [[1, 2, 6], [5], [3, 0], [7], [2, 1]]
        assert out.first_rows == [0, 3, 4, 8, 10]


def test_a_random_row_never_emits_a_draft_it_rejects():
    # p(draft) = 0.4: rejections must sample among the other tokens only
    logits = torch.tensor([[0.2, 0.4, 0.2, 0.2], [0.0, 0.0, 0.0, 1.0]]).log().repeat(1000, 1)  # bonus: 3
    out = reject(logits, make_metadata([1.0] * 2000), [[1]] * 1000)
    for tokens in out.token_ids:
        assert tokens in ([1, 3], [0], [2], [3])


# ---------------------------------------------------------------- per-row processing

def test_frequency_penalty_of_each_row_sees_the_drafts_before_it():
    # Every row alike: token 1 leads token 2 by 0.5. A frequency penalty of 0.3 per occurrence
    # lets row 0 (no draft before it) and row 1 (one 1 before it) pick 1, and row 2 (two
    # before it) pick 2: drafts [1, 1, 1] -> [1, 1, 2].
    logits = torch.tensor([[0.0, 5.0, 4.5, 0.0] + [0.0] * (V - 4)]).repeat(4, 1)
    drafts = [1, 1, 1]
    metadata = make_metadata([0.0] * 4, frequency_penalties=torch.full((4,), 0.3),
                             output_token_ids=[drafts[:j] for j in range(4)])
    assert reject(logits, metadata, [drafts]).token_ids == [[1, 1, 2]]
    # without the earlier drafts in the rows' outputs every draft would pass
    blind = make_metadata([0.0] * 4, frequency_penalties=torch.full((4,), 0.3),
                          output_token_ids=[[] for _ in range(4)])
    assert reject(logits, blind, [drafts]).token_ids == [[1, 1, 1, 1]]


def test_repetition_penalty_and_min_tokens_of_each_row_see_the_drafts_before_it():
    # request 0: a repetition penalty of 2 halves token 3's logit once 3 was drafted
    # request 1: min_tokens 2 forbids stop id 0 until two tokens precede the row
    vocab = [0.0] * V
    rep = list(vocab)
    rep[3], rep[5] = 4.0, 3.0
    stop = list(vocab)
    stop[0], stop[6] = 4.0, 1.0
    logits = torch.tensor([rep, rep, rep, stop, stop, stop])
    drafts = [[3, 3], [6, 6]]
    outputs = [[], [3], [3, 3], [], [6], [6, 6]]
    metadata = make_metadata(
        [0.0] * 6, repetition_penalties=torch.tensor([2.0] * 3 + [1.0] * 3),
        prompt_token_ids=torch.full((6, 1), V), output_token_ids=outputs,
        min_tokens={row: (2, {0}) for row in (3, 4, 5)})
    assert reject(logits, metadata, drafts).token_ids == [[3, 5], [6, 6, 0]]


def test_greedy_verification_matches_sequential_plain_sampling_with_penalties():
    """For many random cases: the emitted tokens are what the plain sampler emits one token at a
    time (each row's output = the tokens emitted before it), stopping at the first disagreement."""
    gen = torch.Generator().manual_seed(7)
    sampler = Sampler()
    for case in range(40):
        num_requests = 1 + case % 4
        all_logits, drafts_all, outputs_all, expected = [], [], [], []
        penalties = {"frequency": [], "presence": [], "repetition": []}
        prompts = []
        for _ in range(num_requests):
            k = int(torch.randint(0, 5, (1,), generator=gen))
            base = torch.randint(0, V, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen).tolist()
            prompt = torch.randint(0, V, (3,), generator=gen).tolist()
            freq, pres, rep = torch.rand(3, generator=gen).tolist()
            rep += 1.0
            logits = torch.randn(k + 1, V, generator=gen) * 2
            drafts, emitted = [], None
            for j in range(k + 1):  # build drafts: mostly the sequential argmax, sometimes not
                metadata = make_metadata([0.0], frequency_penalties=torch.tensor([freq]),
                                         presence_penalties=torch.tensor([pres]),
                                         repetition_penalties=torch.tensor([rep]),
                                         prompt_token_ids=torch.tensor([prompt]),
                                         output_token_ids=[base + drafts])
                token = int(sampler(logits[j:j + 1], metadata).sampled_token_ids[0])
                if j == k:
                    emitted = emitted or drafts + [token]
                    break
                draft = token if torch.rand(1, generator=gen) < 0.75 else (token + 1) % V
                if draft != token and emitted is None:
                    emitted = drafts + [token]
                drafts.append(draft)
            for j in range(k + 1):
                outputs_all.append(base + drafts[:j])
                prompts.append(prompt)
                penalties["frequency"].append(freq)
                penalties["presence"].append(pres)
                penalties["repetition"].append(rep)
            all_logits.append(logits)
            drafts_all.append(drafts)
            expected.append(emitted)
        metadata = make_metadata([0.0] * len(outputs_all),
                                 frequency_penalties=torch.tensor(penalties["frequency"]),
                                 presence_penalties=torch.tensor(penalties["presence"]),
                                 repetition_penalties=torch.tensor(penalties["repetition"]),
                                 prompt_token_ids=torch.tensor(prompts), output_token_ids=outputs_all)
        out = reject(torch.cat(all_logits), metadata, drafts_all)
        assert out.token_ids == expected, case


# ---------------------------------------------------------------- logprobs

@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_logprobs_rows_are_those_of_the_emitted_tokens(mode):
    # request 0 greedy: accept, reject (2 tokens); request 1 random, p(draft) = 1 twice + bonus
    logits = torch.cat([peaked_logits([3, 1, 2], seed=4), torch.tensor([only(5), only(6), only(2)])])
    logits[3:, 0] = -2.0  # a second finite token in the random rows: logprobs are not all 0/-inf
    logits[3:, 5] = torch.where(torch.arange(3) == 0, 20.0, -30.0)
    logits[3:, 6] = torch.where(torch.arange(3) == 1, 20.0, -30.0)
    logits[3:, 2] = torch.where(torch.arange(3) == 2, 20.0, -30.0)
    metadata = make_metadata([0.0] * 3 + [0.5] * 3, max_num_logprobs=2, logprobs_mode=mode,
                             top_k=torch.tensor([0, 0, 0, 1, 1, 1]),
                             presence_penalties=torch.tensor([0.5] * 6),
                             output_token_ids=[[], [3], [3, 4], [], [5], [5, 6]])
    drafts = [[3, 4], [5, 6]]
    out = reject(logits, metadata, drafts)
    assert out.token_ids == [[3, 1], [5, 6, 2]]
    emitted = torch.tensor([3, 1, 0, 5, 6, 2])  # row 2 lies past the rejection: any token
    rows = [0, 1, 3, 4, 5]
    if mode == "raw":
        source = compute_logprobs(logits)
    else:
        processed = logits.clone()
        apply_logits_processors(processed, metadata)
        temperature = metadata.temperature.masked_fill(metadata.temperature < SAMPLING_EPS, 1.0)
        source = compute_logprobs(processed / temperature.unsqueeze(1))
    expected = compute_logprobs_tensors(source[rows], emitted[rows], 2)
    got = out.logprobs
    assert got.token_ids[rows, 0].tolist() == [3, 1, 5, 6, 2]
    assert torch.equal(got.token_ids[rows], expected.token_ids)
    assert torch.allclose(got.logprobs[rows], expected.logprobs, atol=1e-5)
    assert torch.equal(got.ranks[rows], expected.ranks)


# ---------------------------------------------------------------- the target distribution

# chi-square quantiles at 0.999 by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def target_probs(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """The plain sampler's distribution, computed here from its definition."""
    scaled = logits / temperature
    if top_k:
        kth = scaled.topk(top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, NEG_INF)
    return scaled.softmax(-1)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) over the support of ``probs``; nothing outside it allowed."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    n = counts.sum()
    expected = probs[support] * n
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


@pytest.mark.parametrize("temperature, top_k, drafts", [
    (1.0, 0, [1, 3]),  # p(draft) ~ 0.5 at both positions
    (0.7, 3, [1, 5]),  # top-k 3; the second draft lies outside row 1's top 3: always rejected
])
def test_sampled_rows_reproduce_the_target_distribution(temperature, top_k, drafts):
    """N requests, 2 drafts each, one batched call. Position j of the emitted tokens, among
    the requests whose first j tokens are the drafts, follows row j's target distribution
    whatever the drafts (acceptance where the draft is sampled, the residual otherwise)."""
    n = 20000
    vocab_size = 6
    rows = torch.tensor([[0.2, 1.3, 0.5, 0.9, -0.4, 0.0],
                         [0.8, 0.1, -0.3, 1.5, 0.6, -1.0],
                         [0.0, -0.5, 1.0, 0.4, 0.9, 0.3]]) * temperature
    logits = rows.repeat(n, 1)
    metadata = make_metadata([temperature] * (3 * n),
                             top_k=torch.tensor([top_k] * (3 * n)) if top_k else None)
    torch.manual_seed(1234)
    out = reject(logits, metadata, [drafts] * n)

    targets = [target_probs(rows[j], temperature, top_k) for j in range(3)]
    reached = n
    for j in range(3):
        prefix = drafts[:j]
        tokens = torch.tensor([t[j] for t in out.token_ids if t[:j] == prefix], dtype=torch.int64)
        assert len(tokens) == reached  # every request with the drafts so far has a token at j
        if reached == 0:
            break
        counts = torch.bincount(tokens, minlength=vocab_size).double()
        statistic, dof = chi_square(counts, targets[j].double())
        assert statistic < CHI2_999[dof], (j, statistic, counts / counts.sum(), targets[j])
        # and a plain bound on the total variation: its expected size is about 0.9 / sqrt(count)
        assert 0.5 * (counts / counts.sum() - targets[j]).abs().sum() < 3.0 / reached ** 0.5
        if j < 2:
            reached = int((tokens == drafts[j]).sum())
    # the acceptance rates are those of the target: p_j(d_j)
    accepted_first = sum(t[0] == drafts[0] for t in out.token_ids) / n
    assert abs(accepted_first - float(targets[0][drafts[0]])) < 0.02
    if top_k:
        assert float(targets[1][drafts[1]]) == 0.0 and all(t[:2] != drafts for t in out.token_ids)


def test_a_seeded_request_gets_the_same_tokens_whatever_its_batch_and_row():
    request_logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(5)) * 0.5
    drafts = [int(request_logits[j].argmax()) for j in range(3)]

    def run(row_before: int, num_after: int) -> list[list[int]]:
        draws = []
        generator = torch.Generator().manual_seed(77)
        for _ in range(15):
            others_before = [torch.randn(1, 30) for _ in range(row_before)]
            others_after = [torch.randn(1, 30) for _ in range(num_after)]
            logits = torch.cat([*others_before, request_logits, *others_after])
            num_rows = logits.shape[0]
            metadata = make_metadata([0.9] * num_rows,
                                     generators={row_before + j: generator for j in range(4)})
            out = reject(logits, metadata, [[]] * row_before + [drafts] + [[]] * num_after)
            draws.append(out.token_ids[row_before])
        return draws

    alone = run(0, 0)
    assert run(3, 2) == alone
    assert len({tuple(t) for t in alone}) > 1  # the draws do vary from step to step


# ---------------------------------------------------------------- input checks

def test_logits_and_metadata_rows_must_match_the_drafts():
    with pytest.raises(ValueError, match=r"logits must be \[3, V\]"):
        reject(torch.zeros(2, V), make_metadata([0.0] * 2), [[1, 2]])
    with pytest.raises(ValueError, match="metadata has 2 rows, logits have 3"):
        reject(torch.zeros(3, V), make_metadata([0.0] * 2), [[1, 2]])


# ---------------------------------------------------------------- rows with no token to sample

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_fully_masked_row_the_walk_reaches_ends_in_no_token(temperature):
    drafts = [[0, 3], [5]]  # request 0: row 1 (after draft 0) has every token masked
    logits = peaked_logits([0, 3, 1, 5, 2])
    logits[1] = NEG_INF

    out = reject(logits, make_metadata([temperature] * 5), drafts)

    assert out.token_ids[0][-1] == NO_TOKEN and len(out.token_ids[0]) == 2
    assert NO_TOKEN not in out.token_ids[1]


def test_a_fully_masked_row_past_a_rejected_draft_is_never_reached():
    logits = peaked_logits([4, 3, 1])
    logits[1] = NEG_INF

    out = reject(logits, make_metadata([0.0] * 3), [[2, 3]])  # draft 2 is rejected at row 0

    assert out.token_ids == [[4]]
