"""LlamaForCausalLM (Llama, Mistral, Qwen2) against transformers on tiny random configs.

Every test loads the weights of a transformers model into ours and compares
logits (fp32) with transformers' full-sequence forward: one prefill, chunked
prefill over the paged cache, token-by-token decode, and a mixed batch of
three requests with shuffled block tables.
"""
from types import SimpleNamespace

import pytest
import torch
import transformers

import tokenmill
from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend
from tokenmill.plugins.models.llama import LlamaForCausalLM, rope_inv_freq
from tokenmill.testing.builders import make_attention_metadata, shuffled_block_tables
from tokenmill.testing.conformance import model_matches_transformers, model_uses_paged_cache

BLOCK_SIZE = 4
NUM_BLOCKS = 32
ATOL, RTOL = 1e-4, 1e-4

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

CONFIGS = {
    "llama-untied-gqa2": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=False),
    "llama-tied-mha": lambda: transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 4},
                                                       tie_word_embeddings=True),
    "llama-head-dim-gqa4": lambda: transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 1}, head_dim=32),
    "llama-biases": lambda: transformers.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True),
    # original context 32 puts the head's wavelengths in all three llama3 bands
    "llama3-rope": lambda: transformers.LlamaConfig(**TINY, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=None, head_dim=16),
    "qwen2-tied": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
}
HF_CLASSES = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
              "qwen2": transformers.Qwen2ForCausalLM}


def make_pair(config):
    """A transformers model with random weights (biases and norms included) and ours with the same weights."""
    torch.manual_seed(0)
    hf_model = HF_CLASSES[config.model_type](config).float().eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    spec = LlamaForCausalLM.kv_cache_spec(config)
    backend = TorchAttentionBackend(num_heads=config.num_attention_heads, num_kv_heads=spec.num_kv_heads,
                                    head_size=spec.head_size, dtype=torch.float32, device="cpu")
    model = LlamaForCausalLM(config, backend).eval()
    model.load_weights(hf_model.state_dict().items())
    model.bind_kv_caches([torch.zeros(backend.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, spec.num_kv_heads,
                                                             spec.head_size))
                          for _ in range(spec.num_layers)])
    return hf_model, model


def random_ids(n, seed):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_model, ids):
    with torch.inference_mode():
        return hf_model(ids[None]).logits[0].float()


def run(model, ids, positions, query_lens, seq_lens, tables):
    """One flat forward step; logits of every token [T, vocab]."""
    md = make_attention_metadata(query_lens, seq_lens, tables, BLOCK_SIZE)
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, md))


def block_tables(seq_lens, seed=0):
    return shuffled_block_tables(seq_lens, BLOCK_SIZE, NUM_BLOCKS, torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(CONFIGS), scope="module")
def built_pair(request):
    return make_pair(CONFIGS[request.param]())


@pytest.fixture
def pair(built_pair):
    """(transformers model, our model) with an empty KV cache."""
    for cache in built_pair[1].kv_caches:
        cache.zero_()
    return built_pair


def test_prefill_matches_transformers(pair):
    hf_model, model = pair
    ids = random_ids(13, seed=1)
    logits = run(model, ids, torch.arange(13), [13], [13], block_tables([13]))
    assert logits.dtype == torch.float32 and logits.shape == (13, 128)
    torch.testing.assert_close(logits, hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL)


def test_second_chunk_attends_to_cached_first_chunk(pair):
    hf_model, model = pair
    ids = random_ids(13, seed=2)
    table = block_tables([13])
    first = run(model, ids[:7], torch.arange(7), [7], [7], table)
    second = run(model, ids[7:], torch.arange(7, 13), [6], [13], table)
    torch.testing.assert_close(torch.cat([first, second]), hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL)


def test_token_by_token_decode_after_prefill(pair):
    hf_model, model = pair
    ids = random_ids(12, seed=3)
    table = block_tables([12])
    steps = [run(model, ids[:5], torch.arange(5), [5], [5], table)]
    for pos in range(5, 12):
        steps.append(run(model, ids[pos:pos + 1], torch.tensor([pos]), [1], [pos + 1], table))
    torch.testing.assert_close(torch.cat(steps), hf_logits(hf_model, ids), atol=ATOL, rtol=RTOL)


def test_mixed_batch_with_shuffled_block_tables(pair):
    """Step 1 prefills requests 0 and 1 partly; step 2 batches a decode (0), a chunk
    after a cached prefix not aligned to a block (1) and a fresh prompt (2)."""
    hf_model, model = pair
    prompts = [random_ids(n, seed=10 + i) for i, n in enumerate((10, 14, 9))]
    tables = block_tables([10, 14, 9], seed=4)
    run(model, torch.cat([prompts[0][:9], prompts[1][:5]]), torch.cat([torch.arange(9), torch.arange(5)]),
        [9, 5], [9, 5], tables[:2])
    ids = torch.cat([prompts[0][9:], prompts[1][5:], prompts[2]])
    positions = torch.cat([torch.tensor([9]), torch.arange(5, 14), torch.arange(9)])
    logits = run(model, ids, positions, [1, 9, 9], [10, 14, 9], tables)
    expected = torch.cat([hf_logits(hf_model, prompts[0])[9:], hf_logits(hf_model, prompts[1])[5:],
                          hf_logits(hf_model, prompts[2])])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def test_greedy_generation_matches_generate(pair):
    hf_model, model = pair
    prompt = random_ids(6, seed=5)
    table = block_tables([16])
    tokens = prompt.tolist()
    logits = run(model, prompt, torch.arange(6), [6], [6], table)
    for _ in range(10):
        tokens.append(int(logits[-1].argmax()))
        pos = len(tokens) - 1
        logits = run(model, torch.tensor(tokens[-1:]), torch.tensor([pos]), [1], [pos + 1], table)
    with torch.inference_mode():
        expected = hf_model.generate(prompt[None], attention_mask=torch.ones(1, 6, dtype=torch.long),
                                     max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tokens == expected[0].tolist()


# ---------------------------------------------------------------- config handling and weights


def test_legacy_rope_fields_give_the_same_frequencies():
    """rope_theta + rope_scaling (transformers 4 configs) equals transformers 5's rope_parameters."""
    new = CONFIGS["llama3-rope"]()
    legacy = SimpleNamespace(max_position_embeddings=128, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    assert torch.equal(rope_inv_freq(legacy, 16), rope_inv_freq(new, 16))
    default = SimpleNamespace(max_position_embeddings=128, rope_theta=10000.0, rope_scaling=None)
    assert torch.equal(rope_inv_freq(default, 16), rope_inv_freq(transformers.LlamaConfig(**TINY), 16))


def test_unknown_rope_type_is_refused():
    config = SimpleNamespace(rope_parameters={"rope_type": "spiral", "rope_theta": 1e4, "factor": 4.0},
                             max_position_embeddings=128)
    with pytest.raises(ValueError, match="rope_type must be one of .* got 'spiral'"):
        rope_inv_freq(config, 16)


def test_a_mistral_window_shorter_than_the_context_slides_every_layer():
    config = transformers.MistralConfig(**TINY, sliding_window=64)
    assert LlamaForCausalLM.kv_cache_spec(config).sliding_window == 64  # the KV cache frees blocks behind it


def test_sliding_window_covering_the_context_is_accepted():
    config = transformers.MistralConfig(**TINY, sliding_window=128)
    backend = TorchAttentionBackend(num_heads=4, num_kv_heads=2, head_size=16, dtype=torch.float32,
                                    device="cpu")
    LlamaForCausalLM(config, backend)


def test_load_weights_maps_fused_shards_and_skips_tied_lm_head():
    hf_model, model = make_pair(CONFIGS["qwen2-tied"]())
    loaded = model.load_weights(hf_model.state_dict().items())
    assert loaded == set(dict(model.named_parameters()))
    qkv = model.layers[1].self_attn.qkv_proj
    hf_attn = hf_model.model.layers[1].self_attn
    assert torch.equal(qkv.bias[64:96], hf_attn.k_proj.bias)
    assert torch.equal(qkv.weight[96:], hf_attn.v_proj.weight)
    assert model.layers[1].self_attn.o_proj.bias is None


def test_unexpected_weight_is_named():
    hf_model, model = make_pair(CONFIGS["llama-untied-gqa2"]())
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.self_attn.q_norm.weight'"):
        model.load_weights([("model.layers.0.self_attn.q_norm.weight", torch.zeros(16))])


def test_weight_of_wrong_shape_is_named():
    hf_model, model = make_pair(CONFIGS["llama-untied-gqa2"]())
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(64, 64\), "
                                         r"expected \(32, 64\)"):
        model.load_weights([("model.layers.0.self_attn.k_proj.weight", torch.zeros(64, 64))])


def test_conformance_suite_passes():
    model_matches_transformers(LlamaForCausalLM)
    model_uses_paged_cache(LlamaForCausalLM)


# ---------------------------------------------------------------- registry


@pytest.fixture(scope="module")
def registry():
    return tokenmill.Registry(builtins=("tokenmill.plugins.models",), entry_points=False)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_llama_family_is_available(registry, arch):
    assert registry.get("model", arch) is LlamaForCausalLM


@pytest.mark.parametrize("arch", ["MambaForCausalLM", "Mamba2ForCausalLM", "JambaForCausalLM",
                                  "T5ForConditionalGeneration", "WhisperForConditionalGeneration",
                                  "BertModel", "XLMRobertaModel"])
def test_v0_only_architectures_are_refused_with_reason(registry, arch):
    with pytest.raises(tokenmill.RefusedComponentError,
                       match=f"model '{arch}' .* refused: this engine does not run it"):
        registry.get("model", arch)
