"""Phi-3 and Phi-4 (``Phi3ForCausalLM``): Llama's layer, stored fused, with LongRoPE.

Checkpoints hold ``self_attn.qkv_proj`` and ``mlp.gate_up_proj`` already fused, as this engine
computes them. Long-context variants scale rope with ``longrope`` (``su`` in older configs): short
factors up to ``original_max_position_embeddings``, long factors past it (see ``rope``); Phi-4-mini
rotates only part of each head (``partial_rotary_factor``). ``sliding_window``, when set, covers every
layer (Phi-3-mini-4k: 2047).

llama.cpp stores the fused tensors as ``attn_qkv`` and ``ffn_up``, and LongRoPE's factors as the
tensors ``rope_factors_long`` / ``rope_factors_short``, which become config fields when the config
is read from the GGUF metadata.
"""
from __future__ import annotations

from typing import Any

from tokenmill.model_base import GGUFNames

from .decoder import DecoderForCausalLM, DecoderSpec, decoder_features
from .llama import LLAMA_GGUF_BLOCK_NAMES, LLAMA_GGUF_GLOBAL_NAMES, llama_spec

_GGUF_BLOCK_NAMES = {**LLAMA_GGUF_BLOCK_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}


class Phi3ForCausalLM(DecoderForCausalLM):
    architectures = ("Phi3ForCausalLM",)
    gguf_names = {"phi3": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, _GGUF_BLOCK_NAMES)}
    features = decoder_features(sliding_window=True)

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        return llama_spec(config)

    @classmethod
    def example_config(cls) -> Any:
        from transformers import Phi3Config

        return Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          original_max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          architectures=["Phi3ForCausalLM"])
