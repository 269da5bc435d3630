"""Multi-LoRA serving, the model side: PEFT adapter folders loaded, checked against the base model and
applied in the batch, each row with its own adapter (or none).

An adapter folder is what PEFT's ``save_pretrained`` writes for a transformers Llama-style model:

    adapter_config.json          r, lora_alpha, use_rslora, target_modules (q_proj .. down_proj)
    adapter_model.safetensors    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight [r, in]
                                 base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight [out, r]

PEFT adds ``scaling * B(A(x))`` to the projection's output, scaling = alpha / r (alpha / sqrt(r) with
rsLoRA); the scaling is folded into B when the adapter is loaded.

The worker's ``LoRAManager`` keeps ``max_loras`` device slots. Every LoRA-able ``Linear`` of the model
(a family declares them: ``lora_modules``) holds, per slot, A [S, R, K] and B [S, N, R] (R: the layer's
padded rank); a packed layer (qkv_proj, gate_up_proj) holds one A/B covering its shards:

    qkv_proj, R = 3 * max_lora_rank     A rows     [ q: 0..r | k: R/3..R/3+r | v: 2R/3..2R/3+r ]
                                        B          block diagonal: q's rows read A's q rows only, ...
    a shard the adapter does not target, or a rank below max_lora_rank: zeros (adds nothing)

Each step the runner asks ``prepare`` for its rows' slots (loading adapters into free or least recently
used slots), lays them out per token (``input_layout``: -1 = base model) and activates them
(``activate``); every LoRA layer then adds ``lora_apply`` to its output. A step without adapter rows
activates nothing, so the layers skip LoRA entirely, unless it replays a CUDA graph: graphs are captured
with LoRA on, reading the persistent token-slot buffer, so they serve any mix of adapters.

Loaded adapters stay in host memory (``max_cpu_loras`` of them, least recently used evicted) so a slot
refills without reading the folder again. Tensor parallelism is not supported with LoRA (a ConfigError).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .lora_request import LoRARequest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# the projections an adapter may target, as PEFT names them in a transformers Llama-style model
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# adapter_config options that change what PEFT computes beyond ``scaling * B(A(x))``
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False}


# ---------------------------------------------------------------- adapters on the host

@dataclass
class LoRAAdapter:
    """One adapter in host memory: ``weights[(layer, target)] = (A [r, in], B * scaling [out, r])``, fp32."""

    lora_int_id: int
    name: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def _fail(lora: LoRARequest, problem: str) -> ValueError:
    return ValueError(f"LoRA adapter '{lora.lora_name}' ({lora.lora_path}): {problem}")


def read_adapter_config(lora: LoRARequest) -> dict[str, Any]:
    folder = lora.lora_path
    if not os.path.isdir(folder):
        raise _fail(lora, "the adapter folder does not exist")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not os.path.isfile(os.path.join(folder, name)):
            raise _fail(lora, f"missing {name} (a PEFT adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise _fail(lora, f"unreadable {ADAPTER_CONFIG}: {exc}") from None
    if not isinstance(config, dict):
        raise _fail(lora, f"{ADAPTER_CONFIG} is not a JSON object")
    return config


def load_adapter(lora: LoRARequest, module_shapes: Mapping[str, tuple[int, int]], num_layers: int,
                 max_lora_rank: int) -> LoRAAdapter:
    """Read and check an adapter folder against the base model (``module_shapes``: each target's
    (out, in) in the checkpoint); errors are ValueErrors naming the adapter."""
    config = read_adapter_config(lora)
    if config.get("peft_type", "LORA") != "LORA":
        raise _fail(lora, f"peft_type {config.get('peft_type')!r} is not LORA")
    for option, off in _UNSUPPORTED.items():
        if config.get(option, off) != off:
            raise _fail(lora, f"{option}={config[option]!r} is not supported")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise _fail(lora, "trained biases and modules_to_save are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise _fail(lora, "rank_pattern / alpha_pattern are not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _fail(lora, f"r must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise _fail(lora, f"rank r={rank} is above max_lora_rank={max_lora_rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise _fail(lora, f"lora_alpha must be a number, got {alpha!r}")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        unknown = sorted(set(targets) - set(module_shapes))
        if unknown:
            raise _fail(lora, f"unknown target module(s) {unknown}; supported: {sorted(module_shapes)}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.path.join(lora.lora_path, ADAPTER_WEIGHTS))
    except Exception as exc:  # a truncated or foreign file
        raise _fail(lora, f"unreadable {ADAPTER_WEIGHTS}: {exc}") from None
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise _fail(lora, f"unknown tensor '{key}' (only the LoRA A/B of {list(LORA_TARGETS)} are supported)")
        layer, target, half = int(match[1]), match[2], match[3]
        if target not in module_shapes:
            raise _fail(lora, f"unknown target module '{target}' in '{key}'; supported: {sorted(module_shapes)}")
        if layer >= num_layers:
            raise _fail(lora, f"'{key}' is for layer {layer}, the base model has {num_layers} layers "
                              "(an adapter of another base model)")
        halves.setdefault((layer, target), {})[half] = tensor
    weights = {}
    for (layer, target), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise _fail(lora, f"layer {layer} {target} has lora_{''.join(pair)} only")
        out_features, in_features = module_shapes[target]
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise _fail(lora, f"layer {layer} {target}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                              f"the base model's {target} (expected {(rank, in_features)} / {(out_features, rank)}): "
                              "an adapter of another base model")
        weights[(layer, target)] = (a.float().contiguous(), (b.float() * scaling).contiguous())
    if not weights:
        raise _fail(lora, f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    return LoRAAdapter(lora.lora_int_id, lora.lora_name, rank, scaling, weights)


def model_lora_shapes(model_cls: type, hf_config: Any) -> dict[str, tuple[int, int]]:
    """Each LoRA target's checkpoint (out, in) for this model, from the family's ``lora_module_shapes``."""
    shapes = getattr(model_cls, "lora_module_shapes", None)
    if shapes is None:
        raise ValueError(f"{model_cls.__qualname__} declares no LoRA modules (lora_modules)")
    return dict(shapes(hf_config))


def validate_adapter(lora_request: LoRARequest, model_cls: type, hf_config: Any, max_lora_rank: int) -> None:
    """Raise a ValueError naming the adapter if it cannot run on this base model (the engine checks
    each adapter when a request brings it, before it is queued)."""
    load_adapter(lora_request, model_lora_shapes(model_cls, hf_config), hf_config.num_hidden_layers, max_lora_rank)


# ---------------------------------------------------------------- device slots

class LoRAStepState:
    """What every LoRA layer reads during a forward: the step's token slots (int32 [T], -1 = base), or
    None when the step runs no adapter (the layers then skip LoRA)."""

    __slots__ = ("token_slots",)

    def __init__(self) -> None:
        self.token_slots: torch.Tensor | None = None


class LinearLoRA:
    """The LoRA slots of one ``Linear``: ``lora_a`` [S, R, K], ``lora_b`` [S, N, R]; ``targets``: the
    adapter target of each of the layer's shards (in row order), ``shard_rows`` their row counts."""

    def __init__(self, layer: nn.Module, targets: Sequence[str], max_loras: int, max_rank: int,
                 state: LoRAStepState, device: torch.device, dtype: torch.dtype) -> None:
        self.targets = tuple(targets)
        self.shard_rows = tuple(layer.shard_sizes)
        if len(self.shard_rows) != len(self.targets):
            raise ValueError(f"a Linear with {len(self.shard_rows)} shards declared as LoRA targets {self.targets}")
        self.rank = max_rank
        width = max_rank * len(self.targets)
        self.lora_a = torch.zeros((max_loras, width, layer.in_features), dtype=dtype, device=device)
        self.lora_b = torch.zeros((max_loras, layer.out_features, width), dtype=dtype, device=device)
        self.state = state
        from tokenmill.kernels.lora import lora_apply  # imports Triton: only when adapters are served

        self._lora_apply = lora_apply

    def write(self, slot: int, layer_index: int, adapter: LoRAAdapter) -> None:
        """Fill ``slot`` with the adapter's weights for this layer (zeros where it has none)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        row = 0
        for i, (target, rows) in enumerate(zip(self.targets, self.shard_rows)):
            pair = adapter.weights.get((layer_index, target))
            if pair is not None:
                a, b = pair
                r, col = a.shape[0], i * self.rank
                self.lora_a[slot, col: col + r].copy_(a)
                self.lora_b[slot, row: row + rows, col: col + r].copy_(b)
            row += rows

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y`` [T, N] += each token's adapter delta of ``x`` [T, K] (in place; Triton on CUDA)."""
        x = x.to(self.lora_a.dtype)
        self._lora_apply(x if x.stride(-1) == 1 else x.contiguous(), self.lora_a, self.lora_b,
                         self.state.token_slots, y)


class LoRAManager:
    """The worker's adapters: ``max_loras`` device slots (least recently used refilled) over a host cache of
    ``max_cpu_loras`` loaded adapters (least recently used dropped). Attaches a ``LinearLoRA`` to every
    module the model class lists in ``lora_modules`` ({path under each decoder layer: its shards' targets})."""

    def __init__(self, model: nn.Module, hf_config: Any, *, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int, device: torch.device, dtype: torch.dtype) -> None:
        model_cls = type(model)
        self.module_shapes = model_lora_shapes(model_cls, hf_config)
        self.num_layers = hf_config.num_hidden_layers
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.state = LoRAStepState()
        self.layers: list[tuple[int, LinearLoRA]] = []
        for index, block in enumerate(model.layers):
            for path, targets in model_cls.lora_modules.items():
                try:
                    layer = block.get_submodule(path)
                except AttributeError:
                    continue  # this layer's block has no such module (an MoE layer's MLP)
                lora = LinearLoRA(layer, targets, max_loras, max_lora_rank, self.state, device, dtype)
                layer.lora = lora
                self.layers.append((index, lora))
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # id -> adapter, least recent first
        self._slots: OrderedDict[int, int] = OrderedDict()  # id -> device slot, least recent first
        self._free = list(range(max_loras))
        self.num_host_loads = 0  # adapter folders read
        self.num_slot_loads = 0  # adapters written into a device slot

    def load(self, lora: LoRARequest) -> LoRAAdapter:
        """The adapter from the host cache, read from its folder on a miss."""
        adapter = self._host.get(lora.lora_int_id)
        if adapter is None:
            adapter = load_adapter(lora, self.module_shapes, self.num_layers, self.max_lora_rank)
            self.num_host_loads += 1
            while len(self._host) >= self.max_cpu_loras:
                self._host.popitem(last=False)
            self._host[lora.lora_int_id] = adapter
        self._host.move_to_end(lora.lora_int_id)
        return adapter

    def prepare(self, adapters: Sequence[LoRARequest | None]) -> np.ndarray:
        """Each row's device slot (int32, -1 = base model), loading the step's adapters (at most
        ``max_loras`` distinct ones: the scheduler's promise) into free or least recently used slots."""
        slots = np.full(len(adapters), -1, dtype=np.int32)
        wanted = {lora.lora_int_id: lora for lora in adapters if lora is not None}
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step runs {len(wanted)} adapters, more than max_loras={self.max_loras}")
        for lora_id, lora in wanted.items():
            if lora_id not in self._slots:
                if self._free:
                    slot = self._free.pop()
                else:
                    victim = next(i for i in self._slots if i not in wanted)
                    slot = self._slots.pop(victim)
                adapter = self.load(lora)
                for layer_index, layer in self.layers:
                    layer.write(slot, layer_index, adapter)
                self.num_slot_loads += 1
                self._slots[lora_id] = slot
            self._slots.move_to_end(lora_id)
        for i, lora in enumerate(adapters):
            if lora is not None:
                slots[i] = self._slots[lora.lora_int_id]
        return slots

    def activate(self, token_slots: torch.Tensor | None) -> None:
        """The slots the next forward's tokens use (None: no adapter, the layers skip LoRA)."""
        self.state.token_slots = token_slots

    @property
    def resident(self) -> dict[int, int]:
        """Adapter id -> device slot, for the adapters now in a slot."""
        return dict(self._slots)
