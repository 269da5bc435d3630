"""``y = x @ W.T`` with W kept as GGUF quant blocks, dequantized tile by tile inside the matmul loop.

A GGUF 2-D weight [out_features, in_features] is stored one row per output channel, each row a
run of quant blocks along the input dimension (QK inputs in BYTES bytes each):

    data[n]:  | block 0 | block 1 | ... | block in_features / QK - 1 |    data: uint8 [out_features, bytes_per_row]

Tiling. Program (m, n) owns y[m BM : (m + 1) BM, n BN : (n + 1) BN] and walks K in tiles of BK
inputs, BK a multiple of QK: a tile never splits a block, so it holds every scale it needs.

              K ───────────────────────────────────>
    x [BM, K]    | BK | BK | ...        loaded as is
    W [BN, K]    | BK | BK | ...        loaded as bytes, unpacked and scaled in registers into [BN, G, GROUP],
                                         reshaped to [BN, BK]:  acc[BM, BN] += x_tile @ w_tile.T  (fp32)

A tile is G = BK / GROUP scale groups: a group is a whole block in the 32-input formats and a
sub-block in the K-quants (32 inputs in Q4_K/Q5_K, 16 in Q6_K). Each group's fp16 scales and
6/8-bit sub-scales are loaded once ([BN, G]); the quants once per input ([BN, G, GROUP]), as runs
of consecutive bytes. fp16 scales are two bytes put together and bitcast: most formats align
them to 2 bytes only. The quants of Q4_K and Q5_K lie 16-byte aligned, and Triton pipelines their
loads (cp.async) like x's; the other formats' are 2-byte aligned, loaded in the loop unpipelined.

Byte layouts (offsets in bytes from the block start; f16 and u32 little-endian; input e):

    Q4_0  32 in 18:  d f16 @0 | qs[16] @2                  w = d (nib - 8)
    Q4_1  32 in 20:  d @0 | m f16 @2 | qs[16] @4           w = d nib + m
    Q5_0  32 in 22:  d @0 | qh u32 @2 | qs[16] @6          w = d ((nib | qh_e << 4) - 16)
    Q5_1  32 in 24:  d @0 | m @2 | qh u32 @4 | qs[16] @8   w = d (nib | qh_e << 4) + m
    Q8_0  32 in 34:  d @0 | qs int8[32] @2                 w = d qs[e]
        nib: qs[e % 16], low nibble for e < 16, high for e >= 16;  qh_e: bit e of qh

    Q4_K  256 in 144:  d @0 | dmin @2 | b[12] @4 | qs[128] @16
        sub-block j < 8 (inputs 32 j + s):  w = d sc_j q - dmin mn_j
        q = qs[32 (j // 2) + s], low nibble for even j, high for odd j
        j < 4:   sc_j = b[j] & 63                            mn_j = b[j + 4] & 63
        j >= 4:  sc_j = b[j + 4] & 15 | (b[j - 4] >> 6) << 4  mn_j = b[j + 4] >> 4 | (b[j] >> 6) << 4
    Q5_K  256 in 176:  d @0 | dmin @2 | b[12] @4 | qh[32] @16 | qs[128] @48
        as Q4_K; bit j of qh[s] is q's fifth bit
    Q6_K  256 in 210:  ql[128] @0 | qh[64] @128 | sc int8[16] @192 | d @208
        sub-block j < 16 (inputs 16 j + s), h = j // 8:  w = d sc[j] (q - 32)
        q's low 4 bits:  ql[64 h + 16 (j % 4) + s] >> 4 ((j % 8) // 4)
        q's high 2 bits: qh[32 h + 16 (j % 2) + s] >> 2 ((j % 8) // 2)

Launches allocate only the output and read nothing from the device: CUDA-graph capturable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# Triton picks interpreter or compiler when a kernel is defined, i.e. now. The interpreter runs
# bf16 arithmetic on raw uint16 bits, so there the dot takes fp32 operands rounded to x's dtype.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_Q4_0 = tl.constexpr(GGMLQuantizationType.Q4_0.value)
_Q4_1 = tl.constexpr(GGMLQuantizationType.Q4_1.value)
_Q5_0 = tl.constexpr(GGMLQuantizationType.Q5_0.value)
_Q5_1 = tl.constexpr(GGMLQuantizationType.Q5_1.value)
_Q8_0 = tl.constexpr(GGMLQuantizationType.Q8_0.value)
_Q4_K = tl.constexpr(GGMLQuantizationType.Q4_K.value)
_Q5_K = tl.constexpr(GGMLQuantizationType.Q5_K.value)
_Q6_K = tl.constexpr(GGMLQuantizationType.Q6_K.value)


@dataclass(frozen=True, slots=True)
class QuantFormat:
    """One GGUF block format: ``block_inputs`` inputs in ``block_bytes`` bytes, a scale per ``group`` inputs."""

    block_inputs: int
    block_bytes: int
    group: int


FORMATS: dict[GGMLQuantizationType, QuantFormat] = {
    qtype: QuantFormat(*GGML_QUANT_SIZES[qtype], group)
    for qtype, group in ((GGMLQuantizationType.Q4_0, 32), (GGMLQuantizationType.Q4_1, 32),
                         (GGMLQuantizationType.Q5_0, 32), (GGMLQuantizationType.Q5_1, 32),
                         (GGMLQuantizationType.Q8_0, 32), (GGMLQuantizationType.Q4_K, 32),
                         (GGMLQuantizationType.Q5_K, 32), (GGMLQuantizationType.Q6_K, 16))
}


# ---------------------------------------------------------------- unpacking ([BN, G] block pointers in)

@triton.jit
def _f16(ptr):
    """The little-endian fp16 at ``ptr`` (two bytes, 2-byte aligned at best), as fp32."""
    bits = tl.load(ptr).to(tl.uint16) | (tl.load(ptr + 1).to(tl.uint16) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _u32(ptr):
    """The little-endian uint32 at ``ptr`` (four bytes, 2-byte aligned at best)."""
    return (tl.load(ptr).to(tl.uint32) | (tl.load(ptr + 1).to(tl.uint32) << 8)
            | (tl.load(ptr + 2).to(tl.uint32) << 16) | (tl.load(ptr + 3).to(tl.uint32) << 24))


@triton.jit
def _legacy_quants(blk, s, QS: tl.constexpr, QH: tl.constexpr, HAS_QH: tl.constexpr):
    """Unsigned 4- or 5-bit quants [BN, G, 32] of the 32-input blocks at ``blk`` [BN, G]: nibbles at
    byte QS, and with HAS_QH the fifth bits in the u32 at byte QH."""
    byte = tl.load(blk[:, :, None] + QS + s[None, None, :] % 16).to(tl.int32)
    q = (byte >> (s[None, None, :] // 16 * 4)) & 0xF
    if HAS_QH:
        qh = _u32(blk + QH)[:, :, None]
        q = q | (((qh >> s[None, None, :].to(tl.uint32)) & 1).to(tl.int32) << 4)
    return q.to(tl.float32)


@triton.jit
def _k_scales(blk, j):
    """Q4_K/Q5_K: (d sc_j, dmin mn_j) [BN, G] of sub-block ``j`` [G] of the blocks at ``blk`` [BN, G]."""
    jj = j[None, :] % 4
    a = tl.load(blk + 4 + jj).to(tl.int32)
    b = tl.load(blk + 8 + jj).to(tl.int32)
    c = tl.load(blk + 12 + jj).to(tl.int32)
    low = j[None, :] < 4
    sc = tl.where(low, a & 63, (c & 0xF) | ((a >> 6) << 4))
    mn = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
    return _f16(blk) * sc.to(tl.float32), _f16(blk + 2) * mn.to(tl.float32)


@triton.jit
def _dequantize(blk, j, s, QTYPE: tl.constexpr):
    """Weights [BN, G, GROUP] fp32 of scale group ``j`` [G] (its index in its block) of the blocks at
    ``blk`` [BN, G], input ``s`` [GROUP] of each group. Layouts in the module docstring."""
    b3 = blk[:, :, None]
    s3 = s[None, None, :]
    j3 = j[None, :, None]
    if QTYPE == _Q4_0:
        w = _f16(blk)[:, :, None] * (_legacy_quants(blk, s, 2, 0, False) - 8.0)
    elif QTYPE == _Q4_1:
        w = _f16(blk)[:, :, None] * _legacy_quants(blk, s, 4, 0, False) + _f16(blk + 2)[:, :, None]
    elif QTYPE == _Q5_0:
        w = _f16(blk)[:, :, None] * (_legacy_quants(blk, s, 6, 2, True) - 16.0)
    elif QTYPE == _Q5_1:
        w = _f16(blk)[:, :, None] * _legacy_quants(blk, s, 8, 4, True) + _f16(blk + 2)[:, :, None]
    elif QTYPE == _Q8_0:
        w = _f16(blk)[:, :, None] * tl.load(b3 + 2 + s3).to(tl.int8, bitcast=True).to(tl.float32)
    elif QTYPE == _Q4_K or QTYPE == _Q5_K:
        scale, offset = _k_scales(blk, j)
        qs = 48 if QTYPE == _Q5_K else 16
        q = (tl.load(b3 + qs + j3 // 2 * 32 + s3).to(tl.int32) >> (j3 % 2 * 4)) & 0xF
        if QTYPE == _Q5_K:
            q = q | (((tl.load(b3 + 16 + s3).to(tl.int32) >> j3) & 1) << 4)
        w = scale[:, :, None] * q.to(tl.float32) - offset[:, :, None]
    else:
        tl.static_assert(QTYPE == _Q6_K, "unsupported GGUF quant type")
        h = j3 // 8
        low = (tl.load(b3 + h * 64 + j3 % 4 * 16 + s3).to(tl.int32) >> (j3 % 8 // 4 * 4)) & 0xF
        high = (tl.load(b3 + 128 + h * 32 + j3 % 2 * 16 + s3).to(tl.int32) >> (j3 % 8 // 2 * 2)) & 0x3
        scale = _f16(blk + 208) * tl.load(blk + 192 + j[None, :]).to(tl.int8, bitcast=True).to(tl.float32)
        w = scale[:, :, None] * ((low | (high << 4)) - 32).to(tl.float32)
    return w


# ---------------------------------------------------------------- the matmul

@triton.jit
def _gguf_matmul_kernel(x, data, y, M, N, K, stride_xm, stride_wn, stride_ym,
                        QTYPE: tl.constexpr, BLOCK_INPUTS: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_IN_FP32: tl.constexpr):
    """``BLOCK_K`` divides K and is a multiple of BLOCK_INPUTS; programs run M-tile fastest, so the
    M-tiles sharing an N-tile (and its weight bytes) run together."""
    num_m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % num_m_tiles
    pid_n = tl.program_id(0) // num_m_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past M or N read row M - 1 or N - 1 (no masked loads in the loop); only the store is masked
    x_rows = x + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    w_rows = data + tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn  # [BN]

    GROUPS: tl.constexpr = BLOCK_K // GROUP
    GROUPS_PER_BLOCK: tl.constexpr = BLOCK_INPUTS // GROUP
    g = tl.arange(0, GROUPS)
    j = g % GROUPS_PER_BLOCK  # the group's index within its block
    s = tl.arange(0, GROUP)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(0, K // BLOCK_K):
        block = t * (BLOCK_K // BLOCK_INPUTS) + g // GROUPS_PER_BLOCK  # [G]
        w = _dequantize(w_rows[:, None] + block[None, :] * BLOCK_BYTES, j, s, QTYPE)  # [BN, G, GROUP]
        w = tl.reshape(w, [BLOCK_N, BLOCK_K]).to(x.dtype.element_ty)
        x_tile = tl.load(x_rows + t * BLOCK_K)  # [BM, BK]
        if DOT_IN_FP32:
            acc = tl.dot(x_tile.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile, tl.trans(w), acc)
    out = y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(out, acc.to(y.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by phase and block size (32-input formats, K-quants)
_CONFIGS = {("decode", 32): (16, 16, 256, 4, 3), ("decode", 256): (16, 16, 256, 4, 3),
            ("prefill", 32): (64, 64, 64, 4, 3), ("prefill", 256): (64, 32, 256, 8, 2)}
DECODE_MAX_TOKENS = 16


def kernel_config(qtype: GGMLQuantizationType | int, *, num_tokens: int, in_features: int,
                  dtype: torch.dtype) -> tuple[dict[str, Any], int, int]:
    """What a launch of this shape compiles: the kernel's constexprs, num_warps and num_stages
    (``kernels.aot`` compiles the same for a GPU that is not here).

    Decode (num_tokens <= 16) reads each weight byte once per step whatever the batch: one
    16-row M-tile (an mma's height: a smaller tile saves no tensor-core work, a taller one
    only idle rows) and narrow 16-channel N-tiles, out_features / 16 programs to spread the
    weight stream over the SMs, 256 inputs a tile to keep bytes in flight. Prefill dequantizes
    each weight tile once for 64 tokens; the K-quants' whole-block tiles (256 inputs) take
    32 channels and 8 warps, where 64 channels spill on sm_90 and 3 stages of x outgrow
    sm_80's shared memory. Chosen from ptxas register counts (see the AOT test), not timed.
    BLOCK_K halves (down to one block) until it divides in_features."""
    fmt = FORMATS[GGMLQuantizationType(qtype)]
    phase = "decode" if num_tokens <= DECODE_MAX_TOKENS else "prefill"
    block_m, block_n, block_k, num_warps, num_stages = _CONFIGS[phase, fmt.block_inputs]
    while block_k > fmt.block_inputs and in_features % block_k:
        block_k //= 2
    constexprs = dict(QTYPE=int(qtype), BLOCK_INPUTS=fmt.block_inputs, BLOCK_BYTES=fmt.block_bytes,
                      GROUP=fmt.group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      DOT_IN_FP32=dtype == torch.float32 or INTERPRETED)
    return constexprs, num_warps, num_stages


def gguf_matmul(x: torch.Tensor, data: torch.Tensor, qtype: GGMLQuantizationType | int, out_features: int,
                in_features: int) -> torch.Tensor:
    """``x @ W.T`` [T, out_features] in x's dtype (fp32 accumulation), for x [T, in_features]
    (fp32/fp16/bf16, rows contiguous) and W the GGUF weight of type ``qtype`` whose raw bytes
    ``data`` holds as uint8 [out_features, bytes_per_row] (rows contiguous; any row stride)."""
    try:
        fmt = FORMATS[GGMLQuantizationType(qtype)]
    except (KeyError, ValueError):
        raise ValueError(f"qtype must be one of {[q.name for q in FORMATS]}, got {qtype!r}") from None
    if in_features <= 0 or in_features % fmt.block_inputs or out_features <= 0:
        raise ValueError(f"{GGMLQuantizationType(qtype).name} needs out_features >= 1 and in_features a positive "
                         f"multiple of {fmt.block_inputs}, got out_features={out_features}, in_features={in_features}")
    bytes_per_row = in_features // fmt.block_inputs * fmt.block_bytes
    if data.dtype != torch.uint8 or data.shape != (out_features, bytes_per_row) or data.stride(1) != 1:
        raise ValueError(f"data must be uint8 [{out_features}, {bytes_per_row}] with contiguous rows, "
                         f"got {data.dtype} {list(data.shape)} strides {data.stride()}")
    if x.dim() != 2 or x.shape[1] != in_features or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) \
            or x.stride(1) != 1:
        raise ValueError(f"x must be float32/float16/bfloat16 [num_tokens, {in_features}] with contiguous rows, "
                         f"got {x.dtype} {list(x.shape)} strides {x.stride()}")
    if x.device != data.device:
        raise ValueError(f"x and data must be on one device, got {x.device} and {data.device}")
    num_tokens = x.shape[0]
    y = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return y
    constexprs, num_warps, num_stages = kernel_config(qtype, num_tokens=num_tokens, in_features=in_features,
                                                      dtype=x.dtype)
    grid = (triton.cdiv(num_tokens, constexprs["BLOCK_M"]) * triton.cdiv(out_features, constexprs["BLOCK_N"]),)
    _gguf_matmul_kernel[grid](x, data, y, num_tokens, out_features, in_features, x.stride(0), data.stride(0),
                              y.stride(0), **constexprs, num_warps=num_warps, num_stages=num_stages)
    return y
