"""The Llama family: Llama, Mistral, Qwen2, and checkpoints that are Llama under another name.

One pre-norm layer (see ``layers.PreNormBlock``):

    h ──RMSNorm──> qkv_proj ──rope(q, k)──> attention backend (paged cache) ──> o_proj ──(+h)──> h'
    h' ─RMSNorm──> gate_up_proj ──silu(gate) * up──> down_proj ──(+h')──> next layer

Mistral's sliding window covers every layer; Qwen2's applies with ``use_sliding_window``, to
the layers from ``max_window_layers`` on (transformers 5 lists them in ``layer_types``).
InternLM3 and IQuest-Coder configs are Llama's with another name (transformers builds them as
``LlamaForCausalLM``).
"""
from __future__ import annotations

from typing import Any

from tokenmill.model_base import GGUFNames

from .decoder import DecoderForCausalLM, DecoderSpec, attention_layers, decoder_features, gated_mlp
from .layers import BlockParts, PreNormBlock, rms_norm
from .rope import rope_inv_freq, rope_parameters

__all__ = ["LlamaForCausalLM", "rope_inv_freq", "LLAMA_GGUF_GLOBAL_NAMES", "LLAMA_GGUF_BLOCK_NAMES"]

LLAMA_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                           "output.weight": "lm_head.weight"}
LLAMA_GGUF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                          "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
                          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def llama_spec(config: Any, qkv_bias: bool = False, o_bias: bool = False, **attention: Any) -> DecoderSpec:
    """Llama's layout (pre-norm, RMSNorm, SwiGLU, one rotary embedding) with the config's windows;
    ``attention``: more AttentionSpec fields (scale, qk_norm...)."""
    parts = BlockParts(config.hidden_size, rms_norm(config),
                       gated_mlp(config, bias=bool(getattr(config, "mlp_bias", False))))
    layers = attention_layers(config, qkv_bias=qkv_bias, o_bias=o_bias, **attention)
    return DecoderSpec(PreNormBlock, parts, layers, {"default": rope_parameters(config)})


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama, Mistral, Qwen2, InternLM3 and IQuest-Coder checkpoints."""

    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "InternLM3ForCausalLM",
                     "IQuestCoderForCausalLM")
    # llama.cpp's converter permutes Llama's q/k rows, not Qwen2's
    gguf_names = {"llama": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, LLAMA_GGUF_BLOCK_NAMES, permuted_qk=True),
                  "qwen2": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, LLAMA_GGUF_BLOCK_NAMES)}
    features = decoder_features(sliding_window=True)

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        # Llama's attention_bias covers q/k/v/o; Qwen2 has no such field and biases q/k/v only.
        if getattr(config, "attention_bias", None) is not None:
            qkv_bias = o_bias = bool(config.attention_bias)
        else:
            qkv_bias, o_bias = getattr(config, "model_type", None) == "qwen2", False
        return llama_spec(config, qkv_bias, o_bias)

    @classmethod
    def example_config(cls) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           architectures=["LlamaForCausalLM"])
