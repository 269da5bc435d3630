"""Speculative decoding end to end on a tiny random model: greedy outputs, logprobs and stops
are exactly those of the same engine without drafts, whatever the drafts and the batch.

Two kinds of drafter: the built-in ``ngram`` one, on prompts that repeat a random sequence
(the random model now and then repeats itself, so some drafts are accepted) and on free-form
random prompts; and drafters of a fake plugin distribution, selected by name: ``test-oracle``
proposes the plain engine's own continuation (optionally with every few draft positions
corrupted), so most drafts are accepted and stops fall inside accepted runs, and
``fixed-token`` always proposes one token.
"""
from __future__ import annotations

import dataclasses
import types

import pytest

from builders import TINY_ENGINE_OPTIONS, VOCAB_SIZE, assert_no_leaks, make_llm, random_prompts, token_prompts
from engine_fixtures import checkpoint  # noqa: F401
from tokenmill import Registry
from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.llm import LLM
from tokenmill.llm_engine import LLMEngine
from tokenmill.output_processor import OutputKind
from tokenmill.registry import get_registry
from tokenmill.sampling_params import SamplingParams

K = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
MAX_TOKENS = 40
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

_BASES = random_prompts([12, 20, 7, 5], seed=11)
# input-grounded: a random sequence repeated several times (drafts are found, some accepted)
REPETITIVE = [_BASES[0] * 4, _BASES[1] * 3, _BASES[2] * 4, _BASES[3] * 6]
FREE_FORM = random_prompts([10, 30, 50], seed=12)
PROMPTS = REPETITIVE + FREE_FORM

DRAFTER_PLUGIN = """
    from tokenmill import Drafter, hookimpl

    class FixedTokenDrafter(Drafter):
        name = "fixed-token"
        token = 5
        num_calls = 0

        def propose(self, token_ids, max_num_tokens):
            type(self).num_calls += 1
            return [[self.token] * n for n in max_num_tokens]

    class OracleDrafter(Drafter):
        '''Proposes what follows the tokens so far in ``references`` (full token lists), with
        each draft for a position p where p % corrupt_every == 0 replaced by another token.'''
        name = "test-oracle"
        references = []
        corrupt_every = 0

        def propose(self, token_ids, max_num_tokens):
            drafts = []
            for tokens, n in zip(token_ids, max_num_tokens):
                tokens = [int(t) for t in tokens]
                ref = next((r for r in self.references if r[:len(tokens)] == tokens), [])
                draft = ref[len(tokens):len(tokens) + n]
                if self.corrupt_every:
                    draft = [(t + 1) % VOCAB_SIZE if (len(tokens) + i) % self.corrupt_every == 0 else t
                             for i, t in enumerate(draft)]
                drafts.append(draft)
            return drafts

    VOCAB_SIZE = __VOCAB_SIZE__

    @hookimpl
    def tokenmill_register_drafters(register):
        register(FixedTokenDrafter)
        register(OracleDrafter)
""".replace("__VOCAB_SIZE__", str(VOCAB_SIZE))


# ---------------------------------------------------------------- helpers

def make_engine(model, registry: Registry, **options) -> LLMEngine:
    """An engine with a given registry (``LLM`` always uses the process-wide one)."""
    return LLMEngine(EngineConfig.build(model=str(model), **{**TINY_ENGINE_OPTIONS, **options}), registry)


def generate(target: LLM | LLMEngine, prompts: list[list[int]], params):
    """Final outputs in prompt order, from an LLM or by stepping an LLMEngine."""
    if isinstance(target, LLM):
        return target.generate(token_prompts(prompts), params, use_tqdm=False)
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = []
    for prompt, p in zip(prompts, params):
        ids.append(target.next_request_id())
        target.add_request(ids[-1], {"prompt_token_ids": prompt}, p, OutputKind.FINAL_ONLY)
    finals = {}
    while target.has_unfinished_requests():
        finals.update((o.request_id, o) for o in target.step() if o.finished)
    return [finals[i] for i in ids]


def no_leaks(target: LLM | LLMEngine) -> None:
    assert_no_leaks(target if isinstance(target, LLM) else types.SimpleNamespace(engine=target,
                                                                                  get_stats=target.get_stats))


def completions(outputs) -> list[tuple]:
    """What must not change with drafts: tokens, text, finish and stop reasons."""
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for o in outputs for c in o.outputs]


def spec_counts(target) -> tuple[int, int]:
    stats = target.get_stats()
    return stats["spec_num_draft_tokens"], stats["spec_num_accepted_tokens"]


def assert_same_logprobs(ours, theirs) -> None:
    assert (ours is None) == (theirs is None)
    assert len(ours or ()) == len(theirs or ())
    for entry, plain in zip(ours or (), theirs or ()):
        if plain is None:
            assert entry is None
            continue
        assert entry.keys() == plain.keys()
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(plain[token_id].logprob, abs=1e-4)
            assert (logprob.rank, logprob.decoded_token) == (plain[token_id].rank, plain[token_id].decoded_token)


@pytest.fixture(scope="module")
def plain(checkpoint):  # noqa: F811
    """The engine without drafts, prefix caching off: the reference for every comparison."""
    return make_llm(checkpoint[0], enable_prefix_caching=False)


@pytest.fixture(scope="module")
def plain_greedy(plain):
    return completions(generate(plain, PROMPTS, GREEDY))


@pytest.fixture(scope="module")
def ngram_llm(checkpoint):  # noqa: F811
    return make_llm(checkpoint[0], speculative_config=NGRAM)


@pytest.fixture
def plugin_registry(plugin_site):
    """A registry with the fake drafter distribution installed."""
    get_registry()  # the process-wide registry (LLM's) must not pick the fake distribution up
    plugin_site("acme-test-drafters", DRAFTER_PLUGIN)
    return Registry()


def oracle_engine(checkpoint_path, registry, references, corrupt_every=0, **options):  # noqa: F811
    oracle = registry.get("drafter", "test-oracle")
    oracle.references = [list(r) for r in references]
    oracle.corrupt_every = corrupt_every
    return make_engine(checkpoint_path, registry, speculative_config={"method": "test-oracle",
                                                                      "num_speculative_tokens": K}, **options)


def references(plain, prompts, params) -> tuple[list[list[int]], list[tuple]]:
    """(prompt + the plain engine's output: what the oracle proposes from, the plain completions)."""
    expected = completions(generate(plain, prompts, params))
    return [p + c[0] for p, c in zip(prompts, expected)], expected


# ---------------------------------------------------------------- greedy parity with ngram

def test_greedy_outputs_match_spec_off_and_drafts_are_accepted(ngram_llm, plain_greedy):
    before = ngram_llm.get_stats()
    outputs = completions(generate(ngram_llm, PROMPTS, GREEDY))

    assert outputs == plain_greedy
    stats = ngram_llm.get_stats()
    drafted = stats["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
    accepted = stats["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    assert drafted > 0 and 0 < accepted < drafted
    assert stats["spec_acceptance_rate"] == stats["spec_num_accepted_tokens"] / stats["spec_num_draft_tokens"]
    steps = stats["spec_num_verify_steps"]
    assert 0 < steps <= stats["spec_num_draft_tokens"]
    assert stats["spec_mean_accepted_length"] == (stats["spec_num_accepted_tokens"] + steps) / steps
    no_leaks(ngram_llm)


def test_free_form_prompts_alone_match_spec_off(ngram_llm, plain_greedy):
    drafted = ngram_llm.get_stats()["spec_num_draft_tokens"]
    outputs = completions(generate(ngram_llm, FREE_FORM, GREEDY))
    assert outputs == plain_greedy[len(REPETITIVE):]
    assert ngram_llm.get_stats()["spec_num_draft_tokens"] > drafted  # the drafter was at work
    no_leaks(ngram_llm)


@pytest.mark.parametrize("options", [
    # drafts compete for a small token budget with chunked prefills; blocks are shared
    dict(enable_prefix_caching=True, max_num_batched_tokens=32, enable_chunked_prefill=True),
    # 19 usable blocks of 16 tokens cannot hold 7 requests of ~50-100 tokens: preemption
    dict(num_gpu_blocks_override=20, max_num_batched_tokens=64),
    dict(num_gpu_blocks_override=18, max_num_batched_tokens=32, enable_prefix_caching=True, max_num_seqs=4),
], ids=["prefix-cache-small-budget", "preemption", "preemption-prefix-cache-4-seqs"])
def test_greedy_outputs_match_spec_off_under_scheduling_pressure(checkpoint, plain_greedy, options):  # noqa: F811
    llm = make_llm(checkpoint[0], speculative_config=NGRAM, **options)

    first = completions(generate(llm, PROMPTS, GREEDY))
    # again: with prefix caching, the second run reads blocks the first run filled (its
    # rejected drafts' K/V must not have been cached)
    second = completions(generate(llm, PROMPTS[::-1], GREEDY))[::-1]

    assert first == plain_greedy
    assert second == plain_greedy
    stats = llm.get_stats()
    assert stats["spec_num_accepted_tokens"] > 0
    if options.get("num_gpu_blocks_override"):
        assert stats["num_preemptions"] > 0
    if options.get("enable_prefix_caching"):
        assert stats["prefix_cache_hits"] > 0
    no_leaks(llm)


def test_no_max_tokens_runs_to_max_model_len_like_spec_off(checkpoint):  # noqa: F811
    # drafts are capped by the room left before max_model_len
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    prompts = [_BASES[2] * 4, FREE_FORM[0]]
    llm = make_llm(checkpoint[0], speculative_config=NGRAM, max_model_len=64, num_gpu_blocks_override=8)
    expected = completions(generate(make_llm(checkpoint[0], max_model_len=64), prompts, params))

    outputs = completions(generate(llm, prompts, params))

    assert outputs == expected
    assert [len(o[0]) + len(p) for o, p in zip(outputs, prompts)] == [64, 64]
    assert spec_counts(llm)[1] > 0
    no_leaks(llm)


# ---------------------------------------------------------------- stops inside accepted runs

def first_new_token_from(output: list[int], index: int) -> int:
    """The first output index >= ``index`` whose token did not occur before it."""
    return next(i for i in range(index, len(output)) if output[i] not in output[:i])


def token_stop_params(output: list[int]) -> list[SamplingParams]:
    """Stop conditions that end the request at output index 7, inside the third verify step
    of an always-right drafter with k = 4 (outputs 6-10), or at 8 for max_tokens."""
    stop_token = output[first_new_token_from(output, 7)]
    return [
        dataclasses.replace(GREEDY, stop_token_ids=[stop_token]),
        dataclasses.replace(GREEDY, stop_token_ids=[stop_token, output[first_new_token_from(output, 12)]]),
        dataclasses.replace(GREEDY, max_tokens=8),
        # min_tokens holds the stop token back inside a run
        dataclasses.replace(GREEDY, stop_token_ids=[output[2], output[first_new_token_from(output, 6)]],
                            min_tokens=5),
    ]


def string_stop_params(output: list[int]) -> list[SamplingParams]:
    # the text of the stop token and the token before it: the string ends inside a run
    at = first_new_token_from(output, 7)
    stop = f"w{output[at - 1]} w{output[at]}"
    return [dataclasses.replace(GREEDY, stop=[stop]),
            dataclasses.replace(GREEDY, stop=[stop], include_stop_str_in_output=True)]


def continued(plain, prompt: list[int], params: SamplingParams) -> list[int]:
    """prompt + the plain engine's output under ``params`` + its greedy continuation past the
    stop: the oracle proposes tokens beyond the stop, as a drafter would."""
    output = generate(plain, [prompt], params)[0].outputs[0].token_ids
    more = generate(plain, [prompt + output], dataclasses.replace(GREEDY, max_tokens=K + 1))[0].outputs[0].token_ids
    return prompt + output + more


def check_stops_with_oracle(checkpoint_path, plain, registry, make_params) -> None:
    """One request at a time: the oracle's reference is that request's own continuation."""
    full, _ = references(plain, PROMPTS[:5], GREEDY)
    engine = oracle_engine(checkpoint_path, registry, [])
    oracle = registry.get("drafter", "test-oracle")
    for prompt, ref in zip(PROMPTS[:5], full):
        for params in make_params(ref[len(prompt):]):
            expected = completions(generate(plain, [prompt], params))
            assert len(expected[0][0]) <= 13 or params.min_tokens  # it stopped early
            oracle.references = [continued(plain, prompt, params)]

            assert completions(generate(engine, [prompt], params)) == expected
    drafted, accepted = spec_counts(engine)
    assert accepted == drafted > 0  # every draft was right: the stops fell inside accepted runs
    no_leaks(engine)


def test_stop_tokens_and_max_tokens_inside_an_accepted_run_match_spec_off(checkpoint, plain,  # noqa: F811
                                                                          plugin_registry):
    check_stops_with_oracle(checkpoint[0], plain, plugin_registry, token_stop_params)


def test_stop_strings_inside_an_accepted_run_match_spec_off(checkpoint, plain, plugin_registry):  # noqa: F811
    check_stops_with_oracle(checkpoint[0], plain, plugin_registry, string_stop_params)


def test_stop_conditions_match_spec_off_with_ngram(ngram_llm, plain, plain_greedy):
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                             stop_token_ids=[tokens[n]]) for n, (tokens, *_) in enumerate(plain_greedy, 9)]
    params += [dataclasses.replace(GREEDY, max_tokens=n) for n in (1, 2, 5, 11)]
    prompts = PROMPTS + PROMPTS[:4]

    assert completions(generate(ngram_llm, prompts, params)) == completions(generate(plain, prompts, params))
    no_leaks(ngram_llm)


# ---------------------------------------------------------------- rollback of rejected drafts

PROCESSED = [
    GREEDY,
    dataclasses.replace(GREEDY, frequency_penalty=0.8, presence_penalty=0.3),
    dataclasses.replace(GREEDY, repetition_penalty=1.5),
    dataclasses.replace(GREEDY, logit_bias={7: 2.0, 9: -1.0}),
    dataclasses.replace(GREEDY, allowed_token_ids=list(range(3, 60))),
]


@pytest.mark.parametrize("corrupt_every", [0, 5, 2])
def test_oracle_drafts_right_and_wrong_give_the_spec_off_outputs(checkpoint, plain, plugin_registry,  # noqa: F811
                                                                 corrupt_every):
    # each request with its own logits processing: a penalty row must see the drafts before it
    prompts = PROMPTS[:len(PROCESSED)]
    full, expected = references(plain, prompts, PROCESSED)
    engine = oracle_engine(checkpoint[0], plugin_registry, full, corrupt_every=corrupt_every,
                           max_num_batched_tokens=48, enable_prefix_caching=True)

    outputs = completions(generate(engine, prompts, PROCESSED))

    assert outputs == expected
    drafted, accepted = spec_counts(engine)
    assert accepted > 0
    assert (accepted == drafted) == (corrupt_every == 0)
    no_leaks(engine)


def test_a_third_party_drafter_selected_by_name_is_used(checkpoint, plain_greedy, plugin_registry):  # noqa: F811
    drafter = plugin_registry.get("drafter", "fixed-token")
    drafter.num_calls = 0
    engine = make_engine(checkpoint[0], plugin_registry,
                         speculative_config={"method": "fixed-token", "num_speculative_tokens": 3})

    outputs = completions(generate(engine, PROMPTS, GREEDY))

    assert outputs == plain_greedy
    assert type(engine.core.drafter) is drafter and drafter.num_calls > 0
    drafted, accepted = spec_counts(engine)
    assert drafted > 0
    # token 5 is accepted exactly where the plain output has a 5 right after an accepted run
    assert accepted <= sum(tokens.count(5) for tokens, *_ in outputs)
    no_leaks(engine)


# ---------------------------------------------------------------- logprobs

@pytest.mark.parametrize("drafter", ["ngram", "test-oracle"])
def test_logprobs_match_spec_off(checkpoint, plain, plugin_registry, drafter):  # noqa: F811
    params = [dataclasses.replace(GREEDY, max_tokens=24, logprobs=3),
              dataclasses.replace(GREEDY, max_tokens=24, logprobs=0, prompt_logprobs=2),
              dataclasses.replace(GREEDY, max_tokens=24),
              dataclasses.replace(GREEDY, max_tokens=24, logprobs=5, frequency_penalty=0.5)]
    prompts = PROMPTS[:4]
    expected = generate(plain, prompts, params)
    if drafter == "ngram":
        engine = make_engine(checkpoint[0], plugin_registry, speculative_config=NGRAM)
    else:
        full = [p + o.outputs[0].token_ids for p, o in zip(prompts, expected)]
        engine = oracle_engine(checkpoint[0], plugin_registry, full, corrupt_every=3)

    outputs = generate(engine, prompts, params)

    assert completions(outputs) == completions(expected)
    for ours, theirs in zip(outputs, expected):
        assert_same_logprobs(ours.outputs[0].logprobs, theirs.outputs[0].logprobs)
        assert_same_logprobs(ours.prompt_logprobs, theirs.prompt_logprobs)
        if theirs.outputs[0].cumulative_logprob is not None:
            assert ours.outputs[0].cumulative_logprob == pytest.approx(theirs.outputs[0].cumulative_logprob,
                                                                       abs=1e-3)
    assert spec_counts(engine)[1] > 0
    no_leaks(engine)


# ---------------------------------------------------------------- sampling

def test_seeded_sampling_with_drafts_respects_max_tokens_and_is_reproducible(checkpoint, plain,  # noqa: F811
                                                                             plugin_registry):
    seeded = [SamplingParams(temperature=t, seed=s, max_tokens=n, ignore_eos=True, top_k=k)
              for t, s, n, k in [(0.8, 3, 30, 0), (1.0, 4, 17, 20), (0.5, 5, 25, 0), (0.3, 6, 9, 0)]]
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    stopping = SamplingParams(temperature=0.7, seed=8, max_tokens=30, ignore_eos=True, stop_token_ids=[10, 20, 30])
    params = seeded + [unseeded, GREEDY, stopping]
    prompts = PROMPTS[:len(params)]
    # the greedy continuation as drafts: likely tokens, so the sampled rows accept some
    full, _ = references(plain, prompts, dataclasses.replace(GREEDY, max_tokens=60))
    engine = oracle_engine(checkpoint[0], plugin_registry, full)

    first = generate(engine, prompts, params)
    again = generate(engine, prompts[:4][::-1], seeded[::-1])[::-1]  # other batch, other rows

    tokens = [o.outputs[0].token_ids for o in first]
    assert [len(t) for t in tokens[:5]] == [p.max_tokens for p in params[:5]]
    assert tokens[5] == full[5][len(prompts[5]):len(prompts[5]) + MAX_TOKENS]
    stop_output = first[6].outputs[0]
    assert all(t not in (10, 20, 30) for t in stop_output.token_ids[:-1])
    assert stop_output.finish_reason == "length" or stop_output.token_ids[-1] == stop_output.stop_reason
    assert [o.outputs[0].token_ids for o in again] == tokens[:4]
    assert tokens[0] != full[0][len(prompts[0]):len(prompts[0]) + 30]  # it did sample
    drafted, accepted = spec_counts(engine)
    assert 0 < accepted < drafted
    no_leaks(engine)


def test_ngram_sampling_runs_and_respects_max_tokens(ngram_llm):
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=10 + 3 * i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    drafted = ngram_llm.get_stats()["spec_num_draft_tokens"]
    outputs = generate(ngram_llm, PROMPTS, params)
    assert ngram_llm.get_stats()["spec_num_draft_tokens"] > drafted  # sampled rows were verified
    assert [len(o.outputs[0].token_ids) for o in outputs] == [p.max_tokens for p in params]
    assert all(0 <= t < VOCAB_SIZE for o in outputs for t in o.outputs[0].token_ids)
    no_leaks(ngram_llm)


# ---------------------------------------------------------------- configuration

def test_unknown_method_names_the_registered_drafters(checkpoint):  # noqa: F811
    with pytest.raises(ConfigError, match=r"speculative_config.method: no drafter named 'eagle'; "
                                          r"registered: \[.*'ngram'.*\]"):
        make_llm(checkpoint[0], speculative_config={"method": "eagle", "num_speculative_tokens": 2})


@pytest.mark.parametrize("config, message", [
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens: must be >= 1, got 0"),
    ({"method": "ngram", "num_speculative_tokens": -2}, r"num_speculative_tokens: must be >= 1, got -2"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     r"prompt_lookup_min \(4\) must be <= prompt_lookup_max \(2\)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, r"prompt_lookup_min must be >= 1"),
    ({"method": "ngram"}, r"num_speculative_tokens: Field required"),
])
def test_bad_speculative_config_is_a_clear_error(checkpoint, config, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        make_llm(checkpoint[0], speculative_config=config)


def test_plugin_drafter_is_unknown_to_a_registry_without_it(checkpoint, plugin_registry):  # noqa: F811
    assert {"ngram", "fixed-token", "test-oracle"} <= plugin_registry.available("drafter").keys()
    with pytest.raises(ConfigError, match=r"no drafter named 'fixed-token'; registered: \['ngram'\]"):
        make_engine(checkpoint[0], Registry(entry_points=False),
                    speculative_config={"method": "fixed-token", "num_speculative_tokens": 2})
