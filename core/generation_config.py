"""A model's ``generation_config.json``: its end-of-sequence ids and its sampling defaults.

The engine option ``generation_config`` takes vLLM's values:

    "auto"   read generation_config.json beside the checkpoint (next to a .gguf file), if there is one
    "vllm"   ignore it: the engine's own defaults
    PATH     read PATH/generation_config.json (it must exist)

Two things come from the file:

- ``eos_token_id`` (an id or a list): every id ends generation, not only the tokenizer's
  EOS (Llama 3 ends turns with <|eot_id|>, Qwen with <|im_end|>). The ids besides the
  tokenizer's join each request's ``stop_token_ids`` unless it sets ``ignore_eos``, so a
  request they end reports the id as its ``stop_reason``, as vLLM does.
- sampling defaults: ``temperature``, ``top_p``, ``top_k``, ``min_p``,
  ``repetition_penalty`` and ``max_new_tokens`` (as ``max_tokens``), applied where a
  request leaves the field unset: ``LLM.generate`` without sampling params, and every
  server request field that is absent.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .sampling_params import SamplingParams

FILE_NAME = "generation_config.json"
# generation_config.json key -> SamplingParams field
SAMPLING_DEFAULT_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: tuple[int, ...] = ()  # every id that ends generation, the tokenizer's included or not
    sampling: Mapping[str, Any] = field(default_factory=dict)  # SamplingParams field -> default

    def default_sampling_params(self) -> SamplingParams:
        """What a request gets when it gives no sampling parameters."""
        return SamplingParams(**self.sampling)


def load_generation_defaults(option: str, model_dir: Path) -> GenerationDefaults:
    """The defaults ``option`` ("auto", "vllm" or a folder) selects for the checkpoint in ``model_dir``."""
    if option == "vllm":
        return GenerationDefaults()
    folder = Path(model_dir) if option == "auto" else Path(option)
    path = folder / FILE_NAME
    if not path.is_file():
        if option == "auto":
            return GenerationDefaults()
        raise ConfigError(f"generation_config: no {FILE_NAME} in '{option}' (give a folder holding one, "
                          "'auto' for the model's own, or 'vllm' for the engine defaults)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"generation_config: cannot read '{path}': {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"generation_config: '{path}' must hold a JSON object")
    return GenerationDefaults(_eos_ids(data.get("eos_token_id"), path), _sampling(data, path))


def _eos_ids(value: Any, path: Path) -> tuple[int, ...]:
    ids = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ConfigError(f"generation_config: eos_token_id in '{path}' must be a token id or a list of them, "
                          f"got {value!r}")
    return tuple(dict.fromkeys(ids))


def _sampling(data: Mapping[str, Any], path: Path) -> dict[str, Any]:
    sampling = {name: data[key] for key, name in SAMPLING_DEFAULT_FIELDS.items() if data.get(key) is not None}
    try:
        SamplingParams(**sampling)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"generation_config: '{path}' holds a default the engine refuses: {exc}") from None
    return sampling
