"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here.

``triton.compile`` takes a kernel with its argument types and constexprs and a
target (``GPUTarget("cuda", 90, 32)``: sm_90) and runs the whole pipeline down
to a cubin with the ptxas that ships with triton; no driver, no device. The
test suite compiles each kernel variant we ship this way, so compile errors
and register spills show up on a CPU-only machine before any GPU run.

The constexprs come from the launch wrapper's own ``kernel_config``, the
argument types from what the backend passes (int32 metadata, 16-byte aligned
tensors, strides that are multiples of 16): the variant compiled here is the
one a launch of that shape compiles. Needs compiled kernels: run it in a
process without ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .fused_moe import _fused_moe_kernel, kernel_config as moe_kernel_config, launch_constexprs as moe_constexprs
from .gguf_matmul import _gguf_matmul_kernel, kernel_config as gguf_kernel_config
from .kv_write import _write_kv_kernel, kv_write_config
from .lora import _lora_expand_kernel, _lora_shrink_kernel, kernel_config as lora_kernel_config
from .paged_attention import INTERPRETED, _paged_attention_kernel, kernel_config
from .split_kv_reduce import _reduce_kv_splits_kernel

_POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
                  torch.float8_e4m3fn: "*fp8e4nv", torch.float8_e5m2: "*fp8e5"}
_ALIGNED = [["tt.divisibility", 16]]
# shared memory one program may take (opt-in maximum per block): A100 (sm_80), H100/H200 (sm_90)
MAX_SHARED_BYTES = {80: 166912, 90: 232448}


@dataclass(frozen=True, slots=True)
class KernelResources:
    """What ptxas gave one compiled kernel: registers per thread, and the bytes of stack and
    local memory per thread (non-zero: it spilled registers); and the shared memory a program
    takes (a launch fails past the device's limit, ``MAX_SHARED_BYTES``)."""

    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int = 0

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


def compile_paged_attention(arch: int, *, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_size: int,
                            block_size: int, max_query_len: int, num_splits: int = 1, sliding_window: bool = False,
                            soft_cap: bool = False, cache_dtype: torch.dtype | None = None) -> KernelResources:
    """Compile the paged attention variant a launch of this shape uses for ``sm_{arch}``;
    ``cache_dtype``: the KV cache's when it is not ``dtype`` (an fp8 one)."""
    cache_dtype = cache_dtype or dtype
    fp8_kv = cache_dtype != dtype
    constexprs, num_warps, num_stages = kernel_config(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, block_size=block_size, dtype=dtype,
        max_query_len=max_query_len, num_splits=num_splits, sliding_window=sliding_window, soft_cap=soft_cap,
        fp8_kv=fp8_kv)
    data, cache = _POINTER_TYPES[dtype], _POINTER_TYPES[cache_dtype]
    partial = "*fp32" if num_splits > 1 else data  # unsplit launches pass `out` for the unused workspace
    types = dict(out=data, q=data, key_cache=cache, value_cache=cache, block_tables="*i32", seq_lens="*i32",
                 query_start_loc="*i32", part_acc=partial, part_max=partial, part_sum=partial,
                 kv_scales="*fp32" if fp8_kv else data, scale_log2="fp32", window="i32", cap_in="fp32",
                 cap_out="fp32", num_reqs="i32")
    strides = [name for name in _paged_attention_kernel.arg_names if name.startswith("stride_")]
    types.update(dict.fromkeys(strides, "i32"))
    aligned = {name for name, t in types.items() if t.startswith("*")} | set(strides)
    return _compile(_paged_attention_kernel, arch, types, aligned, constexprs, num_warps=num_warps,
                    num_stages=num_stages)


def compile_kv_write(arch: int, *, dtype: torch.dtype, num_kv_heads: int, head_size: int, block_size: int,
                     cache_dtype: torch.dtype | None = None) -> KernelResources:
    """Compile the KV cache write for ``sm_{arch}``: keys of ``dtype`` into a cache of ``cache_dtype``
    (default the same: a copy; fp8: quantized)."""
    cache_dtype = cache_dtype or dtype
    constexprs = kv_write_config(num_kv_heads=num_kv_heads, head_size=head_size, block_size=block_size,
                                 cache_dtype=cache_dtype)
    data, cache = _POINTER_TYPES[dtype], _POINTER_TYPES[cache_dtype]
    types = dict(key=data, value=data, key_cache=cache, value_cache=cache, slot_mapping="*i64",
                 kv_scales="*fp32" if constexprs["QUANTIZE"] else cache)
    strides = [name for name in _write_kv_kernel.arg_names if name.startswith("stride_")]
    types.update(dict.fromkeys(strides, "i32"))
    return _compile(_write_kv_kernel, arch, types, set(types), constexprs, num_warps=4, num_stages=3)


def compile_split_kv_reduce(arch: int, *, dtype: torch.dtype, num_heads: int, num_splits: int,
                            head_size: int) -> KernelResources:
    """Compile the split-KV merge ``reduce_kv_splits`` launches for that shape, for ``sm_{arch}``."""
    constexprs = dict(NUM_HEADS=num_heads, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
                      HEAD_SIZE=head_size, HEAD_PAD=triton.next_power_of_2(head_size))
    types = dict(out=_POINTER_TYPES[dtype], part_acc="*fp32", part_max="*fp32", part_sum="*fp32",
                 stride_ot="i32", stride_oh="i32")
    return _compile(_reduce_kv_splits_kernel, arch, types, set(types), constexprs, num_warps=4, num_stages=3)


def _compile(kernel, arch: int, types: dict[str, str], aligned: set[str], constexprs: dict[str, Any], *,
             num_warps: int, num_stages: int) -> KernelResources:
    if INTERPRETED:
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1, which cannot compile them: "
                           "compile ahead of time in a process without it")
    names = kernel.arg_names
    missing = set(names) - set(types) - set(constexprs)
    if missing:
        raise ValueError(f"{kernel.__name__}: no type or constexpr for {sorted(missing)}")
    signature = {name: "constexpr" if name in constexprs else types[name] for name in names}
    attrs = {(i,): _ALIGNED for i, name in enumerate(names) if name in aligned}  # in order: part of the cache key
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return replace(_resources(compiled.asm["cubin"], kernel.__name__), shared_bytes=compiled.metadata.shared)


def _resources(cubin: bytes, name: str) -> KernelResources:
    """Registers, stack and local bytes of kernel ``name`` in ``cubin``, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                                text=True, check=True).stdout
    lines = report.splitlines()
    usage = next(lines[i + 1] for i, line in enumerate(lines) if line.strip() == f"Function {name}:")
    fields = dict(item.split(":", 1) for item in usage.split())
    return KernelResources(registers=int(fields["REG"]), stack_bytes=int(fields["STACK"]),
                           local_bytes=int(fields["LOCAL"]))


def compile_gguf_matmul(arch: int, *, qtype: int, dtype: torch.dtype, num_tokens: int,
                        in_features: int = 4096) -> KernelResources:
    """Compile the GGUF matmul variant a launch of ``num_tokens`` tokens (its decode or prefill config)
    uses for ``sm_{arch}``."""
    constexprs, num_warps, num_stages = gguf_kernel_config(qtype, num_tokens=num_tokens, in_features=in_features,
                                                           dtype=dtype)
    data = _POINTER_TYPES[dtype]
    types = dict(x=data, data="*u8", y=data, M="i32", N="i32", K="i32", stride_xm="i32", stride_wn="i32",
                 stride_ym="i32")
    aligned = set(types) - {"M"}  # a launch at real sizes: every size but the token count a multiple of 16
    return _compile(_gguf_matmul_kernel, arch, types, aligned, constexprs, num_warps=num_warps,
                    num_stages=num_stages)


def compile_fused_moe(arch: int, *, dtype: torch.dtype, num_tokens: int, gated: bool, activation: str = "silu",
                      hidden: int = 4096, intermediate: int = 14336, num_experts: int = 8,
                      top_k: int = 2) -> KernelResources:
    """Compile one GEMM of ``fused_moe`` (``gated``: gate/up with ``activation``; else down) as a launch of
    ``num_tokens`` tokens on that layer shape (its decode or prefill config) compiles it for ``sm_{arch}``;
    the defaults are Mixtral-8x7B's."""
    config = moe_kernel_config(num_tokens, hidden, intermediate, dtype, top_k=top_k, num_experts=num_experts)
    constexprs, num_warps, num_stages = moe_constexprs(config, gated=gated, k_dim=hidden if gated else intermediate,
                                                       top_k=top_k, activation=activation)
    data = _POINTER_TYPES[dtype]
    types = dict(a=data, w=data, c=data, topk_weights="*fp32", sorted_token_ids="*i32", expert_ids="*i32",
                 num_tokens_post_padded="*i32", N="i32", K="i32", num_slots="i32", stride_am="i32",
                 stride_we="i32", stride_wn="i32", stride_cm="i32")
    aligned = set(types) - {"num_slots"}  # real sizes: all but the slot count (T * k) multiples of 16
    return _compile(_fused_moe_kernel, arch, types, aligned, constexprs, num_warps=num_warps,
                    num_stages=num_stages)


def compile_lora(arch: int, *, op: str, dtype: torch.dtype, num_tokens: int, rank: int = 16) -> KernelResources:
    """Compile the LoRA ``op`` (``"shrink"`` or ``"expand"``) variant a launch of ``num_tokens`` tokens
    (per-row decode or grouped prefill) on adapters of (padded) ``rank`` uses for ``sm_{arch}``."""
    constexprs, num_warps, num_stages = lora_kernel_config(num_tokens, rank, dtype, op)
    data = _POINTER_TYPES[dtype]
    shrink = op == "shrink"
    kernel = _lora_shrink_kernel if shrink else _lora_expand_kernel
    types = dict(x=data, out="*fp32", stride_xm="i32", stride_wr="i32", stride_om="i32", K="i32") if shrink \
        else dict(t="*fp32", y=data, stride_tm="i32", stride_wn="i32", stride_ym="i32", N="i32")
    types.update(w=data, token_slots="*i32", sorted_rows="*i32", block_slots="*i32", num_rows_post_padded="*i32",
                 num_tokens="i32", R="i32", num_slots="i32", stride_ws="i32")
    aligned = set(types) - {"num_tokens", "R", "num_slots"}  # real sizes: features and strides multiples of 16
    return _compile(kernel, arch, types, aligned, constexprs, num_warps=num_warps, num_stages=num_stages)
