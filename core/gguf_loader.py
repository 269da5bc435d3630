"""GGUF checkpoints: llama.cpp tensor names and layouts back to a model class's checkpoint ones.

transformers reads a GGUF's tokenizer and, for llama and qwen2, its config
(``gguf_file=``); ``hf_config_from_gguf`` builds the config of the other
architectures tokenmill runs from the metadata llama.cpp's converter writes. This
module reads the tensors with ``gguf.GGUFReader``, dequantizes them to float32 and
renames them with the model class's ``gguf_names``, so its ``load_weights`` sees the
same names and shapes as from a safetensors checkpoint.

Shapes: GGUF lists dimensions innermost first (``token_embd.weight`` is
``[hidden, vocab]``); reversed, that is the HuggingFace ``[vocab, hidden]``.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .model_base import GGUFNames
from .quantization.gguf import GGUFWeight, is_quantized

# llama.cpp architecture -> transformers model_type, for the files whose config is built here:
# transformers reads none of their metadata (gemma, granite, olmo2) or leaves out what the model
# needs (soft caps, LongRoPE factors, the local rope theta, biases, windows)
_MODEL_TYPES = {"qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3",
                "granite": "granite", "olmo2": "olmo2", "starcoder2": "starcoder2", "qwen2moe": "qwen2_moe",
                "qwen3moe": "qwen3_moe", "olmoe": "olmoe"}
# a "llama" file with experts (``llama.expert_count`` > 0) is Mixtral; transformers would read it as Llama
_LLAMA_WITH_EXPERTS = "mixtral"
# mixture-of-experts architectures: whether llama.cpp divides the top-k routing weights by their sum
# (it hardcodes it per architecture; ``{arch}.expert_weights_norm``, when a file has it, says so instead),
# and the config field that says whether q/k/v have biases, read from the tensors
_MOE_NORM_TOPK_PROB = {"qwen2moe": False, "qwen3moe": True, "olmoe": False}
_ATTENTION_BIAS_FIELDS = {"starcoder2": "use_bias", "qwen2moe": "qkv_bias", "qwen3moe": "attention_bias",
                          "olmoe": "attention_bias"}
# metadata key (after "{arch}.") -> config field
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings", "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.layer_norm_epsilon": "norm_epsilon", "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta", "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping", "attention.scale": "attention_multiplier",
    "embedding_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
    "logit_scale": "logits_scaling", "rope.scaling.original_context_length": "original_max_position_embeddings",
    "expert_count": "num_experts", "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
}
_TOKEN_ID_KEYS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
                  "tokenizer.ggml.padding_token_id": "pad_token_id"}
# tensors that hold config, not weights: Phi-3's LongRoPE factors
_ROPE_FACTOR_TENSORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
# llama.cpp's Gemma 27B models scale attention by (hidden / heads) ** -0.5, the others by head_dim ** -0.5;
# it tells them apart by their layer count and stores no query_pre_attn_scalar
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's ``permute`` of a Llama q or k projection (weight or bias).

    HuggingFace rotates the two halves of each head (rotate_half); llama.cpp
    rotates adjacent pairs, so the converter interleaves the halves' rows:

        HF rows of one head:    a0 a1 a2 a3 | b0 b1 b2 b3      view [heads, 2, half]
        GGUF rows of one head:  a0 b0 a1 b1 a2 b2 a3 b3        view [heads, half, 2]

    ``num_heads`` is the query heads for q and the KV heads for k.
    """
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def iter_gguf_weights(path: Path, names: Mapping[str, GGUFNames], model: str = "the model class",
                      keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | GGUFWeight]]:
    """(checkpoint name, tensor) for every tensor in the file, one at a time; ``names``: the model
    class's ``gguf_names``. Tensors are float32, or with ``keep_quantized`` a 2-D tensor in a GGUF
    block format is a ``GGUFWeight`` holding the file's bytes (its rows permuted like a float one)."""
    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in names:
        raise ValueError(f"GGUF architecture '{arch}' in {path} is not one {model} reads; it reads "
                         f"{sorted(names) or 'no GGUF'}")
    arch_names = names[arch]
    num_heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    head_counts = {"attn_q": num_heads, "attn_k": num_heads if kv_field is None else int(kv_field.contents())}
    for tensor in reader.tensors:
        if tensor.name in _ROPE_FACTOR_TENSORS:
            continue  # in the config (hf_config_from_gguf)
        if tensor.name == "rope_freqs.weight":
            raise ValueError("GGUF tensor 'rope_freqs.weight' holds Llama 3.1-style rope scaling factors, which "
                             "the config read from GGUF metadata does not describe; use the HuggingFace "
                             "safetensors checkpoint for this model")
        name = arch_names.checkpoint_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        block_tensor = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        unpermute = arch_names.permuted_qk and block_tensor in head_counts
        if keep_quantized and len(shape) == 2 and is_quantized(int(tensor.tensor_type)):
            # np.array copies: the reader's arrays are read-only views of a memory map
            weight = GGUFWeight(int(tensor.tensor_type), torch.from_numpy(np.array(tensor.data)), shape[1])
            if unpermute:
                weight = weight.take_rows(unpermute_qk(torch.arange(shape[0]), head_counts[block_tensor]))
            yield name, weight
            continue
        data = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        weight = torch.from_numpy(data)
        if unpermute:
            weight = unpermute_qk(weight, head_counts[block_tensor])
        if arch_names.norm_shift and tensor.name.endswith("norm.weight"):
            weight -= arch_names.norm_shift
        yield name, weight


def hf_config_from_gguf(path: Path) -> PretrainedConfig | None:
    """The HuggingFace config of a GGUF file, from the metadata and tensor list llama.cpp's converter
    wrote, for the architectures in ``_MODEL_TYPES`` and Mixtral (``llama`` with experts); None for the
    others (transformers reads them)."""
    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    meta = {name.removeprefix(f"{arch}."): field.contents() for name, field in reader.fields.items()
            if name.startswith(f"{arch}.") or name in _TOKEN_ID_KEYS}
    model_type = _LLAMA_WITH_EXPERTS if arch == "llama" and meta.get("expert_count", 0) > 0 else _MODEL_TYPES.get(arch)
    if model_type is None:
        return None
    meta = {name: _shortest_float32(value) if isinstance(value, float) else value for name, value in meta.items()}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    fields: dict[str, Any] = {field: meta[key] for key, field in _CONFIG_KEYS.items() if key in meta}
    fields["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])
    fields["tie_word_embeddings"] = "output.weight" not in tensors
    fields.update({field: meta.get(key) for key, field in _TOKEN_ID_KEYS.items()})
    if fields.get("sliding_window") == 0:
        fields["sliding_window"] = None  # Phi-3's converter writes 0 for "no window"
    head_dim = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    if meta.get("rope.dimension_count", head_dim) != head_dim:
        fields["partial_rotary_factor"] = meta["rope.dimension_count"] / head_dim
    rope_scaling = _rope_scaling(meta, tensors)
    if rope_scaling:
        fields["rope_scaling"] = rope_scaling
    if arch in _GEMMA_27B_LAYERS:
        is_27b = fields["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
        fields["query_pre_attn_scalar"] = fields["hidden_size"] // fields["num_attention_heads"] if is_27b else head_dim
    if arch == "gemma3":
        fields["rope_local_base_freq"] = meta.get("rope.freq_base_swa", 10000.0)  # llama.cpp's fixed local theta
    if arch in _ATTENTION_BIAS_FIELDS:
        fields[_ATTENTION_BIAS_FIELDS[arch]] = "blk.0.attn_q.bias" in tensors
    if arch in _MOE_NORM_TOPK_PROB:
        fields["norm_topk_prob"] = bool(meta.get("expert_weights_norm", _MOE_NORM_TOPK_PROB[arch]))
    return AutoConfig.for_model(model_type, **fields)


def _rope_scaling(meta: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config's rope scaling (transformers' ``rope_scaling`` shape) from the metadata, or from
    Phi-3's LongRoPE factor tensors."""
    if all(name in tensors for name in _ROPE_FACTOR_TENSORS):
        scaling = {"rope_type": "longrope", **{key: [_shortest_float32(x) for x in np.asarray(tensors[name].data)]
                                               for name, key in _ROPE_FACTOR_TENSORS.items()}}
        if "rope.scaling.attn_factor" in meta:
            scaling["attention_factor"] = meta["rope.scaling.attn_factor"]
        return scaling
    kind = meta.get("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta["rope.scaling.factor"]}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": meta["rope.scaling.factor"],
                   "original_max_position_embeddings": meta["rope.scaling.original_context_length"]}
        for key in ("beta_fast", "beta_slow"):
            if f"rope.scaling.yarn_{key}" in meta:
                scaling[key] = meta[f"rope.scaling.yarn_{key}"]
        return scaling
    raise ValueError(f"GGUF rope.scaling.type {kind!r} is not one tokenmill reads; it reads 'none', 'linear' "
                     f"and 'yarn'")


def fix_gguf_config(config: Any) -> Any:
    """Repair the HuggingFace config that transformers builds from GGUF metadata.

    - ``architectures`` is missing: derive it from ``model_type`` (llama ->
      LlamaForCausalLM), as the checkpoint's own config.json would say.
    - GGUF stores ``rms_norm_eps`` and ``rope_theta`` as float32
      (1e-5 -> 9.999999747378752e-06): restore the shortest decimal.
    """
    if not getattr(config, "architectures", None):
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        config.architectures = [arch] if arch else None
    if isinstance(getattr(config, "rms_norm_eps", None), float):
        config.rms_norm_eps = _shortest_float32(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and isinstance(rope.get("rope_theta"), float):
        rope["rope_theta"] = _shortest_float32(rope["rope_theta"])
    elif isinstance(getattr(config, "rope_theta", None), float):
        config.rope_theta = _shortest_float32(config.rope_theta)
    return config


def _shortest_float32(value: float) -> float:
    return float(str(np.float32(value)))
