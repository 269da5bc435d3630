"""``LoRARequest``: which adapter a request runs with (vLLM's name and fields).

    LoRARequest(lora_name="sql", lora_int_id=1, lora_path="/adapters/sql")

``lora_path`` is a PEFT adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``);
``lora_int_id`` identifies the adapter across requests (1 or more: 0 is the base model), and
requests with the same id share its weights and their prefix-cache blocks.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1 (0 is the base model), got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must be a non-empty string (a PEFT adapter folder), got {self.lora_path!r}")

    @property
    def cache_key(self) -> str:
        """What joins a request's first prefix-cache block hash: blocks are never shared across adapters
        or with the base model."""
        return f"lora:{self.lora_int_id}"
