"""The OpenAI-compatible server, through the official ``openai`` client.

A real uvicorn server on a loopback port serves a tiny random checkpoint
(word tokenizer: ``w5`` is token 5); one test asks the default model about
France. Greedy requests make the expected text reproducible.
"""
import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from server_builders import (MODEL_NAME, make_byte_level_engine, make_byte_level_model, make_engine,
                             make_tiny_model, run_server, wait_until)
from tokenmill.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(120)

PROMPT = "w5 w6 w7"
GREEDY = dict(model=MODEL_NAME, temperature=0.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(tiny_model):
    with run_server(make_engine(tiny_model)) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


def engine_is_idle(server) -> bool:
    stats = server.engine.stats
    return (stats["num_running"], stats["num_waiting"]) == (0, 0) and \
        stats["num_free_blocks"] == stats["num_total_blocks"] and server.engine.num_in_flight == 0


# ---------------------------------------------------------------- completions

def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_completion_reports_text_finish_reason_and_usage(client):
    response = client.completions.create(prompt=PROMPT, max_tokens=8, **GREEDY)

    [choice] = response.choices
    assert choice.finish_reason == "length" and len(choice.text.split()) == 8
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (3, 8, 11)


def test_streamed_completion_adds_up_to_the_non_streamed_one(client):
    expected = client.completions.create(prompt=PROMPT, max_tokens=8, **GREEDY).choices[0].text

    chunks = list(client.completions.create(prompt=PROMPT, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))

    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.api_url}/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]

    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in events[:-1])


def test_prompts_may_be_token_ids_and_lists(client):
    by_text = client.completions.create(prompt=PROMPT, max_tokens=5, **GREEDY).choices[0].text
    by_ids = client.completions.create(prompt=[5, 6, 7], max_tokens=5, **GREEDY).choices[0].text

    both = client.completions.create(prompt=[PROMPT, "w9"], max_tokens=5, **GREEDY)

    assert by_ids == by_text
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == by_text
    assert both.usage.prompt_tokens == 4


def test_n_gives_n_choices(client):
    response = client.completions.create(prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=7,
                                         model=MODEL_NAME)

    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    assert response.usage.completion_tokens == 18


def test_streamed_n_choices_each_finish_once(client):
    chunks = list(client.completions.create(prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=7,
                                            stream=True, stream_options={"include_usage": True}, model=MODEL_NAME))

    finishes = [(c.index, c.finish_reason) for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    assert chunks[-1].usage.completion_tokens == 12


def test_completion_logprobs_hold_the_chosen_and_top_tokens(client):
    response = client.completions.create(prompt=PROMPT, max_tokens=5, logprobs=3, **GREEDY)

    logprobs = response.choices[0].logprobs
    assert "".join(logprobs.tokens).replace("w", " w").split() == response.choices[0].text.split()
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert top[token] == pytest.approx(max(top.values()))  # greedy: the chosen token is the likeliest


def test_echo_puts_the_prompt_before_the_completion(client):
    plain = client.completions.create(prompt=PROMPT, max_tokens=4, **GREEDY).choices[0].text

    echoed = client.completions.create(prompt=PROMPT, max_tokens=4, echo=True, logprobs=1, **GREEDY).choices[0]

    assert echoed.text == PROMPT + plain
    assert echoed.logprobs.tokens[:3] == ["w5", "w6", "w7"]
    assert echoed.logprobs.token_logprobs[0] is None and len(echoed.logprobs.tokens) == 3 + 4


def test_stop_sequence_ends_the_text_before_it(client):
    full = client.completions.create(prompt=PROMPT, max_tokens=12, **GREEDY).choices[0].text
    stop = full.split()[3]

    choice = client.completions.create(prompt=PROMPT, max_tokens=12, stop=[stop], **GREEDY).choices[0]

    assert choice.finish_reason == "stop"
    assert choice.text == full[:full.index(stop)]


# ---------------------------------------------------------------- chat

def test_chat_completion_answers_as_the_assistant(client):
    response = client.chat.completions.create(messages=[{"role": "user", "content": "w5 w6"}], max_tokens=5,
                                              **GREEDY)

    [choice] = response.choices
    assert choice.message.role == "assistant" and len(choice.message.content.split()) == 5
    assert response.usage.prompt_tokens == 2 and response.object == "chat.completion"


def test_streamed_chat_starts_with_the_role_and_adds_up(client):
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": [{"type": "text", "text": "w5"}]}]
    expected = client.chat.completions.create(messages=messages, max_tokens=6, **GREEDY).choices[0].message.content

    chunks = list(client.chat.completions.create(messages=messages, max_tokens=6, stream=True, **GREEDY))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs_list_the_top_tokens(client):
    response = client.chat.completions.create(messages=[{"role": "user", "content": "w5"}], max_tokens=4,
                                              logprobs=True, top_logprobs=3, **GREEDY)

    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.bytes == list(entry.token.encode())


def test_32_concurrent_streams_all_complete(server, client):
    prompts = [f"w{3 + i} w{40 + i}" for i in range(32)]
    expected = [client.completions.create(prompt=p, max_tokens=12, extra_body={"ignore_eos": True},
                                          **GREEDY).choices[0].text for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0)

    async def stream(prompt: str) -> tuple[str, str | None]:
        chunks = await aclient.completions.create(prompt=prompt, max_tokens=12, stream=True,
                                                  extra_body={"ignore_eos": True}, **GREEDY)
        pieces, finish = [], None
        async for chunk in chunks:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    async def all_streams():
        return await asyncio.gather(*(stream(p) for p in prompts))

    results = asyncio.run(all_streams())

    assert results == [(text, "length") for text in expected]
    assert wait_until(lambda: engine_is_idle(server))


def test_client_leaving_mid_stream_aborts_and_frees_its_blocks(server, client):
    aborted_before = _samples(_parse_metrics(_get_metrics(server)),
                              "tokenmill:request_success_total").get(("abort",), 0.0)
    stream = client.completions.create(prompt=PROMPT, max_tokens=120, stream=True,
                                       extra_body={"ignore_eos": True}, **GREEDY)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()

    assert wait_until(lambda: engine_is_idle(server))
    aborted = _samples(_parse_metrics(_get_metrics(server)), "tokenmill:request_success_total")[("abort",)]
    assert aborted == aborted_before + 1


# ---------------------------------------------------------------- bad input

BAD_COMPLETIONS = [  # (fields, the param the 400 names)
    ({"n": 0}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 50}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"logit_bias": {"100000": 1.0}}, "logit_bias"),
    ({"min_tokens": 40, "max_tokens": 4}, "min_tokens"),
    ({"best_of": 2}, "best_of"),
    ({"prompt": "w5 " * 200}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [5, 100000]}, "prompt"),
    ({"temperature": "hot"}, "temperature"),
    ({"n": 1.5}, "n"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"guided_regex": "w5", "guided_choice": ["w6"]}, "guided_choice"),
]


@pytest.mark.parametrize("fields,param", BAD_COMPLETIONS, ids=[p for _, p in BAD_COMPLETIONS])
def test_bad_completion_input_is_a_400_naming_the_parameter(client, fields, param):
    body = {"model": MODEL_NAME, "prompt": PROMPT, **fields}
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(**{k: body.pop(k) for k in ("model", "prompt")}, extra_body=body)

    assert raised.value.status_code == 400
    assert raised.value.body["param"] == param
    assert raised.value.body["type"] == "invalid_request_error"


BAD_CHAT = [
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "w5 " * 200}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "w5"}]}, "messages.0.role"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
]


@pytest.mark.parametrize("fields,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_bad_chat_input_is_a_400_naming_the_parameter(server, fields, param):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "w5"}], **fields}
    response = httpx.post(f"{server.api_url}/chat/completions", json=body)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_the_server_keeps_serving_after_bad_input(server, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(prompt=PROMPT, n=0, model=MODEL_NAME)

    assert client.completions.create(prompt=PROMPT, max_tokens=2, **GREEDY).choices[0].finish_reason == "length"
    assert wait_until(lambda: engine_is_idle(server))


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="gpt-9", prompt=PROMPT)

    assert raised.value.body["param"] == "model"


def test_unknown_fields_are_ignored(client):
    response = client.completions.create(prompt=PROMPT, max_tokens=2, extra_body={"frobnicate": 3}, **GREEDY)

    assert response.choices[0].finish_reason == "length"


def test_invalid_json_is_a_400(server):
    response = httpx.post(f"{server.api_url}/completions", content=b"{not json",
                          headers={"content-type": "application/json"})

    assert response.status_code == 400 and response.json()["error"]["code"] == 400


def test_oversized_body_is_a_413(server):
    response = httpx.post(f"{server.api_url}/completions",
                          json={"model": MODEL_NAME, "prompt": "w5 " * (4 << 20)})

    assert response.status_code == 413


def test_oversized_headers_are_refused(server):
    try:  # h11 refuses the head mid-upload: a 400, or a reset while the client still sends
        status = httpx.get(f"{server.url}/health", headers={"x-padding": "a" * (1 << 20)}).status_code
    except httpx.TransportError:
        status = None

    assert status in (400, None)
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---------------------------------------------------------------- structured outputs
# The word tokenizer cannot spell JSON: these tests get a server on a byte-level checkpoint,
# whose random output only the grammar keeps valid. Schemas are bounded so that it finishes.

BYTE_PROMPT = "cat dog"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def byte_server(tmp_path_factory):
    with run_server(make_byte_level_engine(make_byte_level_model(tmp_path_factory.mktemp("byte")))) as running:
        yield running


@pytest.fixture
def byte_client(byte_server):
    return openai.OpenAI(base_url=byte_server.api_url, api_key="unused", max_retries=0)


def test_json_schema_response_format_gives_matching_json(byte_client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}

    response = byte_client.chat.completions.create(
        messages=[{"role": "user", "content": "w5 w6"}], max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}, **GREEDY)

    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)


def test_json_object_response_format_gives_json(byte_client):
    response = byte_client.chat.completions.create(
        messages=[{"role": "user", "content": BYTE_PROMPT}], max_tokens=300,
        response_format={"type": "json_object"}, **GREEDY)

    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content), (dict, list))


GUIDED_COMPLETIONS = [  # (the request fields, a check of the text)
    ({"guided_json": PERSON}, lambda text: jsonschema.validate(json.loads(text), PERSON)),
    ({"guided_json": json.dumps(PERSON)}, lambda text: jsonschema.validate(json.loads(text), PERSON)),
    ({"guided_regex": r"[a-z]{2,5}-\d{1,3}"}, lambda text: re.fullmatch(r"[a-z]{2,5}-\d{1,3}", text)),
    ({"guided_choice": ["yes", "no", "maybe"]}, lambda text: text in ("yes", "no", "maybe")),
    ({"guided_grammar": 'root ::= "(" [0-9]{1,3} ("+" [0-9]{1,3}){0,3} ")"'},
     lambda text: re.fullmatch(r"\(\d{1,3}(\+\d{1,3}){0,3}\)", text)),
    ({"structured_outputs": {"choice": ["red", "green"]}}, lambda text: text in ("red", "green")),
    ({"structured_outputs": {"json": PERSON}}, lambda text: jsonschema.validate(json.loads(text), PERSON)),
]


@pytest.mark.parametrize("fields,check", GUIDED_COMPLETIONS, ids=[next(iter(f)) + str(i)
                                                                  for i, (f, _) in enumerate(GUIDED_COMPLETIONS)])
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 0}], ids=["greedy", "seeded"])
def test_guided_completion_fields_constrain_the_text(byte_client, fields, check, sampling):
    response = byte_client.completions.create(model=MODEL_NAME, prompt=BYTE_PROMPT, max_tokens=300, extra_body=fields,
                                              **sampling)

    [choice] = response.choices
    assert choice.finish_reason == "stop", choice.text
    assert check(choice.text) is not False


def test_streamed_guided_completion_adds_up_to_valid_json(byte_client):
    chunks = list(byte_client.completions.create(model=MODEL_NAME, prompt=BYTE_PROMPT, max_tokens=300, stream=True,
                                                 extra_body={"guided_json": PERSON}, temperature=0.0))

    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_guided_n_choices_are_each_valid(byte_client):
    response = byte_client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": BYTE_PROMPT}], n=2, max_tokens=300, temperature=1.0,
        seed=1, extra_body={"guided_choice": ["yes", "no", "maybe"]})

    assert sorted(c.index for c in response.choices) == [0, 1]
    assert all(c.message.content in ("yes", "no", "maybe") and c.finish_reason == "stop" for c in response.choices)


BAD_STRUCTURED = [  # (fields, the param the 400 names, words of the message)
    ({"guided_json": {"type": "objekt"}}, "guided_json", ["objekt"]),
    ({"guided_json": "{not json"}, "guided_json", ["not a valid JSON document"]),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json", ["uniqueItems"]),
    ({"guided_regex": "foo**"}, "guided_regex", ["regex"]),
    ({"guided_choice": []}, "guided_choice", ["choice"]),
    ({"guided_grammar": "root ::= foo"}, "guided_grammar", ["grammar"]),
    ({"structured_outputs": {"regex": "(?=a)b"}}, "structured_outputs", ["lookaround"]),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", ["exactly one"]),
    ({"structured_outputs": {"yaml": "a"}}, "structured_outputs.yaml", []),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", ["objekt"]),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", ["one field"]),
]


@pytest.mark.parametrize("fields,param,words", BAD_STRUCTURED,
                         ids=[f"{p}{i}" for i, (_, p, _) in enumerate(BAD_STRUCTURED)])
def test_bad_structured_output_is_a_400_naming_the_parameter(byte_server, fields, param, words):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": BYTE_PROMPT}], "max_tokens": 8, **fields}

    response = httpx.post(f"{byte_server.api_url}/chat/completions", json=body)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], (word, error["message"])


def test_the_server_keeps_serving_after_a_bad_schema(byte_server, byte_client):
    with pytest.raises(openai.BadRequestError):
        byte_client.completions.create(model=MODEL_NAME, prompt=BYTE_PROMPT, extra_body={"guided_json": {"type": "x"}})

    response = byte_client.completions.create(model=MODEL_NAME, prompt=BYTE_PROMPT, max_tokens=300, temperature=0.0,
                                              extra_body={"guided_choice": ["yes", "no"]})

    assert response.choices[0].text in ("yes", "no") and response.choices[0].finish_reason == "stop"
    assert wait_until(lambda: engine_is_idle(byte_server))
    assert byte_server.engine.stats["num_grammars_compiling"] == 0


# ---------------------------------------------------------------- metrics

def _get_metrics(server) -> str:
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def _parse_metrics(text: str) -> dict[str, dict]:
    """A strict reader of the Prometheus text format (0.0.4): family name ->
    {"type", "samples": [(sample name, labels, value)]}. Raises on anything malformed."""
    families: dict[str, dict] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped") and name not in families
            families[name] = {"type": kind, "samples": []}
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value = match.groups()
        labels = dict(_LABEL.findall(labels_text or ""))
        family = next(f for f in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if f in families)
        families[family]["samples"].append((name, labels, float(value)))
    return families


def _samples(families: dict[str, dict], family: str) -> dict[tuple[str, ...], float]:
    """The family's samples keyed by their non-model label values."""
    return {tuple(v for k, v in labels.items() if k != "model_name"): value
            for _, labels, value in families[family]["samples"]}


def test_metrics_parse_as_prometheus_text(server, client):
    client.completions.create(prompt=PROMPT, max_tokens=5, **GREEDY)

    families = _parse_metrics(_get_metrics(server))

    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "spec_decode_acceptance_rate"):
        assert families[f"tokenmill:{name}"]["type"] == "gauge"
    assert _samples(families, "tokenmill:generation_tokens_total")[()] >= 5
    assert _samples(families, "tokenmill:prefix_cache_queries_total")[()] > 0
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        family = families[f"tokenmill:{name}"]
        assert family["type"] == "histogram"
        buckets = [value for sample, _, value in family["samples"] if sample.endswith("_bucket")]
        count = next(value for sample, _, value in family["samples"] if sample.endswith("_count"))
        assert buckets == sorted(buckets) and buckets[-1] == count > 0


# ---------------------------------------------------------------- the default model

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_default_model_answers_the_france_question():
    engine = make_engine(DEFAULT_MODEL, max_model_len=512, num_gpu_blocks_override=64, max_num_batched_tokens=512)
    with run_server(engine, model_name=DEFAULT_MODEL, chat_template=None) as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
        response = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20, temperature=0.0)

    assert response.choices[0].message.content == "The capital of France is Paris."
    assert response.choices[0].finish_reason == "stop"
