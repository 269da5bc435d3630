"""GGUF checkpoints: llama.cpp tensor names and layouts back to HuggingFace ones.

transformers reads a GGUF's config and tokenizer (``gguf_file=``); this module
reads its tensors with ``gguf.GGUFReader``, dequantizes them to float32 and
renames them, so a model's ``load_weights`` sees the same names and shapes as
from a safetensors checkpoint.

Shapes: GGUF lists dimensions innermost first (``token_embd.weight`` is
``[hidden, vocab]``); reversed, that is the HuggingFace ``[vocab, hidden]``.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# llama.cpp architectures whose tensors this module can rename; the value says
# whether convert_hf_to_gguf.py permuted the q/k rows (see ``unpermute_qk``).
_ARCHITECTURES = {"llama": True, "qwen2": False}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in _BLOCK_NAMES:
        if gguf_name == "rope_freqs.weight":
            raise ValueError("GGUF tensor 'rope_freqs.weight' holds Llama 3.1-style rope scaling factors, which "
                             "the config read from GGUF metadata does not describe; use the HuggingFace "
                             "safetensors checkpoint for this model")
        raise ValueError(f"GGUF tensor '{gguf_name}' has no HuggingFace counterpart; known tensors: "
                         f"{sorted(_GLOBAL_NAMES)} and blk.N.{{{', '.join(_BLOCK_NAMES)}}}.{{weight,bias}}")
    return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.{match[3]}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's ``permute`` of a Llama q or k projection (weight or bias).

    HuggingFace rotates the two halves of each head (rotate_half); llama.cpp
    rotates adjacent pairs, so the converter interleaves the halves' rows:

        HF rows of one head:    a0 a1 a2 a3 | b0 b1 b2 b3      view [heads, 2, half]
        GGUF rows of one head:  a0 b0 a1 b1 a2 b2 a3 b3        view [heads, half, 2]

    ``num_heads`` is the query heads for q and the KV heads for k.
    """
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def iter_gguf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HuggingFace name, float32 tensor) for every tensor in the file, one at a time."""
    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture '{arch}' in {path} is not supported; tokenmill reads GGUF "
                         f"tensors of {sorted(_ARCHITECTURES)}")
    num_heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    head_counts = {"attn_q": num_heads, "attn_k": num_heads if kv_field is None else int(kv_field.contents())}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        # np.array copies: the reader's arrays are read-only views of a memory map
        data = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        weight = torch.from_numpy(data)
        block_tensor = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if _ARCHITECTURES[arch] and block_tensor in head_counts:
            weight = unpermute_qk(weight, head_counts[block_tensor])
        yield name, weight



def fix_gguf_config(config: Any) -> Any:
    """Repair the HuggingFace config that transformers builds from GGUF metadata.

    - ``architectures`` is missing: derive it from ``model_type`` (llama ->
      LlamaForCausalLM), as the checkpoint's own config.json would say.
    - GGUF stores ``rms_norm_eps`` and ``rope_theta`` as float32
      (1e-5 -> 9.999999747378752e-06): restore the shortest decimal.
    """
    if not getattr(config, "architectures", None):
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        config.architectures = [arch] if arch else None
    if isinstance(getattr(config, "rms_norm_eps", None), float):
        config.rms_norm_eps = _shortest_float32(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and isinstance(rope.get("rope_theta"), float):
        rope["rope_theta"] = _shortest_float32(rope["rope_theta"])
    elif isinstance(getattr(config, "rope_theta", None), float):
        config.rope_theta = _shortest_float32(config.rope_theta)
    return config


def _shortest_float32(value: float) -> float:
    return float(str(np.float32(value)))
