"""The layers decoder families share: norms, MLPs, attention over the paged cache, and three block layouts.

Parameter names follow the HuggingFace checkpoints (``input_layernorm``, ``self_attn.o_proj``,
``mlp.down_proj``...), except that q/k/v and gate/up are fused into one matmul each
(``self_attn.qkv_proj``, ``mlp.gate_up_proj``), as Phi-3 checkpoints store them anyway.

Under tensor parallelism (``tokenmill.distributed``) each rank builds its part of every layer, Megatron's
way: one all-reduce after attention, one after the MLP, nothing in between.

    qkv_proj      column: this rank's query heads and the KV heads they read (``TensorParallel.kv_heads``)
    attention     local heads only: the backend and the KV cache are built with the local counts
    o_proj        row: partial outputs summed over the ranks
    gate_up_proj  column: a slice of gate and the same slice of up;  down_proj row
    c_fc          column;  c_proj row
    qk-norm       per head: nothing to share; full width (OLMo 2): the sum of squares all-reduced
    norms         replicated (they act on the full hidden state every rank holds)
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
from tokenmill.distributed import TensorParallel, get_tensor_parallel
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
        self.checkpoint_size = size  # the features of the checkpoint's weight (``split_features``)
        self._split: tuple[TensorParallel, int] | None = None  # (ranks, first feature) once split

    def split_features(self, tp: TensorParallel, start: int, total: int) -> RMSNorm:
        """Make this norm one rank's part of a norm over ``total`` features (OLMo 2's qk-norm over all
        heads, heads split by rank): it holds features ``start : start + size`` and its weight, and takes
        the mean square over every rank's features.

        That mean is the all-reduced sum of squares over ``size * tp.size`` features, not ``total``: where
        ranks share a KV head (fewer KV heads than ranks), each of the ``tp.size * size / total`` ranks
        holding one adds its squares, so the sum counts every feature that many times."""
        if tp.size * self.weight.shape[0] % total or not 0 <= start <= total - self.weight.shape[0]:
            raise ValueError(f"features {start}:{start + self.weight.shape[0]} of {total} are not one rank's share "
                             f"among {tp.size}")
        self.checkpoint_size = total
        self._split = (tp, start)
        return self

    def load(self, tensor: torch.Tensor) -> None:
        """Copy the checkpoint's weight (``checkpoint_size`` features); a split norm keeps its own."""
        if self._split is not None:
            tensor = tensor.narrow(0, self._split[1], self.weight.shape[0])
        with torch.no_grad():
            self.weight.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._split is None and not self.upcast_weight and x.dtype == torch.float32:
            # torch's own kernel runs the same ops (pow, mean, add, rsqrt, mul, mul): bit-identical in fp32
            return F.rms_norm(x, x.shape[-1:], self.weight + 1.0 if self.unit_offset else self.weight, self.eps)
        xf = x.float()
        if self._split is None:
            mean_square = xf.pow(2).mean(-1, keepdim=True)
        else:
            tp = self._split[0]
            mean_square = tp.all_reduce(xf.pow(2).sum(-1, keepdim=True)) / (xf.shape[-1] * tp.size)
        xf = xf * torch.rsqrt(mean_square + self.eps)
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
        get_tensor_parallel().split(intermediate_size, "intermediate_size")  # the error names the config field
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=bias,
                                   shard_sizes=(intermediate_size, intermediate_size), parallel="column")
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, parallel="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # gate, up: [T, intermediate]
        return self.down_proj(self.act(gate).mul_(up))


class PlainMLP(nn.Module):
    """c_proj(act(c_fc(x))), not gated (StarCoder2's names)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.act = activation(act)
        get_tensor_parallel().split(intermediate_size, "intermediate_size")
        self.c_fc = Linear(hidden_size, intermediate_size, bias=bias, parallel="column")
        self.c_proj = Linear(intermediate_size, hidden_size, bias=bias, parallel="row")

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
    """qkv_proj ──[qk-norm]──rope(q, k)──> attention backend (paged cache) ──> o_proj

    ``num_heads``, ``num_kv_heads``: the model's (the checkpoint's); by default the backend's, which is
    right at tensor-parallel size 1 only. The backend computes this rank's heads
    (``TensorParallel.local_heads``): ``num_heads`` and ``num_kv_heads`` attributes are those.
    """

    def __init__(self, hidden_size: int, backend: AttentionBackend, spec: AttentionSpec,
                 norm: Callable[[int], nn.Module], *, num_heads: int | None = None,
                 num_kv_heads: int | None = None) -> None:
        super().__init__()
        tp = get_tensor_parallel()
        num_heads = backend.num_heads if num_heads is None else num_heads
        num_kv_heads = backend.num_kv_heads if num_kv_heads is None else num_kv_heads
        first_head, heads = tp.split(num_heads, "num_attention_heads")
        first_kv_head, kv_heads = tp.kv_heads(num_heads, num_kv_heads)
        if (heads, kv_heads) != (backend.num_heads, backend.num_kv_heads):
            raise ValueError(f"attention backend has {backend.num_heads} query and {backend.num_kv_heads} KV heads; "
                             f"rank {tp.rank} of {tp.size} of a model with {num_heads} and {num_kv_heads} computes "
                             f"{heads} and {kv_heads}")
        self.num_heads, self.num_kv_heads = heads, kv_heads
        self.head_dim = d = backend.head_size
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.spec = spec
        self.backend = backend
        # only what is set: a backend without windows or soft-capping still serves the other models
        self.backend_options = {name: value for name, value in (("sliding_window", spec.sliding_window),
                                                                 ("logits_soft_cap", spec.logits_soft_cap))
                                if value is not None}
        q_rows, kv_rows = (first_head * d, self.q_size), (first_kv_head * d, self.kv_size)
        self.qkv_proj = Linear(hidden_size, (num_heads + 2 * num_kv_heads) * d, bias=spec.qkv_bias,
                               shard_sizes=(num_heads * d, num_kv_heads * d, num_kv_heads * d), parallel="column",
                               shard_slices=(q_rows, kv_rows, kv_rows))
        self.o_proj = Linear(num_heads * d, hidden_size, bias=spec.o_bias, parallel="row")
        if spec.qk_norm is QKNorm.PER_HEAD:
            self.q_norm, self.k_norm = norm(self.head_dim), norm(self.head_dim)
        elif spec.qk_norm is QKNorm.FULL_WIDTH:
            self.q_norm, self.k_norm = norm(self.q_size), norm(self.kv_size)
            if tp.size > 1:
                for qk_norm, (start, _), total in ((self.q_norm, q_rows, num_heads * d),
                                                   (self.k_norm, kv_rows, num_kv_heads * d)):
                    if not isinstance(qk_norm, RMSNorm):
                        raise ValueError(f"a full-width qk-norm splits across tensor-parallel ranks as an RMSNorm; "
                                         f"this model's is a {type(qk_norm).__name__}")
                    qk_norm.split_features(tp, start, total)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)  # v: [T, KV, D]
        if self.spec.qk_norm is QKNorm.NONE:  # q and k side by side: one rotation for both
            qk = apply_rope(qkv[:, :self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads,
                                                                      self.head_dim), cos, sin)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]  # q: [T, H, D], k: [T, KV, D]
        else:
            q, k = qkv[:, :self.q_size], qkv[:, self.q_size: self.q_size + self.kv_size]
            if self.spec.qk_norm is QKNorm.FULL_WIDTH:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)
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
        h = attn.add_(h) if self.residual_scale == 1.0 else h + attn * self.residual_scale  # attn: a fresh tensor
        mlp = self.mlp(self.post_attention_layernorm(h))
        return mlp.add_(h) if self.residual_scale == 1.0 else h + mlp * self.residual_scale


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
