"""GGUF checkpoints: llama.cpp tensor names and layouts back to a model class's checkpoint ones.

transformers reads a GGUF's config and tokenizer (``gguf_file=``); this module
reads its tensors with ``gguf.GGUFReader``, dequantizes them to float32 and
renames them with the model class's ``gguf_names``, so its ``load_weights`` sees the
same names and shapes as from a safetensors checkpoint.

Shapes: GGUF lists dimensions innermost first (``token_embd.weight`` is
``[hidden, vocab]``); reversed, that is the HuggingFace ``[vocab, hidden]``.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .model_base import GGUFNames

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


def iter_gguf_weights(path: Path, names: Mapping[str, GGUFNames],
                      model: str = "the model class") -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, float32 tensor) for every tensor in the file, one at a time;
    ``names``: the model class's ``gguf_names``."""
    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in names:
        raise ValueError(f"GGUF architecture '{arch}' in {path} is not one {model} reads; it reads "
                         f"{sorted(names) or 'no GGUF'}")
    arch_names = names[arch]
    num_heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    head_counts = {"attn_q": num_heads, "attn_k": num_heads if kv_field is None else int(kv_field.contents())}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            raise ValueError("GGUF tensor 'rope_freqs.weight' holds Llama 3.1-style rope scaling factors, which "
                             "the config read from GGUF metadata does not describe; use the HuggingFace "
                             "safetensors checkpoint for this model")
        name = arch_names.checkpoint_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        # np.array copies: the reader's arrays are read-only views of a memory map
        data = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        weight = torch.from_numpy(data)
        block_tensor = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if arch_names.permuted_qk and block_tensor in head_counts:
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
