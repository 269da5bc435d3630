"""Structured outputs through the engine: xgrammar-guided requests checked by what they
promise (jsonschema for schemas, ``re.fullmatch`` for regexes, membership for choices,
a recursive-descent parser for an EBNF grammar).

Most tests run a tiny random Llama with a byte-level BPE tokenizer: its output is noise,
so only the grammar keeps it valid, and a wrong mask row or a matcher that falls behind
shows up at once. The schemas are bounded (maxLength, maxItems, enums) so that the
random model reaches the end of its grammar: every guided request must finish with
finish reason "stop". The tests marked ``slow`` run the default model (one load per module).
"""
from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest

from builders import BYTE_LEVEL_EOS_TOKEN_ID, assert_no_leaks, hf_greedy_loop, make_byte_level_checkpoint, make_llm
from tokenmill import StructuredOutputsParams
from tokenmill.config import DEFAULT_MODEL
from tokenmill.llm import LLM
from tokenmill.request import RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured import allocate_token_bitmask, apply_token_bitmask

pytestmark = pytest.mark.timeout(300)

# room for the random model's whitespace (xgrammar allows any JSON whitespace) and no preemption
ENGINE = dict(max_model_len=384, num_gpu_blocks_override=512, max_num_seqs=32, max_num_batched_tokens=1024)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
MAX_TOKENS = 300
FREE_TOKENS = 24
# The random model's greedy output can loop on whitespace (xgrammar allows any between JSON tokens)
# and a free JSON document (json_object) has no length bound: the weights' seed, the prompts and
# the sampling seeds are ones with which every guided request of the batches ends within MAX_TOKENS.
MODEL_SEED = 2
SEED = 0

# ---------------------------------------------------------------- the constraints and their checks

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
COLORS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}
CITY = {"type": "object",
        "properties": {"city": {"type": "object",
                                "properties": {"name": {"type": "string", "maxLength": 6},
                                               "population": {"type": "integer", "minimum": 0,
                                                              "maximum": 1000000}},
                                "required": ["name", "population"], "additionalProperties": False},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
        "required": ["city", "tags"], "additionalProperties": False}
NUMBERS = {"type": "object",
           "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                          "n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9},
                          "ok": {"type": "boolean"},
                          "kind": {"enum": ["a", "b", None]}},
           "required": ["x", "n", "ok", "kind"], "additionalProperties": False}
ID_REGEX = r"[a-z]{2,5}-\d{1,3}"
EMAIL_REGEX = r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)"
CHOICES = ["yes", "no", "maybe", "red green"]
ARITHMETIC = """
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= [0-9]{1,3} | "(" expr ")"
"""


def parse_arithmetic(text: str) -> bool:
    """Whether ``text`` is a whole ``expr`` of ARITHMETIC (recursive descent)."""
    pos = 0

    def operands(operand, operators: str, max_more: int) -> bool:
        nonlocal pos
        if not operand():
            return False
        for _ in range(max_more):
            if pos == len(text) or text[pos] not in operators:
                break
            pos += 1
            if not operand():
                return False
        return True

    def expr() -> bool:
        return operands(term, "+-", 3)

    def term() -> bool:
        return operands(factor, "*/", 2)

    def factor() -> bool:
        nonlocal pos
        if text.startswith("(", pos):
            pos += 1
            if not expr() or not text.startswith(")", pos):
                return False
            pos += 1
            return True
        digits = re.compile(r"[0-9]{1,3}").match(text, pos)
        if digits is None:
            return False
        pos = digits.end()
        return True

    return expr() and pos == len(text)


def test_the_arithmetic_parser_itself():
    assert all(map(parse_arithmetic, ["7", "12+3*4", "(1+2)*3/456", "((1))", "1+2+3+4", "1*2*3"]))
    assert not any(map(parse_arithmetic, ["", "1+", "(1", "1234", "1+2+3+4+5", "1*2*3*4", "a", "1 + 2"]))


def schema_check(schema):
    def check(text: str) -> None:
        jsonschema.validate(json.loads(text), schema)
    return check


def json_document_check(text: str) -> None:
    # xgrammar's builtin JSON grammar (what json_object compiles to) admits an object or an array
    assert isinstance(json.loads(text), (dict, list)), text


def regex_check(regex: str):
    def check(text: str) -> None:
        assert re.fullmatch(regex, text), (regex, text)
    return check


def choice_check(text: str) -> None:
    assert text in CHOICES, text


def grammar_check(text: str) -> None:
    assert parse_arithmetic(text), text


# name -> (the spec, a check of the output text)
CASES = {
    "object": (dict(json=PERSON), schema_check(PERSON)),
    "array-of-enums": (dict(json=COLORS), schema_check(COLORS)),
    "nested": (dict(json=CITY), schema_check(CITY)),
    "numbers-with-bounds": (dict(json=json.dumps(NUMBERS)), schema_check(NUMBERS)),  # a schema given as text
    "json-object": (dict(json_object=True), json_document_check),
    "regex": (dict(regex=ID_REGEX), regex_check(ID_REGEX)),
    "regex-alternation": (dict(regex=EMAIL_REGEX), regex_check(EMAIL_REGEX)),
    "choice": (dict(choice=CHOICES), choice_check),
    "ebnf-arithmetic": (dict(grammar=ARITHMETIC), grammar_check),
}
PROMPTS = ["[1, 2, 3]", "abc-123", "cat dog"]
FREE_PROMPTS = ["red green blue yes", "[1, 2, 3] abc-123"]


def guided(case: str, sampling: str, index: int = 0, **options) -> SamplingParams:
    spec, _ = CASES[case]
    sampling_options = dict(temperature=0.0) if sampling == "greedy" else dict(temperature=1.0, seed=SEED + index)
    return SamplingParams(max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(**spec),
                          **{**sampling_options, **options})


def free(sampling: str, index: int = 0) -> SamplingParams:
    sampling_options = dict(temperature=0.0) if sampling == "greedy" else dict(temperature=1.0, seed=200 + index)
    return SamplingParams(max_tokens=FREE_TOKENS, ignore_eos=True, **sampling_options)


def batch(sampling: str) -> tuple[list[str], list[SamplingParams], list[str | None]]:
    """Every case on every prompt, with the unconstrained requests in the middle of the batch:
    (prompts, params, the case of each request or None)."""
    prompts, params, cases = [], [], []
    for i, (case, prompt) in enumerate((c, p) for c in CASES for p in PROMPTS):
        prompts.append(prompt)
        params.append(guided(case, sampling, i))
        cases.append(case)
        if i == len(CASES):  # the free ones sit between guided ones
            for j, free_prompt in enumerate(FREE_PROMPTS):
                prompts.append(free_prompt)
                params.append(free(sampling, j))
                cases.append(None)
    return prompts, params, cases


def assert_valid(case: str, completion) -> None:
    assert completion.finish_reason == "stop", (case, completion.finish_reason, completion.text)
    CASES[case][1](completion.text)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """(checkpoint directory, its transformers model)."""
    path = tmp_path_factory.mktemp("byte-llama")
    return path, make_byte_level_checkpoint(path, seed=MODEL_SEED)


@pytest.fixture(scope="module")
def llm(byte_model):
    return make_llm(byte_model[0], **ENGINE)


@pytest.fixture(scope="module")
def batch_outputs(llm):
    """sampling ("greedy" or "seeded") -> (cases, outputs) of one mixed batch, run once."""
    runs = {}

    def run(sampling: str):
        if sampling not in runs:
            prompts, params, cases = batch(sampling)
            runs[sampling] = cases, llm.generate(prompts, params, use_tqdm=False)
            assert_no_leaks(llm)
        return runs[sampling]
    return run


# ---------------------------------------------------------------- valid outputs, mixed batches

@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
@pytest.mark.parametrize("case", list(CASES))
def test_guided_outputs_are_valid_and_finish_when_the_grammar_completes(batch_outputs, case, sampling):
    cases, outputs = batch_outputs(sampling)

    mine = [o.outputs[0] for c, o in zip(cases, outputs) if c == case]
    assert len(mine) == len(PROMPTS)
    for completion in mine:
        assert_valid(case, completion)
        assert completion.token_ids[-1] == BYTE_LEVEL_EOS_TOKEN_ID  # the grammar ends on EOS
        assert "<eos>" not in completion.text


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_unconstrained_requests_batched_with_guided_ones_are_unchanged(llm, batch_outputs, sampling):
    cases, outputs = batch_outputs(sampling)
    batched = [o.outputs[0].token_ids for c, o in zip(cases, outputs) if c is None]

    alone = [llm.generate(p, free(sampling, j), use_tqdm=False)[0].outputs[0].token_ids
             for j, p in enumerate(FREE_PROMPTS)]

    assert batched == alone and all(len(ids) == FREE_TOKENS for ids in alone)
    assert_no_leaks(llm)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_guided_outputs_do_not_depend_on_the_batch(llm, batch_outputs, sampling):
    """Each guided request alone gives what it gave in the mixed batch (seeded ones too:
    a seeded request draws from its own generator)."""
    cases, outputs = batch_outputs(sampling)
    prompts, params, _ = batch(sampling)

    for i in (0, 7, 13, len(prompts) - 1):
        assert llm.generate(prompts[i], params[i], use_tqdm=False)[0].outputs[0].token_ids == \
            outputs[i].outputs[0].token_ids, cases[i]
    assert_no_leaks(llm)


@pytest.mark.parametrize("case", ["object", "regex", "ebnf-arithmetic"])
def test_greedy_guided_tokens_are_transformers_greedy_under_the_same_mask(llm, byte_model, case):
    """The engine masks the right logits row with the right bitmask: a transformers greedy loop,
    masked by a fresh matcher of the same spec (plain torch masking), picks the same tokens."""
    prompt = PROMPTS[1]
    ours = llm.generate(prompt, guided(case, "greedy"), use_tqdm=False)[0].outputs[0].token_ids
    decoder = llm.engine.core.structured.decoder
    matcher = decoder.compile(StructuredOutputsParams(**CASES[case][0]))
    vocab_size = llm.engine.core.vocab_size

    def mask(output_ids, logits):
        if output_ids:
            assert matcher.accept_tokens(output_ids[-1:])
        bitmask = allocate_token_bitmask(1, vocab_size)
        matcher.fill_bitmask(bitmask, 0)
        apply_token_bitmask(logits[None], bitmask)

    prompt_ids = llm.get_tokenizer().encode(prompt)
    reference = hf_greedy_loop(byte_model[1], prompt_ids, len(ours), mask)

    assert ours == reference
    assert matcher.accept_tokens(reference[-1:]) and matcher.is_terminated()


def test_padded_vocabulary_ids_are_never_sampled(llm, batch_outputs):
    """The model's logits are wider than the tokenizer; the grammar never allows the padding."""
    tokenizer_size = len(llm.get_tokenizer())
    assert llm.engine.core.vocab_size > tokenizer_size
    for sampling in ("greedy", "seeded"):
        cases, outputs = batch_outputs(sampling)
        assert all(t < tokenizer_size for c, o in zip(cases, outputs) if c for t in o.outputs[0].token_ids)


def test_n_2_gives_two_valid_completions(llm):
    params = guided("object", "seeded", n=2)

    [output] = llm.generate(PROMPTS[0], params, use_tqdm=False)

    assert [c.index for c in output.outputs] == [0, 1]
    for completion in output.outputs:
        assert_valid("object", completion)
    assert output.outputs[0].token_ids != output.outputs[1].token_ids  # two draws, not one twice
    assert_no_leaks(llm)


def test_guided_requests_survive_preemption_and_chunked_prefill(byte_model, batch_outputs):
    """A small KV cache (preemption: the matcher keeps its state while the KV is recomputed) and
    a small token budget (prompts prefilled in chunks: no bitmask row until the prompt is done)."""
    cases, outputs = batch_outputs("greedy")
    prompts, params, _ = batch("greedy")
    tight = make_llm(byte_model[0], **{**ENGINE, "num_gpu_blocks_override": 26, "max_num_batched_tokens": 24,
                                       "max_num_seqs": 8})
    long_prefix = "abc-123 hello world " * 6  # 120 bytes: several chunks of 24 tokens

    again = tight.generate(prompts, params, use_tqdm=False)
    chunked = tight.generate(long_prefix + PROMPTS[0], guided("nested", "greedy"), use_tqdm=False)

    assert tight.get_stats()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outputs]
    assert_valid("nested", chunked[0].outputs[0])
    assert_no_leaks(tight)


# ---------------------------------------------------------------- speculative decoding

@pytest.fixture(scope="module")
def spec_llm(byte_model):
    return make_llm(byte_model[0], **ENGINE, speculative_config=NGRAM)


def test_ngram_spec_decode_keeps_greedy_outputs_identical(spec_llm, batch_outputs):
    cases, plain = batch_outputs("greedy")
    prompts, params, _ = batch("greedy")

    spec = spec_llm.generate(prompts, params, use_tqdm=False)

    stats = spec_llm.get_stats()
    assert stats["spec_num_draft_tokens"] > 0 and stats["spec_num_accepted_tokens"] > 0
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    for case, output in zip(cases, spec):
        if case is not None:
            assert_valid(case, output.outputs[0])
    assert_no_leaks(spec_llm)


def test_ngram_spec_decode_seeded_outputs_are_valid(spec_llm):
    prompts, params, cases = batch("seeded")

    outputs = spec_llm.generate(prompts, params, use_tqdm=False)

    assert spec_llm.get_stats()["spec_num_draft_tokens"] > 0
    for case, output in zip(cases, outputs):
        if case is not None:
            assert_valid(case, output.outputs[0])
    assert_no_leaks(spec_llm)


def test_drafts_the_grammar_refuses_are_rejected(spec_llm, monkeypatch):
    """The prompt repeats text the grammar forbids after a point, so the ngram drafter proposes
    it: the bitmask walk refuses those drafts (the matcher is rolled back) and the output stays valid."""
    matcher_cls = type(spec_llm.engine.core.structured.decoder.compile(StructuredOutputsParams(choice=["x"])))
    refused = []
    accept_tokens = matcher_cls.accept_tokens

    def spying_accept_tokens(self, token_ids):
        accepted = accept_tokens(self, token_ids)
        if not accepted:
            refused.append(list(token_ids))
        return accepted

    monkeypatch.setattr(matcher_cls, "accept_tokens", spying_accept_tokens)
    prompt = "maybe-maybe-maybe-maybe-maybe-maybe-maybe"

    outputs = spec_llm.generate([prompt] * 2, [guided("regex", "greedy"), guided("choice", "greedy")],
                                use_tqdm=False)

    assert refused  # drafts the grammar did not allow were proposed and refused
    assert_valid("regex", outputs[0].outputs[0])
    assert_valid("choice", outputs[1].outputs[0])
    assert_no_leaks(spec_llm)


# ---------------------------------------------------------------- bad specs

def nested_arrays(depth: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


BAD_SPECS = [  # (id, spec, words the message must hold)
    ("invalid-schema", dict(json={"type": "objekt"}), ["type", "objekt"]),
    ("schema-not-json", dict(json='{"type": "object",'), ["not a valid JSON document"]),
    ("unsupported-keyword", dict(json={"type": "array", "uniqueItems": True}), ["uniqueItems", "not enforced"]),
    ("unsupported-format", dict(json={"type": "string", "format": "idn-email"}), ["idn-email", "not enforced"]),
    ("invalid-regex", dict(regex="foo**"), ["regex", "repetition"]),
    ("regex-lookaround", dict(regex="(?=a)b"), ["lookaround"]),
    ("catastrophic-repetition", dict(json={"type": "string", "pattern": "^(ab|c){0,5000}$"}), ["{0,5000}", "128"]),
    ("empty-choice", dict(choice=[]), ["choice", "at least one"]),
    ("empty-choice-string", dict(choice=["yes", ""]), ["choice", "non-empty"]),
    ("deep-nesting", dict(json=nested_arrays(40)), ["nested deeper", "32"]),
    ("bad-ebnf", dict(grammar="root ::= foo"), ["grammar", "foo"]),
]


@pytest.mark.parametrize("spec, words", [b[1:] for b in BAD_SPECS], ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_a_value_error_naming_the_problem_and_nothing_is_queued(llm, spec, words):
    params = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(**spec))
    good = SamplingParams(max_tokens=8, temperature=0.0, structured_outputs=StructuredOutputsParams(choice=["yes"]))

    with pytest.raises(ValueError) as raised:
        llm.generate([PROMPTS[0], PROMPTS[1]], [good, params], use_tqdm=False)  # the good one is added first

    message = str(raised.value)
    for word in words:
        assert word in message, (word, message)
    assert_no_leaks(llm)
    assert llm.engine.core.structured.num_pending == 0
    assert llm.engine.output_processor.num_unfinished() == 0
    assert llm.generate(PROMPTS[0], good, use_tqdm=False)[0].outputs[0].text == "yes"  # still serving
    assert_no_leaks(llm)


def test_bad_spec_raises_before_anything_runs(llm):
    """The check is synchronous: add_request raises, the engine never sees the request."""
    engine = llm.engine
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a{3,1}"))

    with pytest.raises(ValueError, match="regex"):
        engine.add_request("bad", PROMPTS[0], params)

    assert "bad" not in engine.core.scheduler.requests and not engine.has_unfinished_requests()
    engine.add_request("bad", PROMPTS[0], SamplingParams(max_tokens=2))  # the id was not taken
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(llm)


@pytest.mark.parametrize("regex", [r"(a+)+b", r"(x+x+)+y", r"(a|aa)*c"])
def test_backtracking_blowup_patterns_are_enforced_in_linear_time(llm, regex):
    """Patterns that are catastrophic for a backtracking matcher are plain automata to xgrammar:
    accepted, compiled and followed quickly."""
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=48,
                            structured_outputs=StructuredOutputsParams(regex=regex))
    began = time.monotonic()

    completion = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]

    assert time.monotonic() - began < 20
    if completion.finish_reason == "stop":
        assert re.fullmatch(regex, completion.text)
    else:  # ran out of tokens: a prefix of the language
        assert completion.finish_reason == "length" and re.fullmatch(regex[:-1], completion.text)
    assert_no_leaks(llm)


# ---------------------------------------------------------------- aborts and compile failures

def test_abort_while_waiting_for_grammar_leaves_nothing_behind(llm):
    engine = llm.engine
    spec = StructuredOutputsParams(json={**PERSON, "title": f"unique {time.time_ns()}"})  # not cached: compiles
    engine.add_request("waiting", PROMPTS[0], SamplingParams(max_tokens=8, structured_outputs=spec))
    assert engine.core.scheduler.requests["waiting"].status == RequestStatus.WAITING_FOR_GRAMMAR

    [final] = engine.abort_request(["waiting"])

    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.core.structured.num_pending == 0
    assert not engine.has_unfinished_requests()
    time.sleep(0.2)  # let the compile finish in the pool: nothing may come of it
    assert engine.step() == []
    assert_no_leaks(llm)
    assert llm.generate(PROMPTS[0], guided("choice", "greedy"), use_tqdm=False)[0].outputs[0].text in CHOICES


def test_a_grammar_that_fails_to_compile_after_validation_fails_its_request_saying_why(llm, monkeypatch):
    engine = llm.engine
    decoder = engine.core.structured.decoder

    def broken_compile(spec):
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(decoder, "compile", broken_compile)
    engine.add_request("doomed", PROMPTS[0], guided("choice", "greedy"))
    finals = []
    for _ in range(50):
        finals += [o for o in engine.step() if o.finished]
        if not engine.has_unfinished_requests():
            break
        time.sleep(0.01)
    monkeypatch.undo()
    leftover = engine.has_unfinished_requests()
    if leftover:
        engine.abort_request(["doomed"])  # leave the shared engine clean for the other tests

    assert not leftover
    assert [(o.request_id, o.outputs[0].finish_reason) for o in finals] == [("doomed", "error")]
    assert "the grammar failed to compile: compiler crashed" in finals[0].outputs[0].error.message


def test_options_that_leave_no_grammar_token_fail_the_request_naming_both(llm):
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(max_tokens=8, temperature=0.0, allowed_token_ids=tokenizer.encode("zzz"),
                            structured_outputs=StructuredOutputsParams(choice=["yes"]))

    completion = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]

    assert_no_leaks(llm)
    assert (completion.finish_reason, completion.token_ids) == ("error", [])
    assert completion.error.kind == "invalid_request"
    assert "structured_outputs (choice), allowed_token_ids exclude every token" in completion.error.message


def test_min_tokens_past_the_end_of_a_grammar_fails_where_the_grammar_ends(llm):
    params = SamplingParams(max_tokens=16, min_tokens=10, temperature=0.0,
                            structured_outputs=StructuredOutputsParams(regex="a"))

    completion = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]

    assert_no_leaks(llm)
    assert (completion.finish_reason, completion.text) == ("error", "a")
    assert "at output token 1: structured_outputs (regex), min_tokens=10 exclude every token" in \
        completion.error.message


# ---------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def default_llm():
    return LLM(DEFAULT_MODEL, max_model_len=512, num_gpu_blocks_override=128, max_num_seqs=16,
               max_num_batched_tokens=512)


DEFAULT_PERSON = {"type": "object",
                  "properties": {"name": {"type": "string", "maxLength": 24},
                                 "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                 "city": {"enum": ["Paris", "London", "Berlin", "Rome"]}},
                  "required": ["name", "age", "city"], "additionalProperties": False}
DEFAULT_CASES = [  # (question, spec, check)
    ("Describe a person who lives in Paris as JSON.", dict(json=DEFAULT_PERSON), schema_check(DEFAULT_PERSON)),
    ('Return {"ok": true} as JSON.', dict(json_object=True), json_document_check),
    ("What is the capital of Germany?", dict(choice=["Paris", "London", "Berlin", "Rome"]),
     lambda text: text in ("Paris", "London", "Berlin", "Rome")),
    ("What year did the Second World War end?", dict(regex=r"1[89]\d\d"), regex_check(r"1[89]\d\d")),
    ("Write a short arithmetic expression.", dict(grammar=ARITHMETIC), grammar_check),
]


def chat_prompt(llm, question: str) -> dict:
    return {"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": question}])}


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_default_model_guided_outputs_are_valid_and_free_ones_unchanged(default_llm, sampling):
    free_prompt = chat_prompt(default_llm, "Name three fruits.")
    free_params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0)
    prompts = [chat_prompt(default_llm, q) for q, _, _ in DEFAULT_CASES]
    sampling_options = dict(temperature=0.0) if sampling == "greedy" else dict(temperature=0.8, seed=5)
    params = [SamplingParams(max_tokens=48, structured_outputs=StructuredOutputsParams(**spec), **sampling_options)
              for _, spec, _ in DEFAULT_CASES]

    outputs = default_llm.generate(prompts[:2] + [free_prompt] + prompts[2:], params[:2] + [free_params] + params[2:],
                                   use_tqdm=False)

    free_output = outputs.pop(2).outputs[0]
    for (question, _, check), output in zip(DEFAULT_CASES, outputs):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", (question, completion.text)
        check(completion.text)
    alone = default_llm.generate(free_prompt, free_params, use_tqdm=False)[0].outputs[0]
    assert free_output.token_ids == alone.token_ids
    assert_no_leaks(default_llm)


@pytest.fixture(scope="module")
def default_spec_llm():
    return LLM(DEFAULT_MODEL, max_model_len=512, num_gpu_blocks_override=128, max_num_seqs=16,
               max_num_batched_tokens=512, speculative_config=NGRAM)


@pytest.mark.slow
def test_default_model_ngram_spec_decode_gives_the_same_valid_greedy_outputs(default_llm, default_spec_llm):
    prompts = [chat_prompt(default_llm, q) for q, _, _ in DEFAULT_CASES]
    params = [SamplingParams(max_tokens=48, temperature=0.0, structured_outputs=StructuredOutputsParams(**spec))
              for _, spec, _ in DEFAULT_CASES]

    plain = default_llm.generate(prompts, params, use_tqdm=False)
    spec = default_spec_llm.generate(prompts, params, use_tqdm=False)

    assert default_spec_llm.get_stats()["spec_num_accepted_tokens"] > 0
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    for (question, _, check), output in zip(DEFAULT_CASES, spec):
        assert output.outputs[0].finish_reason == "stop", question
        check(output.outputs[0].text)
    assert_no_leaks(default_spec_llm)
