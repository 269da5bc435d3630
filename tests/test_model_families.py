"""The built-in model families against transformers: engine parity, rope types, GGUF files.

Each family gets a tiny random checkpoint from its transformers config class, with the feature
that sets it apart switched on and large enough to change greedy tokens (windows shorter than
the prompts, soft caps that bend the scores, multipliers far from 1); then:

- ``LLM.generate`` gives transformers' greedy ``generate`` tokens and logprobs (fp32, torch
  backend, and with heads of 64 on the Triton backend under the interpreter);
- each feature, switched off in our model, makes its logits leave transformers': the parity
  tests would catch its loss;
- every rope type matches transformers' own rotary embedding at positions past the original
  context;
- a GGUF written the way llama.cpp's converter writes each architecture loads, config included,
  and gives its transformers twin's logits.
"""
import dataclasses

import pytest
import torch
import transformers

import tokenmill
from builders import (assert_engine_matches_transformers, assert_switching_off_breaks_parity, hf_generate, hf_logits,
                      make_llm, prefill_logits, random_prompts, save_word_tokenizer, token_prompts)
from builders import write_llama_cpp_gguf as write_gguf
from tokenmill import loader
from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend
from tokenmill.plugins.models.decoder import token_seq_lens
from tokenmill.plugins.models.layers import QKNorm
from tokenmill.plugins.models.rope import RotaryEmbedding, rope_parameters
from tokenmill.sampling_params import SamplingParams
from tokenmill.testing.builders import make_attention_metadata

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
WEIGHT_STD = 0.15
SLIDING, FULL = "sliding_attention", "full_attention"


def _longrope(rotary_dim):
    half = rotary_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.0 + 2.0 * i for i in range(half)]}


# name -> transformers config; windows of 10-16 against prompts of ~40 tokens. Output heads are untied:
# tied to embeddings scaled by sqrt(hidden) (Gemma), a tiny random model repeats its input token
FAMILIES = {
    "qwen3": lambda: transformers.Qwen3Config(**BASE, head_dim=32, tie_word_embeddings=False,
                                              architectures=["Qwen3ForCausalLM"]),
    "qwen2-window": lambda: transformers.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=12,
                                                     max_window_layers=1, architectures=["Qwen2ForCausalLM"]),
    "mistral-window": lambda: transformers.MistralConfig(**BASE, sliding_window=10, head_dim=16,
                                                         architectures=["MistralForCausalLM"]),
    "gemma": lambda: transformers.GemmaConfig(**BASE, head_dim=16, tie_word_embeddings=False,
                                              architectures=["GemmaForCausalLM"]),
    "gemma2": lambda: transformers.Gemma2Config(**BASE, head_dim=16, query_pre_attn_scalar=24, sliding_window=12,
                                                attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                                tie_word_embeddings=False, architectures=["Gemma2ForCausalLM"]),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **BASE, head_dim=16, query_pre_attn_scalar=24, sliding_window=10, layer_types=[SLIDING, FULL],
        final_logit_softcapping=3.0, tie_word_embeddings=False, architectures=["Gemma3ForCausalLM"],
        rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                         FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}),
    # the 40-token prompt runs on the long factors, the others on the short ones (see PROMPT_LENGTHS)
    "phi3-longrope": lambda: transformers.Phi3Config(**BASE, original_max_position_embeddings=32, sliding_window=16,
                                                     rope_scaling=_longrope(8), partial_rotary_factor=0.5,
                                                     architectures=["Phi3ForCausalLM"]),
    "granite": lambda: transformers.GraniteConfig(**BASE, embedding_multiplier=6.0, attention_multiplier=0.5,
                                                  residual_multiplier=0.4, logits_scaling=0.5,
                                                  architectures=["GraniteForCausalLM"]),
    "olmo2": lambda: transformers.Olmo2Config(**BASE, architectures=["Olmo2ForCausalLM"]),
    "starcoder2": lambda: transformers.Starcoder2Config(**BASE, sliding_window=14, tie_word_embeddings=False,
                                                        architectures=["Starcoder2ForCausalLM"]),
    "internlm3": lambda: transformers.InternLM3Config(**BASE, head_dim=16, architectures=["InternLM3ForCausalLM"]),
}
# 17 + 12 tokens stay below Phi-3's original context (32), 40 start past it: transformers' Phi-3 drops
# its cache and recomputes the whole sequence on the long factors when a request crosses it, which
# this engine does not (see plugins/models/rope.py)
PROMPT_LENGTHS = [40, 7, 17]
MAX_TOKENS = 12


def make_hf_model(config, seed=0):
    """A transformers model (``AutoModelForCausalLM``, so aliases work), fp32, every weight N(0, std),
    norm weights N(1, std) but Gemma's (1 + w) ones N(0, std)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    unit_offset = config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") and not unit_offset else 0.0, WEIGHT_STD)
    model.generation_config.eos_token_id = None
    return model


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
    # longer than the window; LongRoPE's choice depends on the chunk (see rope.py): one chunk each
    budget = 64 if name == "phi3-longrope" else 32
    assert_engine_matches_transformers(path, hf_model, random_prompts(PROMPT_LENGTHS), MAX_TOKENS,
                                       max_num_batched_tokens=budget)


def triton_variant(name):
    """FAMILIES[name] with heads of 64 (a size the Triton kernel takes): 2 query heads, 1 KV head."""
    config = FAMILIES[name]()
    fields = {**config.to_dict(), "num_attention_heads": 2, "num_key_value_heads": 1}
    if fields.get("head_dim") is not None:
        fields["head_dim"] = 64
    else:
        fields["hidden_size"] = 128
    if name == "phi3-longrope":  # one factor per rotated pair: half of 64 * partial_rotary_factor
        fields["rope_scaling"] = fields["rope_parameters"] = {**_longrope(32), "rope_theta": 10000.0}
    return type(config)(**fields)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_triton_backend_matches_transformers(tmp_path, name):
    hf_model = make_hf_model(triton_variant(name))
    assert hf_model.config.num_attention_heads * 64 == hf_model.model.layers[0].self_attn.o_proj.in_features
    hf_model.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path, VOCAB)
    budget = 64 if name == "phi3-longrope" else 32
    llm = assert_engine_matches_transformers(tmp_path, hf_model, random_prompts(PROMPT_LENGTHS), MAX_TOKENS,
                                             attention_backend="triton", max_num_batched_tokens=budget)
    assert llm.engine.core.model.attention.name == "triton"


# ---------------------------------------------------------------- each feature matters

BLOCK_SIZE = 16


def model_pair(name):
    """(transformers model, our model with its weights) for FAMILIES[name], torch backend, fp32."""
    config = FAMILIES[name]()
    hf_model = make_hf_model(config)
    registry = tokenmill.Registry(builtins=("tokenmill.plugins.models",), entry_points=False)
    cls = loader.resolve_model_class(registry, config)
    spec = cls.kv_cache_spec(config)
    backend = TorchAttentionBackend(num_heads=config.num_attention_heads, num_kv_heads=spec.num_kv_heads,
                                    head_size=spec.head_size, dtype=torch.float32, device="cpu")
    model = cls(config, backend).eval()
    model.load_weights(hf_model.state_dict().items())
    model.bind_kv_caches([torch.zeros(backend.kv_cache_shape(8, BLOCK_SIZE, spec.num_kv_heads, spec.head_size))
                          for _ in range(spec.num_layers)])
    return hf_model, model


def _attentions(model):
    return [layer.self_attn for layer in model.layers]


def _drop_backend_option(option):
    def switch_off(model):
        for attn in _attentions(model):
            attn.backend_options.pop(option, None)
    return switch_off


def _without_qk_norm(model):
    for attn in _attentions(model):
        attn.spec = dataclasses.replace(attn.spec, qk_norm=QKNorm.NONE)


def _set(**values):
    def switch_off(model):
        for name, value in values.items():
            setattr(model, name, value)
    return switch_off


def _norms(**values):
    def switch_off(model):
        for module in model.modules():
            if hasattr(module, "unit_offset"):
                for name, value in values.items():
                    setattr(module, name, value)
    return switch_off


def _local_rope_is_global(model):
    model.rotary[SLIDING] = model.rotary[FULL]


def _short_factors_only(model):
    rotary = model.rotary["default"]
    rotary.long_inv_freq = rotary.inv_freq


def _silu_mlp(model):
    for layer in model.layers:
        layer.mlp.act = torch.nn.functional.silu


def _unscaled_residuals(model):
    for layer in model.layers:
        layer.residual_scale = 1.0


def _head_dim_scale(model):
    for attn in _attentions(model):
        attn.spec = dataclasses.replace(attn.spec, scale=attn.head_dim ** -0.5)


FEATURES = {
    "qwen3 qk-norm": ("qwen3", _without_qk_norm),
    "qwen2 sliding window": ("qwen2-window", _drop_backend_option("sliding_window")),
    "mistral sliding window": ("mistral-window", _drop_backend_option("sliding_window")),
    "gemma (1 + w) norms": ("gemma", _norms(unit_offset=False)),
    "gemma embedding scale": ("gemma", _set(embed_scale=None)),
    "gemma GeGLU": ("gemma", _silu_mlp),
    "gemma2 attention soft cap": ("gemma2", _drop_backend_option("logits_soft_cap")),
    "gemma2 final soft cap": ("gemma2", _set(final_logit_soft_cap=None)),
    "gemma2 sliding window": ("gemma2", _drop_backend_option("sliding_window")),
    "gemma2 query_pre_attn_scalar": ("gemma2", _head_dim_scale),
    "gemma3 qk-norm": ("gemma3", _without_qk_norm),
    "gemma3 sliding window": ("gemma3", _drop_backend_option("sliding_window")),
    "gemma3 local rope theta": ("gemma3", _local_rope_is_global),
    "gemma3 final soft cap": ("gemma3", _set(final_logit_soft_cap=None)),
    "phi3 long factors": ("phi3-longrope", _short_factors_only),
    "phi3 sliding window": ("phi3-longrope", _drop_backend_option("sliding_window")),
    "granite residual multiplier": ("granite", _unscaled_residuals),
    "granite embedding multiplier": ("granite", _set(embed_scale=None)),
    "granite attention multiplier": ("granite", _head_dim_scale),
    "granite logits scaling": ("granite", _set(logits_divisor=1.0)),
    "olmo2 full-width qk-norm": ("olmo2", _without_qk_norm),
    "starcoder2 sliding window": ("starcoder2", _drop_backend_option("sliding_window")),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_switching_a_feature_off_breaks_parity(feature):
    """Ours matches transformers over a 60-token prompt, and no longer does without the feature."""
    name, switch_off = FEATURES[feature]
    assert_switching_off_breaks_parity(*model_pair(name), switch_off)


# ---------------------------------------------------------------- rope types

ROPE_HEAD_DIM = 32
LLAMA_ROPE = dict(BASE, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                    "mscale": 0.7, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}
PAST_CONTEXT = 100  # positions 0..99: past max_position_embeddings (64) and every original context


def hf_cos_sin(rotary, positions, **kwargs):
    dummy = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(dummy, positions[None], **kwargs)
    return cos[0].float(), sin[0].float()


def our_cos_sin(params, head_dim, max_len, positions, seq_lens):
    return RotaryEmbedding(params, head_dim, max_len)(positions, seq_lens)


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_type_matches_transformers_past_the_original_context(name):
    """A prompt of 100 tokens in one forward (every token's request length is 100), then decode
    steps at positions 100 and 120, against transformers' LlamaRotaryEmbedding."""
    config = transformers.LlamaConfig(**LLAMA_ROPE, head_dim=ROPE_HEAD_DIM, rope_parameters=dict(ROPES[name]))
    params = rope_parameters(config)
    positions = torch.arange(PAST_CONTEXT)
    hf = hf_cos_sin(transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config), positions)
    ours = our_cos_sin(params, ROPE_HEAD_DIM, 64, positions, torch.full((PAST_CONTEXT,), PAST_CONTEXT))
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)
    for position in (100, 120):
        hf = hf_cos_sin(transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config),
                        torch.tensor([position]))
        ours = our_cos_sin(params, ROPE_HEAD_DIM, 64, torch.tensor([position]), torch.tensor([position + 1]))
        torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [30, 100])  # within and past original_max_position_embeddings (32)
def test_longrope_with_partial_rotary_matches_transformers(length):
    config = FAMILIES["phi3-longrope"]()
    positions = torch.arange(length)
    hf = hf_cos_sin(transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(config), positions)
    ours = our_cos_sin(rope_parameters(config), 16, 256, positions, torch.full((length,), length))
    assert ours[0].shape == (length, 8)  # half of each 16-wide head rotates
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
def test_gemma3_rope_per_layer_type_matches_transformers(layer_type):
    config = FAMILIES["gemma3"]()
    positions = torch.arange(PAST_CONTEXT)
    rotary = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(config)
    hf = hf_cos_sin(rotary, positions, layer_type=layer_type)
    ours = our_cos_sin(rope_parameters(config, layer_type), 16, 256, positions, None)
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)


def test_each_token_gets_its_own_requests_length():
    """Three requests in one step: a decode, a chunk after a cached prefix, a fresh prompt."""
    md = make_attention_metadata([1, 3, 2], [70, 10, 2], [[0, 1, 2, 3, 4], [5], [6]], BLOCK_SIZE)
    assert token_seq_lens(md, 6).tolist() == [70, 10, 10, 10, 2, 2]
    assert token_seq_lens(md, 8).tolist() == [70, 10, 10, 10, 2, 2, 2, 2]  # padding rows


def test_dynamic_rope_of_a_batch_uses_each_requests_length():
    """Requests of 100 and 30 tokens in one step: each token rotates as in its own request alone."""
    config = transformers.LlamaConfig(**LLAMA_ROPE, head_dim=ROPE_HEAD_DIM, rope_parameters=dict(ROPES["dynamic"]))
    rotary = RotaryEmbedding(rope_parameters(config), ROPE_HEAD_DIM, 64)
    positions = torch.cat([torch.arange(100), torch.arange(30)])
    cos, _ = rotary(positions, torch.tensor([100] * 100 + [30] * 30))
    alone, _ = rotary(torch.arange(30), torch.full((30,), 30))
    torch.testing.assert_close(cos[100:], alone)
    assert not torch.allclose(cos[:30], alone)  # the long request's NTK base differs


# ---------------------------------------------------------------- GGUF

GGUF_ARCHS = {"qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
              "phi3-longrope": "phi3", "granite": "granite", "olmo2": "olmo2", "starcoder2": "starcoder2"}
ALWAYS_TIED = {"gemma", "gemma2"}  # llama.cpp's Gemma and Gemma 2 have no output tensor
# what llama.cpp's converter does to weights, per architecture
PERMUTED_QK = {"granite"}
NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}


def gguf_twin_config(name):
    """FAMILIES[name] as llama.cpp can describe it: Gemma and Gemma 2 tied; Gemma 2 and 3 scaled by
    head_dim ** -0.5 (llama.cpp's rule below 27B); Gemma 3 with its fixed pattern of five local
    layers, then a global one."""
    config = FAMILIES[name]()
    if name == "gemma3":
        config = transformers.Gemma3TextConfig(**{**config.to_dict(), "num_hidden_layers": 6, "layer_types": None})
    config.tie_word_embeddings = config.tie_word_embeddings or GGUF_ARCHS[name] in ALWAYS_TIED
    if GGUF_ARCHS[name] in ("gemma2", "gemma3"):
        config.query_pre_attn_scalar = config.head_dim
    return config


# fields every family's GGUF config must get right, beyond the shapes
GGUF_CONFIG_FIELDS = ["sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                      "attention_multiplier", "embedding_multiplier", "residual_multiplier", "logits_scaling",
                      "use_bias", "tie_word_embeddings", "layer_types"]


@pytest.mark.parametrize("name", list(GGUF_ARCHS))
def test_gguf_file_loads_with_its_config_and_matches_transformers(tmp_path, name):
    hf_model = make_hf_model(gguf_twin_config(name))
    write_gguf(tmp_path / "tiny.gguf", GGUF_ARCHS[name], hf_model)
    source = loader.resolve_model_source(str(tmp_path / "tiny.gguf"), "auto")
    config = loader.load_hf_config(source)

    expected = hf_model.config
    assert config.architectures == expected.architectures
    for field in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", *GGUF_CONFIG_FIELDS]:
        assert getattr(config, field, None) == getattr(expected, field, None), field
    rope = dict(config.rope_parameters)
    if "attention_factor" in rope:  # llama.cpp writes LongRoPE's, which transformers derives
        assert rope.pop("attention_factor") == pytest.approx(
            RotaryEmbedding(rope_parameters(expected), 16, expected.max_position_embeddings).attention_factor)
    assert rope == expected.rope_parameters
    registry = tokenmill.Registry(builtins=("tokenmill.plugins.models",), entry_points=False)
    cls = loader.resolve_model_class(registry, config)
    spec = cls.kv_cache_spec(config)
    backend = TorchAttentionBackend(num_heads=config.num_attention_heads, num_kv_heads=spec.num_kv_heads,
                                    head_size=spec.head_size, dtype=torch.float32, device="cpu")
    model = loader.load_model(config, cls, backend, source=source, dtype=torch.float32, device="cpu")
    model.bind_kv_caches([torch.zeros(backend.kv_cache_shape(8, BLOCK_SIZE, spec.num_kv_heads, spec.head_size))
                          for _ in range(spec.num_layers)])

    ids = torch.tensor(random_prompts([60], seed=3)[0])
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(hf_model, ids), atol=2e-4, rtol=1e-3)


def test_gguf_file_runs_in_the_engine(tmp_path):
    """A Gemma 2 GGUF (config, weights) with a tokenizer directory beside it: the engine's greedy
    tokens are transformers'."""
    hf_model = make_hf_model(gguf_twin_config("gemma2"))
    write_gguf(tmp_path / "gemma2.gguf", "gemma2", hf_model)
    save_word_tokenizer(tmp_path / "tokenizer", VOCAB)
    prompts = random_prompts([40, 9])
    expected = [hf_generate(hf_model, prompt, 8)[0] for prompt in prompts]
    llm = make_llm(tmp_path / "gemma2.gguf", tokenizer=str(tmp_path / "tokenizer"))
    outputs = llm.generate(token_prompts(prompts), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize("arch, cls_name", [
    ("Qwen3ForCausalLM", "Qwen3ForCausalLM"), ("GemmaForCausalLM", "GemmaForCausalLM"),
    ("Gemma2ForCausalLM", "Gemma2ForCausalLM"), ("Gemma3ForCausalLM", "Gemma3ForCausalLM"),
    ("Phi3ForCausalLM", "Phi3ForCausalLM"), ("GraniteForCausalLM", "GraniteForCausalLM"),
    ("Olmo2ForCausalLM", "Olmo2ForCausalLM"), ("Starcoder2ForCausalLM", "Starcoder2ForCausalLM"),
    ("InternLM3ForCausalLM", "LlamaForCausalLM"), ("IQuestCoderForCausalLM", "LlamaForCausalLM"),
])
def test_family_is_registered_under_its_architecture(arch, cls_name):
    registry = tokenmill.Registry(builtins=("tokenmill.plugins.models",), entry_points=False)
    assert registry.get("model", arch).__name__ == cls_name


def test_a_window_on_every_layer_is_declared_to_the_kv_cache():
    """Mistral's window covers every layer: the engine may free blocks behind it; Qwen2's covers
    only layer 1, Gemma 2's every other layer: no single window."""
    registry = tokenmill.Registry(builtins=("tokenmill.plugins.models",), entry_points=False)
    windows = {}
    for name in ("mistral-window", "starcoder2", "qwen2-window", "gemma2", "qwen3"):
        config = FAMILIES[name]()
        windows[name] = loader.resolve_model_class(registry, config).kv_cache_spec(config).sliding_window
    assert windows == {"mistral-window": 10, "starcoder2": 14, "qwen2-window": None, "gemma2": None, "qwen3": None}
