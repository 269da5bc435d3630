"""Decode attention on a GPU: the ``triton`` backend's kernel against torch SDPA.

    python benchmarks/attention.py [--json PATH] [--batches 1 16 128] [--contexts 1024 8192 32768]

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head size 128, bf16),
one new token per request after ``context - 1`` cached ones, block size 16,
blocks in shuffled order. Each row times, on the same data:

    triton        the paged kernel as the backend launches it (its split-KV choice)
    no split      the same kernel forced to one split
    sdpa          torch scaled_dot_product_attention over the same keys and values
                  laid out contiguously, [batch, kv_heads, context, head]; the group's
                  query heads ride as 4 query rows per KV head (no KV repeat)

Bandwidth = KV bytes read / time; "% copy" compares it with a device-to-device
copy measured in the same run (bytes read + written / time), the practical HBM
roofline. Per DESIGN.md read the ratios, not the absolute times. Times are
medians of ``triton.testing.do_bench``, which flushes L2 between runs.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16


def copy_bandwidth(do_bench, num_bytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst
    return 2 * num_bytes / (ms * 1e-3)


def run_case(batch: int, context: int, do_bench, copy_bw: float) -> dict:
    from tokenmill import AttentionMetadata
    from tokenmill.kernels.paged_attention import paged_attention, split_workspace_numel
    from tokenmill.plugins.attention import TritonAttentionBackend

    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks_per_req = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_req
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32).view(batch, blocks_per_req)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    md = AttentionMetadata(num_actual_tokens=batch, max_query_len=1, max_seq_len=context,
                           query_start_loc=query_start_loc.cuda(), seq_lens=seq_lens.cuda(), block_tables=tables,
                           slot_mapping=tables[:, -1].long() * BLOCK_SIZE + BLOCK_SIZE - 1,
                           query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens)
    key_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, device="cuda", dtype=DTYPE,
                            generator=gen)
    value_cache = torch.randn_like(key_cache)
    q = torch.randn(batch, NUM_HEADS, HEAD_SIZE, device="cuda", dtype=DTYPE, generator=gen)
    out = torch.empty_like(q)
    scale = HEAD_SIZE ** -0.5

    backend = TritonAttentionBackend(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE,
                                     dtype=DTYPE, device="cuda")
    splits = backend.num_kv_splits_for(md)
    workspace = torch.empty(split_workspace_numel(batch, NUM_HEADS, max(splits, 1), HEAD_SIZE),
                            dtype=torch.float32, device="cuda")

    def triton_attention(num_splits: int) -> None:
        paged_attention(q, key_cache, value_cache, out, block_tables=md.block_tables, seq_lens=md.seq_lens,
                        query_start_loc=md.query_start_loc, max_query_len=1, scale=scale,
                        num_splits=num_splits, workspace=workspace)

    triton_ms = do_bench(lambda: triton_attention(splits), return_mode="median")
    triton_out = out.clone()
    one_split_ms = do_bench(lambda: triton_attention(1), return_mode="median")

    # the same keys and values, contiguous: [batch, kv_heads, context, head], one tensor at a time
    keys = key_cache[tables.long()].view(batch, context, NUM_KV_HEADS, HEAD_SIZE).transpose(1, 2).contiguous()
    del key_cache
    values = value_cache[tables.long()].view(batch, context, NUM_KV_HEADS, HEAD_SIZE).transpose(1, 2).contiguous()
    del value_cache
    q_grouped = q.view(batch, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_SIZE)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q_grouped, keys, values, scale=scale)

    sdpa_ms = do_bench(sdpa, return_mode="median")
    max_diff = (sdpa().reshape(batch, NUM_HEADS, HEAD_SIZE).float() - triton_out.float()).abs().max().item()
    del keys, values
    torch.cuda.empty_cache()

    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_SIZE * DTYPE.itemsize
    return dict(batch=batch, context=context, splits=splits, triton_us=triton_ms * 1e3,
                no_split_us=one_split_ms * 1e3, sdpa_us=sdpa_ms * 1e3,
                triton_gbps=kv_bytes / (triton_ms * 1e-3) / 1e9, sdpa_gbps=kv_bytes / (sdpa_ms * 1e-3) / 1e9,
                triton_copy_fraction=kv_bytes / (triton_ms * 1e-3) / copy_bw,
                sdpa_copy_fraction=kv_bytes / (sdpa_ms * 1e-3) / copy_bw, max_abs_diff=max_diff)


def print_table(rows: list[dict], copy_bw: float) -> None:
    print(f"decode attention, {NUM_HEADS} q / {NUM_KV_HEADS} kv heads x {HEAD_SIZE}, bf16, block {BLOCK_SIZE}; "
          f"device-to-device copy {copy_bw / 1e9:.0f} GB/s")
    print(f"{'batch':>5} {'context':>7} {'splits':>6} {'triton us':>10} {'GB/s':>6} {'% copy':>6} "
          f"{'no-split us':>11} {'sdpa us':>9} {'GB/s':>6} {'% copy':>6} {'sdpa/triton':>11} {'max diff':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:>5} {r['context']:>7}  {r['error']}")
            continue
        print(f"{r['batch']:>5} {r['context']:>7} {r['splits']:>6} {r['triton_us']:>10.1f} {r['triton_gbps']:>6.0f} "
              f"{100 * r['triton_copy_fraction']:>5.0f}% {r['no_split_us']:>11.1f} {r['sdpa_us']:>9.1f} "
              f"{r['sdpa_gbps']:>6.0f} {100 * r['sdpa_copy_fraction']:>5.0f}% "
              f"{r['sdpa_us'] / r['triton_us']:>10.2f}x {r['max_abs_diff']:>8.1e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/attention.py: no CUDA device here; the Triton kernels are timed on a GPU only "
              "(on CPU they run only under the interpreter, for tests). Skipped.")
        return 0
    from triton.testing import do_bench

    copy_bw = copy_bandwidth(do_bench)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            try:
                rows.append(run_case(batch, context, do_bench, copy_bw))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(dict(batch=batch, context=context, error="out of GPU memory"))
    print_table(rows, copy_bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_gbps=copy_bw / 1e9, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
