"""Mixtral (``MixtralForCausalLM``): Llama's layer with a sparse MLP of ``num_local_experts`` experts.

    h' ─RMSNorm──> router: softmax over the experts, top ``num_experts_per_tok``, divided by their sum
                   ──> Σ weight · expert(h') (each a SwiGLU of ``intermediate_size``) ──(+h')──> next layer

transformers renormalises Mixtral's top-k always (Mixtral has no ``norm_topk_prob``) and keeps the routing
weights in fp32. Its sliding window, when set, covers every layer (as Mistral's). llama.cpp writes
Mixtral GGUFs as architecture ``llama`` with expert tensors and ``llama.expert_count``, q/k permuted as
Llama's; a file of per-expert 2-D tensors (``blk.N.ffn_gate.M``, before llama.cpp stacked them) is not
read.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tokenmill.model_base import GGUFNames

from .decoder import DecoderSpec, decoder_features
from .llama import LLAMA_GGUF_BLOCK_NAMES, LLAMA_GGUF_GLOBAL_NAMES, llama_spec
from .moe import MOE_GGUF_BLOCK_NAMES, MoEDecoderForCausalLM, sparse_moe


class MixtralForCausalLM(MoEDecoderForCausalLM):
    architectures = ("MixtralForCausalLM",)
    gguf_names = {"llama": GGUFNames(LLAMA_GGUF_GLOBAL_NAMES, {**LLAMA_GGUF_BLOCK_NAMES, **MOE_GGUF_BLOCK_NAMES},
                                     permuted_qk=True)}
    features = decoder_features(sliding_window=True)

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        spec = llama_spec(config)
        moe = sparse_moe(config, num_experts=config.num_local_experts, intermediate_size=config.intermediate_size,
                         renormalize=True, round_weights=False, what="intermediate_size")
        return dataclasses.replace(spec, parts=dataclasses.replace(spec.parts, mlp=moe))

    @classmethod
    def example_config(cls) -> Any:
        from transformers import MixtralConfig

        return MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=256, architectures=["MixtralForCausalLM"])
