"""The mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against transformers.

Each family gets a tiny random checkpoint from its transformers config class: 8 experts, 2 per token,
so most experts receive no token in a decode step; Qwen2-MoE with its shared expert and a dense layer
(``mlp_only_layers``), Qwen3-MoE renormalising its top-k (``norm_topk_prob``), Mixtral always. Then:

- ``LLM.generate`` gives transformers' greedy tokens and logprobs (fp32, prompts chunked across steps),
  from the checkpoint ``save_pretrained`` writes (one tensor per expert, Mixtral's ``block_sparse_moe``);
- each routing feature, switched off in our model, makes its logits leave transformers' (loaded from
  transformers 5's in-memory layout: experts stacked per layer);
- experts that receive no token are never read: filled with NaN, they change nothing;
- a GGUF written as llama.cpp writes each architecture (Mixtral as ``llama``; its 3-D expert tensors in
  Q8_0, expanded at load) loads with its config and gives its transformers twin's logits, and a dense
  Llama GGUF still reads as Llama;
- tensor-parallel size 2 gives size 1's logits, each rank holding its slice of every expert;
- decode steps through emulated CUDA graphs (padded batches) give the eager tokens.
"""
import dataclasses

import gguf
import pytest
import torch
import transformers
from gguf import quants

import tokenmill
from builders import (assert_engine_matches_transformers, assert_no_leaks, assert_switching_off_breaks_parity,
                      build_local_model, hf_logits, make_hf_model, make_llm, paged_steps_logits, prefill_logits,
                      random_prompts, save_word_tokenizer, token_prompts, write_llama_cpp_gguf)
from tokenmill import loader
from tokenmill.distributed import get_tensor_parallel
from tokenmill.gguf_loader import hf_config_from_gguf
from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend
from tokenmill.plugins.models import moe as moe_module
from tokenmill.plugins.models.layers import QKNorm
from tokenmill.plugins.models.moe import SparseMoE
from tokenmill.sampling_params import SamplingParams
from tokenmill.testing.tensor_parallel import run_ranks

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
EXPERTS = dict(num_experts_per_tok=2)

FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(**BASE, **EXPERTS, intermediate_size=64, num_local_experts=8,
                                                  architectures=["MixtralForCausalLM"]),
    "qwen2-moe": lambda: transformers.Qwen2MoeConfig(**BASE, **EXPERTS, intermediate_size=96, num_experts=8,
                                                     moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                                     mlp_only_layers=[1], architectures=["Qwen2MoeForCausalLM"]),
    "qwen3-moe": lambda: transformers.Qwen3MoeConfig(**BASE, **EXPERTS, head_dim=32, intermediate_size=96,
                                                     num_experts=8, moe_intermediate_size=32, norm_topk_prob=True,
                                                     architectures=["Qwen3MoeForCausalLM"]),
    "olmoe": lambda: transformers.OlmoeConfig(**BASE, **EXPERTS, intermediate_size=32, num_experts=8,
                                              architectures=["OlmoeForCausalLM"]),
}
PROMPT_LENGTHS = [40, 7, 17]
MAX_TOKENS = 12
BLOCK_SIZE = 16


def model_class(config):
    registry = tokenmill.Registry(builtins=("tokenmill.plugins.models",), entry_points=False)
    return loader.resolve_model_class(registry, config)


def build(config, num_blocks=8):
    """Our model of ``config`` (fp32, torch backend with this rank's heads) with bound KV caches."""
    return build_local_model(model_class(config), config, num_blocks, BLOCK_SIZE)


def model_pair(name):
    """(transformers model, our model loaded from its in-memory state dict: experts stacked)."""
    hf_model = make_hf_model(FAMILIES[name]())
    model, _ = build(hf_model.config)
    model.load_weights(hf_model.state_dict().items())
    return hf_model, model


def sparse_layers(model):
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoE)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, checkpoint directory, transformers model)."""
    path = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(FAMILIES[request.param]())
    hf_model.save_pretrained(path)
    save_word_tokenizer(path, VOCAB)
    return request.param, path, hf_model


# ---------------------------------------------------------------- engine parity

def test_greedy_and_logprobs_match_transformers(family):
    name, path, hf_model = family
    # 32 tokens a step: the 40-token prompt goes in two chunks, the second attending to a cached prefix
    llm = assert_engine_matches_transformers(path, hf_model, random_prompts(PROMPT_LENGTHS), MAX_TOKENS,
                                             min_distinct=3, max_num_batched_tokens=32)
    model = llm.engine.core.model
    layers = [type(layer.mlp).__name__ for layer in model.layers]
    assert layers == (["SparseMoE", "GatedMLP"] if name == "qwen2-moe" else ["SparseMoE"] * 2)


# ---------------------------------------------------------------- each feature matters

def _renormalize(value):
    def switch(model):
        for moe in sparse_layers(model):
            moe.renormalize = value
    return switch


def _top_1(model):
    for moe in sparse_layers(model):
        moe.top_k = 1


class _OpenGate(torch.nn.Module):
    """A shared-expert gate that lets everything through: sigmoid(+inf) = 1."""

    def forward(self, x):
        return torch.full((x.shape[0], 1), float("inf"), dtype=x.dtype)


def _ungated_shared_expert(model):
    for moe in sparse_layers(model):
        moe.shared_expert_gate = _OpenGate()


def _no_shared_expert(model):
    for moe in sparse_layers(model):
        moe.shared_expert = None


def _without_qk_norm(model):
    for layer in model.layers:
        layer.self_attn.spec = dataclasses.replace(layer.self_attn.spec, qk_norm=QKNorm.NONE)


FEATURES = {
    "mixtral top-k renormalised": ("mixtral", _renormalize(False)),
    "mixtral top-2": ("mixtral", _top_1),
    "qwen3-moe norm_topk_prob": ("qwen3-moe", _renormalize(False)),
    "qwen2-moe norm_topk_prob false": ("qwen2-moe", _renormalize(True)),
    "olmoe norm_topk_prob false": ("olmoe", _renormalize(True)),
    "qwen2-moe shared-expert gate": ("qwen2-moe", _ungated_shared_expert),
    "qwen2-moe shared expert": ("qwen2-moe", _no_shared_expert),
    "qwen3-moe qk-norm": ("qwen3-moe", _without_qk_norm),
    "olmoe full-width qk-norm": ("olmoe", _without_qk_norm),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_switching_a_feature_off_breaks_parity(feature):
    """Ours matches transformers over a 60-token prompt, and no longer does without the feature."""
    name, switch_off = FEATURES[feature]
    assert_switching_off_breaks_parity(*model_pair(name), switch_off)


def test_experts_that_receive_no_token_are_never_read(monkeypatch):
    """Three tokens pick at most 6 of 8 experts a layer: the others, filled with NaN, change nothing."""
    hf_model, model = model_pair("mixtral")
    ids = torch.tensor(random_prompts([3], seed=11)[0])
    picked = []
    reference = moe_module.route
    monkeypatch.setattr(moe_module, "route", lambda *args: picked.append(reference(*args)[1]) or reference(*args))
    expected = prefill_logits(model, ids)
    torch.testing.assert_close(expected, hf_logits(hf_model, ids), atol=2e-4, rtol=1e-3)
    with torch.no_grad():
        for moe, ids_of_layer in zip(sparse_layers(model), picked):
            idle = sorted(set(range(8)) - set(ids_of_layer.flatten().tolist()))
            assert idle
            moe.experts.w13[idle] = float("nan")
            moe.experts.w2[idle] = float("nan")
    torch.testing.assert_close(prefill_logits(model, ids), expected, atol=0, rtol=0)


# ---------------------------------------------------------------- loading

def per_expert(state):
    """transformers 5's stacked experts as the per-expert tensors HF checkpoint files hold."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(".experts.gate_up_proj"):
            for e, (gate, up) in enumerate(zip(*tensor.chunk(2, dim=1))):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = up
        elif name.endswith(".experts.down_proj"):
            for e, down in enumerate(tensor):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = down
        else:
            out[name] = tensor
    return out


def test_a_missing_expert_or_experts_of_a_dense_layer_are_reported():
    hf_model = make_hf_model(FAMILIES["qwen2-moe"]())
    state = per_expert(hf_model.state_dict())
    model, _ = build(hf_model.config)
    loaded = model.load_weights((name, t) for name, t in state.items() if ".experts.3.up_proj" not in name)
    assert "layers.0.mlp.experts.w2" in loaded and "layers.0.mlp.experts.w13" not in loaded
    with pytest.raises(ValueError, match="no experts 'layers.1.mlp.experts'"):
        model.load_weights([("model.layers.1.mlp.experts.0.gate_proj.weight", torch.zeros(32, 64))])
    with pytest.raises(ValueError, match=r"expected \(32, 64\)"):
        model.load_weights([("model.layers.0.mlp.experts.0.gate_proj.weight", torch.zeros(64, 64))])
    # llama.cpp may store the shared expert's one-row gate as a vector
    gate = state["model.layers.0.mlp.shared_expert_gate.weight"]
    model.load_weights([("model.layers.0.mlp.shared_expert_gate.weight", gate[0] * 2)])
    assert torch.equal(model.layers[0].mlp.shared_expert_gate.weight, gate * 2)


# ---------------------------------------------------------------- GGUF

GGUF_ARCHS = {"mixtral": "llama", "qwen2-moe": "qwen2moe", "qwen3-moe": "qwen3moe", "olmoe": "olmoe"}
GGUF_CONFIG_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "shared_expert_intermediate_size", "norm_topk_prob", "qkv_bias", "attention_bias",
                      "mlp_only_layers", "tie_word_embeddings"]
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def gguf_twin(name):
    """FAMILIES[name] as llama.cpp can write it (every Qwen2-MoE layer sparse), its expert weights rounded
    through Q8_0 as the file stores them."""
    config = FAMILIES[name]()
    if name == "qwen2-moe":
        config.mlp_only_layers = []
    hf_model = make_hf_model(config)
    with torch.no_grad():
        for param in hf_model.parameters():
            if param.dim() == 3:
                rows = quants.quantize(param.reshape(-1, param.shape[-1]).numpy(), Q8_0)
                param.copy_(torch.from_numpy(quants.dequantize(rows, Q8_0)).reshape(param.shape))
    return hf_model


@pytest.mark.parametrize("name", list(GGUF_ARCHS))
def test_gguf_file_loads_with_its_config_and_matches_transformers(tmp_path, name):
    hf_model = gguf_twin(name)
    path = tmp_path / "tiny.gguf"
    write_llama_cpp_gguf(path, GGUF_ARCHS[name], hf_model,
                         tensor_type=lambda _, shape: Q8_0 if len(shape) == 3 else gguf.GGMLQuantizationType.F32)
    source = loader.resolve_model_source(str(path), "auto")
    config = loader.load_hf_config(source)
    expected = hf_model.config
    assert config.architectures == expected.architectures
    for field in GGUF_CONFIG_FIELDS:
        assert getattr(config, field, None) == getattr(expected, field, None), field
    cls = model_class(config)
    spec = cls.kv_cache_spec(config)
    backend = TorchAttentionBackend(num_heads=config.num_attention_heads, num_kv_heads=spec.num_kv_heads,
                                    head_size=spec.head_size, dtype=torch.float32, device="cpu")
    model = loader.load_model(config, cls, backend, source=source, dtype=torch.float32, device="cpu",
                              quantization=loader.resolve_quantization(None, source, cls))
    model.bind_kv_caches([torch.zeros(backend.kv_cache_shape(8, BLOCK_SIZE, spec.num_kv_heads, spec.head_size))
                          for _ in range(spec.num_layers)])
    ids = torch.tensor(random_prompts([60], seed=3)[0])
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(hf_model, ids), atol=2e-4, rtol=1e-3)


def test_a_dense_llama_gguf_still_reads_as_llama(tmp_path):
    config = transformers.LlamaConfig(**BASE, intermediate_size=64, architectures=["LlamaForCausalLM"])
    write_llama_cpp_gguf(tmp_path / "llama.gguf", "llama", make_hf_model(config))
    assert hf_config_from_gguf(tmp_path / "llama.gguf") is None  # transformers reads it
    config = loader.load_hf_config(loader.resolve_model_source(str(tmp_path / "llama.gguf"), "auto"))
    assert config.architectures == ["LlamaForCausalLM"] and model_class(config).__name__ == "LlamaForCausalLM"


# ---------------------------------------------------------------- tensor parallelism and CUDA graphs

def tensor_parallel_job(config, state):
    """Logits of chunked prompts and decode steps (this rank's model), after checking that every expert
    holds this rank's slice of its intermediate features."""
    model, caches = build(config, num_blocks=6)
    model.load_weights(state.items())
    tp = get_tensor_parallel()
    count = config.moe_intermediate_size // tp.size
    rows = slice(tp.rank * count, (tp.rank + 1) * count)
    experts = model.layers[0].mlp.experts
    assert experts.w13.shape == (8, 2 * count, 64) and experts.w2.shape == (8, 64, count)
    for e in (0, 7):
        prefix = f"model.layers.0.mlp.experts.{e}"
        assert torch.equal(experts.w13[e, :count], state[f"{prefix}.gate_proj.weight"][rows])
        assert torch.equal(experts.w13[e, count:], state[f"{prefix}.up_proj.weight"][rows])
        assert torch.equal(experts.w2[e], state[f"{prefix}.down_proj.weight"][:, rows])
    assert model.layers[0].mlp.gate.weight.shape == (8, 64)  # the router is replicated
    return paged_steps_logits(model, caches, config.vocab_size)


def test_tensor_parallel_size_2_matches_size_1():
    """Qwen2-MoE (experts, shared expert, a dense layer) on two gloo ranks, from per-expert tensors."""
    hf_model = make_hf_model(FAMILIES["qwen2-moe"]())
    state = per_expert(hf_model.state_dict())
    results = run_ranks(tensor_parallel_job, 2, hf_model.config, state)
    expected = tensor_parallel_job(hf_model.config, state)
    for logits in results:
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(results[0], results[1])


def test_emulated_cuda_graph_decode_gives_the_eager_tokens(tmp_path):
    """Padded decode batches (3 requests at size 4) through the graph path's static buffers."""
    hf_model = make_hf_model(FAMILIES["mixtral"]())
    hf_model.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path, VOCAB)
    prompts = random_prompts([30, 9, 17], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    def generate(llm):
        ids = [o.outputs[0].token_ids for o in llm.generate(token_prompts(prompts), params, use_tqdm=False)]
        assert_no_leaks(llm)
        return ids

    expected = generate(make_llm(tmp_path))
    llm = make_llm(tmp_path)
    runner = llm.engine.core.runner
    runner.init_cuda_graphs("emulate", [1, 2, 4])
    for cache in llm.engine.core.kv_caches:  # padding rows read block 0: make a leak show
        cache[:, 0] = 100 * torch.randn(cache[:, 0].shape, generator=torch.Generator().manual_seed(0))
    assert generate(llm) == expected
    assert runner.graphs.num_runs[4] >= MAX_TOKENS - 1


def test_families_are_registered_and_declare_their_gguf_architectures():
    registry = tokenmill.Registry(builtins=("tokenmill.plugins.models",), entry_points=False)
    for name, arch in GGUF_ARCHS.items():
        cls = registry.get("model", FAMILIES[name]().architectures[0])
        assert cls.capabilities()["gguf"] == [arch] and cls.supports_tensor_parallel and cls.quantized_weights
