"""The layers decoder families share: norms, MLPs, attention over the paged cache, and three block layouts.

Parameter names follow the HuggingFace checkpoints (``input_layernorm``, ``self_attn.o_proj``,
``mlp.down_proj``...), except that q/k/v and gate/up are fused into one matmul each
(``self_attn.qkv_proj``, ``mlp.gate_up_proj``), as Phi-3 checkpoints store them anyway.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill import AttentionBackend, AttentionMetadata
from tokenmill.layers import Linear

from .rope import apply_rope

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act must be one of {list(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


# ---------------------------------------------------------------- norms

class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in fp32.

    ``unit_offset`` (Gemma): the checkpoint stores w and the norm multiplies by (1 + w).
    ``upcast_weight`` (Gemma, OLMo 2): the weight multiplies in fp32, then the result is cast to
    the input dtype; Llama casts first. The same in fp32, not in bf16: each follows its reference.
    """

    def __init__(self, size: int, eps: float, *, unit_offset: bool = False, upcast_weight: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps
        self.unit_offset = unit_offset
        self.upcast_weight = upcast_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.upcast_weight:
            weight = self.weight.float()
            return (xf * (weight + 1.0 if self.unit_offset else weight)).to(x.dtype)
        return (self.weight + 1.0 if self.unit_offset else self.weight) * xf.to(x.dtype)


# ---------------------------------------------------------------- MLPs

class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with tanh GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.act = activation(act)
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias,
                                   shard_sizes=(intermediate_size, intermediate_size))
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # gate, up: [T, intermediate]
        return self.down_proj(self.act(gate) * up)


class PlainMLP(nn.Module):
    """c_proj(act(c_fc(x))), not gated (StarCoder2's names)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.act = activation(act)
        self.c_fc = Linear(hidden_size, intermediate_size, bias=bias)
        self.c_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


# ---------------------------------------------------------------- attention

class QKNorm(enum.Enum):
    """Where q and k are normalised before rope, if at all."""

    NONE = "none"
    PER_HEAD = "per_head"  # an RMSNorm over each head's D features (Qwen3, Gemma 3)
    FULL_WIDTH = "full_width"  # one RMSNorm over all heads' H * D features (OLMo 2)


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention needs beyond the backend's head geometry."""

    scale: float
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: QKNorm = QKNorm.NONE
    sliding_window: int | None = None  # HF semantics: the query at p sees keys p - W < j <= p
    logits_soft_cap: float | None = None  # scores -> cap * tanh(score / cap) before softmax
    rope: str = "default"  # which of the model's rotary embeddings this layer uses


class Attention(nn.Module):
    """qkv_proj ──[qk-norm]──rope(q, k)──> attention backend (paged cache) ──> o_proj"""

    def __init__(self, hidden_size: int, backend: AttentionBackend, spec: AttentionSpec,
                 norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = backend.num_heads, backend.num_kv_heads
        self.head_dim = backend.head_size
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.spec = spec
        self.backend = backend
        # only what is set: a backend without windows or soft-capping still serves the other models
        self.backend_options = {name: value for name, value in (("sliding_window", spec.sliding_window),
                                                                 ("logits_soft_cap", spec.logits_soft_cap))
                                if value is not None}
        self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias,
                               shard_sizes=(self.q_size, self.kv_size, self.kv_size))
        self.o_proj = Linear(self.q_size, hidden_size, bias=spec.o_bias)
        if spec.qk_norm is QKNorm.PER_HEAD:
            self.q_norm, self.k_norm = norm(self.head_dim), norm(self.head_dim)
        elif spec.qk_norm is QKNorm.FULL_WIDTH:
            self.q_norm, self.k_norm = norm(self.q_size), norm(self.kv_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.spec.qk_norm is QKNorm.FULL_WIDTH:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(-1, self.num_heads, self.head_dim)  # q: [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # k: [T, KV, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)  # v: [T, KV, D]
        if self.spec.qk_norm is QKNorm.PER_HEAD:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.backend.forward(q, k, v, kv_cache, attn_metadata, self.spec.scale,
                                   **self.backend_options)  # out: [T, H, D]
        return self.o_proj(out.reshape(-1, self.q_size))


# ---------------------------------------------------------------- blocks
#
# Three layouts of one decoder layer; ``norm`` builds a norm over the hidden size, ``mlp`` the MLP.
# HuggingFace names the norms after the position they had in each family, so the names differ.

@dataclass(frozen=True)
class BlockParts:
    """How to build one layer's pieces (shared by every layer of a model)."""

    hidden_size: int
    norm: Callable[[int], nn.Module]
    mlp: Callable[[], nn.Module]
    residual_scale: float = 1.0


class PreNormBlock(nn.Module):
    """Llama and most others; Granite scales both branches by ``residual_multiplier``:

        h  = h  + s * attn(input_layernorm(h))
        h' = h  + s * mlp(post_attention_layernorm(h))
    """

    def __init__(self, parts: BlockParts, attention: Attention) -> None:
        super().__init__()
        self.input_layernorm = parts.norm(parts.hidden_size)
        self.self_attn = attention
        self.post_attention_layernorm = parts.norm(parts.hidden_size)
        self.mlp = parts.mlp()
        self.residual_scale = parts.residual_scale

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, attn_metadata)
        h = h + (attn if self.residual_scale == 1.0 else attn * self.residual_scale)
        mlp = self.mlp(self.post_attention_layernorm(h))
        return h + (mlp if self.residual_scale == 1.0 else mlp * self.residual_scale)


class SandwichBlock(nn.Module):
    """Gemma 2 and 3: a norm before and after each branch.

        h  = h  + post_attention_layernorm(attn(input_layernorm(h)))
        h' = h  + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
    """

    def __init__(self, parts: BlockParts, attention: Attention) -> None:
        super().__init__()
        self.input_layernorm = parts.norm(parts.hidden_size)
        self.self_attn = attention
        self.post_attention_layernorm = parts.norm(parts.hidden_size)
        self.pre_feedforward_layernorm = parts.norm(parts.hidden_size)
        self.mlp = parts.mlp()
        self.post_feedforward_layernorm = parts.norm(parts.hidden_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, kv_cache,
                                                             attn_metadata))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class PostNormBlock(nn.Module):
    """OLMo 2: the norms sit after each branch, none before.

        h  = h  + post_attention_layernorm(attn(h))
        h' = h  + post_feedforward_layernorm(mlp(h))
    """

    def __init__(self, parts: BlockParts, attention: Attention) -> None:
        super().__init__()
        self.self_attn = attention
        self.post_attention_layernorm = parts.norm(parts.hidden_size)
        self.mlp = parts.mlp()
        self.post_feedforward_layernorm = parts.norm(parts.hidden_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(h, cos, sin, kv_cache, attn_metadata))
        return h + self.post_feedforward_layernorm(self.mlp(h))


def rms_norm(config: Any, **options: bool) -> Callable[[int], RMSNorm]:
    """A builder of RMSNorms with the config's ``rms_norm_eps``."""
    return lambda size: RMSNorm(size, config.rms_norm_eps, **options)
