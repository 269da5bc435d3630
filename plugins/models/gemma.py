"""The Gemma family: Gemma, Gemma 2 and Gemma 3 (text).

What all three change in Llama's layer:

- RMSNorm multiplies by (1 + w), in fp32; GeGLU (tanh GELU) instead of SwiGLU;
- the embeddings are scaled by sqrt(hidden_size), and the output head is tied to them.

Gemma 2 and 3 add a norm after each branch (``layers.SandwichBlock``), scale attention scores
by ``query_pre_attn_scalar ** -0.5`` instead of head_dim's, and alternate local (sliding-window)
and global layers (``layer_types``). Gemma 2 soft-caps the attention scores
(``attn_logit_softcapping``) and the final logits (``final_logit_softcapping``). Gemma 3
normalises q and k per head and gives its local layers their own rope theta
(``rope_parameters["sliding_attention"]``, formerly ``rope_local_base_freq``); its final soft cap
is optional and, like transformers' Gemma 3, it ignores an attention soft cap.

llama.cpp's converter stores every Gemma norm weight as 1 + w (``GGUFNames.norm_shift``).
"""
from __future__ import annotations

from typing import Any

from tokenmill.model_base import GGUFNames

from .decoder import (FULL, SLIDING, DecoderForCausalLM, DecoderSpec, attention_layers, decoder_features, gated_mlp,
                      layer_types)
from .layers import BlockParts, PreNormBlock, QKNorm, SandwichBlock, rms_norm
from .llama import LLAMA_GGUF_GLOBAL_NAMES
from .rope import rope_parameters

_GGUF_ATTENTION_AND_MLP = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                           "ffn_down": "mlp.down_proj"}
_GGUF_GEMMA_BLOCK_NAMES = {**_GGUF_ATTENTION_AND_MLP, "attn_norm": "input_layernorm",
                           "ffn_norm": "post_attention_layernorm"}
_GGUF_GEMMA2_BLOCK_NAMES = {**_GGUF_ATTENTION_AND_MLP, "attn_norm": "input_layernorm",
                            "post_attention_norm": "post_attention_layernorm",
                            "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GGUF_GEMMA3_BLOCK_NAMES = {**_GGUF_GEMMA2_BLOCK_NAMES, "attn_q_norm": "self_attn.q_norm",
                            "attn_k_norm": "self_attn.k_norm"}


def _gemma_parts(config: Any) -> BlockParts:
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    # Gemma's "gelu" always meant the tanh approximation (transformers maps it the same way)
    act = "gelu_pytorch_tanh" if act == "gelu" else act
    return BlockParts(config.hidden_size, rms_norm(config, unit_offset=True, upcast_weight=True),
                      gated_mlp(config, act=act))


def _check_causal(config: Any) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True (an embedding model) is not supported: this engine runs "
                         "causal decoders; it must be False")


class GemmaForCausalLM(DecoderForCausalLM):
    architectures = ("GemmaForCausalLM",)
    gguf_names = {"gemma": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, _GGUF_GEMMA_BLOCK_NAMES, norm_shift=1.0)}

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec(PreNormBlock, _gemma_parts(config), attention_layers(config, qkv_bias=bias, o_bias=bias),
                           {"default": rope_parameters(config)}, embed_scale=config.hidden_size ** 0.5)

    @classmethod
    def example_config(cls) -> Any:
        from transformers import GemmaConfig

        return GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           architectures=["GemmaForCausalLM"])


class Gemma2ForCausalLM(DecoderForCausalLM):
    architectures = ("Gemma2ForCausalLM",)
    gguf_names = {"gemma2": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, _GGUF_GEMMA2_BLOCK_NAMES, norm_shift=1.0)}
    features = decoder_features(sliding_window=True, logit_soft_cap=True)

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        _check_causal(config)
        bias = bool(getattr(config, "attention_bias", False))
        # before transformers listed layer_types: local, global, local, ...
        types = layer_types(config, default=lambda i: SLIDING if i % 2 == 0 else FULL)
        layers = attention_layers(config, types, scale=config.query_pre_attn_scalar ** -0.5, qkv_bias=bias,
                                  o_bias=bias, logits_soft_cap=getattr(config, "attn_logit_softcapping", None))
        return DecoderSpec(SandwichBlock, _gemma_parts(config), layers, {"default": rope_parameters(config)},
                           embed_scale=config.hidden_size ** 0.5,
                           final_logit_soft_cap=getattr(config, "final_logit_softcapping", None))

    @classmethod
    def example_config(cls) -> Any:
        from transformers import Gemma2Config

        return Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            max_position_embeddings=256, architectures=["Gemma2ForCausalLM"])


class Gemma3ForCausalLM(DecoderForCausalLM):
    architectures = ("Gemma3ForCausalLM",)
    gguf_names = {"gemma3": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, _GGUF_GEMMA3_BLOCK_NAMES, norm_shift=1.0)}
    features = decoder_features(sliding_window=True, logit_soft_cap=True)  # the final soft cap

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        _check_causal(config)
        bias = bool(getattr(config, "attention_bias", False))
        # before transformers listed layer_types: every `sliding_window_pattern`-th layer is global
        pattern = getattr(config, "sliding_window_pattern", 6)
        types = layer_types(config, default=lambda i: SLIDING if (i + 1) % pattern else FULL)
        layers = attention_layers(config, types, rope_per_type=True, scale=config.query_pre_attn_scalar ** -0.5,
                                  qkv_bias=bias, o_bias=bias, qk_norm=QKNorm.PER_HEAD)
        nested = SLIDING in (getattr(config, "rope_parameters", None) or {})
        local = rope_parameters(config, SLIDING) if nested else {
            "rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
        return DecoderSpec(SandwichBlock, _gemma_parts(config), layers,
                           {SLIDING: local, FULL: rope_parameters(config, FULL)},
                           embed_scale=config.hidden_size ** 0.5,
                           final_logit_soft_cap=getattr(config, "final_logit_softcapping", None))

    @classmethod
    def example_config(cls) -> Any:
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                max_position_embeddings=256, architectures=["Gemma3ForCausalLM"])
