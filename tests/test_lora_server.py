"""LoRA over HTTP: adapters named by --lora-modules or loaded at run time are models of their own; a
request's ``model`` picks one, ``/v1/models`` lists them with their base, and unloading one stops
serving it. The engine-side exactness (PEFT-equal tokens, slots, LRU) is tested in test_lora.py."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from builders import TINY_CONFIGS, make_checkpoint
from server_builders import MODEL_NAME, make_engine, run_server

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(hf_model, path, seed: int) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(hf_model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                     init_lora_weights=False))
    with torch.no_grad():  # big enough updates that greedy tokens change
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(path)
    peft_model.unload()
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_path = tmp_path_factory.mktemp("tiny")
    hf_model = make_checkpoint(model_path, TINY_CONFIGS["llama-gqa-untied"])
    adapters = tmp_path_factory.mktemp("adapters")
    return model_path, write_adapter(hf_model, adapters / "sql", 1), write_adapter(hf_model, adapters / "chat", 2)


def completion(client, model: str, prompt: str = "w3 w4 w5 w6") -> tuple[str, str]:
    result = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.0)
    return result.model, result.choices[0].text


def test_adapters_are_served_by_name_and_loaded_and_unloaded_at_run_time(setup):
    model_path, sql, chat = setup
    engine = make_engine(model_path, enable_lora=True, max_loras=2, max_lora_rank=8)
    with run_server(engine, lora_modules={"sql": sql}) as server:
        client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
        cards = {card.id: card for card in client.models.list().data}
        assert set(cards) == {MODEL_NAME, "sql"}
        assert cards["sql"].parent == MODEL_NAME and cards["sql"].root == sql
        base_model, base_text = completion(client, MODEL_NAME)
        sql_model, sql_text = completion(client, "sql")
        assert (base_model, sql_model) == (MODEL_NAME, "sql") and sql_text != base_text

        loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "chat", "lora_path": chat})
        assert loaded.status_code == 200, loaded.text
        chat_model, chat_text = completion(client, "chat")
        assert chat_model == "chat" and chat_text not in (base_text, sql_text)
        assert completion(client, "sql")[1] == sql_text  # the adapters do not disturb each other

        taken = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "chat", "lora_path": chat})
        assert taken.status_code == 400 and "already served" in taken.text
        missing = httpx.post(f"{server.url}/v1/load_lora_adapter",
                             json={"lora_name": "ghost", "lora_path": str(model_path / "nowhere")})
        assert missing.status_code == 400 and "ghost" in missing.text

        assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "chat"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            completion(client, "chat")
        assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "chat"}).status_code == 404
        chat_reply = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "w3 w4"}],
                                                    max_tokens=4, temperature=0.0)
        assert chat_reply.model == "sql"


def test_without_enable_lora_there_is_no_adapter_route_and_lora_modules_are_refused(setup):
    from tokenmill.errors import ConfigError

    model_path, sql, _ = setup
    engine = make_engine(model_path)
    with run_server(engine) as server:
        response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": sql})
        assert response.status_code == 404
    with pytest.raises(ConfigError, match="--lora-modules needs --enable-lora"):
        with run_server(make_engine(model_path), lora_modules={"sql": sql}):
            pass
