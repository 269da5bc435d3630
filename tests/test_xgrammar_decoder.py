"""The ``xgrammar`` guided decoder: real xgrammar, a real byte-level BPE tokenizer.

Termination, as these tests pin it down: once the constraint is complete the
bitmask allows only the stop token (EOS); ``is_terminated()`` turns true when
EOS itself is accepted, and rolling EOS back un-terminates the matcher.
"""
import functools
import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import tokenmill
from tokenmill import StructuredOutputsParams, UnsupportedStructuredOutput
from tokenmill.plugins.structured.xgrammar_decoder import (MAX_SCHEMA_DEPTH, MAX_STRING_LENGTH, XGrammarDecoder,
                                                            apply_token_bitmask)
from tokenmill.structured import allocate_token_bitmask, bitmask_to_bool

CORPUS = ['{"name": "yes", "age": 12, "tags": ["a", "b"], "active": true, "kind": null}',
          "yes no maybe", "abc-123 (42) x yz", '[{"type": "cat"}, {"type": "dog", "size": 3}]']


# ---------------------------------------------------------------- builders


@functools.cache
def make_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (all 256 bytes + merges) with ``<eos>`` = id 0."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


@functools.cache
def make_decoder(extra_vocab: int = 0) -> XGrammarDecoder:
    tokenizer = make_tokenizer()
    return XGrammarDecoder(tokenizer, len(tokenizer) + extra_vocab)


def make_grammar(**spec):
    return make_decoder().compile(StructuredOutputsParams(**spec))


def eos() -> int:
    return make_tokenizer().eos_token_id


def encode(text: str) -> list[int]:
    return make_tokenizer().encode(text)


def byte_tokens(raw: bytes) -> list[int]:
    """The single-byte token ids spelling ``raw`` (which need not be valid UTF-8), GPT-2's byte map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    to_char = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    vocab = make_tokenizer().get_vocab()
    return [vocab[to_char[b]] for b in raw]


INVALID_UTF8 = {"surrogate": b"\xed\xb9\x8b", "overlong-3": b"\xe0\x8e\x80", "overlong-4": b"\xf0\x83\x9d\x95"}


def token_text(token_id: int) -> str:
    return make_tokenizer().decode([token_id])


def allowed(grammar) -> list[int]:
    """The token ids the grammar's bitmask allows next."""
    vocab_size = make_decoder().vocab_size
    bitmask = allocate_token_bitmask(1, vocab_size)
    grammar.fill_bitmask(bitmask, 0)
    return bitmask_to_bool(bitmask, vocab_size)[0].nonzero().flatten().tolist()


def walk(grammar, pick, max_steps: int = 600) -> str:
    """Generate under the bitmask with ``pick(allowed ids)`` until EOS is accepted."""
    generated = []
    for _ in range(max_steps):
        token_id = pick(allowed(grammar))
        assert grammar.accept_tokens([token_id])
        if token_id == eos():
            assert grammar.is_terminated()
            return make_tokenizer().decode(generated)
        generated.append(token_id)
    raise AssertionError(f"no EOS after {max_steps} tokens: {make_tokenizer().decode(generated)!r}")


def random_pick(seed: int):
    return random.Random(seed).choice


def rejection(**spec) -> str:
    with pytest.raises(UnsupportedStructuredOutput) as info:
        make_grammar(**spec)
    return str(info.value)


# ---------------------------------------------------------------- registration and params


def test_registered_as_the_builtin_xgrammar_guided_decoder():
    assert tokenmill.Registry(entry_points=False).get("guided_decoder", "xgrammar") is XGrammarDecoder


def test_params_require_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])


def test_unsupported_structured_output_is_a_value_error():
    assert issubclass(UnsupportedStructuredOutput, ValueError)


# ---------------------------------------------------------------- choice: the matcher contract

CHOICES = ["yes", "no", "maybe"]


def test_choice_start_allows_exactly_the_tokens_that_begin_a_choice():
    expected = [i for i in range(len(make_tokenizer())) if i != eos() and token_text(i)
                and any(c.startswith(token_text(i)) for c in CHOICES)]
    assert allowed(make_grammar(choice=CHOICES)) == expected
    assert {token_text(i) for i in expected} >= {"y", "n", "m", "yes"}


def test_choice_completes_then_allows_only_eos_and_terminates_on_it():
    grammar = make_grammar(choice=CHOICES)
    assert grammar.accept_tokens(encode("maybe"))
    assert not grammar.is_terminated()
    assert allowed(grammar) == [eos()]
    assert grammar.accept_tokens([eos()])
    assert grammar.is_terminated()


def test_choice_that_prefixes_another_allows_eos_and_continuation():
    grammar = make_grammar(choice=["a", "ab"])
    assert grammar.accept_tokens(encode("a"))
    assert {token_text(i) for i in allowed(grammar) if i != eos()} == {"b"}
    assert eos() in allowed(grammar)


def test_choice_literals_are_escaped():
    # an escape followed by a hex digit ('"a', '\\b', '\ta') must not read that digit as part of the escape
    odd = ['say "hi"', "back\\slash", "tab\there", "naïve", 'x"a', "a\\b1", "\tab", '""7']
    for choice in odd:
        grammar = make_grammar(choice=odd)
        assert grammar.accept_tokens(encode(choice)), choice
        assert grammar.accept_tokens([eos()]) and grammar.is_terminated()
    assert not make_grammar(choice=['x"a']).accept_tokens(encode("x\u022a"))  # what a greedy \x22a would mean


def test_eos_is_not_allowed_before_the_choice_is_complete():
    grammar = make_grammar(choice=CHOICES)
    assert grammar.accept_tokens(encode("ma"))
    assert eos() not in allowed(grammar)
    assert not grammar.accept_tokens([eos()])
    assert not grammar.is_terminated()


def test_rejected_token_returns_false_and_leaves_the_state_unchanged():
    grammar = make_grammar(choice=CHOICES)
    before = allowed(grammar)
    assert not grammar.accept_tokens(encode("z"))
    assert allowed(grammar) == before
    assert grammar.accept_tokens(encode("no") + [eos()]) and grammar.is_terminated()


def test_accept_tokens_keeps_the_tokens_before_the_first_rejected_one():
    grammar, reference = make_grammar(choice=CHOICES), make_grammar(choice=CHOICES)
    assert not grammar.accept_tokens(encode("n") + encode("z") + encode("o"))
    assert reference.accept_tokens(encode("n"))
    assert allowed(grammar) == allowed(reference)


def test_rollback_restores_the_previous_bitmask():
    grammar = make_grammar(choice=CHOICES)
    assert grammar.accept_tokens(encode("m"))
    before = allowed(grammar)
    tokens = [t for c in "aybe" for t in encode(c)] + [eos()]
    assert grammar.accept_tokens(tokens) and grammar.is_terminated()
    grammar.rollback(len(tokens))
    assert not grammar.is_terminated()
    assert allowed(grammar) == before


def test_rolling_back_eos_unterminates():
    grammar = make_grammar(choice=CHOICES)
    assert grammar.accept_tokens(encode("yes") + [eos()])
    grammar.rollback(1)
    assert not grammar.is_terminated()
    assert allowed(grammar) == [eos()]


def test_rollback_beyond_the_accepted_tokens_is_an_error():
    grammar = make_grammar(choice=CHOICES)
    assert grammar.accept_tokens(encode("no"))
    with pytest.raises(ValueError, match="rollback"):
        grammar.rollback(len(encode("no")) + 1)
    grammar.rollback(0)
    assert allowed(grammar) == [eos()]


def test_terminated_matcher_accepts_nothing_and_allows_only_eos():
    grammar = make_grammar(choice=CHOICES)
    assert grammar.accept_tokens(encode("yes") + [eos()])
    assert not grammar.accept_tokens(encode("y"))
    assert not grammar.accept_tokens([eos()])
    assert allowed(grammar) == [eos()]


def test_matchers_from_one_spec_are_independent():
    first, second = make_grammar(choice=CHOICES), make_grammar(choice=CHOICES)
    assert first.accept_tokens(encode("yes"))
    assert allowed(second) == allowed(make_grammar(choice=CHOICES))


def test_padded_vocab_tokens_are_never_allowed():
    decoder = make_decoder(extra_vocab=40)
    grammar = decoder.compile(StructuredOutputsParams(json_object=True))
    bitmask = allocate_token_bitmask(1, decoder.vocab_size)
    assert bitmask.shape == (1, (len(make_tokenizer()) + 40 + 31) // 32)
    grammar.fill_bitmask(bitmask, 0)
    assert max(bitmask_to_bool(bitmask, decoder.vocab_size)[0].nonzero().flatten().tolist()) < len(make_tokenizer())


# ---------------------------------------------------------------- json, regex, grammar

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "active": {"type": "boolean"},
        "kind": {"anyOf": [{"$ref": "#/$defs/kind"}, {"type": "null"}]},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
    "$defs": {"kind": {"type": "string", "enum": ["cat", "dog"]}},
}
PETS = {  # a discriminated union, pydantic style
    "type": "array", "maxItems": 3,
    "items": {"oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"}]},
    "$defs": {
        "cat": {"type": "object", "properties": {"type": {"const": "cat"}, "lives": {"type": "integer",
                "minimum": 1, "maximum": 9}}, "required": ["type", "lives"]},
        "dog": {"type": "object", "properties": {"type": {"const": "dog"}, "size": {"type": "integer",
                "minimum": 1, "maximum": 3}}, "required": ["type"]},
    },
}


@pytest.mark.parametrize("schema", [PERSON, PETS], ids=["person", "pets"])
def test_random_walks_under_a_json_schema_parse_and_validate(schema):
    for seed in range(6):
        text = walk(make_grammar(json=schema), random_pick(seed))
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("min_length, max_length", [(0, 3), (2, 300), (130, None)])
def test_string_lengths_are_exact_and_never_admit_raw_control_characters(min_length, max_length):
    schema = {"type": "string", "minLength": min_length}
    schema |= {} if max_length is None else {"maxLength": max_length}
    edges = {0, min_length - 1, min_length, 129, 200, (max_length or 0) + 1, max_length or 400}
    for length in sorted(n for n in edges if n >= 0):
        fits = length >= min_length and (max_length is None or length <= max_length)
        document = json.dumps("é" * length, ensure_ascii=False)
        assert make_grammar(json=schema).accept_tokens(encode(document) + [eos()]) == fits, length
    grammar = make_grammar(json=schema)
    assert grammar.accept_tokens(encode('"' + "a" * min_length))
    assert not grammar.accept_tokens(encode("\x05")) and not grammar.accept_tokens(encode("\n"))


@pytest.mark.parametrize("raw", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_strings_with_a_length_or_dot_pattern_never_admit_invalid_utf8(raw):
    for schema in ({"type": "string", "maxLength": 5}, {"type": "string", "pattern": "^a.+$"}):
        assert not make_grammar(json=schema).accept_tokens(encode('"a') + byte_tokens(raw)), schema
        valid = encode('"a') + byte_tokens("é".encode()) + encode('"') + [eos()]
        assert make_grammar(json=schema).accept_tokens(valid), schema


def test_json_schema_may_be_given_as_text():
    text = walk(make_grammar(json=json.dumps(PERSON)), random_pick(0))
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_accepts_a_json_document_and_rejects_other_text():
    grammar = make_grammar(json_object=True)
    assert not grammar.accept_tokens(encode("x"))
    assert grammar.accept_tokens(encode(CORPUS[0]) + [eos()])
    assert grammar.is_terminated()


REGEX = r"[a-c]{2}-\d{3}(x|yz)?"


@pytest.mark.parametrize("pick", [min, random_pick(1), random_pick(2)], ids=["lowest", "random1", "random2"])
def test_walks_under_a_regex_fullmatch_it(pick):
    assert re.fullmatch(REGEX, walk(make_grammar(regex=REGEX), pick))


def test_regex_dot_does_not_match_a_newline():
    grammar = make_grammar(regex="a.b")
    assert grammar.accept_tokens(encode("a"))
    assert "\n" not in {token_text(i) for i in allowed(grammar)}
    assert " " in {token_text(i) for i in allowed(grammar)}


@pytest.mark.parametrize("regex", ["a.b", "a[^x]b"])
def test_regex_any_character_admits_no_surrogate(regex):
    assert not make_grammar(regex=regex).accept_tokens(encode("a") + byte_tokens(INVALID_UTF8["surrogate"]))
    assert make_grammar(regex=regex).accept_tokens(encode("a") + byte_tokens("é".encode()) + encode("b") + [eos()])


def test_ebnf_grammar_is_enforced():
    grammar = 'root ::= "(" digits ")"\ndigits ::= [0-9]+'
    assert re.fullmatch(r"\(\d+\)", walk(make_grammar(grammar=grammar), random_pick(3)))
    matcher = make_grammar(grammar=grammar)
    assert matcher.accept_tokens(encode("(42)") + [eos()]) and matcher.is_terminated()


# ---------------------------------------------------------------- rejections


def nested(depth: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("schema, words", [
    ("{not json", ["valid JSON"]),
    ('{"type": NaN}', ["valid JSON"]),
    ("[1, 2]", ["JSON object or boolean", "list"]),
    ({"type": "objekt"}, ["type", "objekt"]),
    (nested(MAX_SCHEMA_DEPTH + 1), ["deeper", str(MAX_SCHEMA_DEPTH)]),
    ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, ["patternProperties", "not enforced"]),
    ({"type": "object", "propertyNames": {"maxLength": 2}}, ["propertyNames"]),
    ({"if": {"type": "string"}, "then": {"minLength": 2}, "else": {"type": "integer"}}, ["'if'"]),
    ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, ["dependentSchemas"]),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, ["dependentRequired"]),
    ({"type": "string", "not": {"const": "x"}}, ["'not'"]),
    ({"type": "array", "uniqueItems": True}, ["uniqueItems"]),
    ({"type": "array", "contains": {"const": 3}}, ["contains"]),
    ({"$defs": {"x": {"$dynamicAnchor": "x"}}, "$dynamicRef": "#x"}, ["$dynamicRef"]),
    ({"type": "string", "contentEncoding": "base64"}, ["contentEncoding"]),
    ({"type": "array", "items": {"type": "integer"}, "additionalItems": False}, ["additionalItems"]),
    ({"type": "array", "items": [{"type": "integer"}]}, ["items", "prefixItems"]),
    ({"type": "number", "multipleOf": 0.5}, ["multipleOf", "number"]),
    ({"type": "integer", "multipleOf": 1.5}, ["multipleOf", "whole number"]),
    ({"type": "string", "format": "idn-email"}, ["format", "idn-email", "not enforced"]),
    ({"type": "integer", "format": "int32"}, ["format", "int32"]),
    ({"type": "string", "pattern": "a+", "minLength": 3}, ["pattern", "minLength"]),
    ({"type": "string", "format": "date", "maxLength": 3}, ["format", "maxLength"]),
    ({"type": "string", "format": "date", "pattern": "^2"}, ["format", "pattern"]),
    ({"type": "string", "pattern": "(?=a)\\w"}, ["lookaround"]),
    ({"type": "string", "pattern": "a$b"}, ["anchor", "$"]),
    ({"type": "string", "pattern": "^[^x]{0,200}$"}, ["{0,200}", "128"]),
    ({"type": "string", "format": "json-pointer"}, ["json-pointer"]),
    ({"type": "string", "format": "ipv4"}, ["ipv4"]),
    ({"type": "string", "pattern": "[]a]"}, ["starts with ']'"]),
    ({"type": "string", "maxLength": MAX_STRING_LENGTH + 1}, ["maxLength", str(MAX_STRING_LENGTH)]),
    ({"type": "string", "minLength": 3, "maxLength": 2}, ["maxLength 2 < minLength 3"]),
    ({"minimum": 3}, ["minimum", "type"]),
    ({"type": "string", "anyOf": [{"minLength": 2}, {"maxLength": 0}]}, ["type", "anyOf", "ignored"]),
    ({"$ref": "#/$defs/x", "minLength": 3, "$defs": {"x": {"type": "string"}}}, ["minLength", "$ref"]),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, ["oneOf", "disjoint"]),
    ({"oneOf": [{"type": "string", "minLength": 1}, {"type": "string", "maxLength": 3}]}, ["oneOf", "disjoint"]),
    ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, ["allOf", "2 subschemas"]),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, ["required", "'b'", "properties"]),
    ({"$ref": "http://example.com/s.json"}, ["$ref", "local"]),
    ({"$ref": "#/$defs/missing"}, ["$ref", "does not resolve"]),
    ({"type": "integer", "enum": [1, "a"]}, ["enum", "'a'", "integer"]),
    ({"const": "c", "enum": ["a", "b"]}, ["const", "enum"]),
    ({"enum": []}, ["enum", "non-empty"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 2}, ["minProperties"]),
])
def test_json_schemas_xgrammar_cannot_enforce_are_rejected(schema, words):
    message = rejection(json=schema)
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("spec, words", [
    ({"regex": "(a"}, ["cannot compile the regex", "parenthesis"]),
    ({"regex": "(?=a)b"}, ["lookaround"]),
    ({"regex": "a\\qb"}, ["escape", "\\q"]),
    ({"regex": "a^b"}, ["anchor", "^"]),
    ({"grammar": "root ::= foo"}, ["cannot compile the grammar", "foo"]),
    ({"grammar": 'start ::= "a"'}, ["cannot compile the grammar", "root"]),
    ({"grammar": 42}, ["grammar must be an EBNF string"]),
    ({"choice": []}, ["choice", "at least one"]),
    ({"choice": ["yes", ""]}, ["choice", "non-empty", "index 1"]),
])
def test_other_specs_xgrammar_cannot_enforce_are_rejected(spec, words):
    message = rejection(**spec)
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("schema", [
    True,
    {"type": "object"},
    {"type": ["string", "null"], "maxLength": 3},
    {"properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"items": {"type": "integer"}, "minItems": 1},
    {"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "string"}, "uniqueItems": False},
    {"type": "string", "const": "x", "enum": ["x", "y"], "title": "X", "description": "d"},
    {"oneOf": [{"type": "string"}, {"type": "integer"}, {"const": None}]},
    {"allOf": [{"$ref": "#/$defs/a"}], "description": "pydantic v1 style", "$defs": {"a": {"type": "integer"}}},
    {"type": "object", "properties": {"child": {"$ref": "#"}}},
    {"type": "integer", "multipleOf": 3, "exclusiveMinimum": 0},
    {"type": "string", "pattern": "^[a-z]+$", "x-vendor": 1},
])
def test_schemas_within_the_enforced_subset_compile(schema):
    make_grammar(json=schema)


# ---------------------------------------------------------------- the compile cache


def test_equal_specs_share_one_compiled_grammar():
    decoder = make_decoder()
    first = decoder.compiled_grammar(StructuredOutputsParams(json=dict(PERSON)))
    assert decoder.compiled_grammar(StructuredOutputsParams(json=json.loads(json.dumps(PERSON)))) is first
    assert decoder.compiled_grammar(StructuredOutputsParams(json=PETS)) is not first


def test_rejected_specs_are_not_cached():
    decoder = XGrammarDecoder(make_tokenizer(), len(make_tokenizer()))
    for _ in range(2):
        with pytest.raises(UnsupportedStructuredOutput):
            decoder.compile(StructuredOutputsParams(regex="(a"))
    assert len(decoder._cache) == 0


def test_cache_evicts_the_least_recently_used_grammar():
    decoder = XGrammarDecoder(make_tokenizer(), len(make_tokenizer()))
    decoder.max_cached_grammars = 2
    a, b, c = (StructuredOutputsParams(regex=r) for r in ("a+", "b+", "c+"))
    first_a = decoder.compiled_grammar(a)
    decoder.compiled_grammar(b)
    assert decoder.compiled_grammar(a) is first_a  # a is now the most recent
    decoder.compiled_grammar(c)  # evicts b
    assert decoder.compiled_grammar(a) is first_a
    assert set(decoder._cache) == {a.cache_key(), c.cache_key()}


def test_concurrent_compiles_from_a_thread_pool():
    decoder = XGrammarDecoder(make_tokenizer(), len(make_tokenizer()))
    specs = [StructuredOutputsParams(choice=[f"opt{i}", "no"]) for i in range(4)] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        grammars = list(pool.map(decoder.compile, specs))
    compiled = {spec.cache_key(): decoder.compiled_grammar(spec) for spec in specs}
    assert len(compiled) == 4
    for spec, grammar in zip(specs, grammars):
        assert grammar.accept_tokens(encode(spec.choice[0]) + [eos()]) and grammar.is_terminated()


# ---------------------------------------------------------------- applying the bitmask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_token_bitmask_masks_exactly_the_disallowed_logits(dtype):
    vocab_size = make_decoder().vocab_size
    bitmask = allocate_token_bitmask(2, vocab_size)
    make_grammar(choice=CHOICES).fill_bitmask(bitmask, 0)
    logits = torch.randn(2, vocab_size).to(dtype)
    expected = logits.clone()
    expected[0, ~bitmask_to_bool(bitmask, vocab_size)[0]] = float("-inf")
    apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)


def test_apply_token_bitmask_only_touches_the_given_rows():
    vocab_size = make_decoder().vocab_size
    bitmask = torch.zeros(2, (vocab_size + 31) // 32, dtype=torch.int32)
    logits = torch.zeros(2, vocab_size)
    apply_token_bitmask(logits, bitmask, indices=[1])
    assert torch.isfinite(logits[0]).all() and torch.isinf(logits[1]).all()


def test_apply_token_bitmask_rejects_a_bitmask_of_the_wrong_width():
    with pytest.raises(ValueError, match="bitmask must be int32"):
        apply_token_bitmask(torch.zeros(1, 100), torch.zeros(1, 3, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_token_bitmask_on_cuda_matches_cpu():
    vocab_size = make_decoder().vocab_size
    bitmask = allocate_token_bitmask(1, vocab_size)
    make_grammar(choice=CHOICES).fill_bitmask(bitmask, 0)
    logits = torch.randn(1, vocab_size)
    on_gpu = logits.cuda()
    apply_token_bitmask(logits, bitmask)
    apply_token_bitmask(on_gpu, bitmask)  # the CPU bitmask is copied to the device
    assert torch.equal(on_gpu.cpu(), logits)
