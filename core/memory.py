"""The start-up memory budget on CUDA: how many bytes the KV cache may take.

    total * gpu_memory_utilization            what this engine may use
      - (total - free)                        in use now: the weights, the CUDA context,
                                              and anything else on the device
      - peak activations of the largest step  measured: a profiling forward pass of
                                              max_num_batched_tokens tokens plus the
                                              sampler on max_num_seqs rows
      = the KV cache budget

A budget at or below zero means the model does not fit; an error says which
part is too big and what to change. Too few blocks for one request of
``max_model_len`` is the caller's error (it knows the block size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttentionMetadata
from .errors import ConfigError
from .sampler import Sampler
from .sampling_metadata import SamplingMetadata

GIB = 1 << 30


@dataclass(slots=True)
class MemoryProfile:
    total_bytes: int
    free_bytes: int  # after the weights were loaded, before the KV cache
    weights_bytes: int
    activation_bytes: int  # peak above the weights during the profiling step


def kv_cache_budget(profile: MemoryProfile, utilization: float) -> int:
    """Bytes the KV cache may take; raises ConfigError when nothing is left for it."""
    allowed = int(profile.total_bytes * utilization)
    in_use = profile.total_bytes - profile.free_bytes
    budget = allowed - in_use - profile.activation_bytes
    if budget <= 0:
        raise ConfigError(
            f"the model does not fit: gpu_memory_utilization={utilization} allows "
            f"{allowed / GIB:.2f} GiB of {profile.total_bytes / GIB:.2f} GiB, but {in_use / GIB:.2f} GiB are in use "
            f"after loading (weights {profile.weights_bytes / GIB:.2f} GiB) and the largest step needs "
            f"{profile.activation_bytes / GIB:.2f} GiB of activations, leaving nothing for the KV cache: raise "
            "gpu_memory_utilization, lower max_num_batched_tokens or max_num_seqs, or use a smaller model")
    return budget


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def bind_scratch_prompt(model, backend, *, num_layers: int, num_kv_heads: int, head_size: int, block_size: int,
                        cache_dtype: torch.dtype, device: torch.device,
                        num_tokens: int) -> tuple[list[torch.Tensor], torch.Tensor, AttentionMetadata]:
    """Bind ``model`` to a zeroed scratch KV cache (of ``cache_dtype``) just big enough for one
    prompt of ``num_tokens`` tokens, and lay that prompt's step out: (the caches, its positions,
    its metadata, prepared by ``backend``). The start-up passes run one such step; bind the real
    cache afterwards."""
    num_blocks = -(-num_tokens // block_size) + 1  # + the null block
    scratch = [torch.zeros(backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size),
                           dtype=cache_dtype, device=device) for _ in range(num_layers)]
    model.bind_kv_caches(scratch)
    positions = torch.arange(num_tokens, device=device)
    query_start_loc = torch.tensor([0, num_tokens], dtype=torch.int32)
    seq_lens = torch.tensor([num_tokens], dtype=torch.int32)
    metadata = AttentionMetadata(
        num_actual_tokens=num_tokens, max_query_len=num_tokens, max_seq_len=num_tokens,
        query_start_loc=query_start_loc.to(device), seq_lens=seq_lens.to(device),
        block_tables=torch.arange(1, num_blocks, dtype=torch.int32, device=device).unsqueeze(0),
        slot_mapping=positions + block_size, query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens)
    metadata.backend_state = backend.prepare(metadata)
    return scratch, positions, metadata


@torch.inference_mode()
def profile_peak_activations(model, backend, *, num_layers: int, num_kv_heads: int, head_size: int,
                             block_size: int, cache_dtype: torch.dtype, device: torch.device, num_tokens: int,
                             num_seqs: int) -> int:
    """Peak bytes allocated above the current level by the largest step: one prompt chunk
    of ``num_tokens`` through the model (on a scratch KV cache of ``cache_dtype`` just big
    enough), then the sampler with top-k, top-p and logprobs on ``num_seqs`` rows. CUDA only.

    The model is left bound to the scratch cache: bind the real one afterwards."""
    if device.type != "cuda":
        raise ValueError("profile_peak_activations measures CUDA memory; the device is " + str(device))
    scratch, positions, metadata = bind_scratch_prompt(
        model, backend, num_layers=num_layers, num_kv_heads=num_kv_heads, head_size=head_size,
        block_size=block_size, cache_dtype=cache_dtype, device=device, num_tokens=num_tokens)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    hidden = model(torch.zeros(num_tokens, dtype=torch.int64, device=device), positions, metadata)
    rows = torch.arange(num_tokens - 1, num_tokens - 1 - num_seqs, -1, device=device).clamp_min(0)
    logits = model.compute_logits(hidden[rows])
    metadata = SamplingMetadata(
        temperature=torch.ones(num_seqs, device=device), all_greedy=False, all_random=True,
        top_p=torch.full((num_seqs,), 0.9, device=device), top_k=torch.full((num_seqs,), 50, device=device),
        max_num_logprobs=20)
    Sampler()(logits, metadata)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del scratch, hidden, logits
    torch.cuda.empty_cache()
    return max(peak, 0)
