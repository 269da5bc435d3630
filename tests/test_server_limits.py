"""The server against requests that used to stop or stall it: every field is checked
against the engine's real limits at the boundary (a 400 naming the field), a request
that fails while generating ends with an error that says why, and tokenizing a prompt
never holds up the other requests' tokens.
"""
import json
import threading

import httpx
import openai
import pytest

from server_builders import (MODEL_NAME, make_byte_level_engine, make_byte_level_model, make_engine,
                             make_tiny_model, run_server, wait_until)
from tokenmill.input_processor import InputProcessor
from tokenmill.server.tokenizer_pool import LARGE_TEXT_CHARS

pytestmark = pytest.mark.timeout(120)

PROMPT = "w5 w6 w7"
MAX_MODEL_LEN = 128  # server_builders.SERVER_ENGINE_OPTIONS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with run_server(make_engine(make_tiny_model(tmp_path_factory.mktemp("tiny")))) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


def post(server, path: str, body: dict | bytes, client: httpx.Client | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (client or httpx).post(f"{server.api_url}/{path}", content=content,
                                  headers={"content-type": "application/json"}, timeout=60)


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def is_serving(server) -> bool:
    health = httpx.get(f"{server.url}/health").status_code
    answer = post(server, "completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2})
    return health == 200 and answer.status_code == 200


def sse_events(response: httpx.Response) -> list:
    return [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]


# ---------------------------------------------------------------- seeds

@pytest.mark.parametrize("seed", [1 << 64, (1 << 63), -(1 << 63) - 1])
def test_a_seed_outside_int64_is_a_400_and_the_engine_keeps_serving(server, seed):
    response = post(server, "completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, "seed": seed})

    assert response.status_code == 400 and error_of(response)["param"] == "seed"
    assert is_serving(server)


@pytest.mark.parametrize("top_k", [1 << 63, 1 << 64])
def test_a_top_k_outside_int64_is_a_400(server, top_k):
    response = post(server, "completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, "top_k": top_k})

    assert response.status_code == 400 and error_of(response)["param"] == "top_k"
    assert is_serving(server)


def test_a_top_k_past_the_vocabulary_keeps_every_token(client):
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=1,
                                           extra_body={"top_k": (1 << 63) - 1})

    assert completion.choices[0].finish_reason == "length"


def test_the_largest_seed_with_n_2_gives_two_seeded_choices(client):
    def run():
        return [c.text for c in client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, n=2,
                                                           temperature=1.0, seed=(1 << 63) - 1).choices]

    first = run()

    assert len(first) == 2 and first == run()


# ---------------------------------------------------------------- lone surrogates

@pytest.mark.parametrize("path,raw,param", [
    ("completions", b'{"model": "tiny", "prompt": "w5 a\\ud800b"}', "prompt"),
    ("completions", b'{"model": "tiny", "prompt": ["w5", "\\udfff"]}', "prompt.1"),
    ("completions", b'{"model": "tiny", "prompt": "w5", "stop": ["\\ud800"]}', "stop.0"),
    ("completions", b'{"model": "tiny", "prompt": "w5", "guided_choice": ["\\ud800"]}', "guided_choice.0"),
    ("completions", b'{"model": "tiny", "prompt": "w5", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    ("chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}',
     "messages.0.content"),
])
def test_a_lone_surrogate_is_a_400_naming_where_it_is(server, path, raw, param):
    with httpx.Client(timeout=60) as connection:  # one keep-alive connection: it must survive
        response = post(server, path, raw, connection)
        after = post(server, "completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2}, connection)

    assert response.status_code == 400
    assert error_of(response)["param"] == param and "lone surrogate" in error_of(response)["message"]
    assert after.status_code == 200


# ---------------------------------------------------------------- lengths

def test_max_tokens_past_the_context_is_a_400_naming_the_three_numbers(server):
    response = post(server, "completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 10**9})

    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "max_tokens"
    assert f"the prompt's 3 tokens plus max_tokens=1000000000 make 1000000003 tokens, more than this model's " \
           f"max_model_len={MAX_MODEL_LEN}; ask for at most {MAX_MODEL_LEN - 3}" in error["message"]


def test_max_tokens_that_fill_the_context_exactly_are_accepted(client):
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_MODEL_LEN - 3,
                                           temperature=0.0, extra_body={"ignore_eos": True})

    assert completion.usage.completion_tokens == MAX_MODEL_LEN - 3


def test_chat_max_completion_tokens_past_the_context_names_that_field(server):
    response = post(server, "chat/completions", {"model": MODEL_NAME, "max_completion_tokens": 500,
                                                 "messages": [{"role": "user", "content": PROMPT}]})

    assert response.status_code == 400 and error_of(response)["param"] == "max_completion_tokens"


# ---------------------------------------------------------------- prompt logprobs

def test_completions_return_the_prompt_logprobs_they_were_asked_for(server):
    response = post(server, "completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2,
                                            "prompt_logprobs": 2})

    positions = response.json()["choices"][0]["prompt_logprobs"]
    assert len(positions) == 3 and positions[0] is None
    for token_id, entry in zip([6, 7], positions[1:]):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        assert entry[str(token_id)]["decoded_token"] == f"w{token_id}" and entry[str(token_id)]["logprob"] <= 0


def test_chat_returns_prompt_logprobs_at_the_top_level(server):
    response = post(server, "chat/completions", {"model": MODEL_NAME, "max_tokens": 2, "prompt_logprobs": 0,
                                                 "messages": [{"role": "user", "content": PROMPT}]})

    body = response.json()
    assert response.status_code == 200 and body["prompt_logprobs"][0] is None
    assert all(len(entry) == 1 for entry in body["prompt_logprobs"][1:])


def test_prompt_logprobs_are_not_dropped_silently_when_streaming(server):
    response = post(server, "completions", {"model": MODEL_NAME, "prompt": PROMPT, "stream": True,
                                            "prompt_logprobs": 1})

    assert response.status_code == 400 and error_of(response)["param"] == "prompt_logprobs"


def test_no_prompt_logprobs_unless_asked(server):
    response = post(server, "completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, "echo": True,
                                            "logprobs": 1})

    assert response.json()["choices"][0]["prompt_logprobs"] is None


# ---------------------------------------------------------------- structured output requests

@pytest.mark.parametrize("response_format,param", [
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
])
def test_a_json_schema_response_format_without_its_schema_is_a_400(server, response_format, param):
    response = post(server, "chat/completions", {"model": MODEL_NAME, "response_format": response_format,
                                                 "messages": [{"role": "user", "content": PROMPT}]})

    assert response.status_code == 400 and error_of(response)["param"] == param


# ---------------------------------------------------------------- chat templates sent with requests

SHOUTING_TEMPLATE = "{% for message in messages %}{{ message['content'] }} w9 {% endfor %}"


def test_a_chat_template_sent_with_a_request_is_refused_by_default(server):
    response = post(server, "chat/completions", {"model": MODEL_NAME, "chat_template": SHOUTING_TEMPLATE,
                                                 "messages": [{"role": "user", "content": PROMPT}]})

    assert response.status_code == 400 and error_of(response)["param"] == "chat_template"


def test_a_server_that_trusts_request_chat_templates_runs_them(tmp_path):
    with run_server(make_engine(make_tiny_model(tmp_path)), trust_request_chat_template=True) as trusting:
        response = post(trusting, "chat/completions", {"model": MODEL_NAME, "chat_template": SHOUTING_TEMPLATE,
                                                       "max_tokens": 1,
                                                       "messages": [{"role": "user", "content": PROMPT}]})

    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == 4  # w5 w6 w7 w9


# ---------------------------------------------------------------- contradictory constraints

def test_options_that_exclude_every_first_token_are_a_400_when_added(server):
    response = post(server, "completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8,
                                            "min_tokens": 3, "allowed_token_ids": [2]})

    assert response.status_code == 400 and error_of(response)["param"] == "min_tokens"


# w5 is allowed, but a second w5 would spell the bad word "w5 w5": nothing is left after one token
EXCLUDED_AFTER_ONE = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0,
                      "allowed_token_ids": [5], "bad_words": ["w5 w5"]}
EXCLUDED_MESSAGE = ("no token satisfies all of this request's constraints at output token 1: allowed_token_ids, "
                    "bad_words exclude every token together")


def test_a_conflict_found_while_generating_is_a_400_that_names_it(server):
    response = post(server, "completions", EXCLUDED_AFTER_ONE)

    assert response.status_code == 400
    assert EXCLUDED_MESSAGE in error_of(response)["message"]
    assert wait_until(lambda: server.engine.num_in_flight == 0)


def test_a_conflict_found_while_streaming_ends_with_an_error_event(server):
    response = post(server, "completions", {**EXCLUDED_AFTER_ONE, "stream": True})

    events = sse_events(response)
    assert response.status_code == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]).strip() == "w5"
    assert chunks[-1]["error"]["code"] == 400 and EXCLUDED_MESSAGE in chunks[-1]["error"]["message"]


@pytest.fixture(scope="module")
def byte_server(tmp_path_factory):
    with run_server(make_byte_level_engine(make_byte_level_model(tmp_path_factory.mktemp("byte")))) as running:
        yield running


def test_min_tokens_past_the_end_of_a_guided_regex_is_a_400_that_names_both(byte_server):
    response = post(byte_server, "completions", {"model": MODEL_NAME, "prompt": "cat", "max_tokens": 16,
                                                 "guided_regex": "a", "min_tokens": 10})

    assert response.status_code == 400
    assert "structured_outputs (regex), min_tokens=10 exclude every token" in error_of(response)["message"]


def test_a_guided_choice_that_allowed_token_ids_forbids_is_a_400_that_names_both(byte_server):
    response = post(byte_server, "completions", {"model": MODEL_NAME, "prompt": "cat", "max_tokens": 16,
                                                 "guided_choice": ["yes", "no"], "allowed_token_ids": [90]})

    assert response.status_code == 400
    assert "at output token 0: structured_outputs (choice), allowed_token_ids exclude every token" in \
        error_of(response)["message"]


# ---------------------------------------------------------------- tokenization off the engine loop

def test_a_huge_prompt_whose_tokenization_hangs_stalls_no_other_request(server, client, monkeypatch):
    """A huge prompt is tokenized on a background worker of its own; while it is stuck there,
    another request is tokenized, admitted and streamed to its end. Then it is let go."""
    huge = "w9 " * (LARGE_TEXT_CHARS // 3 + 1)
    entered, release = threading.Event(), threading.Event()
    workers, timed_out = [], []
    tokenize = InputProcessor.tokenize

    def stuck_tokenize(self, prompt):
        if prompt == huge:
            workers.append(threading.current_thread().name)
            entered.set()
            timed_out.append(not release.wait(timeout=100))
        return tokenize(self, prompt)

    monkeypatch.setattr(InputProcessor, "tokenize", stuck_tokenize)
    answers = []
    stuck = threading.Thread(target=lambda: answers.append(
        post(server, "completions", {"model": MODEL_NAME, "prompt": huge, "max_tokens": 2})))
    stuck.start()
    assert entered.wait(timeout=30)

    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0.0,
                                            stream=True, extra_body={"ignore_eos": True}))
    release.set()
    stuck.join(timeout=60)

    assert timed_out == [False] and workers[0].startswith("tokenmill-tokenize-large")
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) == 24
    assert answers[0].status_code == 400 and error_of(answers[0])["param"] == "prompt"  # too long, in the end


# ---------------------------------------------------------------- ending in-flight requests

def test_fail_in_flight_ends_each_stream_with_an_error_event(server):
    def fail_once_running():
        wait_until(lambda: server.engine.num_in_flight > 0, timeout=30)
        server.engine.fail_in_flight("the server is shutting down")

    failer = threading.Thread(target=fail_once_running)
    failer.start()
    response = post(server, "completions", {"model": MODEL_NAME, "prompt": PROMPT, "stream": True,
                                            "max_tokens": MAX_MODEL_LEN - 3, "ignore_eos": True})
    failer.join()

    events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"] == {"message": "the server is shutting down",
                                               "type": "service_unavailable", "param": None, "code": 503}
    assert wait_until(lambda: server.engine.num_in_flight == 0) and is_serving(server)
