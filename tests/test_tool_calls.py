"""Tool calling and reasoning on /v1/chat/completions, through the official ``openai`` client against a
real server (issue 20).

The model is a tiny random byte-level checkpoint. tool_choice "required" and a named function run on it
for real: the server constrains it with structured outputs. A random model writes no markup, so the
"auto" and reasoning tests script the engine's answer (``scripted_output``): the chat template, the
tokenizer, the parsers, the endpoint and its server-sent events still run for real.
"""
from __future__ import annotations

import contextlib
import json

import httpx
import jsonschema
import openai
import pytest
import transformers

from server_builders import MODEL_NAME, make_byte_level_engine, make_byte_level_model, run_server, scripted_output
from tokenmill.errors import ConfigError
from tokenmill.server import build_app
from tokenmill.server.launch import serve

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                          "unit": {"type": "string", "enum": ["c", "f"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name[4:]}", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
# renders the tools, the calls of assistant messages and the ids tool results answer
TEMPLATE = ("{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
            "{% for m in messages %}{{ m.role }}: {{ m.content }}"
            "{% for c in m.tool_calls or [] %} [{{ c.id }} {{ c.function.name }} {{ c.function.arguments | tojson }}]"
            "{% endfor %}{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
ENGINE_OPTIONS = dict(max_model_len=512)
USER = [{"role": "user", "content": "weather in Paris?"}]
GREEDY = dict(temperature=0.0, max_tokens=300)
# forced calls: greedy, the random model fills the JSON's whitespace until max_tokens; this seed finishes
# (and makes two calls for a parallel "required")
SEEDED = dict(temperature=1.0, seed=1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_byte_level_model(tmp_path_factory.mktemp("tools"))


@pytest.fixture(scope="module")
def plain(model_path):
    """A server started without tool options: forced calls only."""
    with run_server(make_byte_level_engine(model_path, **ENGINE_OPTIONS), chat_template=TEMPLATE) as running:
        yield openai.OpenAI(base_url=running.api_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def agent_server(model_path):
    """A server with "auto" tool choice (hermes) and the think reasoning parser."""
    with run_server(make_byte_level_engine(model_path, **ENGINE_OPTIONS), chat_template=TEMPLATE,
                    enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="think") as running:
        yield running


@pytest.fixture(scope="module")
def agent(agent_server):
    return openai.OpenAI(base_url=agent_server.api_url, api_key="unused", max_retries=0)


@pytest.fixture
def script(agent_server):
    """``script(text)``: the agent server's model answers ``text`` for the rest of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda text: stack.enter_context(scripted_output(agent_server, text))


def hermes_call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def create(client, **fields):
    return client.chat.completions.create(model=MODEL_NAME, **{"messages": USER, **GREEDY, **fields})


def streamed(client, **fields) -> dict:
    """A streamed reply added up: content, reasoning, the calls (id, name, concatenated arguments)
    and the finish reason; asserts that each call's id, type and name come in its first piece only."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in create(client, stream=True, **fields):
        [choice] = chunk.choices
        delta = choice.delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            if call.index not in calls:
                assert call.id and call.type == "function" and call.function.name
                calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
            else:
                assert call.id is None and call.function.name is None
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return {"content": content or None, "reasoning": reasoning or None, "finish_reason": finish,
            "calls": [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]}


def unstreamed(client, **fields) -> dict:
    [choice] = create(client, **fields).choices
    message = choice.message
    return {"content": message.content, "reasoning": (message.model_extra or {}).get("reasoning_content"),
            "finish_reason": choice.finish_reason,
            "calls": [(call.function.name, call.function.arguments) for call in message.tool_calls or []]}


def both(client, **fields) -> dict:
    """The reply, asserting that streamed and unstreamed agree."""
    whole = unstreamed(client, **fields)
    assert streamed(client, **fields) == whole
    return whole


def assert_valid_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


# ---------------------------------------------------------------- forced: "required" and a named function


def test_named_function_gives_one_call_with_valid_arguments(plain):
    reply = both(plain, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}, **SEEDED)

    assert reply["finish_reason"] == "tool_calls" and reply["content"] is None
    [(name, _)] = reply["calls"]
    assert name == "get_time"
    assert_valid_calls(reply["calls"])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gives_valid_calls_of_the_tools(plain, parallel):
    reply = both(plain, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel, **SEEDED)

    assert reply["finish_reason"] == "tool_calls" and reply["content"] is None
    assert_valid_calls(reply["calls"])
    if not parallel:
        assert len(reply["calls"]) == 1


def test_required_call_ids_are_openai_style(plain):
    [choice] = create(plain, tools=TOOLS, tool_choice="required", **SEEDED).choices

    assert all(call.id.startswith("call_") and call.type == "function" for call in choice.message.tool_calls)


@pytest.mark.parametrize("fields", [{"tools": TOOLS, "tool_choice": "none"}, {}], ids=["none", "no-tools"])
def test_none_and_no_tools_give_plain_text(plain, fields):
    reply = both(plain, max_tokens=5, **fields)

    assert reply["calls"] == [] and reply["reasoning"] is None and reply["finish_reason"] in ("stop", "length")


# ---------------------------------------------------------------- "auto": the tool parser on free text


AUTO_TEXT = ("Let me check.\n" + hermes_call("get_weather", {"city": "Paris", "unit": "c"}) + "\n"
             + hermes_call("get_time", {"zone": "CET"}) + "\nDone.")


def test_auto_finds_several_calls_and_keeps_the_text_around_them(agent, script):
    script("<think>I should call both.</think>" + AUTO_TEXT)
    reply = both(agent, tools=TOOLS, tool_choice="auto")

    # the parser keeps the text between the calls; only whitespace at the message's edges goes
    assert reply == {"content": "Let me check.\n\n\nDone.", "reasoning": "I should call both.",
                     "finish_reason": "tool_calls",
                     "calls": [("get_weather", '{"city": "Paris", "unit": "c"}'), ("get_time", '{"zone": "CET"}')]}


def test_streamed_call_chunks_have_openais_shape(agent_server, script):
    script("</think>" + hermes_call("get_time", {"zone": "UTC"}))  # think: the text starts in the reasoning
    body = {"model": MODEL_NAME, "messages": USER, "tools": TOOLS, "stream": True}
    with httpx.stream("POST", f"{agent_server.api_url}/chat/completions", json=body, timeout=30) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    [call_chunk] = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    [call] = call_chunk["choices"][0]["delta"]["tool_calls"]
    assert set(call) == {"index", "id", "type", "function"} and call["index"] == 0 and call["type"] == "function"
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all("reasoning_content" not in c["choices"][0]["delta"] for c in chunks)  # only when there is some


def test_tools_without_tool_choice_mean_auto(agent, script):
    script("</think>" + hermes_call("get_time", {"zone": "UTC"}))
    reply = both(agent, tools=TOOLS)

    assert reply["calls"] == [("get_time", '{"zone": "UTC"}')] and reply["content"] is None


def test_auto_without_calls_is_text_and_stops(agent, script):
    script("<think>easy</think>It is sunny.")
    reply = both(agent, tools=TOOLS, tool_choice="auto")

    assert reply == {"content": "It is sunny.", "reasoning": "easy", "finish_reason": "stop", "calls": []}


def test_none_leaves_markup_as_content_but_still_splits_reasoning(agent, script):
    script("<think>hm</think>" + hermes_call("get_time", {"zone": "UTC"}))
    reply = both(agent, tools=TOOLS, tool_choice="none")

    assert reply == {"content": hermes_call("get_time", {"zone": "UTC"}), "reasoning": "hm",
                     "finish_reason": "stop", "calls": []}


def test_reasoning_without_tools(agent, script):
    script("<think>two plus two</think>Four.")
    reply = both(agent)

    assert reply == {"content": "Four.", "reasoning": "two plus two", "finish_reason": "stop", "calls": []}


def test_unfinished_markup_is_released_as_content_at_the_end(agent, script):
    script("</think>Answer <tool_ca")
    reply = both(agent, tools=TOOLS)

    assert reply == {"content": "Answer <tool_ca", "reasoning": None, "finish_reason": "stop", "calls": []}


# ---------------------------------------------------------------- the conversation through the template


def expected_prompt_tokens(model_path, messages, tools) -> int:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_tool_results_round_trip_through_the_template(plain, model_path):
    arguments = {"city": "Rome", "unit": "f"}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "20 degrees"}]
    response = create(plain, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=1)

    # the template sees the tools, the call (its arguments as an object) and the id the result answers
    rendered = [*USER, {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "content": "20 degrees", "tool_call_id": "call_1"}]
    assert response.usage.prompt_tokens == expected_prompt_tokens(model_path, rendered, TOOLS)
    assert response.usage.prompt_tokens > expected_prompt_tokens(model_path, USER, None)


def test_agent_loop_call_then_result_then_answer(agent, script):
    messages = list(USER)
    first = create(agent, messages=messages, tools=TOOLS,
                   tool_choice={"type": "function", "function": {"name": "get_weather"}}, **SEEDED)
    [call] = first.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny"})
    script("<think>it said sunny</think>It is sunny.")
    answer = create(agent, messages=messages, tools=TOOLS)

    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "It is sunny."
    assert not answer.choices[0].message.tool_calls


# ---------------------------------------------------------------- refusals


BAD = [  # (server, the request fields, the param the 400 names)
    ("plain", {"tool_choice": "auto"}, "tool_choice"),
    ("plain", {}, "tools"),  # unset with tools means "auto"
    ("agent", {"tool_choice": {"type": "function", "function": {"name": "get_moon"}}}, "tool_choice"),
    ("agent", {"tool_choice": {"type": "function"}}, "tool_choice"),
    ("agent", {"tool_choice": "sometimes"}, "tool_choice"),
    ("agent", {"tools": None, "tool_choice": "required"}, "tool_choice"),
    ("agent", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools.0.function.parameters"),
    ("agent", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ("agent", {"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ("agent", {"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ("agent", {"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ("agent", {"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize("server,fields,param", BAD, ids=[f"{s}-{p}-{i}" for i, (s, _, p) in enumerate(BAD)])
def test_bad_tool_requests_are_a_400_naming_the_field(request, server, fields, param):
    client = request.getfixturevalue(server)
    body = {"tools": TOOLS, **fields}
    if body["tools"] is None:
        del body["tools"]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2, extra_body=body)

    assert raised.value.body["param"] == param
    if fields == {"tool_choice": "auto"}:
        assert "--enable-auto-tool-choice and --tool-call-parser" in raised.value.body["message"]


@pytest.mark.parametrize("options,flag", [({"tool_call_parser": "nope"}, "--tool-call-parser"),
                                          ({"reasoning_parser": "nope"}, "--reasoning-parser")])
def test_an_unknown_parser_stops_the_start_listing_the_registered(options, flag):
    with pytest.raises(ConfigError, match=flag) as raised:
        build_app(None, model_names=["m"], **options)
    assert ("hermes" if flag == "--tool-call-parser" else "think") in str(raised.value)
    with pytest.raises(ConfigError, match=flag):
        serve(None, **options)  # before any engine is built


def test_auto_tool_choice_needs_a_parser():
    with pytest.raises(ConfigError, match="--tool-call-parser"):
        build_app(None, model_names=["m"], enable_auto_tool_choice=True)


def test_cli_serve_has_the_tool_flags():
    from tokenmill.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                                      "--reasoning-parser", "think"])
    assert (args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser) == (True, "hermes", "think")


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral"])
def test_auto_with_each_built_in_parser_on_a_model_that_writes_its_format(tmp_path, parser):
    """The scripted test model plugin (tests/scripted_model.py) writes reasoning and then the parser's own
    format through the real engine; the server splits it into reasoning, content and calls, streamed and not."""
    from scripted_model import make_scripted_checkpoint
    from tokenmill.config import EngineConfig
    from tokenmill.llm_engine import LLMEngine
    from tokenmill.registry import BUILTIN_PLUGINS, Registry, get_registry

    calls = [("get_weather", {"city": "Rome", "unit": "c"}), ("get_time", {"zone": "CET"})]
    text = "<think>Two lookups.</think>" + get_registry().get("tool_parser", parser).example_output(calls, "Checking.")
    make_scripted_checkpoint(tmp_path, text)
    registry = Registry(builtins=(*BUILTIN_PLUGINS, "scripted_model"), entry_points=False)
    engine = LLMEngine(EngineConfig.build(model=str(tmp_path), load_format="dummy", device="cpu", dtype="float32",
                                          max_model_len=512), registry)
    with run_server(engine, chat_template=TEMPLATE, enable_auto_tool_choice=True, tool_call_parser=parser,
                    reasoning_parser="think") as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
        reply = both(client, tools=TOOLS, tool_choice="auto", max_tokens=400)
    assert reply["finish_reason"] == "tool_calls" and reply["reasoning"] == "Two lookups."
    assert [(name, json.loads(arguments)) for name, arguments in reply["calls"]] == calls
    assert_valid_calls(reply["calls"])
    assert "Checking." in (reply["content"] or "") and "get_weather" not in (reply["content"] or "")
