"""Builders for engine-level tests: tiny random HF checkpoints, their tokenizer, the
transformers reference, and the leak check every engine test ends with.

A tiny checkpoint is a transformers model with random weights (a larger std than
the usual init, so greedy decoding does not collapse onto one token) written with
``save_pretrained`` (safetensors) next to a word-level tokenizer that names every
id of the vocabulary (``w3`` is id 3), so any generated id decodes to text.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tokenmill.llm import LLM
from tokenmill.sampling_metadata import SAMPLING_EPS, SamplingMetadata

VOCAB_SIZE = 128
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
EOS_TOKEN_ID = 2
WEIGHT_STD = 0.15

_BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=EOS_TOKEN_ID)

# name -> transformers config; the names are the parametrize ids of the parity tests
TINY_CONFIGS = {
    "llama-gqa-untied": transformers.LlamaConfig(**_BASE, num_attention_heads=4, num_key_value_heads=2,
                                                 tie_word_embeddings=False, architectures=["LlamaForCausalLM"]),
    "llama-mha-tied": transformers.LlamaConfig(**_BASE, num_attention_heads=4, num_key_value_heads=4,
                                               tie_word_embeddings=True, architectures=["LlamaForCausalLM"]),
    "llama-3-heads-1-kv-head": transformers.LlamaConfig(**{**_BASE, "hidden_size": 48}, num_attention_heads=3,
                                                        num_key_value_heads=1, tie_word_embeddings=False,
                                                        architectures=["LlamaForCausalLM"]),
    "qwen2-gqa-tied": transformers.Qwen2Config(**_BASE, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"]),
    "mistral-gqa": transformers.MistralConfig(**_BASE, num_attention_heads=4, num_key_value_heads=2,
                                              sliding_window=None, tie_word_embeddings=False,
                                              architectures=["MistralForCausalLM"]),
}

# small engines: fp32 on CPU, short sequences, a small cache
TINY_ENGINE_OPTIONS = dict(dtype="float32", device="cpu", max_model_len=256, block_size=16,
                           num_gpu_blocks_override=64, max_num_seqs=16, max_num_batched_tokens=512)


def word(token_id: int) -> str:
    """The text of a non-special token id."""
    return f"w{token_id}"


def save_word_tokenizer(path: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """A fast word-level tokenizer: ``w3 w4`` <-> [3, 4]; decoding puts a space between words."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({word(i): i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)


def make_hf_model(config: transformers.PretrainedConfig, std: float = WEIGHT_STD,
                  seed: int = 0) -> transformers.PreTrainedModel:
    """A transformers model, fp32, eval mode, every weight N(0, std) (norms N(1, std))."""
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, std)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def make_checkpoint(path: Path, config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    """A HF checkpoint directory (safetensors + tokenizer) at ``path``; returns its transformers model."""
    hf_model = make_hf_model(config)
    hf_model.save_pretrained(path)
    save_word_tokenizer(path)
    return hf_model


def random_prompts(lengths: list[int], seed: int = 0, vocab_size: int = VOCAB_SIZE) -> list[list[int]]:
    """Prompts of the given lengths, ids drawn from the non-special tokens."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(len(SPECIAL_TOKENS), vocab_size, (n,), generator=generator).tolist() for n in lengths]


def token_prompts(prompts: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": p} for p in prompts]


# ---------------------------------------------------------------- the transformers reference

def hf_greedy(hf_model: transformers.PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding: ``max_new_tokens`` ids after ``prompt``, EOS not special."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_logprobs(hf_model: transformers.PreTrainedModel, token_ids: list[int],
                num_last: int | None = None) -> torch.Tensor:
    """log_softmax of one full forward pass: row p is the distribution of token p + 1.
    [len, vocab], or only the last ``num_last`` rows."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids]), logits_to_keep=num_last or 0).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def hf_logits(hf_model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits of every position of ``ids`` [T], float32 [T, vocab]."""
    with torch.inference_mode():
        return hf_model(ids[None]).logits[0].float()


def prefill_logits(model, ids: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """Our model's logits of every position of one request run as a single prefill [T, vocab];
    its KV caches are bound and hold at least ceil(T / block_size) blocks."""
    from tokenmill.testing.builders import make_attention_metadata

    num_blocks = -(-len(ids) // block_size)
    md = make_attention_metadata([len(ids)], [len(ids)], [list(range(num_blocks))], block_size)
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(len(ids)), md))


def compile_ahead_of_time(script: str, jobs: dict) -> dict:
    """Run ``script`` (reads the JSON ``jobs`` on stdin, prints JSON results) in a fresh interpreter
    without TRITON_INTERPRET, so Triton compiles for real GPU targets; its parsed output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what launches use; set, it silences triton's warning
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(jobs), env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q/k (its inverse: unpermute_qk)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def hf_greedy_loop(hf_model: transformers.PreTrainedModel, prompt: list[int], max_new_tokens: int,
                   process=None) -> list[int]:
    """Greedy decoding by full forward passes; ``process(output_ids, logits)`` may edit the
    next token's logits [vocab] in place first (masks, biases, penalties)."""
    token_ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = hf_model(torch.tensor([token_ids]), logits_to_keep=1).logits[0, -1].float()
        if process is not None:
            process(token_ids[len(prompt):], logits)
        token_ids.append(int(logits.argmax()))
    return token_ids[len(prompt):]


# ---------------------------------------------------------------- engines

def make_llm(model: str | Path, **options) -> LLM:
    return LLM(str(model), **{**TINY_ENGINE_OPTIONS, **options})


def output_ids(outputs) -> list[list[int]]:
    """The first completion's token ids of each RequestOutput."""
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_leaks(llm: LLM) -> None:
    """The scheduler holds no request and every KV block is free."""
    stats = llm.get_stats()
    assert (stats["num_running"], stats["num_waiting"]) == (0, 0)
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert not llm.engine.has_unfinished_requests()



# ---------------------------------------------------------------- a byte-level checkpoint (structured outputs)

# The word tokenizer above cannot spell JSON, so structured-output tests use a GPT-2-style
# byte-level BPE instead: every byte is a token (any text can be written), ``<eos>`` is id 0.
BYTE_LEVEL_EOS_TOKEN_ID = 0
BYTE_LEVEL_CORPUS = (
    '{"name": "Ada", "age": 36, "city": "Paris", "tags": ["a", "b"], "ok": true, "x": null}',
    '[{"type": "cat"}, {"type": "dog", "size": 3}] [1, 2, 3] {"a": 1.5, "b": -2}',
    "yes no maybe red green blue (1 + 2) * 3 - 4 / 5 hello world abc-123",
)
BYTE_LEVEL_TOKENIZER_SIZE = 320  # 256 bytes + <eos> + merges
BYTE_LEVEL_VOCAB_SIZE = 352  # the logits width: padded past the tokenizer, as real checkpoints often are


def byte_level_config(**overrides) -> transformers.LlamaConfig:
    """A tiny Llama config for the byte-level tokenizer (EOS and BOS are ``<eos>``, id 0)."""
    options = dict(_BASE, vocab_size=BYTE_LEVEL_VOCAB_SIZE, max_position_embeddings=512,
                   bos_token_id=BYTE_LEVEL_EOS_TOKEN_ID,
                   eos_token_id=BYTE_LEVEL_EOS_TOKEN_ID, num_attention_heads=4, num_key_value_heads=2,
                   tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return transformers.LlamaConfig(**{**options, **overrides})


def save_byte_level_tokenizer(path: Path, corpus=BYTE_LEVEL_CORPUS,
                              vocab_size: int = BYTE_LEVEL_TOKENIZER_SIZE) -> transformers.PreTrainedTokenizerFast:
    """tokenmill's byte-level BPE (``tokenmill.testing.builders``) saved at ``path``."""
    from tokenmill.testing.builders import make_byte_level_tokenizer

    tokenizer = make_byte_level_tokenizer(corpus, vocab_size=vocab_size)
    assert tokenizer.eos_token_id == BYTE_LEVEL_EOS_TOKEN_ID
    tokenizer.save_pretrained(path)
    return tokenizer


def make_byte_level_checkpoint(path: Path, config: transformers.PretrainedConfig | None = None,
                               seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random Llama checkpoint (safetensors) at ``path`` whose tokenizer is the byte-level
    BPE; the config's vocabulary (the logits width) covers the tokenizer's and pads past it.
    EOS is id 0 in the config and the generation config. Returns the transformers model."""
    config = config or byte_level_config()
    tokenizer = save_byte_level_tokenizer(path)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} < the tokenizer's {len(tokenizer)} tokens")
    hf_model = make_hf_model(config, seed=seed)
    hf_model.generation_config.eos_token_id = BYTE_LEVEL_EOS_TOKEN_ID
    hf_model.generation_config.bos_token_id = BYTE_LEVEL_EOS_TOKEN_ID
    hf_model.save_pretrained(path)
    hf_model.generation_config.eos_token_id = None  # as make_hf_model: the reference ignores EOS
    return hf_model


def make_metadata(temperature: list[float], **overrides) -> SamplingMetadata:
    """Metadata for len(temperature) rows with nothing but temperatures set."""
    is_greedy = [t < SAMPLING_EPS for t in temperature]
    fields = dict(temperature=torch.tensor(temperature, dtype=torch.float32),
                  all_greedy=all(is_greedy), all_random=not any(is_greedy),
                  output_token_ids=[[] for _ in temperature])
    fields.update(overrides)
    return SamplingMetadata(**fields)


# ---------------------------------------------------------------- GGUF files as llama.cpp writes them

# what llama.cpp's converter does to weights, per GGUF architecture
GGUF_PERMUTED_QK = {"llama", "granite"}
GGUF_NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}


def quantize_k_quant(values, qtype):
    """float32 [rows, K] (K a multiple of 256) -> the uint8 rows [rows, K / 256 * type_size] of a K-quant
    (Q4_K, Q5_K or Q6_K), which gguf-py cannot quantize: a plain round-to-nearest quantizer (no search
    for the best scales, as llama.cpp's), in the block layouts of ``tokenmill.quantization.gguf``."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    rows, width = values.shape
    f16_bytes = lambda a: a.astype(np.float16).view(np.uint8).reshape(len(a), 2)  # noqa: E731
    if qtype == Q.Q6_K:  # 16 sub-blocks of 16: w = d * sc * (q - 32), q 6 bits, sc int8
        x = values.reshape(-1, 16, 16).astype(np.float32)
        sub = np.abs(x).max(-1) / 31
        d = (sub.max(-1) / 127).astype(np.float16)
        d32 = np.where(d == 0, 1, d).astype(np.float32)[:, None]
        sc = np.clip(np.ceil(sub / d32), 0, 127).astype(np.int8)
        step = d.astype(np.float32)[:, None] * sc
        q = np.clip(np.rint(x / np.where(step == 0, 1, step)[..., None]) + 32, 0, 63).astype(np.uint8)
        q = q.reshape(-1, 2, 4, 32)  # quant 128h + 32k + l
        ql = (q[:, :, :2] & 15) | ((q[:, :, 2:] & 15) << 4)  # [n, h, 2, 32]: ql[64h + 32j + l]
        qh = sum(((q[:, :, k] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8)  # [n, h, 32]
        blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), f16_bytes(d)], axis=1)
    elif qtype in (Q.Q4_K, Q.Q5_K):  # 8 sub-blocks of 32: w = d * sc * q - dmin * mn, sc and mn 6 bits
        bits = 4 if qtype == Q.Q4_K else 5
        x = values.reshape(-1, 8, 32).astype(np.float32)
        mins = np.maximum(-x.min(-1), 0)
        scales = (x.max(-1) + mins) / (2 ** bits - 1)
        d, dmin = (scales.max(-1) / 63).astype(np.float16), (mins.max(-1) / 63).astype(np.float16)
        sc = np.clip(np.ceil(scales / np.where(d == 0, 1, d).astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
        mn = np.clip(np.ceil(mins / np.where(dmin == 0, 1, dmin).astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
        step, low = d.astype(np.float32)[:, None] * sc, dmin.astype(np.float32)[:, None] * mn
        q = np.rint((x + low[..., None]) / np.where(step == 0, 1, step)[..., None])
        q = np.clip(q, 0, 2 ** bits - 1).astype(np.uint8)  # [n, sub-block, 32]
        packed_scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                                        (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
        pairs = (q & 15).reshape(-1, 4, 2, 32)
        qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
        parts = [f16_bytes(d), f16_bytes(dmin), packed_scales]
        if bits == 5:
            parts.append(sum(((q[:, s] >> 4) & 1) << s for s in range(8)).astype(np.uint8))  # qh[l]: bit s
        blocks = np.concatenate([*parts, qs], axis=1)
    else:
        raise ValueError(f"{qtype!r} is not a K-quant this quantizer writes")
    assert blocks.shape[1] == GGML_QUANT_SIZES[qtype][1]
    return np.ascontiguousarray(blocks).reshape(rows, -1)


def quantize_gguf(values, qtype):
    """float32 [rows, K] -> the uint8 rows of GGUF type ``qtype`` (gguf-py's quantizer, or
    ``quantize_k_quant`` for the K-quants gguf-py cannot write)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, quants

    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return quantize_k_quant(values, qtype)
    raw = quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)
    return np.ascontiguousarray(raw).view(np.uint8).reshape(values.shape[0], -1)


def write_llama_cpp_gguf(path, arch: str, hf_model: transformers.PreTrainedModel, tensor_type=None) -> None:
    """``hf_model`` as llama.cpp's converter writes GGUF architecture ``arch``: its metadata keys,
    gguf-py's tensor names, permuted q/k (llama, granite), norm weights + 1 (Gemma), Phi-3's LongRoPE
    factors as tensors, a mixture of experts' expert count and sizes and its experts stacked per layer
    (``ffn_{gate,up,down}_exps`` [E, rows, K]). Tensors are F32 but where ``tensor_type`` (a
    ``GGMLQuantizationType`` for every 2-D and 3-D tensor, or a function ``(gguf name, shape) -> type``)
    names another type: then the file holds that type's blocks (``quantize_gguf``, row by row) of the
    permuted, norm-shifted float tensor.

    test_model_families and test_moe_models write their GGUF files with it."""
    import math

    import gguf
    import numpy as np

    from tokenmill.plugins.models.rope import rope_parameters

    c = hf_model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    if arch == "starcoder2":
        writer.add_layer_norm_eps(c.norm_epsilon)
    else:
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch in ("qwen3", "gemma", "gemma2", "gemma3", "qwen3moe"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    num_experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if num_experts:  # mixture of experts (Mixtral as arch "llama", qwen2moe, qwen3moe, olmoe)
        writer.add_expert_count(num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        if getattr(c, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        if getattr(c, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if arch == "llama":  # LlamaModel's keys; transformers reads the vocabulary size from no tensor
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    rope = rope_parameters(c, "full_attention" if arch == "gemma3" else None)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if getattr(c, "sliding_window", None) is not None:
        writer.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
    if arch in ("gemma2", "gemma3") and c.final_logit_softcapping:
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "granite":
        writer.add_attention_scale(c.attention_multiplier)
        writer.add_embedding_scale(c.embedding_multiplier)
        writer.add_residual_scale(c.residual_multiplier)
        writer.add_logit_scale(c.logits_scaling)
    if arch == "phi3":
        rotary_dim = int(head_dim * rope["partial_rotary_factor"])
        writer.add_rope_dimension_count(rotary_dim)
        writer.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        original = c.original_max_position_embeddings
        scale = c.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    name_map = gguf.get_tensor_name_map(model_arch, c.num_hidden_layers)
    for hf_name, tensor in _llama_cpp_tensors(hf_model.state_dict()):
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if arch in GGUF_PERMUTED_QK and ".q_proj." in hf_name:
            tensor = llama_cpp_permute(tensor, c.num_attention_heads)
        elif arch in GGUF_PERMUTED_QK and ".k_proj." in hf_name:
            tensor = llama_cpp_permute(tensor, c.num_key_value_heads)
        if arch in GGUF_NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
            tensor = tensor + 1
        base, leaf = hf_name.rsplit(".", 1)
        name, values = f"{name_map.get_name(base)}.{leaf}", tensor.float().numpy()
        qtype = gguf.GGMLQuantizationType.F32
        if values.ndim in (2, 3) and tensor_type is not None:
            qtype = tensor_type(name, values.shape) if callable(tensor_type) else tensor_type
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:  # a 3-D expert tensor [E, rows, K]: each expert's rows quantized
            rows = quantize_gguf(values.reshape(-1, values.shape[-1]), qtype)
            writer.add_tensor(name, rows.reshape(*values.shape[:-1], -1), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp_tensors(state_dict):
    """(name, tensor) as llama.cpp's converter takes them: transformers 5 keeps each MoE layer's experts as
    ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]; the converter stacks
    the checkpoint's per-expert gate, up and down tensors into ``ffn_{gate,up,down}_exps`` [E, ...]."""
    for name, tensor in state_dict.items():
        if name.endswith(".experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            yield name.replace(".gate_up_proj", ".gate_proj.weight"), gate
            yield name.replace(".gate_up_proj", ".up_proj.weight"), up
        elif name.endswith(".experts.down_proj"):
            yield name + ".weight", tensor
        else:
            yield name, tensor


def gguf_weight(tensor: torch.Tensor, qtype=None):
    """A float tensor [rows, K] as a kept ``GGUFWeight`` of ``qtype`` (default Q8_0), as the loader yields
    a quantized GGUF tensor."""
    from gguf import GGMLQuantizationType

    from tokenmill.quantization.gguf import GGUFWeight

    qtype = GGMLQuantizationType.Q8_0 if qtype is None else qtype
    data = torch.from_numpy(quantize_gguf(tensor.detach().float().numpy(), qtype))
    return GGUFWeight(qtype, data, tensor.shape[1])


def paged_steps_logits(model, caches: list[torch.Tensor], vocab_size: int, block_size: int = 16) -> torch.Tensor:
    """The logits of every token of three steps of two requests through the paged KV cache, [33, vocab]:
    a 21-token prompt in chunks of 13 and 8 then one decode step, next to a 9-token prompt then two
    decode steps. ``caches`` (zeroed here) must hold 6 blocks of ``block_size`` >= 16."""
    from tokenmill.testing.builders import make_attention_metadata

    generator = torch.Generator().manual_seed(5)
    a, b = (torch.randint(len(SPECIAL_TOKENS), vocab_size, (n,), generator=generator) for n in (22, 11))
    tables = [[3, 0], [5]]
    for cache in caches:
        cache.zero_()
    logits = []
    with torch.inference_mode():
        for (a0, a1), (b0, b1) in (((0, 13), (0, 9)), ((13, 21), (9, 10)), ((21, 22), (10, 11))):
            md = make_attention_metadata([a1 - a0, b1 - b0], [a1, b1], tables, block_size)
            ids, positions = torch.cat([a[a0:a1], b[b0:b1]]), torch.cat([torch.arange(a0, a1), torch.arange(b0, b1)])
            logits.append(model.compute_logits(model(ids, positions, md)))
    return torch.cat(logits)


def build_local_model(cls, config: transformers.PretrainedConfig, num_blocks: int = 8, block_size: int = 16):
    """``cls``'s model of ``config`` as this tensor-parallel rank builds it (fp32, the torch attention backend
    with the rank's heads) with its KV caches of ``num_blocks`` blocks bound; (model, caches)."""
    from tokenmill.distributed import get_tensor_parallel
    from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend

    spec = cls.kv_cache_spec(config)
    heads, kv_heads = get_tensor_parallel().local_heads(config.num_attention_heads, spec.num_kv_heads)
    attention = TorchAttentionBackend(num_heads=heads, num_kv_heads=kv_heads, head_size=spec.head_size,
                                      dtype=torch.float32, device="cpu")
    model = cls(config, attention).float().eval()
    caches = [torch.zeros(attention.kv_cache_shape(num_blocks, block_size, kv_heads, spec.head_size))
              for _ in range(spec.num_layers)]
    model.bind_kv_caches(caches)
    return model, caches


def assert_switching_off_breaks_parity(hf_model, model, switch_off, seed: int = 7) -> None:
    """``model`` matches transformers over a 60-token prompt, and no longer does once ``switch_off(model)``
    removes the feature under test."""
    ids = torch.tensor(random_prompts([60], seed=seed)[0])
    expected = hf_logits(hf_model, ids)
    torch.testing.assert_close(prefill_logits(model, ids), expected, atol=2e-4, rtol=1e-3)
    switch_off(model)
    assert (prefill_logits(model, ids) - expected).abs().max() > 0.05


def hf_generate(hf_model: transformers.PreTrainedModel, prompt: list[int], max_new_tokens: int):
    """transformers' greedy ``generate``: (token ids, log_softmax of each step's logits [n, vocab])."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0, output_logits=True,
                                return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


def assert_engine_matches_transformers(path, hf_model, prompts: list[list[int]], max_tokens: int,
                                       min_distinct: int = 2, **options) -> LLM:
    """The engine on ``path`` generates transformers' greedy tokens for ``prompts``, logprobs within 2e-3,
    and leaks no KV block; the engine. ``min_distinct``: distinct tokens each reference output must hold
    (greedy on a tiny random model must not collapse onto one token, or parity proves little)."""
    import pytest

    from tokenmill.sampling_params import SamplingParams

    expected = [hf_generate(hf_model, prompt, max_tokens) for prompt in prompts]
    assert all(len(set(ids)) >= min_distinct for ids, _ in expected)
    llm = make_llm(path, **options)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    outputs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    for output, (ids, logprobs) in zip(outputs, expected):
        completion = output.outputs[0]
        assert completion.token_ids == ids
        ours = [entry[token].logprob for entry, token in zip(completion.logprobs, ids)]
        assert ours == pytest.approx(logprobs[torch.arange(len(ids)), ids].tolist(), abs=2e-3)
    assert_no_leaks(llm)
    return llm
