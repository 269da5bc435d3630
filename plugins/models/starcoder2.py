"""StarCoder2 (``Starcoder2ForCausalLM``): LayerNorm with bias, a GELU MLP that is not gated, biases.

    h ──LayerNorm──> qkv_proj (+b) ──rope──> attention ──> o_proj (+b) ──(+h)──> h'
    h' ─LayerNorm──> c_fc (+b) ──gelu(tanh)──> c_proj (+b) ──(+h')──> next layer

``use_bias`` covers every projection; ``sliding_window``, when set, covers every layer.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from tokenmill.model_base import GGUFNames

from .decoder import DecoderForCausalLM, DecoderSpec, attention_layers, decoder_features
from .layers import BlockParts, PlainMLP, PreNormBlock
from .llama import LLAMA_GGUF_GLOBAL_NAMES
from .rope import rope_parameters

_GGUF_GLOBAL_NAMES = {**LLAMA_GGUF_GLOBAL_NAMES, "output_norm.bias": "model.norm.bias"}
_GGUF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                     "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                     "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}


class Starcoder2ForCausalLM(DecoderForCausalLM):
    architectures = ("Starcoder2ForCausalLM",)
    gguf_names = {"starcoder2": GGUFNames(_GGUF_GLOBAL_NAMES, _GGUF_BLOCK_NAMES)}
    features = decoder_features(sliding_window=True)

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        bias = bool(config.use_bias)
        parts = BlockParts(config.hidden_size, lambda size: nn.LayerNorm(size, eps=config.norm_epsilon),
                           lambda: PlainMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias))
        layers = attention_layers(config, qkv_bias=bias, o_bias=bias)
        return DecoderSpec(PreNormBlock, parts, layers, {"default": rope_parameters(config)})

    @classmethod
    def example_config(cls) -> Any:
        from transformers import Starcoder2Config

        return Starcoder2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                bos_token_id=1, eos_token_id=2, architectures=["Starcoder2ForCausalLM"])
