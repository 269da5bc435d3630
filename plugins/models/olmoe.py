"""OLMoE (``OlmoeForCausalLM``): a pre-norm Llama layer whose q and k are normalised over all heads at once
(OLMo 2's full-width qk-norm, but before the branch, not after it), and a sparse MLP in every layer.

    h  = h  + attn(input_layernorm(h))       q = RMSNorm(q_proj(.)) over H * D features, k over KV * D
    h' = h  + moe(post_attention_layernorm(h))   top ``num_experts_per_tok`` of ``num_experts`` SwiGLU
                                                  experts of ``intermediate_size``; ÷ their sum with
                                                  ``norm_topk_prob`` (False in the released checkpoints)

Its RMSNorms multiply by the weight after casting back to the activation dtype (Llama's order, not
OLMo 2's). ``clip_qkv`` (clamping q, k and v) is not implemented: a config that sets it is refused.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tokenmill.model_base import GGUFNames

from .decoder import DecoderSpec
from .layers import QKNorm
from .llama import LLAMA_GGUF_BLOCK_NAMES, LLAMA_GGUF_GLOBAL_NAMES, llama_spec
from .moe import MOE_GGUF_BLOCK_NAMES, MoEDecoderForCausalLM, sparse_moe

_GGUF_BLOCK_NAMES = {**LLAMA_GGUF_BLOCK_NAMES, **MOE_GGUF_BLOCK_NAMES, "attn_q_norm": "self_attn.q_norm",
                     "attn_k_norm": "self_attn.k_norm"}


class OlmoeForCausalLM(MoEDecoderForCausalLM):
    architectures = ("OlmoeForCausalLM",)
    gguf_names = {"olmoe": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, _GGUF_BLOCK_NAMES)}

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        if getattr(config, "clip_qkv", None) is not None:
            raise ValueError(f"OlmoeForCausalLM does not implement clip_qkv (the config sets {config.clip_qkv}); "
                             f"only checkpoints without it run")
        bias = bool(getattr(config, "attention_bias", False))
        spec = llama_spec(config, qkv_bias=bias, o_bias=bias, qk_norm=QKNorm.FULL_WIDTH)
        moe = sparse_moe(config, num_experts=config.num_experts, intermediate_size=config.intermediate_size,
                         renormalize=bool(config.norm_topk_prob), round_weights=True, what="intermediate_size")
        return dataclasses.replace(spec, parts=dataclasses.replace(spec.parts, mlp=moe))

    @classmethod
    def example_config(cls) -> Any:
        from transformers import OlmoeConfig

        return OlmoeConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           architectures=["OlmoeForCausalLM"])
