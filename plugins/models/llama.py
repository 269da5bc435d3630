"""The Llama family (Llama, Mistral, Qwen2): a decoder-only transformer over the paged KV cache.

One layer, on a flat run of T tokens from any number of requests:

    h ──RMSNorm──> qkv_proj ──rope(q, k)──> attention backend (paged cache) ──> o_proj ──(+h)──> h'
    h' ─RMSNorm──> gate_up_proj ──silu(gate) * up──> down_proj ──(+h')──> next layer

q/k/v and gate/up are fused into one matmul each; ``load_weights`` maps the
HuggingFace checkpoint names onto the fused shards.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill import AttentionBackend, AttentionMetadata, Model
from tokenmill.model_base import GGUFNames

_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                      "output.weight": "lm_head.weight"}
_GGUF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                     "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                     "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                     "ffn_down": "mlp.down_proj"}

# HuggingFace projection -> (fused parameter, shard index within it)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def rope_inv_freq(config: Any, head_dim: int) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2], fp32. Reads transformers 5's
    ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling`` fields."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        # Llama 3.1: keep short wavelengths, stretch long ones by `factor`, blend in between.
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, blended, scaled)
    raise ValueError(f"rope_type must be one of ['default', 'linear', 'llama3'], got {rope_type!r}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, 1, D]. Rotates the two halves of D (HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, weight applied in the input dtype: the order transformers uses
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = backend.num_heads, backend.num_kv_heads
        self.head_dim = backend.head_size
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(-1, self.num_heads, self.head_dim), cos, sin)  # q: [T, H, D]
        k = apply_rope(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)  # k: [T, KV, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)  # v: [T, KV, D]
        out = self.backend.forward(q, k, v, kv_cache, attn_metadata, self.scale)  # out: [T, H, D]
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # gate, up: [T, intermediate]
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, attn_metadata)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(Model):
    """Llama, Mistral (without a sliding window) and Qwen2 checkpoints.

    Parameters are named like the HuggingFace ones without the ``model.``
    prefix, except the fused ``qkv_proj`` and ``gate_up_proj``.
    """

    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    # llama.cpp's converter permutes Llama's q/k rows, not Qwen2's
    gguf_names = {"llama": GGUFNames(_GGUF_GLOBAL_NAMES, _GGUF_BLOCK_NAMES, permuted_qk=True),
                  "qwen2": GGUFNames(_GGUF_GLOBAL_NAMES, _GGUF_BLOCK_NAMES)}

    def __init__(self, hf_config: Any, attention: AttentionBackend) -> None:
        super().__init__(hf_config, attention)
        config = hf_config
        _check_supported(config)
        spec = self.kv_cache_spec(config)
        expected = (config.num_attention_heads, spec.num_kv_heads, spec.head_size)
        if (attention.num_heads, attention.num_kv_heads, attention.head_size) != expected:
            raise ValueError(f"attention backend has (num_heads, num_kv_heads, head_size) = "
                             f"{(attention.num_heads, attention.num_kv_heads, attention.head_size)}, "
                             f"the config needs {expected}")
        # Llama's attention_bias covers q/k/v/o; Qwen2 has no such field and biases q/k/v only.
        if getattr(config, "attention_bias", None) is not None:
            qkv_bias = o_bias = bool(config.attention_bias)
        else:
            qkv_bias, o_bias = getattr(config, "model_type", None) == "qwen2", False
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, attention, qkv_bias, o_bias)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                       bias=False)
        # fp32 whatever the default dtype; a later model.to(bfloat16) would round it, so build in the target dtype
        self.register_buffer("inv_freq", rope_inv_freq(config, spec.head_size), persistent=False)
        attn = self.layers[0].self_attn
        self._shard_sizes = {"qkv_proj": (attn.q_size, attn.kv_size, attn.kv_size),
                             "gate_up_proj": (config.intermediate_size, config.intermediate_size)}

    @classmethod
    def example_config(cls) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           architectures=["LlamaForCausalLM"])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        if len(self.kv_caches) != len(self.layers):
            raise RuntimeError(f"bind_kv_caches() needs one cache per layer ({len(self.layers)}) before "
                               f"forward, got {len(self.kv_caches)}")
        h = self.embed_tokens(input_ids)  # h: [T, hidden]
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # freqs: [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # emb: [T, 1, D]
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for layer, kv_cache in zip(self.layers, self.kv_caches):
            h = layer(h, cos, sin, kv_cache, attn_metadata)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()  # [n, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if hf_name.endswith(_IGNORED_SUFFIXES) or (hf_name == "lm_head.weight" and self.lm_head is None):
                continue  # recomputed buffers; a tied lm_head is embed_tokens itself
            name = hf_name.removeprefix("model.")
            module, _, leaf = name.rpartition(".")
            parent, _, proj = module.rpartition(".")
            shard = None
            if proj in _FUSED:
                fused, shard = _FUSED[proj]
                name = f"{parent}.{fused}.{leaf}"
            param = params.get(name)
            if param is None:
                raise ValueError(f"unexpected weight '{hf_name}': {type(self).__name__} for this config has no "
                                 f"parameter '{name}'")
            target = param.data
            if shard is not None:
                sizes = self._shard_sizes[fused]
                target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
            if target.shape != tensor.shape:
                raise ValueError(f"weight '{hf_name}' has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
            loaded.add(name)
        return loaded


def _check_supported(config: Any) -> None:
    """Refuse configs this implementation would run differently from the reference."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act must be 'silu', got {act!r}")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    # Qwen2 keeps a sliding_window value but applies it only when use_sliding_window is set.
    if getattr(config, "use_sliding_window", True) is False or \
            (layer_types is not None and "sliding_attention" not in layer_types):
        window = None
    max_len = config.max_position_embeddings
    if window is not None and window < max_len:
        raise ValueError(f"sliding_window={window} is smaller than max_position_embeddings={max_len}: "
                         f"sliding-window attention is not implemented, so outputs past {window} tokens "
                         f"would be wrong; sliding_window must be None or >= {max_len}")
