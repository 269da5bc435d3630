"""Multi-LoRA serving: PEFT adapters applied per row of the batch give PEFT's own greedy tokens.

Adapters are made by PEFT itself on the tiny Llama checkpoint (``init_lora_weights=False``: B is not
zero, so an adapter changes the tokens) and saved with ``save_pretrained``:

    A   q_proj, v_proj                      r=4, alpha=8
    B   all seven projections, rsLoRA       r=8, alpha=16     (scaling alpha / sqrt(r))
    C   o_proj, down_proj                   r=2, alpha=4

Every request must give the greedy tokens of PEFT's model ``generate`` with its adapter (base rows: of
the plain model), in mixed batches, with LRU slot and host-cache reuse, under emulated CUDA graphs and
with prefix caching (blocks never shared across adapters). fp32 on CPU.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from builders import (TINY_CONFIGS, assert_no_leaks, hf_greedy, make_checkpoint, make_hf_model, make_llm, output_ids,
                      random_prompts, token_prompts)
from tokenmill import LoRARequest
from tokenmill.errors import ConfigError
from tokenmill.sampling_params import SamplingParams

peft = pytest.importorskip("peft")

CONFIG = TINY_CONFIGS["llama-gqa-untied"]
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"A": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
            "B": dict(target_modules=ALL_SEVEN, r=8, lora_alpha=16, use_rslora=True),
            "C": dict(target_modules=["o_proj", "down_proj"], r=2, lora_alpha=4)}
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPTS = random_prompts([7, 21, 4, 35], seed=5)
LORA_OPTIONS = dict(enable_lora=True, max_loras=2, max_lora_rank=8)


def make_adapter(path, config, seed: int, **lora_options):
    """A PEFT LoRA adapter over the tiny model's weights, saved at ``path``; returns the PEFT model."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(make_hf_model(config), peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0,
                                                                       **lora_options))
    model.save_pretrained(path)
    return model.eval()


class World:
    """The checkpoint, the adapters and their expected tokens (computed once per prompt and adapter)."""

    def __init__(self, root) -> None:
        self.root = root
        self.checkpoint = root / "model"
        self.models = {None: make_checkpoint(self.checkpoint, CONFIG)}
        self.loras = {}
        for i, (name, options) in enumerate(ADAPTERS.items()):
            self.models[name] = make_adapter(root / name, CONFIG, seed=10 + i, **options)
            self.loras[name] = LoRARequest(f"adapter-{name}", i + 1, str(root / name))
        self._expected = {}

    def expected(self, prompt: list[int], name: str | None) -> list[int]:
        key = (tuple(prompt), name)
        if key not in self._expected:
            self._expected[key] = hf_greedy(self.models[name], prompt, MAX_TOKENS)
        return self._expected[key]

    def lora(self, name: str | None) -> LoRARequest | None:
        return None if name is None else self.loras[name]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("lora"))


def run(llm, world: World, cases: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """Generate every (prompt, adapter) in one batch; assert PEFT's tokens; return ours."""
    got = output_ids(llm.generate(token_prompts([p for p, _ in cases]), GREEDY, use_tqdm=False,
                                  lora_request=[world.lora(name) for _, name in cases]))
    assert_no_leaks(llm)
    for (prompt, name), ids in zip(cases, got):
        assert ids == world.expected(prompt, name), f"adapter {name}, prompt of {len(prompt)} tokens"
        if name is not None:  # the adapter changes the tokens: every test fails with LoRA switched off
            assert ids != world.expected(prompt, None), f"adapter {name} gave the base model's tokens"
    return got


def test_mixed_batch_matches_peft_per_adapter(world):
    llm = make_llm(world.checkpoint, **LORA_OPTIONS)
    cases = [(PROMPTS[0], None), (PROMPTS[0], "A"), (PROMPTS[0], "B"), (PROMPTS[1], "A"), (PROMPTS[2], None),
             (PROMPTS[3], "B"), (PROMPTS[1], None), (PROMPTS[2], "B")]
    got = run(llm, world, cases)
    assert got[1] != got[2]
    manager = llm.engine.core.runner.lora
    assert set(manager.resident) == {1, 2}


def test_prefix_cache_is_never_shared_across_adapters(world):
    llm = make_llm(world.checkpoint, **LORA_OPTIONS)
    prompt = PROMPTS[3]  # 35 tokens: two full blocks of 16

    def one(name):
        out = llm.generate(token_prompts([prompt]), GREEDY, use_tqdm=False, lora_request=world.lora(name))[0]
        assert out.outputs[0].token_ids == world.expected(prompt, name)
        assert name is None or out.outputs[0].token_ids != world.expected(prompt, None)
        return out.num_cached_tokens

    assert one(None) == 0
    assert one("A") == 0  # the base model's blocks hold other keys and values
    assert one("B") == 0
    assert one("A") == 32  # hits within one adapter
    assert one(None) == 32
    assert_no_leaks(llm)


def test_more_adapters_than_slots_and_host_cache_reuse_them(world):
    llm = make_llm(world.checkpoint, enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=8)
    manager = llm.engine.core.runner.lora
    for i, name in enumerate(["A", "B", "C", "A"]):
        run(llm, world, [(PROMPTS[i], name), (PROMPTS[(i + 1) % 4], None)])
        assert manager.resident == {world.loras[name].lora_int_id: 0}  # the one slot, refilled
    assert manager.num_slot_loads == 4
    assert manager.num_host_loads == 4  # C pushed A out of the host cache (2 adapters): A was read again
    # one batch of three adapters and the base model: the scheduler runs one adapter at a time
    run(llm, world, [(PROMPTS[0], "C"), (PROMPTS[1], "A"), (PROMPTS[2], "B"), (PROMPTS[3], None),
                     (PROMPTS[2], "C")])


def test_cuda_graph_emulation_with_lora_matches_eager(world):
    llm = make_llm(world.checkpoint, **LORA_OPTIONS)
    runner = llm.engine.core.runner
    runner.init_cuda_graphs("emulate", [1, 2, 4, 8])
    run(llm, world, [(PROMPTS[0], "A"), (PROMPTS[1], None), (PROMPTS[2], "B")])  # 3 rows: padded to 4
    run(llm, world, [(PROMPTS[3], "B")])
    assert sum(runner.graphs.num_runs.values()) >= 2 * (MAX_TOKENS - 1)


def test_lora_on_a_quantized_base_weight_adds_its_delta():
    from tokenmill.layers import Linear
    from tokenmill.lora import LinearLoRA, LoRAAdapter, LoRAStepState
    from tokenmill.quantization.fp8 import Fp8Weight

    torch.manual_seed(0)
    layer = Linear(32, 24, bias=False, shard_sizes=(16, 8))
    layer.load(torch.randn(24, 32))
    layer.quantize(Fp8Weight)
    state = LoRAStepState()
    layer.lora = LinearLoRA(layer, ("gate_proj", "up_proj"), max_loras=2, max_rank=4, state=state,
                            device=torch.device("cpu"), dtype=torch.float32)
    a, b = torch.randn(3, 32), torch.randn(8, 3)
    layer.lora.write(1, 0, LoRAAdapter(1, "x", 3, 1.0, {(0, "up_proj"): (a, b)}))  # the second shard only
    x = torch.randn(5, 32)
    base = layer(x)
    state.token_slots = torch.tensor([1, -1, 1, 0, -1], dtype=torch.int32)
    with_lora = layer(x)
    expected = base.clone()
    expected[[0, 2], 16:] += x[[0, 2]] @ a.T @ b.T
    torch.testing.assert_close(with_lora, expected, rtol=1e-5, atol=1e-4)
    assert not torch.equal(with_lora, base)


def _bad_adapters(world) -> dict[str, tuple[LoRARequest, str]]:
    root = world.root / "bad"
    root.mkdir(exist_ok=True)
    only_config = root / "only-config"
    only_config.mkdir(exist_ok=True)
    shutil.copy(world.root / "A" / "adapter_config.json", only_config)
    rank16 = root / "rank16"
    if not rank16.exists():
        make_adapter(rank16, CONFIG, seed=3, target_modules=["q_proj"], r=16, lora_alpha=16)
    unknown = root / "unknown-target"
    if not unknown.exists():
        shutil.copytree(world.root / "A", unknown)
        config = json.loads((unknown / "adapter_config.json").read_text())
        config["target_modules"] = ["q_proj", "v_proj", "lm_head"]
        (unknown / "adapter_config.json").write_text(json.dumps(config))
    other_base = root / "other-base"
    if not other_base.exists():
        make_adapter(other_base, TINY_CONFIGS["llama-3-heads-1-kv-head"], seed=4, target_modules=["q_proj"], r=4,
                     lora_alpha=8)
    cases = {"missing": (root / "nowhere", "does not exist"), "no-weights": (only_config, "missing adapter_model"),
             "rank16": (rank16, "above max_lora_rank=8"), "unknown": (unknown, "unknown target module"),
             "other-base": (other_base, "do not fit the base model")}
    return {name: (LoRARequest(f"bad-{name}", 50 + i, str(path)), message)
            for i, (name, (path, message)) in enumerate(cases.items())}


def test_bad_adapters_are_refused_by_name_while_others_run(world):
    llm = make_llm(world.checkpoint, **LORA_OPTIONS)
    engine = llm.engine
    good = [(PROMPTS[0], "A"), (PROMPTS[1], None), (PROMPTS[2], "B")]
    for i, (prompt, name) in enumerate(good):
        engine.add_request(f"good-{i}", {"prompt_token_ids": prompt}, GREEDY, lora_request=world.lora(name))
    engine.step()  # the good requests are running when the bad ones come
    for name, (lora, message) in _bad_adapters(world).items():
        with pytest.raises(ValueError, match=f"'bad-{name}'.*{message}"):
            engine.add_request(f"bad-{name}", {"prompt_token_ids": PROMPTS[3]}, GREEDY, lora_request=lora)
    with pytest.raises(ValueError, match="lora_int_id 1 already names the adapter at"):  # one id, one adapter
        engine.add_request("clash", {"prompt_token_ids": PROMPTS[3]}, GREEDY,
                           lora_request=LoRARequest("clash", 1, str(world.root / "B")))
    # an adapter broken after it was accepted fails its own request only
    broken = world.root / "broken"
    shutil.copytree(world.root / "C", broken, dirs_exist_ok=True)
    engine.add_request("broken", {"prompt_token_ids": PROMPTS[3]}, GREEDY,
                       lora_request=LoRARequest("broken", 90, str(broken)))
    os.remove(broken / "adapter_model.safetensors")
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    for i, (prompt, name) in enumerate(good):
        assert finals[f"good-{i}"].outputs[0].token_ids == world.expected(prompt, name)
        assert name is None or world.expected(prompt, name) != world.expected(prompt, None)
    assert finals["broken"].outputs[0].finish_reason == "error"
    assert_no_leaks(llm)


def test_lora_requests_need_enable_lora_and_one_rank(world):
    llm = make_llm(world.checkpoint)
    with pytest.raises(ValueError, match="lora_request 'adapter-A'.*enable_lora"):
        llm.generate(token_prompts([PROMPTS[0]]), GREEDY, lora_request=world.lora("A"))
    assert_no_leaks(llm)
    with pytest.raises(ConfigError, match="enable_lora: .*tensor_parallel_size 1 only"):
        make_llm(world.checkpoint, enable_lora=True, tensor_parallel_size=2)
