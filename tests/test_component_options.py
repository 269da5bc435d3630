"""Third-party components with options of their own, selected by configuration alone.

A fake installed distribution registers a drafter, a guided decoder and an attention
backend, each with a nested ``Options`` model. The engine builds each through the
registry from its config section (``speculative_config``, ``structured_outputs_config``,
``attention_config``): the component gets its validated options, runs end to end, and a
key it does not declare is an error naming the key and the component.
"""
from types import SimpleNamespace

import pytest
import torch

from builders import TINY_ENGINE_OPTIONS, assert_no_leaks, make_byte_level_checkpoint
from tokenmill import ConfigError, EngineConfig, Registry, SamplingParams
from tokenmill.llm_engine import LLMEngine
from tokenmill.output_processor import OutputKind
from tokenmill.structured import StructuredOutputsParams

PLUGIN = """
    from pydantic import BaseModel, Field

    from tokenmill import Drafter, hookimpl
    from tokenmill.plugins.attention import TorchAttentionBackend
    from tokenmill.plugins.structured import XGrammarDecoder

    class RepeatLastDrafter(Drafter):
        name = "repeat-last"
        num_proposals = 0

        class Options(BaseModel):
            max_repeat: int = Field(default=2, ge=1)

        def propose(self, token_ids, max_num_tokens):
            type(self).num_proposals += sum(1 for n in max_num_tokens if n)
            return [[int(t[-1])] * min(n, self.options.max_repeat) if len(t) else []
                    for t, n in zip(token_ids, max_num_tokens)]

    class HiddenStatesDrafter(Drafter):
        # proposes what follows in ``references`` (whole token lists), and keeps what it was given
        name = "hidden-states"
        uses_hidden_states = True
        references = []
        seen = []

        def propose(self, token_ids, max_num_tokens, context):
            token_ids = [list(map(int, t)) for t in token_ids]
            type(self).seen.append((token_ids, [h.clone() for h in context.hidden_states], context.device))
            drafts = []
            for tokens, n in zip(token_ids, max_num_tokens):
                reference = next((r for r in self.references if r[:len(tokens)] == tokens), [])
                drafts.append(reference[len(tokens):len(tokens) + n])
            return drafts

    class CountingDecoder(XGrammarDecoder):
        name = "counting-xgrammar"
        num_compiles = 0

        class Options(BaseModel):
            label: str = "plain"

        def compile(self, spec):
            type(self).num_compiles += 1
            return super().compile(spec)

    class CountingTorchBackend(TorchAttentionBackend):
        name = "counting-torch"
        num_forwards = 0
        num_prepares = 0

        class Options(BaseModel):
            tag: str = "none"

        @classmethod
        def priority(cls, device):
            return 5  # above the built-in torch backend's 0: chosen when no backend is named

        def prepare(self, metadata):
            type(self).num_prepares += 1
            return super().prepare(metadata)

        def forward(self, *args, **kwargs):
            type(self).num_forwards += 1
            return super().forward(*args, **kwargs)

    @hookimpl
    def tokenmill_register_drafters(register):
        register(RepeatLastDrafter)
        register(HiddenStatesDrafter)

    @hookimpl
    def tokenmill_register_guided_decoders(register):
        register(CountingDecoder)

    @hookimpl
    def tokenmill_register_attention_backends(register):
        register(CountingTorchBackend)
"""
PROMPTS = ["aaaa aaaa aaaa", "cat dog cat dog"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
ENGINE = {**TINY_ENGINE_OPTIONS, "max_model_len": 128}


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte-llama")
    make_byte_level_checkpoint(path, seed=2)
    return path


@pytest.fixture
def registry(plugin_site):
    plugin_site("acme-components", PLUGIN)
    return Registry()


def make_engine(model, registry, **options) -> LLMEngine:
    return LLMEngine(EngineConfig.build(model=str(model), **{**ENGINE, **options}), registry)


def run(engine: LLMEngine, params: SamplingParams = GREEDY) -> list:
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params, OutputKind.FINAL_ONLY)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    return [finals[str(i)].outputs[0] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def torch_greedy(byte_model):
    """Greedy completions with the built-in torch backend and no drafter."""
    return [c.token_ids for c in run(LLMEngine(EngineConfig.build(model=str(byte_model), attention_backend="torch",
                                                                  **ENGINE)))]


# ---------------------------------------------------------------- drafter

def test_a_drafter_with_options_is_selected_by_config_alone(byte_model, registry, torch_greedy):
    engine = make_engine(byte_model, registry, attention_backend="torch",
                         speculative_config={"method": "repeat-last", "num_speculative_tokens": 3, "max_repeat": 1})

    completions = run(engine)

    drafter = engine.core.drafter
    assert type(drafter).__name__ == "RepeatLastDrafter" and drafter.options.max_repeat == 1
    assert drafter.num_speculative_tokens == 3 and type(drafter).num_proposals > 0
    assert [c.token_ids for c in completions] == torch_greedy
    assert engine.get_stats()["spec_num_draft_tokens"] > 0


def test_a_drafter_that_asks_gets_the_hidden_states_of_the_verified_positions(byte_model, registry, torch_greedy):
    engine = make_engine(byte_model, registry, attention_backend="torch",
                         speculative_config={"method": "hidden-states", "num_speculative_tokens": 2})
    drafter_cls = type(engine.core.drafter)
    drafter_cls.references = [engine.tokenizer.encode(p) + ids for p, ids in zip(PROMPTS, torch_greedy)]

    completions = run(engine)

    assert [c.token_ids for c in completions] == torch_greedy
    seen = drafter_cls.seen
    assert seen and any(len(h) > 1 for _, states, _ in seen for h in states)  # accepted drafts: several rows
    model = engine.core.model
    for token_ids, states, device in seen:
        assert device == torch.device("cpu")
        for tokens, hidden in zip(token_ids, states):
            # each verified position's hidden state gives, greedily, the token that followed it
            newest = tokens[len(tokens) - len(hidden):]
            with torch.inference_mode():
                assert model.compute_logits(hidden).argmax(dim=-1).tolist() == newest


@pytest.mark.parametrize("extra,message", [
    ({"lookback": 3}, r"speculative_config\.lookback: unknown option for drafter 'repeat-last'; its options are "
                      r"\['max_repeat'\]"),
    ({"max_repeat": 0}, r"drafter 'repeat-last': speculative_config\.max_repeat: Input should be greater than or "
                        r"equal to 1"),
])
def test_a_drafter_option_it_does_not_take_is_an_error_naming_both(byte_model, registry, extra, message):
    with pytest.raises(ConfigError, match=message):
        make_engine(byte_model, registry,
                    speculative_config={"method": "repeat-last", "num_speculative_tokens": 2, **extra})


def test_ngram_options_are_the_ngram_drafters_own(byte_model, registry):
    with pytest.raises(ConfigError, match=r"speculative_config\.max_repeat: unknown option for drafter 'ngram'"):
        make_engine(byte_model, registry, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                              "max_repeat": 1})


# ---------------------------------------------------------------- guided decoder

def test_a_guided_decoder_with_options_is_selected_by_config_alone(byte_model, registry):
    engine = make_engine(byte_model, registry, attention_backend="torch",
                         structured_outputs_config={"backend": "counting-xgrammar", "label": "acme"})
    params = SamplingParams(max_tokens=8, temperature=0.0,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))

    completions = run(engine, params)

    decoder = engine.core.structured.decoder
    assert type(decoder).__name__ == "CountingDecoder" and decoder.options.label == "acme"
    assert type(decoder).num_compiles > 0
    assert [c.text in ("yes", "no") for c in completions] == [True, True]
    assert_no_leaks(SimpleNamespace(engine=engine, get_stats=engine.get_stats))  # what an LLM would give it


def test_an_unknown_guided_decoder_or_option_is_an_error(byte_model, registry):
    with pytest.raises(ConfigError, match=r"structured_outputs_config\.backend: no guided_decoder named 'outlines'"):
        make_engine(byte_model, registry, structured_outputs_config={"backend": "outlines"})
    with pytest.raises(ConfigError, match=r"structured_outputs_config\.colour: unknown option for guided_decoder "
                                          r"'counting-xgrammar'"):
        make_engine(byte_model, registry, structured_outputs_config={"backend": "counting-xgrammar", "colour": 1})


# ---------------------------------------------------------------- attention backend

def test_the_highest_priority_backend_that_supports_the_model_is_chosen(byte_model, registry, torch_greedy):
    engine = make_engine(byte_model, registry, attention_config={"tag": "fast"})

    completions = run(engine)

    backend = engine.core.model.attention
    assert type(backend).__name__ == "CountingTorchBackend" and backend.options.tag == "fast"
    num_layers = engine.core.hf_config.num_hidden_layers
    assert type(backend).num_prepares > 0  # once per step, before the step's layers:
    assert type(backend).num_forwards == num_layers * type(backend).num_prepares
    assert [c.token_ids for c in completions] == torch_greedy


def test_a_named_backend_wins_over_priority(byte_model, registry):
    engine = make_engine(byte_model, registry, attention_backend="torch")

    assert type(engine.core.model.attention).__name__ == "TorchAttentionBackend"


def test_an_attention_option_the_backend_does_not_take_is_an_error(byte_model, registry):
    with pytest.raises(ConfigError, match=r"attention_config\.tag: attention_backend 'torch' takes no options"):
        make_engine(byte_model, registry, attention_backend="torch", attention_config={"tag": "x"})
