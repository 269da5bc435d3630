"""The ``torch`` attention backend: paged attention in plain PyTorch.

The reference every other backend is tested against, and the CPU default.
Cache layout, one tensor per layer:

    kv_cache[0] = keys, kv_cache[1] = values: [num_blocks, block_size, num_kv_heads, head_size]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supported_devices = ("cpu", "cuda")

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        n = metadata.num_actual_tokens
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        block_size = key_cache.shape[1]
        write_kv(key_cache, value_cache, k[:n], v[:n], metadata.slot_mapping[:n])

        out = torch.zeros_like(q)
        group = self.num_heads // self.num_kv_heads
        starts = metadata.query_start_loc_cpu.tolist()
        for i, seq_len in enumerate(metadata.seq_lens_cpu.tolist()):
            start, end = starts[i], starts[i + 1]
            query_len = end - start
            if query_len == 0:
                continue
            blocks = metadata.block_tables[i, : (seq_len + block_size - 1) // block_size]
            # keys/values of the whole context: [seq_len, kv_heads, head]
            keys = key_cache[blocks].flatten(0, 1)[:seq_len]
            values = value_cache[blocks].flatten(0, 1)[:seq_len]
            # [heads, len, head]; fp32 so the reference is exact enough to compare against
            qh = q[start:end].transpose(0, 1).float()
            kh = keys.transpose(0, 1).float().repeat_interleave(group, dim=0)
            vh = values.transpose(0, 1).float().repeat_interleave(group, dim=0)
            # new token j sits at position seq_len - query_len + j and sees keys up to it
            q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
            attn = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
            out[start:end] = attn.transpose(0, 1).to(q.dtype)
        return out


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter each token's k/v into its slot; slot -1 (padding) is skipped."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key_cache.view(-1, *key_cache.shape[2:])[slots] = k[valid].to(key_cache.dtype)
    value_cache.view(-1, *value_cache.shape[2:])[slots] = v[valid].to(value_cache.dtype)
