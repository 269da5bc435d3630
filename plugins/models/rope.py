"""Rotary position embeddings: the rope parameters of a config, their scaling types, and their application.

    positions [T] ──RotaryEmbedding──> cos, sin [T, rotary_dim] ──apply_rope(q and k)──> rotated [T, heads, D]

A rotary embedding turns each position into angles ``position * inv_freq`` (one per pair of
dimensions) and rotates the two halves of the first ``rotary_dim`` dimensions of every head
(HuggingFace's ``rotate_half`` layout); ``partial_rotary_factor`` < 1 leaves the rest as they are.
Scaling types change ``inv_freq`` and may scale cos and sin (an attention factor):

    default    theta ** (-2i / dim)
    linear     default / factor
    llama3     long wavelengths / factor, short ones kept, a smooth blend in between
    yarn       per dimension a ramp between interpolation (/ factor) and extrapolation; cos and sin
               scaled by the attention factor (0.1 ln(factor) + 1 unless the config gives it)
    dynamic    dynamic NTK: theta grows with the sequence length L past max_position_embeddings
    longrope   (or ``su``) default / short_factor while L <= original_max_position_embeddings,
               / long_factor past it; cos and sin scaled by sqrt(1 + ln(factor) / ln(original))

The two length-dependent types follow transformers: its rotary embedding recomputes from
``max(position_ids) + 1`` of each forward, which in its ``generate`` is the sequence length of
that step (the prompt's length for the prefill, p + 1 for the token at position p). Here every
token uses the length of its own request at this step (cached + scheduled tokens): identical for
a prompt computed in one chunk and for every decoded token, and well defined when requests of
different lengths share a batch. A prompt split into chunks uses the length reached by each
chunk; keys already in the cache (a prefix-cache hit included) are never re-rotated. Two
differences remain:

- transformers' Phi-3 ``generate`` drops its cache when a sequence grows past
  ``original_max_position_embeddings`` and recomputes every token on the long factors; here the
  keys cached before the crossing keep their short-factor rotation, so such a request departs
  from transformers after it crosses (requests whose prompt is already past it, or that never
  reach it, match);
- vLLM fixes dynamic NTK at ``max_position_embeddings * factor`` for every length, which does not
  match transformers below that length; here it matches, but the engine caps ``max_model_len`` at
  ``max_position_embeddings`` (``loader.resolve_max_model_len``), where dynamic NTK has not yet
  started scaling: it only takes effect once that cap allows longer requests.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
_ALIASES = {"su": "longrope"}


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope parameters of ``config`` in transformers 5's shape (``rope_type``, ``rope_theta``
    and the type's own fields), for the layers of ``layer_type`` when they differ per layer type
    (Gemma 3's nested ``rope_parameters``). Reads transformers 5's ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling`` fields."""
    params = getattr(config, "rope_parameters", None)
    if params and layer_type in params:
        params = params[layer_type]
    params = dict(params or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type") or params.pop("type", None) or "default"
    params["rope_type"] = _ALIASES.get(rope_type, rope_type)
    for name in ("partial_rotary_factor", "original_max_position_embeddings"):
        if params.get(name) is None and getattr(config, name, None) is not None:
            params[name] = getattr(config, name)  # Phi-3 keeps them outside the rope fields
    return params


def rope_inv_freq(config: Any, head_dim: int) -> torch.Tensor:
    """The inverse frequencies [rotary_dim // 2] (fp32) of a config whose rope does not depend on
    the sequence length; for the dynamic types, those at lengths up to the original context."""
    return RotaryEmbedding(rope_parameters(config), head_dim, config.max_position_embeddings).inv_freq


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., rotary_dim] with its first half negated: the factor ``apply_rope`` takes, made once per
    step rather than once per layer."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos and ``signed_sin(sin)``: [T, 1, rotary_dim] with rotary_dim <= D. Rotates the
    two halves of the first rotary_dim dimensions (HF layout); the others pass through.

    HF's ``x * cos + cat(-x2, x1) * sin`` as ``x * cos + cat(x2, x1) * cat(-s, s)``: the same products
    (a sign flip rounds alike), in four kernels instead of five, on fresh tensors only."""
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    out = rotated * cos
    swapped = torch.cat((rotated[..., half:], rotated[..., :half]), dim=-1)
    out += swapped.mul_(sin)
    return out if passed.shape[-1] == 0 else torch.cat((out, passed), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos and sin for the positions of a step, from one set of rope parameters.

    ``is_length_dependent`` (dynamic, longrope): ``forward`` needs each token's request length
    (see the module docstring). The inverse frequencies stay fp32 buffers; build the model in its
    target dtype rather than converting it afterwards, which would round them.
    """

    def __init__(self, params: Mapping[str, Any], head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        self.rope_type = params["rope_type"]
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {list(ROPE_TYPES) + list(_ALIASES)}, got {self.rope_type!r}")
        self.theta = float(params["rope_theta"])
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.max_position_embeddings = max_position_embeddings
        self.original_max_position_embeddings = params.get("original_max_position_embeddings",
                                                           max_position_embeddings)
        self.attention_factor = 1.0
        self.is_length_dependent = self.rope_type in ("dynamic", "longrope")
        inv_freq = default_inv_freq(self.theta, self.rotary_dim)
        if self.rope_type == "linear":
            inv_freq = inv_freq / params["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params, max_position_embeddings)
        elif self.rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn(params, self.theta, self.rotary_dim, max_position_embeddings)
        elif self.rope_type == "dynamic":
            self.factor = float(params["factor"])
        elif self.rope_type == "longrope":
            self.attention_factor = _longrope_attention_factor(params, max_position_embeddings)
            self.register_buffer("long_inv_freq", inv_freq / _factors(params["long_factor"]), persistent=False)
            inv_freq = inv_freq / _factors(params["short_factor"])
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor,
                seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int [T]; seq_lens: int [T], each token's request length at this step (needed
        when ``is_length_dependent``). Returns fp32 cos, sin [T, rotary_dim]."""
        if self.rope_type == "dynamic":
            inv_freq = self._dynamic_inv_freq(seq_lens)  # [T, rotary_dim / 2]
        elif self.rope_type == "longrope":
            is_long = (seq_lens > self.original_max_position_embeddings)[:, None]
            inv_freq = torch.where(is_long, self.long_inv_freq[None, :], self.inv_freq[None, :])
        else:
            inv_freq = self.inv_freq[None, :]
        freqs = positions.float()[:, None] * inv_freq  # freqs: [T, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        # theta' = theta * (factor * L / max_pos - (factor - 1)) ** (dim / (dim - 2)), L >= max_pos
        dim, max_len = self.rotary_dim, self.max_position_embeddings
        length = seq_lens.clamp(min=max_len).float()
        theta = self.theta * (self.factor * length / max_len - (self.factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_lens.device).float() / dim
        return 1.0 / theta[:, None] ** exponents[None, :]


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _factors(values: Any) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: Mapping[str, Any], max_len: int) -> torch.Tensor:
    # Llama 3.1: keep short wavelengths, stretch long ones by `factor`, blend in between.
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params.get("original_max_position_embeddings", max_len)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


def _yarn(params: Mapping[str, Any], theta: float, dim: int, max_len: int) -> tuple[torch.Tensor, float]:
    """YaRN: dimensions that turn fewer than ``beta_slow`` times over the original context are
    interpolated (/ factor), those that turn more than ``beta_fast`` times are kept, with a linear
    ramp in between; returns (inv_freq, attention factor)."""
    old_len = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_len / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dim_of(num_rotations: float) -> float:  # the dimension that turns num_rotations times over old_len
        return dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv_freq = 1.0 / (factor * pos_freqs) * ramp + 1.0 / pos_freqs * (1 - ramp)
    return inv_freq, float(attention_factor)


def _longrope_attention_factor(params: Mapping[str, Any], max_len: int) -> float:
    old_len = params["original_max_position_embeddings"]
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = params.get("factor") or max_len / old_len
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
