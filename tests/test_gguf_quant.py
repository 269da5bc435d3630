"""GGUF weights kept quantized (``tokenmill.quantization.gguf``) against gguf's own dequantization.

A weight is random bytes in the format's layout with sane fp16 scale fields (random bytes there could be
inf or NaN; the gguf package has no quantizer for K-quants). Dequantization must give gguf's floats bit
for bit. A matmul may differ from ``x @ W.T`` (in float64, W dequantized) by what its roundings allow,
elementwise

    |y - x @ W.T| <= c * (|x| @ |W|.T)

- the tiled path in float32: c = K * 2**-24, the bound of a float32 dot product of length K;
- the int4 kernel (bfloat16 inside): c = 4 * 2**-8, for three roundings to bfloat16 of unit roundoff
  2**-8 (x, each plane's scale and zero, the output), each of a term about the size of |x| |w|
  (measured: under 1 * 2**-8 on these weights);
- bfloat16 x on the tiled path: c = 2 * 2**-8 + 1e-5 (the tile and the output rounded).

A weight decoded from the wrong bits is off by about |W| per input, a multiple of the bound.
"""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants

from tokenmill.gguf_loader import unpermute_qk
from tokenmill.quantization import QuantizedWeight
from tokenmill.quantization import gguf as gq
from tokenmill.quantization.gguf import FORMATS, GGUFWeight, Int4Pack, dequantize, matmul_tiled

on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
with_int4 = pytest.mark.skipif(not gq._HAS_INT4PACK, reason="this torch has no _weight_int4pack_mm_for_cpu")

# format -> byte offsets of its fp16 scale fields (d, and m or dmin)
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
              Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
QUANTIZED = list(F16_FIELDS)
FLOATS = [Q.F32, Q.F16, Q.BF16]
BF16_ROUNDOFF = 2 ** -8


def qtype_id(qtype) -> str:
    return qtype.name


# ---------------------------------------------------------------- builders

def width(qtype: Q) -> int:
    """A small in_features of whole blocks: 2 super-blocks of a K-quant, 3 blocks of 32 otherwise."""
    return 512 if GGML_QUANT_SIZES[qtype][0] == 256 else 96


def make_data(qtype: Q, out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """GGUF bytes uint8 [out_features, bytes_per_row]: random, fp16 scale fields uniform in +-1."""
    rng = np.random.default_rng(seed)
    if qtype in FLOATS:
        values = rng.standard_normal((out_features, in_features), dtype=np.float32)
        raw = quants.quantize(values, qtype)
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(out_features, -1))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = (out_features, in_features // block_size)
    blocks = rng.integers(0, 256, size=(*shape, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = rng.uniform(-1, 1, size=shape).astype(np.float16)
        blocks[..., offset:offset + 2] = scale.view(np.uint8).reshape(*shape, 2)
    return torch.from_numpy(blocks.reshape(out_features, -1))


def make_weight(qtype: Q, out_features: int = 80, in_features: int | None = None, seed: int = 0) -> GGUFWeight:
    in_features = in_features or width(qtype)
    return GGUFWeight(qtype, make_data(qtype, out_features, in_features, seed), in_features)


def make_x(num_tokens: int, in_features: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_tokens, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference(data: torch.Tensor, qtype: Q) -> torch.Tensor:
    """gguf's dequantization, float32 [rows, in_features]."""
    return torch.from_numpy(quants.dequantize(data.numpy(), qtype).copy())


def assert_within(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, c: float) -> None:
    """|y - x @ w.T| <= c * (|x| @ |w|.T), elementwise, against float64."""
    expected = x.double() @ w.double().T
    bound = c * (x.double().abs() @ w.double().abs().T)
    error = (y.double() - expected).abs()
    worst = int((error - bound).argmax())
    assert (error <= bound).all(), (f"y[{divmod(worst, y.shape[1])}] = {y.flatten()[worst].item()}, expected "
                                    f"{expected.flatten()[worst].item()} +- {bound.flatten()[worst].item()}")


# ---------------------------------------------------------------- formats and dequantization

@pytest.mark.parametrize("qtype", QUANTIZED + FLOATS, ids=qtype_id)
def test_block_sizes_are_gguf_ones(qtype):
    fmt = FORMATS[qtype]
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]


@pytest.mark.parametrize("qtype", QUANTIZED + FLOATS, ids=qtype_id)
def test_dequantize_is_bit_exact_with_gguf(qtype):
    data = make_data(qtype, 8, width(qtype))
    assert torch.equal(dequantize(data, qtype, width(qtype)), reference(data, qtype))


def test_dequantize_rows_gives_those_rows_in_index_order_and_shape():
    weight = make_weight(Q.Q5_K)
    full = reference(weight.data, Q.Q5_K)
    rows = torch.tensor([[7, 0], [7, 79]])
    assert torch.equal(weight.dequantize(rows), full[rows])
    assert torch.equal(weight.dequantize(), full)


def test_unknown_format_is_refused_by_name():
    with pytest.raises(ValueError, match="GGUF type Q2_K is not one tokenmill keeps quantized.*Q4_K"):
        GGUFWeight(Q.Q2_K, torch.zeros(4, 84, dtype=torch.uint8), 256)


def test_data_that_does_not_fit_the_format_is_refused():
    with pytest.raises(ValueError, match="in_features of a Q4_K weight must be a multiple of 256, got 576"):
        GGUFWeight(Q.Q4_K, torch.zeros(4, 324, dtype=torch.uint8), 576)
    with pytest.raises(ValueError, match=r"must be uint8 \[rows, 36\], got torch.uint8 \[4, 34\]"):
        GGUFWeight(Q.Q4_0, torch.zeros(4, 34, dtype=torch.uint8), 64)


# ---------------------------------------------------------------- CPU matmul

@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("qtype", QUANTIZED + FLOATS, ids=qtype_id)
def test_tiled_matmul_is_float32_exact(qtype, num_tokens):
    weight = make_weight(qtype)
    x = make_x(num_tokens, weight.in_features)
    y = matmul_tiled(x, weight.data, qtype, weight.in_features)
    assert_within(y, x, reference(weight.data, qtype), weight.in_features * 2 ** -24)


def test_tiled_matmul_covers_every_row_tile():
    weight = make_weight(Q.Q8_0, out_features=2 * (gq._TILE_WEIGHTS // 96) + 5)
    x = make_x(3, 96)
    assert_within(matmul_tiled(x, weight.data, Q.Q8_0, 96), x, reference(weight.data, Q.Q8_0), 96 * 2 ** -24)


@with_int4
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("qtype", QUANTIZED, ids=qtype_id)
def test_int4_kernel_matches_dequantized_within_bfloat16_rounding(qtype, num_tokens):
    weight = make_weight(qtype)
    pack = Int4Pack.from_raw(weight.data, qtype, weight.in_features)
    assert pack is not None
    x = make_x(num_tokens, weight.in_features)
    y = pack.matmul(x)
    assert y.dtype == torch.float32
    assert_within(y, x, reference(weight.data, qtype), 4 * BF16_ROUNDOFF)


@with_int4
def test_int4_kernel_packs_a_weight_of_several_row_chunks():
    weight = make_weight(Q.Q4_1, out_features=gq._PACK_ROWS + 48, in_features=64)
    x = make_x(5, 64)
    y = Int4Pack.from_raw(weight.data, Q.Q4_1, 64).matmul(x)
    assert_within(y, x, reference(weight.data, Q.Q4_1), 4 * BF16_ROUNDOFF)


@with_int4
@pytest.mark.parametrize("qtype", QUANTIZED, ids=qtype_id)
def test_cpu_weight_multiplies_with_the_int4_kernel_where_rows_come_in_sixteens(qtype):
    weight = make_weight(qtype, out_features=32).to("cpu")
    x = make_x(3, weight.in_features)
    assert torch.equal(weight.matmul(x), Int4Pack.from_raw(weight.data, qtype, weight.in_features).matmul(x))


def test_cpu_weight_of_other_row_counts_multiplies_in_tiles():
    weight = make_weight(Q.Q4_0, out_features=40)
    assert Int4Pack.from_raw(weight.data, Q.Q4_0, 96) is None
    x = make_x(3, 96)
    assert torch.equal(weight.matmul(x), matmul_tiled(x, weight.data, Q.Q4_0, 96))


@with_int4
@pytest.mark.parametrize("out_features", [32, 40], ids=["int4", "tiled"])
def test_bfloat16_activations_give_bfloat16_within_its_rounding(out_features):
    weight = make_weight(Q.Q8_0, out_features=out_features)
    x = make_x(7, 96, torch.bfloat16)
    y = weight.matmul(x)
    assert y.dtype == torch.bfloat16
    assert_within(y, x, reference(weight.data, Q.Q8_0), 4 * BF16_ROUNDOFF)


def test_matmul_keeps_leading_dimensions():
    weight = make_weight(Q.Q4_K, out_features=16)
    x = make_x(6, 512).reshape(2, 3, 512)
    assert torch.equal(weight.matmul(x), weight.matmul(x.reshape(6, 512)).reshape(2, 3, 16))


# ---------------------------------------------------------------- the weight

@with_int4
def test_weight_is_a_quantized_weight_whose_bytes_grow_by_its_cpu_layout():
    weight = make_weight(Q.Q4_0, out_features=64)
    assert isinstance(weight, QuantizedWeight)
    assert (weight.out_features, weight.in_features) == (64, 96)
    assert weight.nbytes == 64 * 3 * 18
    weight.to("cpu")
    # a nibble per weight, a bfloat16 scale and zero per 32
    assert weight.nbytes == 64 * 3 * 18 + 64 * 96 // 2 + 64 * 3 * 2 * 2


@with_int4
@pytest.mark.parametrize("qtype", QUANTIZED, ids=qtype_id)
def test_releasing_the_raw_rows_keeps_the_product_and_reads_the_weight_back_from_the_int4_layout(qtype):
    weight = make_weight(qtype, out_features=32).to("cpu")
    x = make_x(3, weight.in_features)
    before, raw_bytes, full = weight.matmul(x), weight.data.nbytes, weight.dequantize()
    nbytes = weight.nbytes
    assert weight.release_raw()
    assert weight.data is None and weight.nbytes == nbytes - raw_bytes
    assert torch.equal(weight.matmul(x), before)
    assert_within(x @ weight.dequantize().T, x, full, 4 * BF16_ROUNDOFF)  # the kernel's bf16 scales
    with pytest.raises(ValueError, match="released after int4 packing"):
        weight.take_rows(torch.tensor([0]))


def test_raw_rows_stay_where_no_int4_layout_can_replace_them():
    weight = make_weight(Q.Q4_0, out_features=40)  # 40 rows: not a multiple of 16
    assert not weight.release_raw() and weight.data is not None


@with_int4
def test_cat_stacks_rows_of_one_format():
    q, k = make_weight(Q.Q5_0, out_features=48, seed=1), make_weight(Q.Q5_0, out_features=16, seed=2)
    fused = GGUFWeight.cat([q, k])
    assert fused.out_features == 64
    assert torch.equal(fused.dequantize(), torch.cat([q.dequantize(), k.dequantize()]))
    x = make_x(2, 96)
    assert torch.equal(fused.matmul(x)[:, 48:], Int4Pack.from_raw(k.data, Q.Q5_0, 96).matmul(x))


def test_cat_refuses_mixed_formats_by_name():
    with pytest.raises(ValueError, match=r"one format and in_features; got Q4_0 \[.., 96\] and Q8_0 \[.., 96\]"):
        GGUFWeight.cat([make_weight(Q.Q4_0), make_weight(Q.Q8_0)])


def test_take_rows_undoes_llama_cpp_q_permutation():
    num_heads = 4
    weight = make_weight(Q.Q6_K, out_features=num_heads * 8)
    order = unpermute_qk(torch.arange(weight.out_features), num_heads)
    assert torch.equal(weight.take_rows(order).dequantize(), unpermute_qk(weight.dequantize(), num_heads))


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("qtype", QUANTIZED + FLOATS, ids=qtype_id)
def test_cuda_dequantize_is_bit_exact_with_gguf(qtype):
    weight = make_weight(qtype).to("cuda")
    assert torch.equal(weight.dequantize(torch.tensor([3, 1], device="cuda")).cpu(),
                       reference(make_data(qtype, 80, width(qtype)), qtype)[[3, 1]])


@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("qtype", QUANTIZED, ids=qtype_id)
def test_cuda_matmul_runs_the_triton_kernel(qtype):
    weight = make_weight(qtype)
    x = make_x(7, weight.in_features)
    y = weight.to("cuda").matmul(x.cuda())
    assert_within(y.cpu(), x, reference(weight.data, qtype), 1e-5)
