"""Qwen2-MoE and Qwen3-MoE: Qwen2's / Qwen3's attention, and sparse MLPs on the layers the config says.

Layer i is sparse unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step`` is not 0; a dense
layer has the plain gated MLP of ``intermediate_size``. A sparse one routes each token to
``num_experts_per_tok`` of ``num_experts`` experts of ``moe_intermediate_size`` (the top-k of the softmax,
divided by their sum with ``norm_topk_prob``); Qwen2-MoE adds a shared expert to every token:

    out = Σ weight · expert(x) + sigmoid(shared_expert_gate(x)) · shared_expert(x)
          (shared_expert: a gated MLP of shared_expert_intermediate_size; shared_expert_gate: one output)

Qwen2-MoE biases q/k/v (``qkv_bias``) and follows Qwen2's windows (``layer_types``); Qwen3-MoE normalises
each head of q and k (qk-norm) and biases q/k/v/o with ``attention_bias``.

GGUF: llama.cpp's ``qwen2moe`` and ``qwen3moe`` make every layer sparse, and renormalise the top-k for
``qwen3moe`` only (``core/gguf_loader`` builds the config so).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from tokenmill.model_base import GGUFNames

from .decoder import DecoderSpec, decoder_features, gated_mlp
from .layers import QKNorm
from .llama import LLAMA_GGUF_BLOCK_NAMES, LLAMA_GGUF_GLOBAL_NAMES, llama_spec
from .moe import MOE_GGUF_BLOCK_NAMES, SHARED_EXPERT_GGUF_BLOCK_NAMES, MoEDecoderForCausalLM, sparse_moe

_QWEN2_MOE_GGUF_BLOCK_NAMES = {**LLAMA_GGUF_BLOCK_NAMES, **MOE_GGUF_BLOCK_NAMES, **SHARED_EXPERT_GGUF_BLOCK_NAMES}
_QWEN3_MOE_GGUF_BLOCK_NAMES = {**LLAMA_GGUF_BLOCK_NAMES, **MOE_GGUF_BLOCK_NAMES, "attn_q_norm": "self_attn.q_norm",
                               "attn_k_norm": "self_attn.k_norm"}


def is_sparse_layer(config: Any, i: int) -> bool:
    """Whether layer i has the sparse MLP (transformers' rule for the Qwen MoE decoders)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return i not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0 \
        and (i + 1) % step == 0


def qwen_moe_mlps(config: Any, shared_expert: bool) -> tuple[Callable[[], nn.Module], ...]:
    """Each layer's MLP builder: sparse (with Qwen2-MoE's shared expert when ``shared_expert``) or dense."""
    dense = gated_mlp(config)
    sparse = sparse_moe(config, num_experts=config.num_experts, intermediate_size=config.moe_intermediate_size,
                        renormalize=bool(config.norm_topk_prob), round_weights=True,
                        shared_intermediate_size=config.shared_expert_intermediate_size if shared_expert else None)
    return tuple(sparse if is_sparse_layer(config, i) else dense for i in range(config.num_hidden_layers))


class Qwen2MoeForCausalLM(MoEDecoderForCausalLM):
    architectures = ("Qwen2MoeForCausalLM",)
    gguf_names = {"qwen2moe": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, _QWEN2_MOE_GGUF_BLOCK_NAMES)}
    features = decoder_features(sliding_window=True)

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        spec = llama_spec(config, qkv_bias=bool(getattr(config, "qkv_bias", True)))
        return dataclasses.replace(spec, mlps=qwen_moe_mlps(config, shared_expert=True))

    @classmethod
    def example_config(cls) -> Any:
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=32, shared_expert_intermediate_size=64, mlp_only_layers=[1],
                              max_position_embeddings=256, architectures=["Qwen2MoeForCausalLM"])


class Qwen3MoeForCausalLM(MoEDecoderForCausalLM):
    architectures = ("Qwen3MoeForCausalLM",)
    gguf_names = {"qwen3moe": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, _QWEN3_MOE_GGUF_BLOCK_NAMES)}
    features = decoder_features(sliding_window=True)

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        spec = llama_spec(config, qkv_bias=bias, o_bias=bias, qk_norm=QKNorm.PER_HEAD)
        return dataclasses.replace(spec, mlps=qwen_moe_mlps(config, shared_expert=False))

    @classmethod
    def example_config(cls) -> Any:
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4,
                              num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                              max_position_embeddings=256, architectures=["Qwen3MoeForCausalLM"])
