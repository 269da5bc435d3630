"""A failure that belongs to one request ends that request alone.

Each test injects a fault into one per-request stage (sampling set-up, the grammar's
bitmask and matcher, stop checks, detokenization, sample and prompt logprobs) for one
"victim" request running in a batch with others. The victim ends with finish reason
"error" and a RequestError naming the stage; every other request produces exactly the
greedy tokens it produces in a batch without faults; no KV block is left behind, and
the engine goes on serving. Without the isolation, the fault would escape ``step()``.
"""
import pytest

from builders import assert_no_leaks, make_byte_level_checkpoint, make_llm
from tokenmill import scheduler as scheduler_module
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured import StructuredOutputsParams

ENGINE = dict(max_model_len=256, num_gpu_blocks_override=256, max_num_seqs=8, max_num_batched_tokens=512)
BYSTANDERS = ["cat dog", "[1, 2, 3]", "abc-123 abc-123 abc-123"]
BYSTANDER_PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
VICTIM_PROMPT = "red green blue"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte-llama")
    make_byte_level_checkpoint(path, seed=2)
    return make_llm(path, **ENGINE)


@pytest.fixture(scope="module")
def bystander_ids(llm):
    """The bystanders' greedy tokens in a batch with no fault."""
    outputs = llm.generate(BYSTANDERS, BYSTANDER_PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


class Fault(Exception):
    """The injected failure."""


def run_batch(llm, victim_params: SamplingParams, inject=None):
    """Add the bystanders and the victim ("victim"), call ``inject(engine)`` and step to the end.
    Returns (the victim's final output, the bystanders' token ids)."""
    engine = llm.engine
    for i, prompt in enumerate(BYSTANDERS):
        engine.add_request(f"bystander-{i}", prompt, BYSTANDER_PARAMS)
    engine.add_request("victim", VICTIM_PROMPT, victim_params)
    if inject is not None:
        inject(engine)
    finals = {}
    for _ in range(500):
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    return finals["victim"], [finals[f"bystander-{i}"].outputs[0].token_ids for i in range(len(BYSTANDERS))]


def assert_failed_alone(llm, victim, bystanders, bystander_ids, message: str, kind: str = "internal") -> None:
    completion = victim.outputs[0]
    assert completion.finish_reason == "error"
    assert message in completion.error.message
    assert completion.error.kind == kind
    assert bystanders == bystander_ids
    assert_no_leaks(llm)
    after = llm.generate(BYSTANDERS[:1], BYSTANDER_PARAMS, use_tqdm=False)[0].outputs[0]  # still serving
    assert after.token_ids == bystander_ids[0]


def victim_only(fn):
    """Wrap ``fn(self_or_arg, ...)`` so that it raises Fault when called for the victim."""
    def wrapper(*args, **kwargs):
        if any(getattr(arg, "req_id", getattr(arg, "request_id", None)) == "victim" for arg in args):
            raise Fault("injected")
        return fn(*args, **kwargs)
    return wrapper


# ---------------------------------------------------------------- the stages

def test_a_failed_sampling_set_up_fails_only_its_request(llm, bystander_ids, monkeypatch):
    runner = llm.engine.core.runner
    monkeypatch.setattr(runner, "_generator", victim_only(runner._generator))

    victim, bystanders = run_batch(llm, SamplingParams(max_tokens=8, temperature=1.0, seed=7))

    assert_failed_alone(llm, victim, bystanders, bystander_ids, "setting up the request's sampling state failed")
    assert victim.outputs[0].token_ids == []


def test_a_stop_check_that_raises_fails_only_its_request(llm, bystander_ids, monkeypatch):
    monkeypatch.setattr(scheduler_module, "check_stop", victim_only(scheduler_module.check_stop))

    victim, bystanders = run_batch(llm, SamplingParams(max_tokens=8, temperature=0.0))

    assert_failed_alone(llm, victim, bystanders, bystander_ids, "checking the request's new tokens")


class BrokenGrammar:
    """A real grammar whose ``method`` raises from its ``after``-th call on."""

    def __init__(self, inner, method: str, after: int) -> None:
        self.inner, self.method, self.calls_left = inner, method, after

    def __getattr__(self, name):
        attribute = getattr(self.inner, name)
        if name != self.method:
            return attribute

        def maybe_raise(*args):
            self.calls_left -= 1
            if self.calls_left < 0:
                raise Fault(f"{name} broke")
            return attribute(*args)
        return maybe_raise


@pytest.mark.parametrize("method,after,stage", [
    ("fill_bitmask", 2, "the grammar matcher failed"),
    ("accept_tokens", 2, "checking the request's new tokens"),
])
def test_a_grammar_that_raises_fails_only_its_request(llm, bystander_ids, monkeypatch, method, after, stage):
    structured = llm.engine.core.structured
    compile_grammar = structured.decoder.compile
    monkeypatch.setattr(structured.decoder, "compile",
                        lambda spec: BrokenGrammar(compile_grammar(spec), method, after))
    params = SamplingParams(max_tokens=16, temperature=0.0,
                            structured_outputs=StructuredOutputsParams(regex="[a-z]{8}"))

    victim, bystanders = run_batch(llm, params)

    assert_failed_alone(llm, victim, bystanders, bystander_ids, stage)
    assert len(victim.outputs[0].token_ids) <= after


def test_a_detokenizer_that_raises_fails_only_its_request(llm, bystander_ids):
    def inject(engine):
        detokenizer = engine.output_processor._parents["victim"].children["victim"].detokenizer
        detokenizer.update = lambda *args: (_ for _ in ()).throw(Fault("bad bytes"))

    victim, bystanders = run_batch(llm, SamplingParams(max_tokens=8, temperature=0.0), inject)

    assert_failed_alone(llm, victim, bystanders, bystander_ids, "detokenizing the output or its logprobs failed")


def test_output_text_that_cannot_be_made_fails_only_its_request(llm, bystander_ids):
    def inject(engine):
        detokenizer = engine.output_processor._parents["victim"].children["victim"].detokenizer
        detokenizer.get_next_output_text = lambda *args: (_ for _ in ()).throw(Fault("bad text"))

    victim, bystanders = run_batch(llm, SamplingParams(max_tokens=8, temperature=0.0), inject)

    assert_failed_alone(llm, victim, bystanders, bystander_ids, "detokenizing the output failed")


def test_sample_logprobs_that_cannot_be_decoded_fail_only_their_request(llm, bystander_ids, monkeypatch):
    processor = llm.engine.output_processor
    monkeypatch.setattr(processor, "_decode", lambda token_id: (_ for _ in ()).throw(Fault("no text")))

    victim, bystanders = run_batch(llm, SamplingParams(max_tokens=8, temperature=0.0, logprobs=2))

    assert_failed_alone(llm, victim, bystanders, bystander_ids, "detokenizing the output or its logprobs failed")


def test_prompt_logprobs_that_raise_fail_only_their_request(llm, bystander_ids, monkeypatch):
    runner = llm.engine.core.runner
    monkeypatch.setattr(runner, "_prompt_logprobs", lambda *args: (_ for _ in ()).throw(Fault("no logprobs")))

    victim, bystanders = run_batch(llm, SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=1))

    assert_failed_alone(llm, victim, bystanders, bystander_ids, "computing prompt logprobs failed")
    assert victim.outputs[0].token_ids == []


# ---------------------------------------------------------------- options that exclude every token

def only_token(llm, text: str) -> list[int]:
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    assert len(ids) == 1
    return ids


def test_bad_words_that_ban_the_only_allowed_token_after_itself_fail_as_an_invalid_request(llm, bystander_ids):
    params = SamplingParams(max_tokens=8, temperature=0.0, allowed_token_ids=only_token(llm, "q"), bad_words=["qq"])

    victim, bystanders = run_batch(llm, params)

    assert victim.outputs[0].text == "q"  # a second "q" would spell the bad word
    assert_failed_alone(llm, victim, bystanders, bystander_ids,
                        "no token satisfies all of this request's constraints at output token 1: allowed_token_ids, "
                        "bad_words exclude every token together", kind="invalid_request")


def test_a_sampled_request_with_no_allowed_token_fails_too(llm, bystander_ids):
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=3, allowed_token_ids=only_token(llm, "q"),
                            bad_words=["qq"])

    victim, bystanders = run_batch(llm, params)

    assert_failed_alone(llm, victim, bystanders, bystander_ids, "allowed_token_ids, bad_words exclude every token",
                        kind="invalid_request")


@pytest.mark.parametrize("options,message", [
    (dict(min_tokens=3), "min_tokens=3 forbids the stop tokens"),
    (dict(min_tokens=1, stop_token_ids=["q"]), "min_tokens=1 forbids the stop tokens"),
    (dict(bad_words=["q"]), "bad_words ban every token that allowed_token_ids allows"),
])
def test_options_that_exclude_every_first_token_are_rejected_when_added(llm, options, message):
    q = only_token(llm, "q")
    allowed = q if "stop_token_ids" in options or "bad_words" in options else [llm.engine.core.eos_token_id]
    if "stop_token_ids" in options:
        options["stop_token_ids"] = q

    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("refused", VICTIM_PROMPT,
                               SamplingParams(max_tokens=8, allowed_token_ids=allowed, **options))

    assert_no_leaks(llm)
