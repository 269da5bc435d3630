"""The decoder skeleton every built-in family shares, and the spec a family fills in.

On a flat run of T tokens from any number of requests:

    input_ids ─embed_tokens (× embed_scale)─> h ─[block 0 .. N-1]─> norm ─> hidden [T, hidden]
    hidden ─lm_head (tied: embed_tokens)─> logits (÷ logits_divisor, soft cap) [n, vocab]

A family is a subclass that says how its config maps onto the skeleton (``decoder_spec``): the
block layout, the norm, the MLP, each layer's attention (scale, biases, qk-norm, sliding window,
soft cap, which rotary embedding) and the rope parameters. ``load_weights`` takes the
HuggingFace checkpoint names and fills the fused q/k/v and gate/up shards.

Every family runs tensor-parallel (``supports_tensor_parallel``): built under a ``TensorParallel`` of
size N, the model is one rank's shard (``layers``: heads, MLP columns and vocabulary split), its
attention backend computes ``TensorParallel.local_heads`` of the config's heads, ``load_weights`` takes
the whole checkpoint tensors and keeps the rank's part, and ``compute_logits`` gives every rank all
the logits.
"""
from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenmill import AttentionBackend, AttentionMetadata, Model
from tokenmill.distributed import get_tensor_parallel
from tokenmill.layers import Embedding, Linear
from tokenmill.model_base import KVCacheSpec
from tokenmill.quantization import QuantizedWeight

from .layers import Attention, AttentionSpec, BlockParts, GatedMLP, RMSNorm
from .rope import ROPE_TYPES, RotaryEmbedding, signed_sin

# HuggingFace projection -> (fused parameter, shard index within it)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class DecoderSpec:
    """What a family changes in the skeleton, read from its HuggingFace config."""

    block: Callable[[BlockParts, Attention], nn.Module]  # PreNormBlock, SandwichBlock or PostNormBlock
    parts: BlockParts
    layers: tuple[AttentionSpec, ...]  # one per layer
    rope: Mapping[str, Mapping[str, Any]]  # AttentionSpec.rope -> rope parameters (see rope.rope_parameters)
    embed_scale: float = 1.0
    logits_divisor: float = 1.0
    final_logit_soft_cap: float | None = None
    # one MLP builder per layer where the layers' MLPs differ (MoE families mixing dense and sparse
    # layers); None: ``parts.mlp`` builds every layer's
    mlps: tuple[Callable[[], nn.Module], ...] | None = None


def decoder_features(*, sliding_window: bool = False, logit_soft_cap: bool = False) -> dict[str, Any]:
    """A family's ``Model.features``: whether its configs may have windows or soft caps, and the
    rope types every family reads."""
    return {"sliding_window": sliding_window, "logit_soft_cap": logit_soft_cap, "rope_types": list(ROPE_TYPES)}


def layer_types(config: Any, default: Callable[[int], str] | None = None) -> list[str]:
    """Each layer's attention type, ``sliding_attention`` or ``full_attention``.

    transformers 5 configs list them (``layer_types``); older ones say it otherwise: Qwen2's
    window applies only with ``use_sliding_window`` and from layer ``max_window_layers`` on,
    Mistral's, Phi-3's and StarCoder2's to every layer. ``default(i)``: the family's own pattern
    when the config lists none (Gemma's alternation).
    """
    num_layers = config.num_hidden_layers
    listed = getattr(config, "layer_types", None)
    if listed is not None:
        return list(listed)
    if not getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", True) is False:
        return [FULL] * num_layers
    if default is not None:
        return [default(i) for i in range(num_layers)]
    first = getattr(config, "max_window_layers", 0)
    return [SLIDING if i >= first else FULL for i in range(num_layers)]


def sliding_windows(config: Any, types: list[str]) -> list[int | None]:
    """Each layer's window, None for full attention. A window that covers
    ``max_position_embeddings`` changes nothing and is dropped, so no backend needs to support it."""
    window = getattr(config, "sliding_window", None)
    if not window or window >= config.max_position_embeddings:
        return [None] * len(types)
    return [window if kind == SLIDING else None for kind in types]


def attention_layers(config: Any, types: list[str] | None = None, *, rope_per_type: bool = False,
                     **fields: Any) -> tuple[AttentionSpec, ...]:
    """One AttentionSpec per layer: the config's sliding windows (``types``: the layers' attention
    types, by default ``layer_types(config)``), each type's own rotary embedding if
    ``rope_per_type``, and ``fields`` (``scale`` defaults to head_dim ** -0.5)."""
    types = layer_types(config) if types is None else types
    fields.setdefault("scale", Model.kv_cache_spec(config).head_size ** -0.5)
    return tuple(AttentionSpec(sliding_window=window, rope=kind if rope_per_type else "default", **fields)
                 for kind, window in zip(types, sliding_windows(config, types)))


def gated_mlp(config: Any, act: str | None = None, bias: bool = False) -> Callable[[], GatedMLP]:
    """A builder of the config's gated MLP; ``act`` overrides its ``hidden_act``."""
    return lambda: GatedMLP(config.hidden_size, config.intermediate_size, act or config.hidden_act, bias)


def token_seq_lens(attn_metadata: AttentionMetadata, num_tokens: int) -> torch.Tensor:
    """Each token's request length at this step (cached + scheduled tokens), int [num_tokens];
    padding rows past the last request get its length."""
    ends = attn_metadata.query_start_loc[1:]
    tokens = torch.arange(num_tokens, device=ends.device, dtype=ends.dtype)
    request = torch.searchsorted(ends, tokens, right=True).clamp_(max=ends.shape[0] - 1)
    return attn_metadata.seq_lens[request]


class DecoderForCausalLM(Model):
    """A decoder-only transformer over the paged KV cache, shaped by ``decoder_spec(config)``.

    Parameters are named like the HuggingFace ones without the ``model.`` prefix, except the
    fused ``qkv_proj`` and ``gate_up_proj``.
    """

    features = decoder_features()
    quantized_weights = True
    supports_tensor_parallel = True
    # LoRA (core/lora.py): each LoRA-able Linear under a decoder layer -> the PEFT target of each shard
    lora_modules = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
                    "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}

    @classmethod
    def lora_module_shapes(cls, config: Any) -> dict[str, tuple[int, int]]:
        """Each LoRA target's checkpoint (out, in): what an adapter's B and A must fit."""
        cache = cls.kv_cache_spec(config)
        q, kv, hidden = config.num_attention_heads * cache.head_size, cache.num_kv_heads * cache.head_size, \
            config.hidden_size
        shapes = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q)}
        spec = cls.decoder_spec(config)
        with torch.device("meta"):  # shapes only: nothing allocated
            mlps = [build() for build in set(spec.mlps or (spec.parts.mlp,))]
        if all(isinstance(mlp, GatedMLP) for mlp in mlps):  # MoE and c_fc/c_proj MLPs take no MLP adapter
            intermediate = mlps[0].down_proj.in_features
            shapes.update(gate_proj=(intermediate, hidden), up_proj=(intermediate, hidden),
                          down_proj=(hidden, intermediate))
        return shapes

    @classmethod
    @abstractmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        """How this family's config maps onto the skeleton."""

    @classmethod
    def kv_cache_spec(cls, hf_config: Any) -> KVCacheSpec:
        """The standard geometry; ``sliding_window`` when every layer has the same window, so the
        engine may free the blocks behind it."""
        layers = cls.decoder_spec(hf_config).layers
        windows = {layer.sliding_window for layer in layers}
        return dataclasses.replace(super().kv_cache_spec(hf_config),
                                   sliding_window=next(iter(windows)) if len(windows) == 1 else None,
                                   uses_sliding_window=windows != {None},
                                   uses_logits_soft_cap=any(layer.logits_soft_cap is not None for layer in layers))

    def __init__(self, hf_config: Any, attention: AttentionBackend) -> None:
        super().__init__(hf_config, attention)
        config = hf_config
        spec = self.decoder_spec(config)
        cache = self.kv_cache_spec(config)
        tp = get_tensor_parallel()
        expected = (*tp.local_heads(config.num_attention_heads, cache.num_kv_heads), cache.head_size)
        if (attention.num_heads, attention.num_kv_heads, attention.head_size) != expected:
            ranks = f" on each of {tp.size} tensor-parallel ranks" if tp.size > 1 else ""
            raise ValueError(f"attention backend has (num_heads, num_kv_heads, head_size) = "
                             f"{(attention.num_heads, attention.num_kv_heads, attention.head_size)}, "
                             f"the config needs {expected}{ranks}")
        if len(spec.layers) != config.num_hidden_layers:
            raise ValueError(f"{type(self).__name__}.decoder_spec gave {len(spec.layers)} layers, the config "
                             f"has num_hidden_layers={config.num_hidden_layers}")
        mlps = (spec.parts.mlp,) * len(spec.layers) if spec.mlps is None else spec.mlps
        if len(mlps) != len(spec.layers):
            raise ValueError(f"{type(self).__name__}.decoder_spec gave {len(mlps)} MLP builders for "
                             f"{len(spec.layers)} layers")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, parallel="vocab",
                                      head=self.tie_word_embeddings)
        # a buffer in the model dtype: transformers rounds Gemma's sqrt(hidden) to it too
        self.register_buffer("embed_scale", None if spec.embed_scale == 1.0 else torch.tensor(spec.embed_scale),
                             persistent=False)
        self.layers = nn.ModuleList(
            spec.block(dataclasses.replace(spec.parts, mlp=mlp),
                       Attention(config.hidden_size, attention, layer, spec.parts.norm,
                                 num_heads=config.num_attention_heads, num_kv_heads=cache.num_kv_heads))
            for layer, mlp in zip(spec.layers, mlps))
        self.norm = spec.parts.norm(config.hidden_size)
        self.lm_head = None if self.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size,
                                                                       bias=False, logits=True, parallel="vocab")
        self.rotary = nn.ModuleDict({key: RotaryEmbedding(params, cache.head_size, config.max_position_embeddings)
                                     for key, params in spec.rope.items()})
        self._needs_seq_lens = any(rotary.is_length_dependent for rotary in self.rotary.values())
        self.logits_divisor, self.final_logit_soft_cap = spec.logits_divisor, spec.final_logit_soft_cap

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        if len(self.kv_caches) != len(self.layers):
            raise RuntimeError(f"bind_kv_caches() needs one cache per layer ({len(self.layers)}) before "
                               f"forward, got {len(self.kv_caches)}")
        h = self.embed_tokens(input_ids)  # h: [T, hidden]
        if self.embed_scale is not None:
            h = h * self.embed_scale
        seq_lens = token_seq_lens(attn_metadata, positions.shape[0]) if self._needs_seq_lens else None
        rope = {}  # cos, signed sin: [T, 1, rotary_dim] in h's dtype, computed once for every layer
        for key, rotary in self.rotary.items():
            cos, sin = rotary(positions, seq_lens)
            rope[key] = cos.to(h.dtype)[:, None, :], signed_sin(sin).to(h.dtype)[:, None, :]
        for layer, kv_cache in zip(self.layers, self.kv_caches):
            h = layer(h, *rope[layer.self_attn.spec.rope], kv_cache, attn_metadata)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens.as_linear if self.lm_head is None else self.lm_head
        logits = head(hidden).float()  # [n, vocab]
        if self.logits_divisor != 1.0:
            logits = logits / self.logits_divisor
        if self.final_logit_soft_cap is not None:
            logits = self.final_logit_soft_cap * torch.tanh(logits / self.final_logit_soft_cap)
        return logits

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
            owner = self.get_submodule(name.rpartition(".")[0])
            quantized = isinstance(tensor, QuantizedWeight)
            shape = (tensor.out_features, tensor.in_features) if quantized else tuple(tensor.shape)
            expected = _checkpoint_shape(owner, leaf, shard, param)
            if shape != expected:
                raise ValueError(f"weight '{hf_name}' has shape {shape}, expected {expected}")
            # the layers take whole checkpoint tensors and keep this rank's part (tensor parallelism)
            if isinstance(owner, Linear) and leaf == "weight":
                owner.load(tensor, shard)  # a quantized tensor stays quantized
            elif isinstance(owner, Linear) and leaf == "bias" and not quantized:
                owner.load_bias(tensor, shard)
            elif isinstance(owner, Embedding) and leaf == "weight":
                owner.load(tensor)
            elif quantized:
                raise ValueError(f"weight '{hf_name}' is quantized, but '{name}' is not a Linear or Embedding weight")
            elif isinstance(owner, RMSNorm) and leaf == "weight":
                owner.load(tensor)
            else:
                with torch.no_grad():
                    param.data.copy_(tensor)
            loaded.add(name)
        return loaded


def _checkpoint_shape(owner: nn.Module, leaf: str, shard: int | None, param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the checkpoint tensor that fills ``owner``'s parameter ``leaf`` (shard ``shard`` of a
    fused Linear): the whole tensor, whatever part of it this tensor-parallel rank keeps."""
    if isinstance(owner, Linear) and leaf in ("weight", "bias"):
        rows = owner.checkpoint_shape[0] if shard is None else owner.checkpoint_shard_sizes[shard]
        return (rows, owner.checkpoint_shape[1]) if leaf == "weight" else (rows,)
    if isinstance(owner, Embedding) and leaf == "weight":
        return owner.vocab_size, owner.embedding_dim
    if isinstance(owner, RMSNorm) and leaf == "weight":
        return (owner.checkpoint_size,)
    return tuple(param.shape)
