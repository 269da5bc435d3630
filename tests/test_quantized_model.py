"""The default model (a Q4_1 GGUF with a Q8_0 embedding table) runs with its weights in their
GGUF block formats: the France answer, greedy output close to the fp32-expanded model, a
fraction of its weight bytes; bad quantization options are errors naming the option."""
import pytest
import torch

from builders import TINY_CONFIGS, make_checkpoint
from tokenmill import LLM, SamplingParams
from tokenmill.errors import ConfigError
from tokenmill.layers import Embedding, Linear
from tokenmill.quantization.gguf import GGUFWeight

PROMPTS = ["Once upon a time", "The three primary colors are", "def fibonacci(n):", "Water boils at"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def weight_bytes(model: torch.nn.Module) -> int:
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    quantized = sum(w.nbytes for m in model.modules() if isinstance(m, Linear) and m.quantized
                    for w in m.quantized)
    table = sum(m.quantized.nbytes for m in model.modules() if isinstance(m, Embedding) and m.quantized)
    return dense + quantized + table


@pytest.fixture(scope="module")
def quantized():
    return LLM(max_model_len=256)


@pytest.fixture(scope="module")
def expanded():
    return LLM(max_model_len=256, quantization="none")


def test_the_default_model_keeps_its_block_formats(quantized, expanded):
    model = quantized.engine.core.model
    assert quantized.engine.core.quantization == "gguf"
    layer = model.layers[0]
    assert layer.self_attn.qkv_proj.weight is None and layer.mlp.gate_up_proj.weight is None
    assert isinstance(layer.self_attn.qkv_proj.quantized[0], GGUFWeight)
    assert len(layer.self_attn.qkv_proj.quantized) == 1  # q, k and v merged into one Q4_1 weight
    assert isinstance(model.embed_tokens.quantized, GGUFWeight) and model.embed_tokens.weight is None
    # projections hold only the CPU int4 layout, not the file's rows beside it; the table keeps its rows
    assert all(w.data is None for m in model.modules() if isinstance(m, Linear) and m.quantized
               for w in m.quantized if isinstance(w, GGUFWeight))
    assert model.embed_tokens.quantized.data is not None
    ours, fp32 = weight_bytes(model), weight_bytes(expanded.engine.core.model)
    print(f"weight bytes: quantized {ours / 2**20:.0f} MiB, fp32-expanded {fp32 / 2**20:.0f} MiB")
    assert ours < fp32 / 3.5


def test_the_quantized_default_model_answers_the_france_question(quantized):
    out = quantized.chat([{"role": "user", "content": "What is the capital of France?"}],
                         SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def test_greedy_output_is_close_to_the_fp32_expanded_model(quantized, expanded):
    ours = [o.outputs[0].token_ids for o in quantized.generate(PROMPTS, GREEDY, use_tqdm=False)]
    theirs = [o.outputs[0].token_ids for o in expanded.generate(PROMPTS, GREEDY, use_tqdm=False)]
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ours, theirs)]
    print(f"greedy agreement: tokens before the first difference per prompt {prefix} of {GREEDY.max_tokens}")
    assert sum(prefix) >= len(PROMPTS) * GREEDY.max_tokens // 2  # bfloat16 activations in the int4 kernel
    assert prefix[0] >= 8


def test_bad_quantization_options_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match="quantization: 'fp8' quantizes a bf16/fp16/fp32 checkpoint"):
        LLM(quantization="fp8")
    make_checkpoint(tmp_path, TINY_CONFIGS["llama-gqa-untied"])
    with pytest.raises(ConfigError, match="quantization: 'gguf' keeps a .gguf file's block formats"):
        LLM(str(tmp_path), quantization="gguf", device="cpu")
    with pytest.raises(ConfigError, match="quantization"):
        LLM(quantization="awq")


def test_a_fused_layer_takes_one_quantized_tensor_for_all_its_shards_or_one_per_shard():
    import numpy as np
    from gguf import GGMLQuantizationType as Q, quants

    weight = torch.randn(64, 64)
    rows = np.ascontiguousarray(quants.quantize(weight.numpy(), Q.Q8_0)).view(np.uint8).reshape(64, -1)
    def q8_0() -> GGUFWeight:  # a fresh weight per layer: a layer releases the rows of the weight it keeps
        return GGUFWeight(Q.Q8_0, torch.from_numpy(rows.copy()), 64)

    whole = q8_0()
    x = torch.randn(3, 64)
    expected = x @ whole.dequantize().T
    fused = Linear(64, 64, bias=False, shard_sizes=(32, 16, 16))  # q, k, v: a checkpoint may store them fused
    fused.load(whole)
    bound = 4 * 2 ** -8 * (x.abs() @ whole.dequantize().abs().T)  # the int4 kernel's bfloat16 rounding
    assert fused.weight is None and ((fused(x) - expected).abs() <= bound).all()
    split = Linear(64, 64, bias=False, shard_sizes=(32, 16, 16))
    for shard, index in enumerate((torch.arange(0, 32), torch.arange(32, 48), torch.arange(48, 64))):
        split.load(q8_0().take_rows(index), shard)
    assert len(split.quantized) == 1 and torch.equal(split(x), fused(x))


def test_a_model_class_without_quantized_layers_runs_a_gguf_expanded_and_refuses_a_quantization(tmp_path):
    from tokenmill.loader import ModelSource, resolve_quantization
    from tokenmill.model_base import Model

    class PlainModel(Model):  # a plugin whose layers are torch.nn.Linear
        architectures = ("PlainForCausalLM",)

    class LayeredModel(PlainModel):
        quantized_weights = True

    gguf_file = ModelSource(tmp_path, "gguf", gguf_file="model.gguf")
    assert resolve_quantization(None, gguf_file, LayeredModel) == "gguf"
    assert resolve_quantization(None, gguf_file, PlainModel) is None
    assert PlainModel.capabilities()["quantized_weights"] is False
    with pytest.raises(ConfigError, match="quantization: 'fp8' needs a model class .*PlainModel does not"):
        resolve_quantization("fp8", ModelSource(tmp_path, "safetensors"), PlainModel)


# ---------------------------------------------------------------- fp8 weights

def test_fp8_weight_matches_its_dequantized_matrix_and_the_original_within_e4m3_error():
    from tokenmill.quantization.fp8 import Fp8Weight

    weight = torch.randn(96, 64) * torch.linspace(0.01, 3.0, 96)[:, None]  # channels of very different size
    fp8 = Fp8Weight.from_weight(weight)
    x = torch.randn(5, 64)
    assert torch.allclose(fp8.matmul(x), x @ fp8.dequantize().T, atol=1e-4)
    relative = (fp8.dequantize() - weight).abs() / weight.abs().amax(dim=1, keepdim=True)
    assert relative.max() < 2 ** -4  # e4m3: 3 mantissa bits, scaled per channel
    per_tensor = (weight / (weight.abs().max() / 448)).to(torch.float8_e4m3fn).float() * (weight.abs().max() / 448)
    assert (per_tensor - weight).abs()[:8].max() > (fp8.dequantize() - weight).abs()[:8].max()  # per channel helps


def test_fp8_quantizes_every_projection_but_the_logits_head(tmp_path):
    from builders import hf_greedy, random_prompts, token_prompts
    from tokenmill.quantization.fp8 import Fp8Weight

    hf_model = make_checkpoint(tmp_path, TINY_CONFIGS["llama-gqa-untied"])
    llm = LLM(str(tmp_path), quantization="fp8", device="cpu", dtype="float32", max_model_len=128)
    model = llm.engine.core.model
    assert isinstance(model.layers[0].self_attn.qkv_proj.quantized[0], Fp8Weight)
    assert model.lm_head.quantized is None  # logits stay in the model dtype
    prompts = random_prompts([9, 17, 5], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(token_prompts(prompts), params, use_tqdm=False)]
    theirs = [hf_greedy(hf_model, p, 8) for p in prompts]
    agree = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / (8 * len(prompts))
    print(f"fp8 weights: greedy tokens equal to transformers fp32 at {agree:.0%} of positions")
    assert ours[0][0] == theirs[0][0] and agree >= 0.5
