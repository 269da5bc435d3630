"""Quantized models through the whole engine: every GGUF block format kept at load, and CUDA-graph decode
steps (emulated on CPU) over quantized weights and fp8 KV caches.

1. GGUF files in each block format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). A tiny random Llama,
   256 wide (K-quant super-blocks are 256 weights), is written as llama.cpp's converter writes it
   (``builders.write_llama_cpp_gguf``: llama metadata, gguf-py names, permuted q/k) with every 2-D tensor
   (projections, embedding table, logits head) in that format: gguf-py's quantizer, or for the K-quants,
   which gguf-py cannot quantize, ``builders.quantize_k_quant``. The file is checked to be what it claims
   (its tensor types; the engine expanding it to fp32 gives the logits of the transformers model holding
   the dequantized weights). The engine run on it with the formats kept (``quantization`` unset):

   - holds a ``GGUFWeight`` of that format in every projection, the embedding and the logits head (an
     engine that expanded the file fails here);
   - gives prefill logits close to the same file expanded (``quantization="none"``): the only difference
     is the CPU int4 kernel's bfloat16 roundings (bound below);
   - decodes greedily to tokens the expanded model also picks: free-running agreement (the tokens before
     the first difference) is printed; what is asserted is the per-position agreement given the same
     context (teacher forcing over our generated tokens), since one flipped near tie changes everything
     after it in these tiny random models; and every disagreement is a near tie;
   - leaks no KV block.

2. Emulated CUDA graphs (``runner.init_cuda_graphs("emulate")``: the graph path's static buffers, padded
   batches and static metadata, the forward called eagerly) over every combination of weights {GGUF kept
   (Q8_0), fp8 (``quantization="fp8"`` on a float safetensors checkpoint), unquantized} and KV cache
   {"auto", "fp8_e4m3", "fp8_e5m2"}: the quantized state is checked to be active (layer weight types, the
   cache tensors' dtype, calibrated scales), then batches of 3 and 5 prompts (padded to the captured sizes
   4 and 8, the null block the padding rows read filled with large values) give token for token the
   greedy output of an eager engine with the same options, and the runner's ``num_runs`` counter shows
   every decode step of the full batch went through the graph path.
"""
from __future__ import annotations

import copy

import gguf
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from builders import (TINY_CONFIGS, VOCAB_SIZE, assert_no_leaks, hf_logits, make_checkpoint, make_hf_model, make_llm,
                      output_ids, prefill_logits, quantize_gguf, random_prompts, save_word_tokenizer, token_prompts,
                      write_llama_cpp_gguf)
from tokenmill.layers import Embedding, Linear
from tokenmill.quantization.fp8 import Fp8Weight
from tokenmill.quantization.gguf import GGUFWeight
from tokenmill.sampling_params import SamplingParams

BLOCK_FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]

# 256 wide, heads of 64: every projection's inputs (256 or 512) are whole K-quant super-blocks
WIDE_CONFIG = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
FORMAT_PROMPTS = random_prompts([9, 17, 5, 30], seed=4)

# Kept vs expanded logits. The expanded model multiplies by the file's dequantized weights in float32; the kept one by
# the same values in PyTorch's CPU int4 kernel, which rounds x, each 32-group's scale and zero, and its output to
# bfloat16 (unit roundoff 2**-8): each projection's output moves by about 2**-8 of its size, RMS (test_gguf_quant bounds
# it elementwise by 4 * 2**-8 * |x| @ |W|.T). The embedding lookup and the logits head stay exact (dequantized rows; the
# head multiplies in float32). Four matmuls a layer (qkv, o, gate_up, down), two layers: independent roundings add in
# quadrature, and these random std-0.15 weights amplify them (attention scores of std ~6 make the softmax nearly
# one-hot; SiLU(gate) * up adds its two factors' relative errors), so the logits move by a few per cent of their spread:
# measured 1.9-2.8 % RMS, and at most 22 % of the logits' standard deviation (~2.4) at the worst of 16000 logits (125
# positions); for scale, the expanded model run wholly in bfloat16 moves them by 2.5 % RMS, 16-19 % at most (Q8_0,
# Q4_K). Bounds: about twice that. A weight decoded from wrong bits moves them by more than their whole spread
# (measured: an int4 zero one scale step off, or a group's quants in reverse order: RMS 108-143 %).
LOGITS_RMS_BOUND = 0.06  # of the expanded logits' standard deviation
LOGITS_MAX_BOUND = 0.4
# A greedy token the expanded model would not pick is a near tie there: it beat the expanded model's top token in
# our logits, and each of the two logits moved by at most the bound above (measured gaps: under 0.1 of the std).
NEAR_TIE = 2 * LOGITS_MAX_BOUND
MIN_TEACHER_FORCED_AGREEMENT = 0.85  # measured 0.92-0.98


def qtype_id(qtype) -> str:
    return qtype.name


# ---------------------------------------------------------------- helpers

def quantized_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every Linear and Embedding of ``model`` (the projections, the table, the logits head)."""
    return [m for m in model.modules() if isinstance(m, (Linear, Embedding))]


def weights_of(layer: torch.nn.Module) -> list:
    """What a layer multiplies by: its quantized shards ([] when it holds a plain tensor)."""
    if layer.quantized is None:
        return []
    return list(layer.quantized) if isinstance(layer, Linear) else [layer.quantized]


def dequantized_twin(hf_model: transformers.PreTrainedModel, qtype: Q) -> transformers.PreTrainedModel:
    """``hf_model`` with every 2-D weight replaced by its ``qtype`` blocks dequantized by gguf-py: the model a
    file of that format holds (block quantization is row by row, so llama.cpp's q/k row permutation commutes)."""
    twin = copy.deepcopy(hf_model)
    with torch.no_grad():
        for param in twin.parameters():
            if param.dim() == 2:
                blocks = quantize_gguf(param.numpy(), qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).reshape(param.shape))
    return twin


def first_difference(ours: list[int], theirs: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))


# ---------------------------------------------------------------- 1. each GGUF block format, kept

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(the transformers model, the word tokenizer's directory)."""
    path = tmp_path_factory.mktemp("wide")
    save_word_tokenizer(path)
    return make_hf_model(WIDE_CONFIG), str(path)


@pytest.mark.parametrize("qtype", BLOCK_FORMATS, ids=qtype_id)
def test_a_gguf_file_runs_in_its_block_format_close_to_the_expanded_model(wide, tmp_path, qtype):
    hf_model, tokenizer = wide
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_llama_cpp_gguf(path, "llama", hf_model, qtype)
    file_types = {t.name: gguf.GGMLQuantizationType(int(t.tensor_type)) for t in gguf.GGUFReader(path).tensors
                  if len(t.shape) == 2}
    assert len(file_types) == 2 + 7 * WIDE_CONFIG.num_hidden_layers and set(file_types.values()) == {qtype}

    kept = make_llm(path, tokenizer=tokenizer)
    expanded = make_llm(path, tokenizer=tokenizer, quantization="none")
    assert (kept.engine.core.quantization, expanded.engine.core.quantization) == ("gguf", None)
    layers = quantized_layers(kept.engine.core.model)
    assert len(layers) == 2 + 4 * WIDE_CONFIG.num_hidden_layers  # table, head; qkv, o, gate_up, down per layer
    for layer in layers:
        assert layer.weight is None, layer
        assert [(type(w), w.qtype) for w in weights_of(layer)] == [(GGUFWeight, qtype)], layer
    assert not any(weights_of(layer) for layer in quantized_layers(expanded.engine.core.model))

    ours = output_ids(kept.generate(token_prompts(FORMAT_PROMPTS), GREEDY, use_tqdm=False))
    theirs = output_ids(expanded.generate(token_prompts(FORMAT_PROMPTS), GREEDY, use_tqdm=False))
    assert_no_leaks(kept)
    assert_no_leaks(expanded)

    # the caches are no longer needed: one prefill per sequence overwrites their first blocks
    sequences = [torch.tensor(prompt + generated) for prompt, generated in zip(FORMAT_PROMPTS, ours)]
    kept_logits = [prefill_logits(kept.engine.core.model, ids) for ids in sequences]
    expanded_logits = [prefill_logits(expanded.engine.core.model, ids) for ids in sequences]

    twin = dequantized_twin(hf_model, qtype)  # the file is what it claims: expanded, it is the twin
    torch.testing.assert_close(expanded_logits[0], hf_logits(twin, sequences[0]), atol=2e-4, rtol=1e-4)

    difference = torch.cat(kept_logits) - torch.cat(expanded_logits)
    spread = float(torch.cat(expanded_logits).std())
    rms, largest = float(difference.pow(2).mean().sqrt()) / spread, float(difference.abs().max()) / spread
    agreed, gaps = 0, []
    for prompt, generated, logits in zip(FORMAT_PROMPTS, ours, expanded_logits):
        steps = logits[len(prompt) - 1: -1]  # the distribution each generated token was picked from
        chosen = torch.tensor(generated)
        agreed += int((steps.argmax(dim=-1) == chosen).sum())
        gaps.append(steps.max(dim=-1).values - steps[torch.arange(len(generated)), chosen])
    agreement = agreed / (len(ours) * MAX_TOKENS)
    gap = float(torch.cat(gaps).max()) / spread
    prefixes = [first_difference(a, b) for a, b in zip(ours, theirs)]
    print(f"{qtype.name}: logits vs expanded: RMS {rms:.3f}, max {largest:.3f} of their std {spread:.2f}; greedy "
          f"tokens before the first difference {prefixes} of {MAX_TOKENS}; teacher-forced agreement {agreement:.2f}, "
          f"largest gap to the expanded top token {gap:.3f} of the std")

    assert rms < LOGITS_RMS_BOUND and largest < LOGITS_MAX_BOUND
    assert agreement >= MIN_TEACHER_FORCED_AGREEMENT
    assert gap < NEAR_TIE


# ---------------------------------------------------------------- 2. emulated CUDA graphs over quantized state

GRAPH_TOKENS = 10
GRAPH_GREEDY = SamplingParams(temperature=0.0, max_tokens=GRAPH_TOKENS, ignore_eos=True)
# (prompts, the captured size their decode steps pad to): default ladder 1, 2, 4, 8, 16 (max_num_seqs 16)
BATCHES = [(random_prompts([7, 30, 2], seed=21), 4), (random_prompts([12, 1, 25, 40, 9], seed=22), 8)]
KV_CACHE_DTYPES = {"auto": torch.float32, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
WEIGHTS = ["gguf-Q8_0", "fp8", "unquantized"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """model and options per weight kind: one transformers model as a safetensors checkpoint (unquantized, or
    fp8 at load) and as a Q8_0 GGUF (64 wide: whole blocks of 32)."""
    checkpoint = tmp_path_factory.mktemp("tiny")
    hf_model = make_checkpoint(checkpoint, TINY_CONFIGS["llama-gqa-untied"])
    gguf_path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-Q8_0.gguf"
    write_llama_cpp_gguf(gguf_path, "llama", hf_model, Q.Q8_0)
    return {"gguf-Q8_0": (gguf_path, dict(tokenizer=str(checkpoint))),
            "fp8": (checkpoint, dict(quantization="fp8")),
            "unquantized": (checkpoint, {})}


def assert_quantized_state(llm, weights: str, kv_cache_dtype: str) -> None:
    core = llm.engine.core
    assert {cache.dtype for cache in core.kv_caches} == {KV_CACHE_DTYPES[kv_cache_dtype]}
    if kv_cache_dtype != "auto":  # calibrated per (layer, keys/values, KV head), not the default 1.0
        scales = torch.stack([core.model.attention.kv_cache_scales(cache) for cache in core.kv_caches])
        assert (scales != 1).all()
    layers = quantized_layers(core.model)
    head = core.model.lm_head
    kinds = {layer: [(type(w), getattr(w, "qtype", None)) for w in weights_of(layer)] for layer in layers}
    if weights == "gguf-Q8_0":
        assert core.quantization == "gguf"
        assert all(kind == [(GGUFWeight, Q.Q8_0)] for kind in kinds.values()), kinds
    elif weights == "fp8":  # every projection; the embedding table and the logits head stay in the model dtype
        assert core.quantization == "fp8"
        assert all(kind == [(Fp8Weight, None)] for layer, kind in kinds.items()
                   if isinstance(layer, Linear) and layer is not head), kinds
        assert kinds[head] == [] and kinds[core.model.embed_tokens] == []
    else:
        assert core.quantization is None and not any(kinds.values())


def poison_null_block(llm) -> None:
    """Large values in the reserved block 0, which only padding rows read: a padding row leaking into a real
    row would change its tokens. Clamped to what e4m3 holds (a larger value would be NaN there)."""
    generator = torch.Generator().manual_seed(0)
    for cache in llm.engine.core.kv_caches:
        noise = (100 * torch.randn(cache[:, 0].shape, generator=generator)).clamp(-400, 400)
        cache[:, 0] = noise.to(cache.dtype)


@pytest.mark.parametrize("kv_cache_dtype", list(KV_CACHE_DTYPES))
@pytest.mark.parametrize("weights", WEIGHTS)
def test_emulated_cuda_graphs_over_quantized_weights_and_kv_cache_give_the_eager_tokens(tiny, weights,
                                                                                      kv_cache_dtype):
    model, options = tiny[weights]
    eager = make_llm(model, kv_cache_dtype=kv_cache_dtype, **options)
    llm = make_llm(model, kv_cache_dtype=kv_cache_dtype, **options)
    for engine in (eager, llm):
        assert_quantized_state(engine, weights, kv_cache_dtype)
    runner = llm.engine.core.runner
    runner.init_cuda_graphs("emulate")
    graphs = runner.graphs
    assert graphs.emulate and eager.engine.core.runner.graphs is None
    poison_null_block(llm)
    for prompts, padded in BATCHES:
        expected = output_ids(eager.generate(token_prompts(prompts), GRAPH_GREEDY, use_tqdm=False))
        runs_before = graphs.num_runs[padded]
        assert output_ids(llm.generate(token_prompts(prompts), GRAPH_GREEDY, use_tqdm=False)) == expected
        assert graphs.num_runs[padded] - runs_before >= GRAPH_TOKENS - 1  # every decode step of the full batch
        assert_no_leaks(llm)
    assert_no_leaks(eager)
