"""Granite 3 (``GraniteForCausalLM``): Llama's layer with four scalar multipliers.

    h = embed_tokens(ids) * embedding_multiplier
    scores = q . k * attention_multiplier          (instead of head_dim ** -0.5)
    h = h + residual_multiplier * branch(h)         (attention and MLP alike)
    logits = lm_head(h) / logits_scaling

llama.cpp names them ``embedding_scale``, ``attention.scale``, ``residual_scale`` and ``logit_scale``,
and permutes q/k rows as it does Llama's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tokenmill.model_base import GGUFNames

from .decoder import DecoderForCausalLM, DecoderSpec
from .llama import LLAMA_GGUF_BLOCK_NAMES, LLAMA_GGUF_GLOBAL_NAMES, llama_spec


class GraniteForCausalLM(DecoderForCausalLM):
    architectures = ("GraniteForCausalLM",)
    gguf_names = {"granite": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, LLAMA_GGUF_BLOCK_NAMES, permuted_qk=True)}

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        bias = bool(config.attention_bias)
        spec = llama_spec(config, qkv_bias=bias, o_bias=bias, scale=config.attention_multiplier)
        parts = dataclasses.replace(spec.parts, residual_scale=config.residual_multiplier)
        return dataclasses.replace(spec, parts=parts, embed_scale=config.embedding_multiplier,
                                   logits_divisor=config.logits_scaling)

    @classmethod
    def example_config(cls) -> Any:
        from transformers import GraniteConfig

        return GraniteConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             embedding_multiplier=4.0, attention_multiplier=0.2, residual_multiplier=0.5,
                             logits_scaling=2.0, architectures=["GraniteForCausalLM"])
