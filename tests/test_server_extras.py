"""vLLM's extra routes and server options: /tokenize and /detokenize (a prompt or a conversation as the
ids generation sees, and back), /version, CORS (--allowed-origins and the rest), and several
--served-model-name values, each accepted and echoed."""
from __future__ import annotations

import argparse
import json

import httpx
import pytest
from fastapi.testclient import TestClient

import tokenmill
from builders import TINY_CONFIGS, make_checkpoint
from server_builders import CHAT_TEMPLATE, MODEL_NAME, make_engine, make_tiny_model, run_server
from tokenmill import cli
from tokenmill.errors import ConfigError
from tokenmill.server import AsyncEngine, ServerMetrics, build_app
from tokenmill.server.app import check_cors_options
from tokenmill.server.launch import served_model_names

pytestmark = pytest.mark.timeout(120)

PROMPT = "w5 w6 w7"
ORIGIN = "http://app.example"
API_KEY = "s3cret"
PREFLIGHT = {"origin": ORIGIN, "access-control-request-method": "POST",
             "access-control-request-headers": "authorization, content-type"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(tiny_model):
    with run_server(make_engine(tiny_model)) as running:
        yield running


@pytest.fixture(scope="module")
def cors_server(tiny_model):
    with run_server(make_engine(tiny_model), api_key=API_KEY, allowed_origins=[ORIGIN]) as running:
        yield running


def post(server, path: str, body: dict, **headers) -> httpx.Response:
    """JSON with escapes (``\\ud800``): httpx's own encoding cannot carry a lone surrogate."""
    return httpx.post(f"{server.url}{path}", content=json.dumps(body),
                      headers={"content-type": "application/json", **headers}, timeout=30)


def error(response: httpx.Response, status: int) -> tuple[str | None, str]:
    assert response.status_code == status, response.text
    return response.json()["error"]["param"], response.json()["error"]["message"]


# ---------------------------------------------------------------- /tokenize and /detokenize

def test_a_prompt_tokenizes_as_completions_see_it_and_detokenizes_back(server):
    tokenized = post(server, "/tokenize", {"model": MODEL_NAME, "prompt": PROMPT})
    completion = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1})
    detokenized = post(server, "/detokenize", {"model": MODEL_NAME, "tokens": tokenized.json()["tokens"]})

    assert tokenized.json() == {"count": 3, "max_model_len": 128, "tokens": [5, 6, 7], "token_strs": None}
    assert completion.json()["usage"]["prompt_tokens"] == 3
    assert detokenized.json() == {"prompt": PROMPT}


def test_token_strs_spell_each_token(server):
    body = post(server, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()

    assert body["token_strs"] == ["w5", "w6", "w7"]


def test_special_tokens_are_asked_for_or_not(server):
    with_special = post(server, "/tokenize", {"prompt": "<s> w5", "add_special_tokens": True}).json()
    without = post(server, "/tokenize", {"prompt": "<s> w5", "add_special_tokens": False}).json()

    assert with_special["tokens"][-1] == without["tokens"][-1] == 5  # the word tokenizer adds none of its own


def test_messages_tokenize_through_the_chat_template_as_chat_completions_see_them(server):
    messages = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"}]
    tokenized = post(server, "/tokenize", {"messages": messages, "return_token_strs": True}).json()
    chat = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    detokenized = post(server, "/detokenize", {"tokens": tokenized["tokens"]}).json()

    assert (tokenized["count"], tokenized["tokens"], tokenized["token_strs"]) == (3, [5, 6, 7], ["w5", "w6", "w7"])
    assert chat["usage"]["prompt_tokens"] == tokenized["count"]
    assert detokenized == {"prompt": PROMPT}


def test_a_prompt_longer_than_the_model_still_tokenizes_with_its_count(server):
    body = post(server, "/tokenize", {"prompt": " ".join(["w5"] * 200)}).json()

    assert (body["count"], body["max_model_len"]) == (200, 128)


def test_empty_inputs_give_empty_answers(server):
    assert post(server, "/tokenize", {"prompt": ""}).json()["tokens"] == []
    assert post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {"model": "nope", "prompt": PROMPT}, "model"),
    ("/detokenize", {"model": "nope", "tokens": [5]}, "model"),
])
def test_an_unknown_model_is_a_404(server, path, body, param):
    assert error(post(server, path, body), 404)[0] == param


@pytest.mark.parametrize(("body", "param", "words"), [
    ({}, "prompt", "either prompt"),
    ({"prompt": PROMPT, "messages": [{"role": "user", "content": "w5"}]}, "messages", "not both"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": "w5 \ud800"}, "prompt", "surrogate"),
    ({"prompt": PROMPT, "add_special_tokens": "yes"}, "add_special_tokens", "boolean"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "user", "content": "w5"}], "chat_template": "{{ 1 }}"}, "chat_template", "trust"),
    ({"messages": [{"role": "user", "content": "w5"}], "continue_final_message": True}, "continue_final_message",
     "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": "w5"}], "chat_template_kwargs": {"tokenize": True}}, "messages",
     "chat template"),
])
def test_a_bad_tokenize_body_is_a_400_naming_the_field(server, body, param, words):
    got_param, message = error(post(server, "/tokenize", body), 400)

    assert got_param == param
    assert words in message


@pytest.mark.parametrize(("tokens", "param", "words"), [
    ([5, 1000], "tokens", "token id 1000 at position 1 is out of range"),
    ([5, -1], "tokens.1", "greater than or equal to 0"),
    ([5, "w6"], "tokens.1", "integer"),
    ("w5", "tokens", "list"),
])
def test_bad_token_ids_are_a_400_naming_tokens(server, tokens, param, words):
    got_param, message = error(post(server, "/detokenize", {"tokens": tokens}), 400)

    assert got_param == param
    assert words in message


def test_the_openapi_document_lists_the_new_routes_with_their_errors(server):
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]

    for path in ("/tokenize", "/detokenize"):
        assert sorted(status for status in paths[path]["post"]["responses"] if status != "200") == \
            ["400", "404", "413", "431", "503"]
    assert "/version" in paths


def test_lora_adapter_names_tokenize_with_the_base_tokenizer(tmp_path):
    from test_lora_server import write_adapter

    hf_model = make_checkpoint(tmp_path / "base", TINY_CONFIGS["llama-gqa-untied"])
    adapter = write_adapter(hf_model, tmp_path / "sql", seed=1)
    with run_server(make_engine(tmp_path / "base", enable_lora=True), lora_modules={"sql": adapter}) as lora_server:
        tokenized = post(lora_server, "/tokenize", {"model": "sql", "prompt": PROMPT})
        detokenized = post(lora_server, "/detokenize", {"model": "sql", "tokens": [5, 6, 7]})

    assert tokenized.json()["tokens"] == [5, 6, 7]
    assert detokenized.json() == {"prompt": PROMPT}


# ---------------------------------------------------------------- /version

def test_version_is_the_package_version(server):
    response = httpx.get(f"{server.url}/version")

    assert response.json() == {"version": tokenmill.__version__}


# ---------------------------------------------------------------- CORS

def test_without_allowed_origins_there_are_no_cors_headers(server):
    preflight = httpx.options(f"{server.api_url}/completions", headers=PREFLIGHT)
    simple = httpx.get(f"{server.api_url}/models", headers={"origin": ORIGIN})

    assert preflight.status_code == 405
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in simple.headers


def test_a_preflight_from_an_allowed_origin_is_answered_without_the_api_key(cors_server):
    response = httpx.options(f"{cors_server.api_url}/completions", headers=PREFLIGHT)

    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "access-control-allow-credentials" not in response.headers


def test_a_preflight_from_another_origin_is_refused(cors_server):
    response = httpx.options(f"{cors_server.api_url}/completions",
                             headers={**PREFLIGHT, "origin": "http://evil.example"})

    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


def test_simple_requests_from_an_allowed_origin_carry_the_header_even_when_refused(cors_server):
    allowed = httpx.get(f"{cors_server.api_url}/models",
                        headers={"origin": ORIGIN, "authorization": f"Bearer {API_KEY}"})
    refused = httpx.get(f"{cors_server.api_url}/models", headers={"origin": ORIGIN})
    other = httpx.get(f"{cors_server.api_url}/models",
                      headers={"origin": "http://evil.example", "authorization": f"Bearer {API_KEY}"})

    assert (allowed.status_code, refused.status_code, other.status_code) == (200, 401, 200)
    assert allowed.headers["access-control-allow-origin"] == refused.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in other.headers


def test_cors_details_without_origins_are_a_config_error():
    check_cors_options([ORIGIN], ["GET"], None, True)
    check_cors_options(None, None, None, False)
    with pytest.raises(ConfigError, match="--allowed-origins"):
        check_cors_options(None, ["GET"], None, False)
    with pytest.raises(ConfigError, match="--allowed-origins"):
        check_cors_options([], None, None, True)


# ---------------------------------------------------------------- several served names

@pytest.fixture(scope="module")
def aliased(tiny_model):
    """An app serving the model as "tiny" and "tiny-alias" (run_server takes a single name)."""
    engine = AsyncEngine(make_engine(tiny_model), ServerMetrics(MODEL_NAME))
    app = build_app(engine, model_names=[MODEL_NAME, "tiny-alias"], chat_template=CHAT_TEMPLATE)
    with TestClient(app) as client:
        yield client


def test_every_served_name_is_listed(aliased):
    assert [card["id"] for card in aliased.get("/v1/models").json()["data"]] == [MODEL_NAME, "tiny-alias"]


@pytest.mark.parametrize(("model", "echoed"), [("tiny-alias", "tiny-alias"), (MODEL_NAME, MODEL_NAME),
                                               (None, MODEL_NAME)])
def test_responses_echo_the_name_the_request_used(aliased, model, echoed):
    completion = aliased.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2})
    chat = aliased.post("/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": PROMPT}]})
    tokenized = aliased.post("/tokenize", json={"model": model, "prompt": PROMPT})

    assert (completion.json()["model"], chat.json()["model"]) == (echoed, echoed)
    assert tokenized.json()["tokens"] == [5, 6, 7]


def test_an_unlisted_name_is_still_a_404_and_metrics_keep_the_first_name(aliased):
    response = aliased.post("/v1/completions", json={"model": "tiny-other", "prompt": PROMPT, "max_tokens": 2})
    metrics = aliased.get("/metrics").text

    assert response.status_code == 404
    assert 'model_name="tiny"' in metrics and "tiny-alias" not in metrics


def test_served_model_names_default_to_the_model_and_drop_duplicates():
    assert served_model_names(None, "/models/x") == ["/models/x"]
    assert served_model_names("a", "/models/x") == ["a"]
    assert served_model_names(["a", "b", "a"], "/models/x") == ["a", "b"]


# ---------------------------------------------------------------- the command line

def test_serve_flags_reach_the_server(tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr("tokenmill.server.serve", lambda config, **kwargs: calls.append(kwargs) or 0)

    status = cli.main(["serve", str(tiny_model), "--device", "cpu", "--served-model-name", "a", "b",
                       "--allowed-origins", f'["{ORIGIN}"]', "--allowed-methods", '["GET", "POST"]',
                       "--allow-credentials"])

    assert status == 0
    assert calls[0]["served_model_name"] == ["a", "b"]
    assert (calls[0]["allowed_origins"], calls[0]["allowed_methods"], calls[0]["allowed_headers"],
            calls[0]["allow_credentials"]) == ([ORIGIN], ["GET", "POST"], None, True)


@pytest.mark.parametrize("value", ["http://app.example", '{"a": 1}', '["a", 1]'])
def test_cors_flags_must_be_json_lists_of_strings(value):
    with pytest.raises(argparse.ArgumentTypeError, match="JSON list of strings"):
        cli._json_str_list(value)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "m", "--allowed-origins", value])
