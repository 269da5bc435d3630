"""Qwen3: Llama's layer with an RMSNorm over each head of q and k before rope (qk-norm).

    qkv_proj ──q, k: RMSNorm per head (head_dim features)──> rope ──> attention ──> o_proj

``head_dim`` is explicit (Qwen3 heads are wider than hidden_size / num_attention_heads); sliding
windows follow Qwen2's ``use_sliding_window`` / ``max_window_layers`` (see ``llama``).
"""
from __future__ import annotations

from typing import Any

from tokenmill.model_base import GGUFNames

from .decoder import DecoderForCausalLM, DecoderSpec, decoder_features
from .layers import QKNorm
from .llama import LLAMA_GGUF_BLOCK_NAMES, LLAMA_GGUF_GLOBAL_NAMES, llama_spec

_GGUF_BLOCK_NAMES = {**LLAMA_GGUF_BLOCK_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


class Qwen3ForCausalLM(DecoderForCausalLM):
    architectures = ("Qwen3ForCausalLM",)
    gguf_names = {"qwen3": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, _GGUF_BLOCK_NAMES)}
    features = decoder_features(sliding_window=True)

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return llama_spec(config, qkv_bias=bias, o_bias=bias, qk_norm=QKNorm.PER_HEAD)

    @classmethod
    def example_config(cls) -> Any:
        from transformers import Qwen3Config

        return Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                           architectures=["Qwen3ForCausalLM"])
