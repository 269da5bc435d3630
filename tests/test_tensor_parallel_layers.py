"""Tensor parallelism in the model layers: real gloo groups of 2 and 4 CPU processes against size 1.

Each spawned group runs one job that does many checks (a spawn costs seconds on a small machine): the
job returns named tensors, every rank must return the same ones bit for bit (the engine samples the
same token on every rank), and they must equal what the same job computes in this process at size 1.
The job also asserts that each rank's weights are its shard (shapes and contents), so a layer that
quietly kept the whole weight and skipped its collectives would fail even though its logits agree.

Construction and loading need no collectives, so the partition of the checkpoint among the ranks and
the errors are checked in this process under ``tensor_parallel(TensorParallel(rank, size))``.
"""
import contextlib

import pytest
import torch
import transformers

from builders import TINY_CONFIGS, build_local_model, gguf_weight, make_hf_model, paged_steps_logits
from tokenmill.distributed import TensorParallel, get_tensor_parallel, tensor_parallel
from tokenmill.layers import Embedding, Linear
from tokenmill.loader import _quantize_fp8
from tokenmill.model_base import Model
from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend
from tokenmill.plugins.models import BUILTIN_MODELS
from tokenmill.quantization import gguf as gguf_kernels
from tokenmill.quantization.fp8 import Fp8Weight
from tokenmill.quantization.gguf import GGUFWeight
from tokenmill.testing.tensor_parallel import start_ranks

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SLIDING, FULL = "sliding_attention", "full_attention"

# every built-in family, with what sets it apart switched on; windows shorter than the 21-token prompt
FAMILIES = {
    "llama-gqa-untied": TINY_CONFIGS["llama-gqa-untied"],
    "llama-tied-odd-vocab": transformers.LlamaConfig(**{**BASE, "vocab_size": 125}, tie_word_embeddings=True,
                                                     architectures=["LlamaForCausalLM"]),
    "qwen2-biases": transformers.Qwen2Config(**BASE, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"]),
    "qwen3-qk-norm": transformers.Qwen3Config(**BASE, head_dim=32, tie_word_embeddings=False,
                                              architectures=["Qwen3ForCausalLM"]),
    "gemma2-soft-cap": transformers.Gemma2Config(**BASE, head_dim=16, query_pre_attn_scalar=24, sliding_window=10,
                                                 attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                                 architectures=["Gemma2ForCausalLM"]),
    "gemma3": transformers.Gemma3TextConfig(**BASE, head_dim=16, query_pre_attn_scalar=24, sliding_window=10,
                                            layer_types=[SLIDING, FULL], final_logit_softcapping=3.0,
                                            tie_word_embeddings=False, architectures=["Gemma3ForCausalLM"]),
    "phi3-fused": transformers.Phi3Config(**BASE, original_max_position_embeddings=256,
                                          architectures=["Phi3ForCausalLM"]),
    "granite": transformers.GraniteConfig(**BASE, embedding_multiplier=6.0, attention_multiplier=0.5,
                                          residual_multiplier=0.4, logits_scaling=0.5,
                                          architectures=["GraniteForCausalLM"]),
    "olmo2-full-width-qk-norm": transformers.Olmo2Config(**BASE, architectures=["Olmo2ForCausalLM"]),
    "starcoder2": transformers.Starcoder2Config(**BASE, sliding_window=14, tie_word_embeddings=False,
                                                architectures=["Starcoder2ForCausalLM"]),
}
# at size 4 the 2 KV heads are each held by two ranks; 126 ids are 32 per rank, the last rank's 30
FAMILIES_AT_4 = {
    "llama-gqa-untied": FAMILIES["llama-gqa-untied"],
    "olmo2-full-width-qk-norm": FAMILIES["olmo2-full-width-qk-norm"],
    "qwen2-biases-tied-odd-vocab": transformers.Qwen2Config(**{**BASE, "vocab_size": 126}, tie_word_embeddings=True,
                                                            architectures=["Qwen2ForCausalLM"]),
}
QUANTIZED_FAMILY = "llama-gqa-untied"
# (absolute, relative) tolerance by the job's key prefix: fp32 sums in another order (GGUF weights
# multiplied by the float32 tiled kernel, so a rank's blocks must be exactly the checkpoint's)
TOLERANCES = {"model": (3e-5, 1e-5), "layer": (3e-6, 1e-5), "gguf": (3e-5, 1e-5)}
# relative RMS from size 1: the CPU int4 kernel rounds each rank's partial sums to bfloat16, and a
# rank's rows may take another kernel than the whole weight's; fp8 scales each rank's part of a row
# by its own maximum (the loader quantizes what the rank holds)
RELATIVE_RMS = {"gguf-int4": 3e-2, "fp8": 0.1}


def model_class(config) -> type[Model]:
    return next(cls for cls in BUILTIN_MODELS if config.architectures[0] in cls.architectures)


def build(config):
    """This rank's model (fp32, torch attention with the rank's heads) and its KV caches of 6 blocks."""
    return build_local_model(model_class(config), config, num_blocks=6)


def checkpoint_qk(config, state) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's q and k projections in the checkpoint (cut from Phi-3's fused qkv_proj)."""
    if "model.layers.0.self_attn.q_proj.weight" in state:
        return state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    spec = model_class(config).kv_cache_spec(config)
    q_rows, kv_rows = config.num_attention_heads * spec.head_size, spec.num_kv_heads * spec.head_size
    q, k, _ = state["model.layers.0.self_attn.qkv_proj.weight"].split([q_rows, kv_rows, kv_rows])
    return q, k


def assert_is_this_ranks_shard(model, config, state) -> None:
    """Every layer holds this rank's part of the checkpoint: heads, MLP columns, vocabulary rows."""
    tp = get_tensor_parallel()
    spec = type(model).kv_cache_spec(config)
    d, hidden, inter = spec.head_size, config.hidden_size, config.intermediate_size
    heads, kv_heads = tp.local_heads(config.num_attention_heads, spec.num_kv_heads)
    first_kv = tp.kv_heads(config.num_attention_heads, spec.num_kv_heads)[0]
    for layer in model.layers:
        attn = layer.self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (heads, kv_heads)
        assert attn.qkv_proj.weight.shape == ((heads + 2 * kv_heads) * d, hidden)
        assert attn.o_proj.weight.shape == (hidden, heads * d)
        up, down = (layer.mlp.gate_up_proj, layer.mlp.down_proj) if hasattr(layer.mlp, "gate_up_proj") \
            else (layer.mlp.c_fc, layer.mlp.c_proj)
        assert up.weight.shape == (up.checkpoint_shape[0] // tp.size, hidden)
        assert down.weight.shape == (hidden, inter // tp.size)
    q, k = checkpoint_qk(config, state)
    qkv = model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(qkv[:heads * d], q[tp.rank * heads * d:(tp.rank + 1) * heads * d])
    assert torch.equal(qkv[heads * d:(heads + kv_heads) * d], k[first_kv * d:(first_kv + kv_heads) * d])
    per_rank = -(-config.vocab_size // tp.size)
    rows = min(per_rank, config.vocab_size - tp.rank * per_rank)
    assert model.embed_tokens.weight.shape == (rows, hidden)
    if model.lm_head is not None:
        assert model.lm_head.weight.shape == (rows, hidden)


# ---------------------------------------------------------------- the jobs (every rank, and size 1 here)

def families_job(cases: dict) -> dict[str, torch.Tensor]:
    """Each family's logits of chunked prompts and decode steps through the paged cache."""
    out = {}
    for name, (config, state) in cases.items():
        model, caches = build(config)
        model.load_weights(state.items())
        assert_is_this_ranks_shard(model, config, state)
        out[f"model/{name}"] = paged_steps_logits(model, caches, config.vocab_size)
    return out


@contextlib.contextmanager
def gguf_float32_kernel():
    """GGUF weights multiplied by the float32 tiled kernel, not the CPU int4 one (which rounds to bfloat16)."""
    saved, gguf_kernels._HAS_INT4PACK = gguf_kernels._HAS_INT4PACK, False
    try:
        yield
    finally:
        gguf_kernels._HAS_INT4PACK = saved


def quantized_job(config, state) -> dict[str, torch.Tensor]:
    """One family with GGUF Q8_0 weights kept (embedding and head included), multiplied in float32 and
    by the CPU int4 kernel, and with fp8 weights."""
    tp = get_tensor_parallel()
    out = {}
    for key, kernel in (("gguf/model", gguf_float32_kernel), ("gguf-int4/model", contextlib.nullcontext)):
        with kernel():
            model, caches = build(config)
            model.load_weights((name, gguf_weight(t) if t.dim() == 2 else t) for name, t in state.items())
            o_proj, gate_up = model.layers[0].self_attn.o_proj, model.layers[0].mlp.gate_up_proj
            assert isinstance(o_proj.quantized[0], GGUFWeight) and o_proj.quantized[0].in_features == 64 // tp.size
            assert sum(w.out_features for w in gate_up.quantized) == 2 * config.intermediate_size // tp.size
            assert model.lm_head.quantized[0].out_features == config.vocab_size // tp.size
            assert model.embed_tokens.quantized.out_features == config.vocab_size // tp.size
            out[key] = paged_steps_logits(model, caches, config.vocab_size)
    model, caches = build(config)
    model.load_weights(state.items())
    _quantize_fp8(model)
    assert isinstance(o_proj := model.layers[0].self_attn.o_proj.quantized[0], Fp8Weight)
    assert o_proj.in_features == 64 // tp.size
    out["fp8/model"] = paged_steps_logits(model, caches, config.vocab_size)
    return out


@torch.no_grad()
@gguf_float32_kernel()
def layers_job(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Column (two shards), row (bias once), vocab head and embedding (13 ids: padded at size 2), dense,
    GGUF Q8_0 and fp8; a column layer's slices are gathered shard by shard to compare with size 1."""
    tp = get_tensor_parallel()
    x, ids = w["x"], torch.arange(13).flip(0)

    def column(quantize=None, gguf=False):
        layer = Linear(64, 48, bias=not gguf, shard_sizes=(32, 16), parallel="column")
        if gguf:
            layer.load(gguf_weight(torch.cat([w["a"], w["b"]])))  # a fused checkpoint tensor
        else:
            for shard, name in enumerate("ab"):
                layer.load(w[name], shard)
                layer.load_bias(w[f"bias_{name}"], shard)
        if quantize:
            layer.quantize(quantize)
        assert layer.shard_sizes == (32 // tp.size, 16 // tp.size) and layer.out_features == 48 // tp.size
        y = layer(x).split(layer.shard_sizes, dim=-1)
        return torch.cat([tp.all_gather(part) for part in y], dim=-1)

    def row(quantize=None, gguf=False):
        layer = Linear(64, 24, bias=not gguf, parallel="row")
        layer.load(gguf_weight(w["c"]) if gguf else w["c"])
        if not gguf:
            layer.load_bias(w["bias_c"])
        if quantize:
            layer.quantize(quantize)
        assert layer.in_features == 64 // tp.size and (gguf or layer.bias.shape == (24,))
        return layer(x.narrow(1, *layer.columns))  # its input is this rank's columns (a column layer's output)

    def head(gguf=False):
        layer = Linear(64, 13, bias=False, logits=True, parallel="vocab")
        layer.load(gguf_weight(w["vocab"]) if gguf else w["vocab"])
        return layer(x)

    def embedding(gguf=False):
        layer = Embedding(13, 64, parallel="vocab")
        layer.load(gguf_weight(w["vocab"]) if gguf else w["vocab"])
        assert layer.num_embeddings == (13 if tp.size == 1 else 7 - tp.rank)
        return layer(ids), layer.as_linear(x)

    out = {"layer/column": column(), "layer/row": row(), "layer/vocab": head(), "gguf/column": column(gguf=True),
           "gguf/row": row(gguf=True), "gguf/vocab": head(gguf=True), "fp8/column": column(Fp8Weight),
           "fp8/row": row(Fp8Weight)}
    out["layer/embedding"], out["layer/tied"] = embedding()
    out["gguf/embedding"], out["gguf/tied"] = embedding(gguf=True)
    return out


def size_2_job(layer_weights, cases, quantized_case) -> dict[str, torch.Tensor]:
    return {**layers_job(layer_weights), **families_job(cases), **quantized_job(*quantized_case)}


# ---------------------------------------------------------------- comparing the ranks with size 1

def assert_ranks_match_size_1(results: list[dict], expected: dict) -> None:
    for key, reference in expected.items():
        first = results[0][key]
        for rank, result in enumerate(results[1:], start=1):
            assert torch.equal(result[key], first), f"{key}: rank {rank} differs from rank 0"
        assert first.shape == reference.shape, f"{key}: {tuple(first.shape)}, size 1 gives {tuple(reference.shape)}"
        kind = key.split("/")[0]
        if kind in RELATIVE_RMS:
            error = float((first - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())
            assert error < RELATIVE_RMS[kind], f"{key}: {error:.2%} RMS from size 1"
        else:
            atol, rtol = TOLERANCES[kind]
            torch.testing.assert_close(first, reference, atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")


def states(configs: dict) -> dict:
    return {name: (config, make_hf_model(config).state_dict()) for name, config in configs.items()}


def layer_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"x": (5, 64), "a": (32, 64), "b": (16, 64), "bias_a": (32,), "bias_b": (16,), "c": (24, 64),
              "bias_c": (24,), "vocab": (13, 64)}
    return {name: torch.randn(shape, generator=g) * 0.5 for name, shape in shapes.items()}


def test_size_2_matches_size_1_layers_families_and_quantized_weights():
    weights, cases = layer_weights(), states(FAMILIES)
    quantized_case = cases[QUANTIZED_FAMILY]
    # the ranks run while this process computes size 1: the same job, so the same code path at size 1
    ranks = start_ranks(size_2_job, 2, weights, cases, quantized_case)
    expected = size_2_job(weights, cases, quantized_case)
    assert_ranks_match_size_1(ranks.results(), expected)


def test_size_4_replicates_kv_heads():
    cases = states(FAMILIES_AT_4)
    ranks = start_ranks(families_job, 4, cases)
    expected = families_job(cases)
    assert_ranks_match_size_1(ranks.results(), expected)


# ---------------------------------------------------------------- in this process: partition and errors

def test_the_ranks_partition_the_checkpoint_and_share_kv_heads_when_fewer():
    config = FAMILIES["llama-gqa-untied"]
    state = make_hf_model(config).state_dict()
    d = 16
    for size in (2, 4):
        parts = []
        for rank in range(size):
            with tensor_parallel(TensorParallel(rank, size)):
                model, _ = build(config)
                model.load_weights(state.items())
                assert_is_this_ranks_shard(model, config, state)
            parts.append(model)
        attn = [m.layers[1].self_attn for m in parts]
        q = torch.cat([a.qkv_proj.weight[:a.q_size] for a in attn])
        assert torch.equal(q, state["model.layers.1.self_attn.q_proj.weight"])
        v = state["model.layers.1.self_attn.v_proj.weight"]
        for rank, a in enumerate(attn):  # at size 4 ranks 0, 1 read KV head 0 and ranks 2, 3 KV head 1
            first = rank * 2 // size
            assert torch.equal(a.qkv_proj.weight[a.q_size + a.kv_size:], v[first * d:(first + a.num_kv_heads) * d])
        assert torch.equal(torch.cat([a.o_proj.weight for a in attn], dim=1),
                           state["model.layers.1.self_attn.o_proj.weight"])
        gate = torch.cat([m.layers[1].mlp.gate_up_proj.weight.chunk(2)[0] for m in parts])
        assert torch.equal(gate, state["model.layers.1.mlp.gate_proj.weight"])
        assert torch.equal(torch.cat([m.lm_head.weight for m in parts]), state["lm_head.weight"])


def test_take_columns_cuts_gguf_blocks_and_refuses_a_cut_inside_one():
    full = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    weight = gguf_weight(full)
    assert torch.equal(weight.take_columns(32, 96).dequantize(), weight.dequantize()[:, 32:96])
    with pytest.raises(ValueError, match=r"Q8_0 weight is cut into input columns only at its blocks of 32 weights; "
                                         r"columns 16:32"):
        weight.take_columns(16, 32)
    with tensor_parallel(TensorParallel(1, 4)):
        layer = Linear(64, 32, bias=False, parallel="row")  # 16 input columns per rank: half a Q8_0 block
    with pytest.raises(ValueError, match="Q8_0 weight is cut into input columns only at its blocks of 32"):
        layer.load(gguf_weight(full[:, :64].repeat(4, 1)))


def test_head_counts_that_do_not_divide_are_named():
    llama = TINY_CONFIGS["llama-gqa-untied"]  # 4 heads, 2 KV heads
    cases = [(llama, 3, r"num_attention_heads \(4\) must be divisible by tensor_parallel_size \(3\)"),
             (transformers.LlamaConfig(**{**BASE, "num_attention_heads": 8, "num_key_value_heads": 6,
                                          "hidden_size": 96}, architectures=["LlamaForCausalLM"]),
              4, r"num_key_value_heads \(6\) must be divisible by tensor_parallel_size \(4\)"),
             (transformers.LlamaConfig(**{**BASE, "num_attention_heads": 12, "num_key_value_heads": 3,
                                          "hidden_size": 96}, architectures=["LlamaForCausalLM"]),
              4, r"tensor_parallel_size \(4\) must be a multiple of num_key_value_heads \(3\)"),
             (transformers.LlamaConfig(**{**BASE, "intermediate_size": 102}, architectures=["LlamaForCausalLM"]),
              4, r"intermediate_size \(102\) must be divisible by tensor_parallel_size \(4\)")]
    for config, size, message in cases:
        with tensor_parallel(TensorParallel(0, size)), pytest.raises(ValueError, match=message):
            build(config)


def test_a_backend_with_the_whole_head_count_is_refused_on_a_rank():
    config = TINY_CONFIGS["llama-gqa-untied"]
    whole = TorchAttentionBackend(num_heads=4, num_kv_heads=2, head_size=16, dtype=torch.float32, device="cpu")
    with tensor_parallel(TensorParallel(0, 2)), pytest.raises(ValueError, match=r"the config needs \(2, 1, 16\) "
                                                                                r"on each of 2 tensor-parallel ranks"):
        model_class(config)(config, whole)


def test_local_heads_and_capabilities():
    assert TensorParallel(0, 2).local_heads(4, 2) == (2, 1)
    assert TensorParallel(3, 4).local_heads(4, 2) == (1, 1)
    assert TensorParallel(5, 8).local_heads(32, 8) == (4, 1)
    assert TensorParallel().local_heads(4, 2) == (4, 2)
    assert all(cls.supports_tensor_parallel and cls.capabilities()["supports_tensor_parallel"]
               for cls in BUILTIN_MODELS)
    assert Model.supports_tensor_parallel is False
