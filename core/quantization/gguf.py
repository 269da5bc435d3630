"""GGUF block formats kept quantized: dequantization in plain torch ops (CPU or CUDA) and a CPU matmul that
never holds the float32 matrix.

A 2-D GGUF weight [out_features, in_features] is stored row by row, each row a run of blocks along the
input dimension, so every row (one output channel) stands alone:

    data: uint8 [out_features, in_features // block_size * type_size]
          row r: | block 0 | block 1 | ... |     block b holds weights [r, b*block_size : (b+1)*block_size]

One block (fp16 = IEEE half, all fields little endian; q[i] is the i-th quant of the block):

    Q4_0  (32 weights, 18 B)   | d fp16 | qs[16] |              w = d * (q - 8)
    Q4_1  (32 weights, 20 B)   | d fp16 | m fp16 | qs[16] |     w = d * q + m
          qs[j]: low nibble = q[j], high nibble = q[j + 16]
    Q5_0  (32 weights, 22 B)   | d | qh[4] | qs[16] |           w = d * (q - 16)
    Q5_1  (32 weights, 24 B)   | d | m | qh[4] | qs[16] |       w = d * q + m
          q[j] = nibble j (as in Q4_0) | (bit j of the 32-bit qh) << 4
    Q8_0  (32 weights, 34 B)   | d fp16 | q int8[32] |          w = d * q

K-quants: a super-block of 256 weights in sub-blocks, each with its own scale:

    Q4_K  (256, 144 B)  | d | dmin | scales[12] | qs[128] |
    Q5_K  (256, 176 B)  | d | dmin | scales[12] | qh[32] | qs[128] |
          8 sub-blocks s of 32: w = d * sc[s] * q - dmin * mn[s]
          qs[32c + l]: low nibble = quant l of sub-block 2c, high nibble = quant l of sub-block 2c + 1
          Q5_K: bit s of qh[l] is the fifth bit of quant l of sub-block s
          scales[12], 6-bit sc and mn (upper case: sc, lower case: mn; A..H = sub-blocks 0..7):
              bytes 0-3:  EEAAAAAA FFBBBBBB GGCCCCCC HHDDDDDD
              bytes 4-7:  eeaaaaaa ffbbbbbb ggcccccc hhdddddd
              bytes 8-11: eeeeEEEE ffffFFFF ggggGGGG hhhhHHHH
    Q6_K  (256, 210 B)  | ql[128] | qh[64] | scales int8[16] | d fp16 |
          16 sub-blocks of 16: w = d * scales[i // 16] * (q[i] - 32)
          quant i = 128h + 32k + l (h < 2, k < 4, l < 32): 4 low bits from ql[64h + 32(k % 2) + l]
          (its low nibble when k < 2, else its high one), 2 high bits from qh[32h + l] >> 2k

F32, F16 and BF16 pass through as blocks of one weight.

Every quantized format is one affine form, ``w = scale * (q - offset) + min`` over groups of 32 (16 for
Q6_K) consecutive weights, with q an unsigned integer of 4 to 8 bits (``BlockFormat.affine``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from gguf import GGMLQuantizationType

__all__ = ["FORMATS", "BlockFormat", "GGUFWeight", "Int4Pack", "block_format", "dequantize", "matmul_tiled"]

Q = GGMLQuantizationType
# (q uint8 [n, block_size] (int8 q - offset for ``signed``), scale float32 [n, groups], min float32 [n, groups] or None)
Affine = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


# ---------------------------------------------------------------------------------------------------------------
# Block formats
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BlockFormat:
    """A GGUF storage format: ``block_size`` weights in ``type_size`` bytes.

    Quantized formats give ``affine``: uint8 blocks [n, type_size] -> their quants, scales and mins, where
    ``w = scale * (q - offset) + min`` per group of ``group_size`` weights; float ones give ``float_dtype``.
    """

    qtype: GGMLQuantizationType
    block_size: int
    type_size: int
    bits: int = 0
    offset: int = 0
    group_size: int = 32
    affine: Callable[[torch.Tensor], Affine] | None = None
    float_dtype: torch.dtype | None = None
    # where the blocks store q - offset as int8 (Q8_0): (that view, scale, min), read without arithmetic
    signed: Callable[[torch.Tensor], Affine] | None = None

    def dequantize_blocks(self, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 blocks [n, type_size] -> float32 weights [n, block_size], the same bits as gguf.quants;
        into ``out`` (contiguous float32 [n, block_size]) when given.

        ``q - offset`` is a small integer, so it is formed exactly in int8 (``signed``, or ``affine``'s q
        minus the offset) and the float math is the format's own: one product, one sum."""
        if out is None:
            out = torch.empty(blocks.shape[0], self.block_size, dtype=torch.float32, device=blocks.device)
        if self.affine is None:
            return out.copy_(blocks.contiguous().view(self.float_dtype))
        if self.signed is not None:
            v, scale, min_ = self.signed(blocks)
        else:  # q < 64: the same value as int8
            q, scale, min_ = self.affine(blocks)
            v = q.view(torch.int8) if self.offset == 0 else q.view(torch.int8) - self.offset
        w = out.view(blocks.shape[0], -1, self.group_size)
        w.copy_(v.unflatten(1, (-1, self.group_size))).mul_(scale.unsqueeze(-1))
        if min_ is not None:
            w += min_.unsqueeze(-1)
        return out


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Bytes [n, 2] (an fp16 field) -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes [..., k] -> [..., 2, k]: the low nibbles, then the high ones."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _bits(b: torch.Tensor, count: int, step: int = 1) -> torch.Tensor:
    """Bytes [..., k] -> [..., count, k]: b >> 0, b >> step, b >> 2 step, ... (the caller masks)."""
    shifts = torch.arange(0, count * step, step, dtype=torch.uint8, device=b.device)
    return b.unsqueeze(-2) >> shifts.unsqueeze(-1)


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 quants [n, 32] from qh [n, 4] and qs [n, 16]."""
    high = (_bits(qh, 8) & 1).transpose(1, 2).flatten(1)  # bit j of qh is bit j % 8 of byte j // 8
    return _nibbles(qs).flatten(1) | (high << 4)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K blocks -> (d * sc, -dmin * mn), float32 [n, 8] each."""
    s = b[:, 4:16]
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=1)
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=1)
    return _f16(b[:, 0:2]) * sc.float(), -(_f16(b[:, 2:4]) * mn.float())


def _q4_0(b: torch.Tensor) -> Affine:
    return _nibbles(b[:, 2:]).flatten(1), _f16(b[:, :2]), None


def _q4_1(b: torch.Tensor) -> Affine:
    return _nibbles(b[:, 4:]).flatten(1), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b: torch.Tensor) -> Affine:
    return _five_bit(b[:, 2:6], b[:, 6:]), _f16(b[:, :2]), None


def _q5_1(b: torch.Tensor) -> Affine:
    return _five_bit(b[:, 4:8], b[:, 8:]), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q8_0(b: torch.Tensor) -> Affine:
    return b[:, 2:] ^ 0x80, _f16(b[:, :2]), None  # int8 v as the unsigned v + 128


def _q8_0_signed(b: torch.Tensor) -> Affine:
    return b[:, 2:].view(torch.int8), _f16(b[:, :2]), None


def _q4_k(b: torch.Tensor) -> Affine:
    q = _nibbles(b[:, 16:].unflatten(1, (4, 32))).flatten(1)  # [n, 4 pairs, 2, 32] -> sub-block order
    return (q, *_k_scales(b))


def _q5_k(b: torch.Tensor) -> Affine:
    low = _nibbles(b[:, 48:].unflatten(1, (4, 32))).flatten(1)
    high = (_bits(b[:, 16:48], 8) & 1).flatten(1)  # [n, sub-block s, 32]: bit s of qh[l]
    return (low | (high << 4), *_k_scales(b))


def _q6_k(b: torch.Tensor) -> Affine:
    low = _nibbles(b[:, :128].unflatten(1, (2, 64))).flatten(1)  # [n, h, nibble, 64]: 128h + 64 nibble + l
    high = (_bits(b[:, 128:192].unflatten(1, (2, 32)), 4, step=2) & 3).flatten(1)  # [n, h, k, 32]
    scale = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()
    return low | (high << 4), scale, None


FORMATS: dict[GGMLQuantizationType, BlockFormat] = {f.qtype: f for f in [
    BlockFormat(Q.F32, 1, 4, float_dtype=torch.float32),
    BlockFormat(Q.F16, 1, 2, float_dtype=torch.float16),
    BlockFormat(Q.BF16, 1, 2, float_dtype=torch.bfloat16),
    BlockFormat(Q.Q4_0, 32, 18, bits=4, offset=8, affine=_q4_0),
    BlockFormat(Q.Q4_1, 32, 20, bits=4, affine=_q4_1),
    BlockFormat(Q.Q5_0, 32, 22, bits=5, offset=16, affine=_q5_0),
    BlockFormat(Q.Q5_1, 32, 24, bits=5, affine=_q5_1),
    BlockFormat(Q.Q8_0, 32, 34, bits=8, offset=128, affine=_q8_0, signed=_q8_0_signed),
    BlockFormat(Q.Q4_K, 256, 144, bits=4, affine=_q4_k),
    BlockFormat(Q.Q5_K, 256, 176, bits=5, affine=_q5_k),
    BlockFormat(Q.Q6_K, 256, 210, bits=6, offset=32, group_size=16, affine=_q6_k),
]}


def block_format(qtype: int) -> BlockFormat:
    """The format of ``qtype`` (a ``GGMLQuantizationType`` or its number)."""
    fmt = FORMATS.get(qtype)  # type: ignore[call-overload]
    if fmt is None:
        try:
            name = Q(qtype).name
        except ValueError:
            name = f"number {qtype}"
        raise ValueError(f"GGUF type {name} is not one tokenmill keeps quantized; it keeps "
                         f"{', '.join(q.name for q in FORMATS)}")
    return fmt


def is_quantized(qtype: int) -> bool:
    """Whether a tensor of ``qtype`` stays in its GGUF block format (float formats are expanded);
    a block format tokenmill does not keep is a ValueError naming it."""
    if qtype in (Q.F32, Q.F16, Q.BF16, Q.F64):
        return False
    return block_format(qtype).affine is not None


def dequantize(data: torch.Tensor, qtype: int, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of blocks, uint8 [rows, bytes_per_row] -> float32 [rows, in_features], on data's device (into
    ``out``, contiguous float32 [rows, in_features], when given)."""
    fmt = block_format(qtype)
    blocks = data.reshape(-1, fmt.type_size)
    out = fmt.dequantize_blocks(blocks, None if out is None else out.view(blocks.shape[0], fmt.block_size))
    return out.view(data.shape[0], in_features)


# ---------------------------------------------------------------------------------------------------------------
# CPU matmul: dequantized tiles, or PyTorch's int4 kernel
# ---------------------------------------------------------------------------------------------------------------

# float32 weights per dequantized tile: 2 MiB, small enough to stay in cache while the tile is multiplied,
# large enough that the ~10 ops per tile cost little beside their work
_TILE_WEIGHTS = 1 << 19


def matmul_tiled(x: torch.Tensor, data: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """``x @ W.T`` for x [T, in_features], dequantizing a tile of output rows at a time (any device).

    Exact float32 math for float32 x; for a 16-bit x each tile is rounded to x's dtype before the matmul.
    """
    num_rows = data.shape[0]
    tile = min(num_rows, max(16, _TILE_WEIGHTS // in_features))
    out = torch.empty(x.shape[0], num_rows, dtype=x.dtype, device=x.device)
    buffer = torch.empty(tile * in_features, dtype=torch.float32, device=x.device)  # one tile's worth, reused
    for start in range(0, num_rows, tile):
        rows = data[start:start + tile]
        w = dequantize(rows, qtype, in_features, out=buffer[:rows.shape[0] * in_features]).to(x.dtype)
        torch.matmul(x, w.T, out=out[:, start:start + tile])
    return out


# rows packed at a time; a multiple of the kernel's 64-row blocks, so the packed chunks concatenate
_PACK_ROWS = 1024
_HAS_INT4PACK = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


@dataclass(frozen=True, slots=True)
class Int4Pack:
    """A weight in the layout of ``torch.ops.aten._weight_int4pack_mm_for_cpu``.

    That kernel computes ``x @ W.T`` with, per group of 32 inputs and per output row,
    ``W = (u - 8) * scale + zero`` for unsigned nibbles u; x, scale and zero share one dtype (float32,
    float16 or bfloat16; only bfloat16 is vectorized on x86, so that is the one used), it accumulates in
    float32 and returns x's dtype. A format of up to 8 bits splits into nibble planes, concatenated along
    the input dimension and multiplied by x repeated once per plane. With v = q - offset:

        4 bits:  w = scale * (q - 8) + (min + (8 - offset) * scale)                  one plane, u = q
        5-8 bits, v = 16 h + l (0 <= l < 16, -8 <= h < 8):
                 w = 16 scale * (h + 8 - 8) + [scale * (l - 8) + (min + 8 scale)]    planes u = h + 8, u = l

    Q6_K's groups of 16 become groups of 32 whose second half multiplies zeros padded into x:

        x:  | x0..x15 | x16..x31 | ...    ->    | x0..x15 0..0 | x16..x31 0..0 | ...

    All of it is exact in real numbers. Rounding x, each plane's scale and zero, and the result to
    bfloat16 costs a relative error of at most 2**-8 (bfloat16's unit roundoff) each; the planes' terms
    are about the size of the weight, so ``|y - x @ W.T|`` stays within a few 2**-8 of ``|x| @ |W|.T``.

    Layout cost: a nibble per weight and plane (twice that for Q6_K) plus a bfloat16 scale and zero per
    group of 32 and plane: 0.625 bytes per weight (4 bits), 1.25 (5 and 8 bits), 2.5 (Q6_K).
    """

    packed: torch.Tensor            # uint8 [N, num_planes * K' / 2] in the kernel's own tiling (K' = 2K for Q6_K)
    scales_and_zeros: torch.Tensor  # bfloat16 [num_planes * K' / 32, N, 2]
    num_planes: int
    group_size: int                 # the format's: 32, or 16 (inputs padded)

    @classmethod
    def from_raw(cls, data: torch.Tensor, qtype: int, in_features: int) -> Int4Pack | None:
        """The packed form of raw CPU rows, or None where the kernel cannot take the format or shape."""
        fmt = block_format(qtype)
        if not _HAS_INT4PACK or fmt.affine is None or data.shape[0] % 16:
            return None
        packed, scales_and_zeros = [], []
        for start in range(0, data.shape[0], _PACK_ROWS):
            nibbles, sz = _nibble_planes(fmt, data[start:start + _PACK_ROWS], in_features)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1))
            scales_and_zeros.append(sz)
        return cls(torch.cat(packed), torch.cat(scales_and_zeros, dim=1).bfloat16().contiguous(),
                   1 if fmt.bits <= 4 else 2, fmt.group_size)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes

    def dequantize(self) -> torch.Tensor:
        """The weight the kernel multiplies by, float32 [N, K]: the product with an identity, K rows at a
        time (exact but for the bfloat16 rounding of the result)."""
        in_features = self.packed.shape[1] * 2 // self.num_planes * self.group_size // 32
        columns = []
        for start in range(0, in_features, _PACK_ROWS):
            rows = torch.arange(start, min(start + _PACK_ROWS, in_features))
            eye = torch.zeros(len(rows), in_features, dtype=torch.bfloat16)
            eye[torch.arange(len(rows)), rows] = 1
            columns.append(self.matmul(eye).float())
        return torch.cat(columns).T.contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T``: x [T, K] -> [T, N] in x's dtype."""
        xs = _pad_groups(x.to(torch.bfloat16), self.group_size, 0)
        if self.num_planes > 1:
            xs = xs.repeat(1, self.num_planes)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xs, self.packed, 32, self.scales_and_zeros).to(x.dtype)


def _pad_groups(t: torch.Tensor, group_size: int, value: int) -> torch.Tensor:
    """[R, K] -> [R, K * 32 / group_size]: each group of ``group_size`` columns padded with ``value`` to 32."""
    if group_size == 32:
        return t
    return torch.nn.functional.pad(t.unflatten(1, (-1, group_size)), (0, 32 - group_size), value=value).flatten(1)


def _nibble_planes(fmt: BlockFormat, data: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> (nibbles int32 [rows, planes * K'], scales and zeros float32 [planes * K' / 32, rows, 2])."""
    assert fmt.affine is not None
    num_rows = data.shape[0]
    q, scale, min_ = fmt.affine(data.reshape(-1, fmt.type_size))
    q, scale = q.reshape(num_rows, in_features).int(), scale.reshape(num_rows, -1)
    min_ = torch.zeros_like(scale) if min_ is None else min_.reshape(num_rows, -1)
    if fmt.bits <= 4:
        planes = [(q, scale, min_ + (8 - fmt.offset) * scale)]
    else:
        v = q - fmt.offset
        planes = [(v & 15, scale, min_ + 8 * scale), ((v >> 4) + 8, 16 * scale, torch.zeros_like(scale))]
    nibbles = torch.cat([_pad_groups(u, fmt.group_size, 8) for u, _, _ in planes], dim=1)
    scales_and_zeros = torch.cat([torch.stack([s, z], dim=-1) for _, s, z in planes], dim=1)
    return nibbles, scales_and_zeros.transpose(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# The weight
# ---------------------------------------------------------------------------------------------------------------

class GGUFWeight:
    """A GGUF weight [out_features, in_features] kept in its block format (a ``QuantizedWeight``).

    ``data`` holds the rows exactly as the file stores them. On CPU, ``matmul`` uses ``Int4Pack`` where
    the format fits it (built by ``to(cpu)`` or the first CPU matmul) and ``matmul_tiled`` otherwise; on
    CUDA it calls the Triton kernel ``tokenmill.kernels.gguf_matmul``.

    A layer that only multiplies (no lookups, no float32 logits) calls ``release_raw`` once the int4
    layout is built, so the weight is held once, not twice; ``data`` is then None and ``dequantize``
    reads the weight back from the int4 layout (its scales rounded to bfloat16, as the kernel uses them).
    """

    def __init__(self, qtype: int, data: torch.Tensor, in_features: int):
        fmt = block_format(qtype)
        if in_features % fmt.block_size:
            raise ValueError(f"in_features of a {fmt.qtype.name} weight must be a multiple of "
                             f"{fmt.block_size}, got {in_features}")
        row_bytes = in_features // fmt.block_size * fmt.type_size
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes:
            raise ValueError(f"data of a {fmt.qtype.name} weight with {in_features} inputs must be uint8 "
                             f"[rows, {row_bytes}], got {data.dtype} {list(data.shape)}")
        self.qtype = fmt.qtype
        self.data: torch.Tensor | None = data.contiguous()
        self.device = data.device
        self.out_features = data.shape[0]
        self.in_features = in_features

    def __repr__(self) -> str:
        return (f"GGUFWeight({self.qtype.name}, out_features={self.out_features}, "
                f"in_features={self.in_features}, device={self.device})")

    @cached_property
    def _int4(self) -> Int4Pack | None:
        if self.device.type != "cpu" or self.data is None:
            return None
        return Int4Pack.from_raw(self.data, self.qtype, self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes of ``data`` (until released) and, once built, of the CPU int4 layout."""
        int4 = self.__dict__.get("_int4")
        return (0 if self.data is None else self.data.nbytes) + (int4.nbytes if int4 is not None else 0)

    def release_raw(self) -> bool:
        """Drop the file's rows when the CPU int4 layout can do all the multiplying; whether it did."""
        if self._int4 is None:
            return False
        self.data = None
        return True

    def _raw(self, what: str) -> torch.Tensor:
        if self.data is None:
            raise ValueError(f"{what} needs the GGUF rows of {self!r}, released after int4 packing")
        return self.data

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T``: x [..., in_features] -> [..., out_features], in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in {self.in_features} features, got shape {list(x.shape)}")
        x2 = x.reshape(-1, self.in_features)
        if self.device.type == "cuda" and block_format(self.qtype).affine is not None:
            from tokenmill.kernels.gguf_matmul import gguf_matmul
            out = gguf_matmul(x2, self.data, self.qtype, self.out_features, self.in_features)
        elif self._int4 is not None:
            out = self._int4.matmul(x2)
        else:
            out = matmul_tiled(x2, self.data, self.qtype, self.in_features)
        return out.reshape(*x.shape[:-1], self.out_features)

    def matmul_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` computed in float32 whatever kernel ``matmul`` would pick (the CPU int4 kernel
        rounds x and its output to bfloat16): for logits, where a near tie decides a greedy token."""
        x2 = x.reshape(-1, self.in_features).float()
        out = matmul_tiled(x2, self._raw("matmul_fp32"), self.qtype, self.in_features)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight, or its ``rows`` (an int64 index of any shape), as float32 [*rows.shape, in_features]."""
        if self.data is None:
            full = self._int4.dequantize()
            return full if rows is None else full[rows.to(full.device)]
        if rows is None:
            return dequantize(self.data, self.qtype, self.in_features)
        flat = dequantize(self.data[rows.reshape(-1)], self.qtype, self.in_features)
        return flat.reshape(*rows.shape, self.in_features)

    def to(self, device: torch.device | str) -> GGUFWeight:
        """This weight on ``device``; on CPU with its int4 layout built."""
        device = torch.device(device)
        if self.device == device:
            moved = self
        else:
            moved = GGUFWeight(self.qtype, self._raw(f"moving to {device}").to(device), self.in_features)
        if device.type == "cpu":
            _ = moved._int4  # laid out now rather than at the first matmul
        return moved

    def take_rows(self, index: torch.Tensor) -> GGUFWeight:
        """The weight made of rows ``index`` (int64 [n]) in that order: a row selection or permutation."""
        return GGUFWeight(self.qtype, self._raw("take_rows")[index.to(self.device)], self.in_features)

    def take_columns(self, start: int, stop: int) -> GGUFWeight:
        """The weight's input columns ``start:stop`` (a row-parallel rank's part): whole blocks of every row,
        so both ends must fall on block boundaries."""
        fmt = block_format(self.qtype)
        if not 0 <= start < stop <= self.in_features:
            raise ValueError(f"columns {start}:{stop} are not a range within the {self.in_features} inputs of {self!r}")
        if start % fmt.block_size or stop % fmt.block_size:
            raise ValueError(f"a {fmt.qtype.name} weight is cut into input columns only at its blocks of "
                             f"{fmt.block_size} weights; columns {start}:{stop} of its {self.in_features} inputs "
                             f"are not (is tensor_parallel_size too large for this layer in this format?)")
        per_block = fmt.type_size
        data = self._raw("take_columns")[:, start // fmt.block_size * per_block: stop // fmt.block_size * per_block]
        return GGUFWeight(self.qtype, data, stop - start)

    @staticmethod
    def cat(weights: list[GGUFWeight]) -> GGUFWeight:
        """The weights' rows one after another (a fused qkv or gate_up projection); one format and width."""
        if not weights:
            raise ValueError("cat needs at least one weight, got none")
        first = weights[0]
        for w in weights[1:]:
            if (w.qtype, w.in_features) != (first.qtype, first.in_features):
                raise ValueError(f"cat needs one format and in_features; got {first.qtype.name} "
                                 f"[.., {first.in_features}] and {w.qtype.name} [.., {w.in_features}]")
        return GGUFWeight(first.qtype, torch.cat([w._raw("cat") for w in weights]), first.in_features)
