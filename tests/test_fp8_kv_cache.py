"""The fp8 KV cache (``kv_cache_dtype``): quantized writes, dequantized reads, calibrated scales.

An fp8 cache stores ``clamp(x / scale, -max, max)`` with one scale per (layer,
keys or values, KV head), fixed at start-up from a calibration pass
(``tokenmill.kv_scales``), and attention reads ``stored * scale``:

    head 0 keys ~ 300    scale 300 * 4 / 448 ~ 2.7    stored ~ 112    (448: e4m3's largest)
    head 1 keys ~ 0.01   scale ~ 1e-4                  stored ~ 112    (at scale 1: subnormal, 2 bits)

The batches here give the KV heads magnitudes that far apart, so a path that
ignored the scales (or used one per layer) would fail. Checked: the writes byte
for byte (torch and the Triton kernel), every attention path against the
reference on the same fp8 cache (tightly) and against fp32 attention on the
unquantized values (within fp8's error), sliding windows and soft caps
included; then the engine: fp8 cache tensors, calibrated scales, block counts,
greedy agreement with the unquantized cache, prefix caching, the errors; and the
fp8 kernel variants compiled ahead of time. Triton runs under its interpreter
on CPU (small shapes).
"""
import os
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from builders import (TINY_CONFIGS, TINY_ENGINE_OPTIONS, assert_no_leaks, compile_ahead_of_time,  # noqa: E402
                      make_checkpoint, make_llm, output_ids, random_prompts, token_prompts)
from tokenmill import ConfigError, EngineConfig, Registry  # noqa: E402
from tokenmill.attention import select_attention_backend  # noqa: E402
from tokenmill.cli import _engine_options, build_parser  # noqa: E402
from tokenmill.engine_core import EngineCore  # noqa: E402
from tokenmill.kv_scales import HEADROOM, scales_from_amax  # noqa: E402
from tokenmill.plugins.attention import TorchAttentionBackend, TritonAttentionBackend  # noqa: E402
from tokenmill.plugins.attention.torch_backend import reference_paged_attention, write_kv  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402
from tokenmill.testing.builders import make_attention_metadata, shuffled_block_tables  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="CPU checks need the Triton interpreter")

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# request i: PREFIX_LENS[i] cached tokens, then QUERY_LENS[i] new ones: decodes, a chunk after a prefix, a fresh
# prompt (its attention reads this step's k/v: they must round-trip through fp8 as the cache's do)
PREFIX_LENS = [37, 19, 0, 70]
QUERY_LENS = [1, 5, 23, 1]
HEAD_MAGNITUDES = [300.0, 0.01]  # KV head 0's keys and values ~ 300, head 1's ~ 0.01
VARIANTS = {"plain": {}, "window": dict(sliding_window=13), "soft-cap": dict(logits_soft_cap=1.5),
            "window-soft-cap": dict(sliding_window=5, logits_soft_cap=1.5)}
# output error against fp32 attention on the unquantized values, relative to the output's RMS: e4m3 keeps
# 3 mantissa bits (a half-ulp of 2**-4), e5m2 2 bits
RELATIVE_ERROR = {"fp8_e4m3": 0.06, "fp8_e5m2": 0.12}


@dataclass
class Batch:
    q: torch.Tensor  # [T + padding, H, D]; scaled so each head's scores span a few units
    k: torch.Tensor  # [T + padding, KV, D]: the new tokens'
    v: torch.Tensor
    exact_cache: torch.Tensor  # fp32 [2, num_blocks, block_size, KV, D]: the cached prefixes, noise elsewhere
    fp8_cache: torch.Tensor  # the same, written as an fp8 cache with ``scales``
    scales: torch.Tensor  # fp32 [2, KV]: calibrated from the values' magnitudes
    md: object
    magnitude: torch.Tensor  # [H]: the values' magnitude in each query head's KV head

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5


def make_batch(kv_cache_dtype="fp8_e4m3", *, num_heads=4, num_kv_heads=2, head_size=64, block_size=16,
               num_padding=2, seed=0, scales: torch.Tensor | None = None) -> Batch:
    """Random q/k/v and a cache of prefixes (shuffled block tables, padding rows); ``scales``:
    the fp8 cache's (default: calibrated from the values as the engine does)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(PREFIX_LENS, QUERY_LENS)]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    tables = shuffled_block_tables(seq_lens, block_size, num_blocks, gen)
    md = make_attention_metadata(QUERY_LENS, seq_lens, tables, block_size, num_padding_tokens=num_padding)
    magnitude = torch.tensor(HEAD_MAGNITUDES[:num_kv_heads])[:, None]  # [KV, 1]
    total = md.num_actual_tokens + num_padding
    k, v = (torch.randn(total, num_kv_heads, head_size, generator=gen) * magnitude for _ in range(2))
    # q divided by its KV head's magnitude: scores of a few units in every head
    q = torch.randn(total, num_heads, head_size, generator=gen) * 3.0
    q = q / magnitude.repeat_interleave(num_heads // num_kv_heads, 0)
    exact = torch.randn(TorchAttentionBackend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size),
                        generator=gen) * magnitude
    cache_dtype = FP8[kv_cache_dtype]
    if scales is None:
        scales = scales_from_amax(exact.abs().amax(dim=(1, 2, 4)), cache_dtype)  # [2, KV]
    fp8 = torch.zeros(exact.shape, dtype=cache_dtype)
    all_slots = torch.arange(num_blocks * block_size)
    write_kv(fp8[0], fp8[1], exact[0].flatten(0, 1), exact[1].flatten(0, 1), all_slots, scales)
    return Batch(q, k, v, exact, fp8, scales, md, magnitude[:, 0].repeat_interleave(num_heads // num_kv_heads))


def make_backend(cls, batch: Batch, kv_cache_dtype="fp8_e4m3", *, dtype=torch.float32, **kwargs):
    _, _, _, num_kv_heads, head_size = batch.exact_cache.shape
    return cls(num_heads=batch.q.shape[1], num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype,
               device="cpu", kv_cache_dtype=kv_cache_dtype, **kwargs)


def run_fp8(backend, batch: Batch, **variant) -> torch.Tensor:
    """The backend's output on a copy of the batch's fp8 cache, bound to the batch's scales."""
    cache = batch.fp8_cache.clone()
    backend.set_kv_cache_scales([cache], batch.scales[None])
    q, k, v = (t.to(backend.dtype) for t in (batch.q, batch.k, batch.v))
    return backend.forward(q, k, v, cache, batch.md, batch.scale, **variant)


def reference_fp8(batch: Batch, **variant) -> torch.Tensor:
    return reference_paged_attention(batch.q, batch.k, batch.v, batch.fp8_cache.clone(), batch.md, batch.scale,
                                     kv_scales=batch.scales, **variant)


def reference_exact(batch: Batch, **variant) -> torch.Tensor:
    return reference_paged_attention(batch.q, batch.k, batch.v, batch.exact_cache.clone(), batch.md, batch.scale,
                                     **variant)


def in_units(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The real tokens' rows, each head divided by its values' magnitude: heads compare alike."""
    return out[: batch.md.num_actual_tokens].float() / batch.magnitude[:, None]


def relative_error(out: torch.Tensor, expected: torch.Tensor, batch: Batch) -> float:
    """The worst head's error norm over its output norm."""
    diff = (in_units(out, batch) - in_units(expected, batch)).norm(dim=(0, 2))
    return float((diff / in_units(expected, batch).norm(dim=(0, 2))).max())


def assert_close_to(out: torch.Tensor, expected: torch.Tensor, batch: Batch, atol=1e-5, rtol=1e-4) -> None:
    torch.testing.assert_close(in_units(out, batch), in_units(expected, batch), atol=atol, rtol=rtol)
    assert torch.isfinite(out[batch.md.num_actual_tokens:]).all(), "padding rows must be finite"


# ---------------------------------------------------------------- writes

@pytest.mark.parametrize("kv_cache_dtype", FP8)
def test_a_write_stores_x_over_its_heads_scale_and_saturates_beyond_the_range(kv_cache_dtype):
    dtype, limit = FP8[kv_cache_dtype], torch.finfo(FP8[kv_cache_dtype]).max
    k = torch.tensor([[[1.0, -2.0], [0.5, 1e6]]])  # [1 token, 2 KV heads, 2]: 1e6 is far past head 1's range
    scales = torch.tensor([[0.5, 0.25], [1.0, 1.0]])
    cache = torch.zeros(2, 1, 1, 2, 2, dtype=dtype)

    write_kv(cache[0], cache[1], k, k, torch.tensor([0]), scales)

    assert cache[0, 0, 0].float().tolist() == [[2.0, -4.0], [2.0, limit]]  # x / scale, then clamped
    assert cache[1, 0, 0].float().tolist() == [[1.0, -2.0], [0.5, limit]]


@interpreted
@pytest.mark.parametrize("kv_cache_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_triton_kv_write_equals_torchs_byte_for_byte(kv_cache_dtype, dtype):
    from tokenmill.kernels.kv_write import write_kv_cache

    batch = make_batch(kv_cache_dtype)
    ours, expected = batch.fp8_cache.clone(), batch.fp8_cache.clone()
    k, v = batch.k.to(dtype), batch.v.to(dtype)
    write_kv_cache(k, v, ours[0], ours[1], batch.md.slot_mapping, batch.scales)  # padding rows: slot -1
    write_kv(expected[0], expected[1], k, v, batch.md.slot_mapping, batch.scales)

    assert torch.equal(ours.view(torch.uint8), expected.view(torch.uint8))
    assert not torch.equal(ours.view(torch.uint8), batch.fp8_cache.view(torch.uint8)), "nothing was written"


@interpreted
@pytest.mark.parametrize("kv_cache_dtype", FP8)
def test_triton_rounds_every_value_as_torchs_cast(kv_cache_dtype):
    """Every finite fp8 value, the midpoints between neighbours (ties: to even) and the floats
    either side of them, zeros of both signs and values past the range: the kernel's rounding
    is its own (exact whatever the cast does), torch's is the hardware's."""
    from tokenmill.kernels.kv_write import write_kv_cache

    dtype = FP8[kv_cache_dtype]
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids.nextafter(mids + 1), mids.nextafter(mids - 1),
                        torch.tensor([0.0, -0.0, 1e6, -1e6, 1e-30, -1e-30])])
    values = torch.cat([values, torch.zeros(-values.numel() % 16)]).view(-1, 1, 16)
    cache = torch.zeros(2, values.shape[0], 1, 1, 16, dtype=dtype)

    write_kv_cache(values, values, cache[0], cache[1], torch.arange(values.shape[0]), torch.ones(2, 1))

    limit = torch.finfo(dtype).max
    assert torch.equal(cache[0].view(torch.uint8).flatten(), values.clamp(-limit, limit).to(dtype).view(torch.uint8)
                       .flatten())


# ---------------------------------------------------------------- attention

BACKENDS = {"torch": TorchAttentionBackend, "triton": TritonAttentionBackend}


def backend_params():
    return [pytest.param(cls, marks=[interpreted] if name == "triton" else [], id=name)
            for name, cls in BACKENDS.items()]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_cache_dtype", FP8)
@pytest.mark.parametrize("cls", backend_params())
def test_attention_equals_the_reference_on_the_same_fp8_cache(cls, kv_cache_dtype, variant):
    batch = make_batch(kv_cache_dtype)

    out = run_fp8(make_backend(cls, batch, kv_cache_dtype), batch, **VARIANTS[variant])

    assert_close_to(out, reference_fp8(batch, **VARIANTS[variant]), batch)


@pytest.mark.parametrize("variant", ["plain", "window-soft-cap"])
@pytest.mark.parametrize("kv_cache_dtype", FP8)
@pytest.mark.parametrize("cls", backend_params())
def test_attention_is_within_fp8_error_of_unquantized_attention(cls, kv_cache_dtype, variant):
    batch = make_batch(kv_cache_dtype)

    out = run_fp8(make_backend(cls, batch, kv_cache_dtype), batch, **VARIANTS[variant])

    error = relative_error(out, reference_exact(batch, **VARIANTS[variant]), batch)
    assert 0 < error < RELATIVE_ERROR[kv_cache_dtype]


@pytest.mark.parametrize("cls", backend_params())
def test_per_head_scales_are_applied(cls):
    """With scale 1.0 (vLLM's default) head 0's values saturate and head 1's sink into the
    subnormals; the calibrated scales are what keep the error at fp8's own."""
    batch, unit_batch = make_batch("fp8_e4m3"), make_batch("fp8_e4m3", scales=torch.ones(2, 2))
    calibrated = run_fp8(make_backend(cls, batch), batch)
    unit = run_fp8(make_backend(cls, unit_batch), unit_batch)
    exact = reference_exact(batch)

    assert relative_error(calibrated, exact, batch) < RELATIVE_ERROR["fp8_e4m3"]
    assert relative_error(unit, exact, batch) > 5 * relative_error(calibrated, exact, batch)


@interpreted
@pytest.mark.parametrize("variant", ["plain", "window-soft-cap"])
def test_triton_split_kv_on_an_fp8_cache_equals_the_reference(variant):
    batch = make_batch("fp8_e4m3")

    out = run_fp8(make_backend(TritonAttentionBackend, batch, options={"num_kv_splits": 3}), batch,
                  **VARIANTS[variant])

    assert_close_to(out, reference_fp8(batch, **VARIANTS[variant]), batch)


@interpreted
@pytest.mark.parametrize("kv_cache_dtype", FP8)
def test_triton_bfloat16_queries_on_an_fp8_cache_equal_the_reference(kv_cache_dtype):
    batch = make_batch(kv_cache_dtype)
    batch.q, batch.k, batch.v = (t.to(torch.bfloat16).float() for t in (batch.q, batch.k, batch.v))

    out = run_fp8(make_backend(TritonAttentionBackend, batch, kv_cache_dtype, dtype=torch.bfloat16), batch,
                  **VARIANTS["window-soft-cap"])

    assert out.dtype == torch.bfloat16
    expected = reference_fp8(batch, **VARIANTS["window-soft-cap"])
    assert relative_error(out, expected, batch) < 1e-2  # bf16 rounding of p and the output


def test_a_cache_bound_to_no_scales_reads_with_scale_1():
    batch = make_batch("fp8_e4m3")
    backend = make_backend(TorchAttentionBackend, batch)

    assert torch.equal(backend.kv_cache_scales(batch.fp8_cache), torch.ones(2, 2))
    backend.set_kv_cache_scales([batch.fp8_cache], batch.scales[None])
    assert torch.equal(backend.kv_cache_scales(batch.fp8_cache), batch.scales)


def test_scales_must_be_one_finite_positive_pair_per_head_and_layer():
    batch = make_batch("fp8_e4m3")
    backend = make_backend(TorchAttentionBackend, batch)
    for bad in (torch.ones(2, 2), torch.ones(1, 2, 3), torch.zeros(1, 2, 2), torch.full((1, 2, 2), float("inf"))):
        with pytest.raises(ValueError, match=r"scales must be finite and > 0, \[1, 2, 2\]"):
            backend.set_kv_cache_scales([batch.fp8_cache], bad)


# ---------------------------------------------------------------- the engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = random_prompts([5, 17, 40, 70, 3, 33, 90, 12], seed=7)
SHARED_PREFIX = random_prompts([40], seed=1)[0]
SHARING_PROMPTS = [SHARED_PREFIX + tail for tail in random_prompts([1, 9, 30], seed=2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint(path, TINY_CONFIGS["llama-gqa-untied"])
    return path


@pytest.fixture(scope="module")
def fp8_llm(checkpoint):
    return make_llm(checkpoint, kv_cache_dtype="fp8")


def core_of(llm) -> EngineCore:
    return llm.engine.core


@pytest.mark.parametrize("kv_cache_dtype, expected", [("fp8", torch.float8_e4m3fn), ("fp8_e4m3", torch.float8_e4m3fn),
                                                       ("fp8_e5m2", torch.float8_e5m2), ("auto", torch.float32)])
def test_the_cache_tensors_have_the_dtype_asked_for(checkpoint, kv_cache_dtype, expected):
    core = core_of(make_llm(checkpoint, kv_cache_dtype=kv_cache_dtype))

    assert {cache.dtype for cache in core.kv_caches} == {expected}
    assert core.model.attention.cache_dtype == expected


def test_scales_are_calibrated_per_layer_and_head_and_differ_from_1(fp8_llm):
    core = core_of(fp8_llm)
    scales = torch.stack([core.model.attention.kv_cache_scales(cache) for cache in core.kv_caches])

    assert scales.shape == (2, 2, 2)  # layers, keys/values, KV heads
    assert (scales != 1).all() and len(scales.unique()) == scales.numel()


def test_calibration_is_the_same_on_every_start(checkpoint, fp8_llm):
    first = core_of(fp8_llm)
    again = core_of(make_llm(checkpoint, kv_cache_dtype="fp8"))

    for a, b in zip(first.kv_caches, again.kv_caches):
        assert torch.equal(first.model.attention.kv_cache_scales(a), again.model.attention.kv_cache_scales(b))


def test_generations_fit_the_calibrated_range_without_saturating(fp8_llm):
    """The calibration's amax maps to 1 / HEADROOM of the largest fp8 value: other prompts'
    keys and values stay inside the range (none clamped), and use a good part of it."""
    fp8_llm.generate(token_prompts(PROMPTS), GREEDY, use_tqdm=False)
    core = core_of(fp8_llm)
    largest = max(float(cache.float().abs().max()) for cache in core.kv_caches)

    assert 0 < largest < torch.finfo(torch.float8_e4m3fn).max
    assert largest > torch.finfo(torch.float8_e4m3fn).max / HEADROOM / 4  # the range is used, not wasted


@pytest.mark.parametrize("dtype, kv_cache_dtype, bytes_per_value", [
    ("float32", "auto", 4), ("bfloat16", "auto", 2), ("float32", "fp8", 1), ("bfloat16", "fp8_e5m2", 1)])
def test_block_count_follows_the_cache_dtypes_size(checkpoint, dtype, kv_cache_dtype, bytes_per_value):
    budget = 3 << 20
    llm = make_llm(checkpoint, dtype=dtype, kv_cache_dtype=kv_cache_dtype, num_gpu_blocks_override=None,
                   kv_cache_memory_bytes=budget)
    config = TINY_CONFIGS["llama-gqa-untied"]
    head_size = config.hidden_size // config.num_attention_heads
    values_per_block = config.num_hidden_layers * 2 * TINY_ENGINE_OPTIONS["block_size"] \
        * config.num_key_value_heads * head_size

    # the null block (id 0, never handed out) is not counted
    assert llm.get_stats()["num_total_blocks"] == budget // (values_per_block * bytes_per_value) - 1


def agreement(expected: list[list[int]], got: list[list[int]]) -> float:
    pairs = [(a, b) for x, y in zip(expected, got) for a, b in zip(x, y)]
    return sum(a == b for a, b in pairs) / len(pairs)


def teacher_forced(llm, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt position: the logprob of the prompt's next token, and the most likely token."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    logprobs, top = [], []
    for prompt, output in zip(prompts, llm.generate(token_prompts(prompts), params, use_tqdm=False)):
        for token, ranked in zip(prompt[1:], output.prompt_logprobs[1:]):
            logprobs.append(ranked[token].logprob)
            top.append(next(t for t, logprob in ranked.items() if logprob.rank == 1))
    return torch.tensor(logprobs), torch.tensor(top)


@pytest.mark.parametrize("kv_cache_dtype, min_top1, max_logprob_error", [("fp8_e4m3", 0.75, 0.15),
                                                                        ("fp8_e5m2", 0.7, 0.25)])
def test_greedy_agrees_with_the_unquantized_cache(checkpoint, kv_cache_dtype, min_top1, max_logprob_error,
                                                  record_property):
    """Free-running greedy decoding of a tiny random model is chaotic (its logits are nearly
    flat: one flipped token changes everything after it), so the rate is reported, and what is
    asserted is the per-position agreement given the same context: the most likely next token,
    and the logprob of the actual one (mean error over the prompts)."""
    plain, fp8 = make_llm(checkpoint), make_llm(checkpoint, kv_cache_dtype=kv_cache_dtype)
    rate = agreement(output_ids(plain.generate(token_prompts(PROMPTS), GREEDY, use_tqdm=False)),
                     output_ids(fp8.generate(token_prompts(PROMPTS), GREEDY, use_tqdm=False)))
    plain_logprobs, plain_top = teacher_forced(plain, PROMPTS)
    fp8_logprobs, fp8_top = teacher_forced(fp8, PROMPTS)
    top1 = float((plain_top == fp8_top).float().mean())
    error = float((plain_logprobs - fp8_logprobs).abs().mean())
    record_property("greedy_agreement", rate)
    record_property("top1_agreement", top1)
    print(f"{kv_cache_dtype}: greedy agreement {rate:.2f}, next-token agreement {top1:.2f}, "
          f"mean |logprob error| {error:.3f}")

    assert top1 >= min_top1
    assert 0 < error < max_logprob_error  # > 0: the cache is quantized
    assert_no_leaks(fp8)


def test_prefix_caching_does_not_change_fp8_outputs(checkpoint):
    """A prompt's first pass attends to its own k/v round-tripped through fp8: what a later
    request reading the cached blocks sees."""
    cached = make_llm(checkpoint, kv_cache_dtype="fp8")
    uncached = make_llm(checkpoint, kv_cache_dtype="fp8", enable_prefix_caching=False)
    expected = output_ids(uncached.generate(token_prompts(SHARING_PROMPTS), GREEDY, use_tqdm=False))
    first = output_ids(cached.generate(token_prompts(SHARING_PROMPTS), GREEDY, use_tqdm=False))
    again = output_ids(cached.generate(token_prompts(SHARING_PROMPTS), GREEDY, use_tqdm=False))

    assert first == expected and again == expected
    assert cached.get_stats()["prefix_cache_hits"] > 0
    assert_no_leaks(cached)


@interpreted
def test_triton_emulated_cuda_graphs_on_an_fp8_cache_give_the_torch_tokens(tmp_path):
    """The graph path (static buffers, padded batches; emulated on CPU) with the scales read
    from where they were bound: the triton backend's tokens are the torch backend's."""
    config = TINY_CONFIGS["llama-gqa-untied"]
    make_checkpoint(tmp_path, type(config)(**{**config.to_dict(), "hidden_size": 256, "head_dim": 64}))
    prompts = random_prompts([3, 17, 40], seed=5)
    options = dict(kv_cache_dtype="fp8", max_model_len=128, num_gpu_blocks_override=32, max_num_seqs=4,
                   max_num_batched_tokens=32)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = output_ids(make_llm(tmp_path, attention_backend="torch", **options).generate(
        token_prompts(prompts), params, use_tqdm=False))
    llm = make_llm(tmp_path, attention_backend="triton", **options)
    runner = core_of(llm).runner
    runner.init_cuda_graphs("emulate", None)

    assert output_ids(llm.generate(token_prompts(prompts), params, use_tqdm=False)) == expected
    assert runner.graphs.num_runs[4] > 0
    assert_no_leaks(llm)


# ---------------------------------------------------------------- configuration errors

NO_FP8_PLUGIN = """
    from tokenmill import hookimpl
    from tokenmill.plugins.attention import TorchAttentionBackend

    class NoFp8Backend(TorchAttentionBackend):
        name = "no-fp8"
        supported_kv_cache_dtypes = ("auto",)

    @hookimpl
    def tokenmill_register_attention_backends(register):
        register(NoFp8Backend)
"""


def test_an_unknown_kv_cache_dtype_is_an_error_naming_the_option():
    with pytest.raises(ConfigError, match=r"kv_cache_dtype: Input should be 'auto', 'fp8', 'fp8_e4m3' or "
                                          r"'fp8_e5m2', got 'int8'"):
        EngineConfig.build(kv_cache_dtype="int8")


def test_a_backend_without_fp8_is_refused_naming_the_option_and_the_backend(checkpoint, plugin_site):
    plugin_site("no-fp8-backend", NO_FP8_PLUGIN)
    config = EngineConfig.build(model=str(checkpoint), **{**TINY_ENGINE_OPTIONS, "attention_backend": "no-fp8",
                                                           "kv_cache_dtype": "fp8"})

    with pytest.raises(ConfigError, match=r"kv_cache_dtype: attention backend 'no-fp8': kv_cache_dtype must be "
                                          r"one of \['auto'\], got 'fp8'"):
        EngineCore(config, Registry())


def test_selection_passes_over_a_backend_without_fp8():
    no_fp8 = type("NoFp8", (TorchAttentionBackend,), {"supported_kv_cache_dtypes": ("auto",)})
    shape = dict(device=torch.device("cpu"), dtype=torch.float32, head_size=16, block_size=16)

    assert select_attention_backend({"no-fp8": no_fp8, "torch": TorchAttentionBackend}, **shape,
                                    kv_cache_dtype="fp8") == "torch"
    with pytest.raises(ConfigError, match=r"attention_backend, kv_cache_dtype: .*kv_cache_dtype=fp8_e5m2 on cpu: "
                                          r"'no-fp8': kv_cache_dtype must be one of \['auto'\]"):
        select_attention_backend({"no-fp8": no_fp8}, **shape, kv_cache_dtype="fp8_e5m2")


def test_a_backend_refuses_to_be_built_for_a_dtype_it_does_not_support():
    no_fp8 = type("NoFp8", (TorchAttentionBackend,), {"supported_kv_cache_dtypes": ("auto",), "name": "no-fp8"})
    with pytest.raises(ValueError, match="attention backend 'no-fp8': kv_cache_dtype must be one of"):
        no_fp8(num_heads=2, num_kv_heads=1, head_size=16, dtype=torch.float32, device="cpu", kv_cache_dtype="fp8")


def test_triton_refuses_e4m3_below_compute_capability_8_9(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    cuda = torch.device("cuda")

    for name in ("fp8", "fp8_e4m3"):
        assert "needs compute capability >= 8.9" in TritonAttentionBackend.unsupported_kv_cache_dtype(name, device=cuda)
    assert TritonAttentionBackend.unsupported_kv_cache_dtype("fp8_e5m2", device=cuda) is None
    assert TorchAttentionBackend.unsupported_kv_cache_dtype("fp8", device=cuda) is None


def test_the_cli_flag_sets_the_option():
    args = build_parser().parse_args(["generate", "--kv-cache-dtype", "fp8_e5m2"])

    assert _engine_options(args)["kv_cache_dtype"] == "fp8_e5m2"


def test_features_list_the_kv_cache_dtypes_per_backend_and_device():
    row = next(f for f in Registry().feature_matrix()["features"] if f["feature"] == "kv_cache_dtypes")

    assert row["status"] == "supported"
    assert "torch (cpu: auto, fp8, fp8_e4m3, fp8_e5m2; cuda: auto, fp8, fp8_e4m3, fp8_e5m2)" in row["detail"]
    assert "fp8, fp8_e4m3: CUDA compute capability >= 8.9" in row["detail"]


# ---------------------------------------------------------------- ahead of time, for sm_80 and sm_90 (no GPU)

_AOT_SCRIPT = """
import json, sys, torch
from dataclasses import asdict
from tokenmill.kernels.aot import compile_kv_write, compile_paged_attention
results = {}
for name, (kernel, args) in json.load(sys.stdin).items():
    for key in ("dtype", "cache_dtype"):
        args[key] = getattr(torch, args[key])
    compile_kernel = compile_paged_attention if kernel == "paged_attention" else compile_kv_write
    try:
        results[name] = asdict(compile_kernel(**args))
    except Exception as error:
        results[name] = {"error": f"{type(error).__name__}: {error}"}
print(json.dumps(results))
"""
_SHAPE = dict(num_heads=32, num_kv_heads=8, head_size=128, block_size=16)
AOT_ATTENTION = {  # launch shapes: decodes, a chunk, a split decode; 16-bit and fp32 queries
    "decode-bfloat16": dict(dtype="bfloat16", max_query_len=1, num_splits=1),
    "chunk-bfloat16": dict(dtype="bfloat16", max_query_len=64, num_splits=1),
    "split-float16": dict(dtype="float16", max_query_len=1, num_splits=4),
    "decode-float32": dict(dtype="float32", max_query_len=1, num_splits=1),
}
AOT_VARIANTS = {"plain": dict(sliding_window=False, soft_cap=False),
                "window-soft-cap": dict(sliding_window=True, soft_cap=True)}
AOT_TARGETS = [(90, "float8_e4m3fn"), (90, "float8_e5m2"), (80, "float8_e5m2")]  # Triton has no e4m3 on sm_80
AOT_MAX_STACK_BYTES = 32


@pytest.fixture(scope="module")
def aot_resources():
    jobs = {}
    for arch, cache_dtype in AOT_TARGETS:
        for shape, shape_args in AOT_ATTENTION.items():
            for variant, variant_args in AOT_VARIANTS.items():
                jobs[f"{arch}/{cache_dtype}/{shape}/{variant}"] = ("paged_attention", dict(
                    arch=arch, cache_dtype=cache_dtype, **_SHAPE, **shape_args, **variant_args))
        jobs[f"{arch}/{cache_dtype}/kv-write"] = ("kv_write", dict(arch=arch, dtype="bfloat16", cache_dtype=cache_dtype,
                                                                   num_kv_heads=8, head_size=128, block_size=16))
    jobs["80/float8_e4m3fn/kv-write"] = ("kv_write", dict(arch=80, dtype="bfloat16", cache_dtype="float8_e4m3fn",
                                                          num_kv_heads=8, head_size=128, block_size=16))
    return compile_ahead_of_time(_AOT_SCRIPT, jobs)


@pytest.mark.parametrize("variant", AOT_VARIANTS)
@pytest.mark.parametrize("shape", AOT_ATTENTION)
@pytest.mark.parametrize("arch, cache_dtype", AOT_TARGETS, ids=lambda x: f"sm_{x}" if isinstance(x, int) else x)
def test_fp8_attention_compiles_ahead_of_time(aot_resources, arch, cache_dtype, shape, variant):
    resources = aot_resources[f"{arch}/{cache_dtype}/{shape}/{variant}"]
    assert "error" not in resources, resources.get("error")
    assert resources["stack_bytes"] <= AOT_MAX_STACK_BYTES and resources["local_bytes"] == 0, resources


@pytest.mark.parametrize("arch, cache_dtype", AOT_TARGETS, ids=lambda x: f"sm_{x}" if isinstance(x, int) else x)
def test_fp8_kv_write_compiles_ahead_of_time(aot_resources, arch, cache_dtype):
    resources = aot_resources[f"{arch}/{cache_dtype}/kv-write"]
    assert "error" not in resources, resources.get("error")
    assert resources["stack_bytes"] == 0 and resources["local_bytes"] == 0, resources


def test_triton_has_no_e4m3_on_sm_80(aot_resources):
    """Why the triton backend refuses fp8 / fp8_e4m3 below compute capability 8.9."""
    assert "fp8e4nv not supported in this architecture" in aot_resources["80/float8_e4m3fn/kv-write"]["error"]
