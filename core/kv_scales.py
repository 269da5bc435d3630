"""The scales of an fp8 KV cache: one per (layer, keys or values, KV head), fixed at start-up.

Why fixed: a cache entry is read by every later step of its request and, through
the prefix cache, by other requests; a scale that changed after the write would
change what the entry means (and a block's prefix-cache hash would no longer
name its contents). Why per KV head: a layer's heads can differ in magnitude
several-fold, and one scale for the layer would push the small ones towards
fp8's coarse subnormal range.

How: one calibration prompt (the BOS token, then ids drawn with the engine's
seed; the same prompt on every start, so the same scales) runs through the
model on a scratch cache in the model's dtype, which then holds every layer's
exact keys and values. From each head's largest magnitude:

    scale[layer, keys|values, head] = HEADROOM * amax / (the fp8 format's largest finite value)

so the calibration's own values use the format's range up to 1 / HEADROOM, and
a later one up to HEADROOM times larger still fits; beyond that a write saturates
(clamped, never inf or NaN). fp8's relative precision is the same across its
normal range, so the headroom costs precision only for values HEADROOM times
closer to the subnormals, which are negligible next to the head's largest ones.
A head that held only zeros keeps vLLM's default scale, 1.0.
"""
from __future__ import annotations

import torch

from .attention import AttentionBackend
from .memory import bind_scratch_prompt

HEADROOM = 4.0
CALIBRATION_TOKENS = 256


def scales_from_amax(amax: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales for a cache of ``cache_dtype`` whose values' magnitudes reach ``amax`` (any shape)."""
    amax = amax.float()
    return torch.where(amax > 0, amax * (HEADROOM / torch.finfo(cache_dtype).max), torch.ones_like(amax))


@torch.inference_mode()
def calibrate_kv_cache_scales(model: torch.nn.Module, backend: AttentionBackend, *, num_layers: int,
                              block_size: int, vocab_size: int, bos_token_id: int | None, seed: int,
                              num_tokens: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """The scales of ``backend.cache_dtype`` (fp8) for ``model``: fp32 [num_layers, 2, num_kv_heads]
    (keys, values), from one forward pass of a ``num_tokens`` calibration prompt.

    The model is left bound to the scratch cache: bind the real one afterwards."""
    scratch, positions, metadata = bind_scratch_prompt(
        model, backend, num_layers=num_layers, num_kv_heads=backend.num_kv_heads, head_size=backend.head_size,
        block_size=block_size, cache_dtype=backend.dtype, device=backend.device, num_tokens=num_tokens)
    token_ids = torch.randint(vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    if bos_token_id is not None:
        token_ids[0] = bos_token_id
    model(token_ids.to(backend.device), positions, metadata)
    amax = torch.stack([backend.kv_cache_amax(cache) for cache in scratch])  # [layers, 2, KV]
    return scales_from_amax(amax, backend.cache_dtype)
