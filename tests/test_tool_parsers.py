"""Tool-call and reasoning parsers: the built-ins on scripted model outputs, streamed and not, and the
registry and feature rows that make them selectable by name."""
import json
import os
import random
import subprocess
import sys

import pytest

from tokenmill import Registry
from tokenmill.components import REASONING_PARSER, TOOL_PARSER
from tokenmill.testing.conformance import CHECKS
from tokenmill.tool_parsing import (DeltaMessage, MarkupToolParser, Scan, ScannedCall, SplittingReasoningParser,
                                     ToolParser)

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"tz": "Europe/Paris", "nested": {"list": [1, 2.5, None, True], "quote": "a \"b\" </x> {c} [d] é 🙂"}}


def parser(name, kind=TOOL_PARSER, **options):
    return Registry(entry_points=False).create(kind, name, options, tokenizer=None)


def calls_of(result):
    return [(c.name, json.loads(c.arguments)) for c in result.tool_calls]


def stream(p, chunks, tools=None):
    """Feed chunks as the server will; the content and (name, arguments) the deltas add up to."""
    content, calls, previous = "", [], ""
    deltas = []
    for chunk in chunks:
        deltas.append(p.extract_streaming(previous, previous + chunk, chunk, tools))
        previous += chunk
    deltas.append(p.finish(previous, tools))
    for delta in filter(None, deltas):
        content += delta.content or ""
        for piece in delta.tool_calls:
            if piece.index == len(calls):
                assert piece.id.startswith("call_") and piece.name
                calls.append([piece.name, ""])
            calls[piece.index][1] += piece.arguments_delta
    return content or None, [(name, json.loads(args)) for name, args in calls]


def chunkings(text, seed=0):
    rng = random.Random(seed)
    yield [text]
    yield list(text)
    for size in (2, 3, 5, 7, 13):
        yield [text[i:i + size] for i in range(0, len(text), size)]
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 20))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def hermes_call(name, args):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


# (parser, output, expected content, expected calls)
CASES = [
    ("hermes", hermes_call("get_weather", WEATHER), None, [("get_weather", WEATHER)]),
    ("hermes", hermes_call("get_weather", WEATHER) + "\n" + hermes_call("get_time", TIME) + "\n", None,
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("hermes", "Let me check.\n" + hermes_call("get_weather", WEATHER) + "\nI asked for the weather.",
     "Let me check.\n\nI asked for the weather.", [("get_weather", WEATHER)]),
    ("hermes", 'Try <tool_call>{"name": "f", "arguments": {bad json}}</tool_call> then ' + hermes_call("g", {}),
     'Try <tool_call>{"name": "f", "arguments": {bad json}}</tool_call> then', [("g", {})]),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("hermes", 'Text <tool_call>{"name": "f", "arguments": {}}', 'Text <tool_call>{"name": "f", "arguments": {}}',
     []),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', None, [("f", {"x": 1})]),
    ("hermes", "a <tool_c b", "a <tool_c b", []),
    ("llama3_json", json.dumps({"name": "get_weather", "parameters": WEATHER}), None, [("get_weather", WEATHER)]),
    ("llama3_json", "<|python_tag|>" + json.dumps({"name": "get_weather", "parameters": WEATHER}) + "; "
     + json.dumps({"name": "get_time", "parameters": TIME}), None, [("get_weather", WEATHER), ("get_time", TIME)]),
    ("llama3_json", "I will look it up.<|python_tag|>" + json.dumps({"name": "f", "arguments": {"a": 1}}),
     "I will look it up.", [("f", {"a": 1})]),
    ("llama3_json", '  {"name": "f", "parameters": {"a": }', '  {"name": "f", "parameters": {"a": }', []),
    ("llama3_json", '{"city": "Paris"} is JSON, not a call', '{"city": "Paris"} is JSON, not a call', []),
    ("llama3_json", json.dumps({"name": "f", "parameters": {}}) + " and then some text",
     "and then some text", [("f", {})]),
    ("llama3_json", "The weather {is} nice", "The weather {is} nice", []),
    ("mistral", "[TOOL_CALLS]" + json.dumps([{"name": "get_weather", "arguments": WEATHER}]), None,
     [("get_weather", WEATHER)]),
    ("mistral", "[TOOL_CALLS] " + json.dumps([{"name": "get_weather", "arguments": WEATHER},
                                             {"name": "get_time", "arguments": TIME}]), None,
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("mistral", "Checking now. [TOOL_CALLS]" + json.dumps([{"name": "f", "arguments": {}}]) + " Done.",
     "Checking now.  Done.", [("f", {})]),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {bad}}]', '[TOOL_CALLS][{"name": "f", "arguments": {bad}}]',
     []),
    ("mistral", '[TOOL_CALLS][{"nom": "f"}] after', '[TOOL_CALLS][{"nom": "f"}] after', []),
    ("mistral", "A list [1, 2] and [TOOL", "A list [1, 2] and [TOOL", []),
]


@pytest.mark.parametrize("name, text, content, calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_extract_and_stream_scripted_outputs(name, text, content, calls):
    result = parser(name).extract(text, None)
    assert (result.content, calls_of(result)) == (content, calls)
    ids = [c.id for c in result.tool_calls]
    assert all(i.startswith("call_") and len(i) > 10 for i in ids) and len(set(ids)) == len(ids)
    assert all(isinstance(json.loads(c.arguments), dict) for c in result.tool_calls)
    for chunks in chunkings(text):
        assert stream(parser(name), chunks) == (content, calls), chunks


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_plain_text_is_content_unchanged_and_streams_as_it_comes(name):
    text = "Hello there,\n  the answer is 42 (a < b, [x], {y}).  \n"
    assert parser(name).extract(text).content == text
    p, got = parser(name), []
    for i in range(len(text)):
        got.append(p.extract_streaming(text[:i], text[:i + 1], text[i]))
    # nothing is held back but trailing whitespace, which may turn out to precede a call
    assert "".join(d.content for d in got if d) == text.rstrip()
    assert p.finish(text) == DeltaMessage(content=text[len(text.rstrip()):])


def test_a_call_is_streamed_when_its_markup_closes_and_content_before_it_first():
    p = parser("hermes")
    text = "Sure.\n" + hermes_call("get_weather", WEATHER)
    assert p.extract_streaming("", "Sure.\n<tool", "Sure.\n<tool") == DeltaMessage(content="Sure.")
    assert p.extract_streaming("Sure.\n<tool", text[:-1], text[len("Sure.\n<tool"):-1]) is None
    delta = p.extract_streaming(text[:-1], text, text[-1])
    [piece] = delta.tool_calls
    assert (piece.index, piece.name, json.loads(piece.arguments_delta)) == (0, "get_weather", WEATHER)
    assert delta.content is None and p.finish(text) is None


def test_unfinished_call_is_released_as_content_at_the_end_of_the_stream():
    p = parser("mistral")
    text = 'ok [TOOL_CALLS][{"name": "f", "argu'
    assert stream(p, list(text)) == (text, [])


THINK_CASES = [
    ({}, "<think>Let me think.\nStep 2.</think>\n\nThe answer is 4.", "Let me think.\nStep 2.", "\n\nThe answer is 4."),
    ({}, "The template opened it.</think>Answer.", "The template opened it.", "Answer."),
    ({}, "<think>cut off while thinking", "cut off while thinking", None),
    ({}, "no tags at all", "no tags at all", None),
    ({}, "<think></think>Just the answer", None, "Just the answer"),
    ({}, "a < b </thin k> c</think>d</think>e", "a < b </thin k> c", "d</think>e"),
    ({}, "<thi", "<thi", None),
    ({"starts_in_reasoning": False}, "no tags at all", None, "no tags at all"),
    ({"starts_in_reasoning": False}, "<think>why</think>because", "why", "because"),
    ({"starts_in_reasoning": False}, "<thi", None, "<thi"),
]


@pytest.mark.parametrize("options, text, reasoning, content", THINK_CASES)
def test_think_reasoning_parser_streamed_and_not(options, text, reasoning, content):
    assert parser("think", REASONING_PARSER, **options).extract(text) == (reasoning, content)
    for chunks in chunkings(text):
        p = parser("think", REASONING_PARSER, **options)
        deltas, previous = [], ""
        for chunk in chunks:
            deltas.append(p.extract_streaming(previous, previous + chunk, chunk))
            previous += chunk
        deltas.append(p.finish(previous))
        got = ("".join(d.reasoning_content or "" for d in deltas if d) or None,
               "".join(d.content or "" for d in deltas if d) or None)
        assert got == (reasoning, content), chunks


def test_think_streams_reasoning_before_the_closing_tag_arrives():
    p = parser("think", REASONING_PARSER)
    assert p.extract_streaming("", "<think>Hmm</th", "<think>Hmm</th") == DeltaMessage(reasoning_content="Hmm")
    assert p.extract_streaming("<think>Hmm</th", "<think>Hmm</think>A", "ink>A") == DeltaMessage(content="A")


def test_think_rejects_unknown_options():
    from tokenmill import ConfigError

    with pytest.raises(ConfigError, match="section.bogus"):
        Registry(entry_points=False).create(REASONING_PARSER, "think", {"bogus": 1}, section="section")


def test_registry_lists_the_new_kinds_as_builtins():
    registry = Registry(entry_points=False)
    assert set(registry.available(TOOL_PARSER)) >= {"hermes", "llama3_json", "mistral"}
    assert set(registry.available(REASONING_PARSER)) >= {"think"}
    record = next(r for r in registry.records(TOOL_PARSER) if r.name == "hermes")
    assert record.provider.plugin == "tokenmill.plugins.tool_parsers" and record.status == "available"
    assert {TOOL_PARSER, REASONING_PARSER} <= {r.kind for r in registry.records()}


THIRD_PARTY = """
    from tokenmill import hookimpl
    from tokenmill.tool_parsing import MarkupToolParser, Scan, ScannedCall

    class EverythingIsACall(MarkupToolParser):
        name = "acme-calls"

        def scan(self, text):
            return Scan([ScannedCall("f", "{}")] if text else [], len(text))

    @hookimpl
    def tokenmill_register_tool_parsers(register):
        register(EverythingIsACall)
"""


def test_third_party_tool_parser_is_registered_and_listed(plugin_site):
    plugin_site("acme-parsers", THIRD_PARTY)
    registry = Registry()
    assert registry.available(TOOL_PARSER)["acme-calls"].__name__ == "EverythingIsACall"
    row = next(f for f in registry.feature_matrix()["features"] if f["feature"] == "tool_call_parsers")
    assert "acme-calls" in row["detail"]


def test_feature_rows_list_the_parsers():
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "features", "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {f["feature"]: f for f in json.loads(result.stdout)["features"]}
    assert rows["tool_call_parsers"] == {"feature": "tool_call_parsers", "status": "supported",
                                         "detail": "hermes, llama3_json, mistral"}
    assert rows["reasoning_parsers"] == {"feature": "reasoning_parsers", "status": "supported", "detail": "think"}
    empty = Registry(builtins=(), entry_points=False).feature_matrix()["features"]
    assert next(f for f in empty if f["feature"] == "tool_call_parsers")["status"] == "unavailable"


# ---------------------------------------------------------------- the conformance checks catch broken parsers


class _Broken(MarkupToolParser):
    """Reports every call as ``f``, and when streaming forgets what it held back at the end."""

    name = "broken"

    def scan(self, text):
        events, pos = [], 0
        while (start := text.find("<c>", pos)) >= 0:
            end = text.find("</c>", start)
            if end < 0:
                return Scan([*events, text[pos:start]], start)
            events += [text[pos:start], ScannedCall("f", text[start + 3:end])]
            pos = end + 4
        return Scan([*events, text[pos:]], len(text))

    def finish(self, current_text, tools=None):
        return None

    @classmethod
    def example_output(cls, calls, content=""):
        return content + "".join(f"<c>{json.dumps(args)}</c>" for _, args in calls)


class _EatsText(ToolParser):
    name = "eats-text"

    def extract(self, text, tools=None):
        from tokenmill.tool_parsing import ExtractedToolCalls

        return ExtractedToolCalls(text.strip() or None, [])

    def extract_streaming(self, previous_text, current_text, delta_text, tools=None):
        return DeltaMessage(content=delta_text)


@pytest.mark.parametrize("cls, failing", [(_Broken, "tool_parser_streams_what_it_extracts"),
                                          (_Broken, "tool_parser_extracts_generated_calls"),
                                          (_EatsText, "tool_parser_leaves_plain_text_alone")])
def test_conformance_checks_fail_broken_parsers(cls, failing):
    check = next(c for c in CHECKS[TOOL_PARSER] if c.__name__ == failing)
    with pytest.raises(AssertionError):
        check(cls)


@pytest.mark.parametrize("cls", ["hermes", "llama3_json", "mistral"])
def test_builtin_tool_parsers_pass_every_check_in_process(cls):
    klass = Registry(entry_points=False).get(TOOL_PARSER, cls)
    for check in CHECKS[TOOL_PARSER]:
        check(klass)


def test_builtin_plugin_passes_its_conformance_suite(plugin_site, tmp_path):
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site.path), *sys.path])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "tokenmill.testing",
                             "--tokenmill-conformance=tokenmill.plugins.tool_parsers", "-q", "-p", "no:cacheprovider",
                             str(tmp_path / "empty")], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # 3 tool parsers x 4 checks + think x 3 checks
    assert "15 passed" in result.stdout, result.stdout


class _FlipFlop(SplittingReasoningParser):
    """Calls everything reasoning while streaming and content once the output ends."""

    name = "flip-flop"

    def split(self, text, final):
        return ("", text) if final else (text, "")


def test_conformance_check_fails_a_reasoning_parser_that_streams_another_split():
    check = next(c for c in CHECKS[REASONING_PARSER] if c.__name__ == "reasoning_parser_streams_what_it_extracts")
    with pytest.raises(AssertionError, match="streamed"):
        check(_FlipFlop)
