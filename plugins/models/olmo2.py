"""OLMo 2 (``Olmo2ForCausalLM``): norms after each branch, and q/k normalised over all heads at once.

    h  = h  + post_attention_layernorm(attn(h))      attn: q = RMSNorm(q_proj(h)) over H * D features,
    h' = h  + post_feedforward_layernorm(mlp(h))           k likewise over KV * D, then rope

No norm before the branches (``layers.PostNormBlock``); the RMSNorm weight multiplies in fp32.
"""
from __future__ import annotations

from typing import Any

from tokenmill.model_base import GGUFNames

from .decoder import DecoderForCausalLM, DecoderSpec, attention_layers, gated_mlp
from .layers import BlockParts, PostNormBlock, QKNorm, rms_norm
from .llama import LLAMA_GGUF_GLOBAL_NAMES
from .rope import rope_parameters

_GGUF_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                     "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                     "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
                     "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                     "post_ffw_norm": "post_feedforward_layernorm"}


class Olmo2ForCausalLM(DecoderForCausalLM):
    architectures = ("Olmo2ForCausalLM",)
    gguf_names = {"olmo2": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, _GGUF_BLOCK_NAMES)}

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        parts = BlockParts(config.hidden_size, rms_norm(config, upcast_weight=True), gated_mlp(config))
        layers = attention_layers(config, qkv_bias=bias, o_bias=bias, qk_norm=QKNorm.FULL_WIDTH)
        return DecoderSpec(PostNormBlock, parts, layers, {"default": rope_parameters(config)})

    @classmethod
    def example_config(cls) -> Any:
        from transformers import Olmo2Config

        return Olmo2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, architectures=["Olmo2ForCausalLM"])
