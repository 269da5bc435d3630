"""The mixture-of-experts feed-forward the MoE families share (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE),
and the decoder that loads its experts.

One sparse MLP on a flat run of T tokens:

    x [T, H] ──gate (router)──> logits [T, E] ──softmax (fp32)──> top-k ──[÷ their sum]──> weights, ids [T, k]
    x ──experts──> out[t] = Σ_j weights[t, j] · down_e(act(gate_e(x_t)) · up_e(x_t)),  e = ids[t, j]
    [Qwen2-MoE: out += sigmoid(shared_expert_gate(x)) · shared_expert(x),  a dense gated MLP]

The families differ in two routing details, each as its transformers reference does:

    renormalize    the top-k probabilities divided by their sum: always (Mixtral), or the config's
                   ``norm_topk_prob`` (Qwen2-MoE, Qwen3-MoE, OLMoE)
    round_weights  the routing weights rounded to the activation dtype before they scale the experts'
                   outputs (Qwen, OLMoE), or kept in fp32 (Mixtral); the same in fp32, not in bf16

Expert weights are stacked per layer, in the model dtype, as ``tokenmill.kernels.fused_moe`` takes them:

    experts.w13  [E, 2I, H]   rows 0..I-1 each expert's gate projection, rows I..2I-1 its up projection
    experts.w2   [E, H, I]    each expert's down projection

On CUDA the layer runs ``fused_moe`` (two grouped Triton GEMMs, no host sync: CUDA graphs capture it),
elsewhere ``fused_moe_reference``, which computes only the experts that received a token. The router
is a ``tokenmill.layers.Linear`` built with ``logits=True``: like the logits head, near ties decide
which experts run, so a quantized router multiplies in float32 and fp8 leaves it in the model dtype.
The experts stay in the model dtype under every ``quantization`` (the kernel multiplies model-dtype
weights): a GGUF file's quantized 3-D expert tensors are expanded at load, its 2-D tensors (attention,
router, shared expert, dense layers) stay quantized as in any family, and fp8 quantizes the attention,
shared-expert and dense-layer projections only.

Tensor parallelism: each rank keeps its slice of every expert's intermediate dimension (the same rows
of gate and of up in w13, those columns of w2), so its ``fused_moe`` output is a partial sum over the
intermediate features, all-reduced once; the router is replicated (every rank routes every token the
same way), as is the shared expert's gate, and the shared expert is a ``GatedMLP`` (column / row
parallel, its own all-reduce).

Checkpoints name the experts three ways, all loaded here (``MoEDecoderForCausalLM.load_weights``):

    HF files         layers.N.mlp.experts.M.{gate,up,down}_proj.weight     (Mixtral: block_sparse_moe.
                     experts.M.{w1,w3,w2}.weight, its router block_sparse_moe.gate.weight)
    transformers 5   layers.N.mlp.experts.gate_up_proj [E, 2I, H], layers.N.mlp.experts.down_proj [E, H, I]
    GGUF             blk.N.ffn_{gate,up,down}_exps -> layers.N.mlp.experts.{gate,up,down}_proj.weight, stacked
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from tokenmill.distributed import get_tensor_parallel
from tokenmill.layers import Linear
from tokenmill.quantization import QuantizedWeight

from .decoder import DecoderForCausalLM
from .layers import GatedMLP

__all__ = ["Experts", "SparseMoE", "MoEDecoderForCausalLM", "sparse_moe", "route", "MOE_GGUF_BLOCK_NAMES",
           "SHARED_EXPERT_GGUF_BLOCK_NAMES"]

# llama.cpp's expert tensors (gguf-py's tensor name map) -> the checkpoint names load_weights takes;
# the three expert tensors are stacked [E, ...]
MOE_GGUF_BLOCK_NAMES = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj",
                        "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj"}
SHARED_EXPERT_GGUF_BLOCK_NAMES = {"ffn_gate_shexp": "mlp.shared_expert.gate_proj",
                                  "ffn_up_shexp": "mlp.shared_expert.up_proj",
                                  "ffn_down_shexp": "mlp.shared_expert.down_proj",
                                  "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}

# hidden_act -> the fused kernel's name for it
_KERNEL_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

# layers.N.mlp.experts[.M].<projection>[.weight]: per expert (M) or stacked (no M)
_EXPERT_TENSOR = re.compile(r"(?:model\.)?(layers\.\d+\.mlp\.experts)\.(?:(\d+)\.)?"
                            r"(gate_up_proj|gate_proj|up_proj|down_proj|w1|w2|w3)(?:\.weight)?")
_EXPERT_KINDS = {"gate_up_proj": "gate_up", "gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up",
                 "down_proj": "down", "w2": "down"}


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice for each token: (weights fp32 [T, k], expert ids int64 [T, k]) from its
    logits [T, E]: the softmax over all experts in fp32, its k largest, divided by their sum when
    ``renormalize``."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Experts(nn.Module):
    """E gated MLPs of intermediate size I, stacked (``w13``, ``w2``: see the module docstring), this
    tensor-parallel rank's slice of I only; ``forward`` gives their routing-weighted sum, all-reduced.

    ``load`` takes one checkpoint tensor at a time, whole (all of I, like every layer here) and in any of
    the layouts in the module docstring; ``loaded_parameters`` says which of ``w13`` and ``w2`` every
    expert's tensors have filled, so the loader reports a checkpoint that lacks one expert."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, act: str,
                 what: str = "moe_intermediate_size") -> None:
        super().__init__()
        if act not in _KERNEL_ACTIVATIONS:
            raise ValueError(f"hidden_act of a mixture-of-experts layer must be one of {list(_KERNEL_ACTIVATIONS)}, "
                             f"got {act!r}")
        self.activation = _KERNEL_ACTIVATIONS[act]
        self.tensor_parallel = tp = get_tensor_parallel()
        self.start, self.count = tp.split(intermediate_size, what)  # this rank's features of I
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.count, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.count))
        self._loaded: dict[str, set[int]] = {"gate": set(), "up": set(), "down": set()}

    def load(self, kind: str, tensor: torch.Tensor | QuantizedWeight, expert: int | None = None) -> None:
        """Copy one checkpoint tensor: ``kind`` "gate", "up", "down" or "gate_up" (gate rows then up rows),
        of expert ``expert`` ([I, H], [H, I], [2I, H]), or of every expert stacked when None ([E, ...]).
        A quantized (2-D, per-expert) tensor is expanded to the model dtype."""
        if isinstance(tensor, QuantizedWeight):
            tensor = tensor.dequantize()
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} of a layer with {self.num_experts} experts")
        size, hidden = self.intermediate_size, self.hidden_size
        shape = {"gate": (size, hidden), "up": (size, hidden), "gate_up": (2 * size, hidden), "down": (hidden, size)}
        expected = shape[kind] if expert is not None else (self.num_experts, *shape[kind])
        if tuple(tensor.shape) != expected:
            what = "stacked experts" if expert is None else f"expert {expert}"
            raise ValueError(f"{kind} weight of {what} has shape {tuple(tensor.shape)}, expected {expected}")
        w13, w2 = (self.w13, self.w2) if expert is None else (self.w13[expert], self.w2[expert])
        start, count = self.start, self.count
        with torch.no_grad():
            if kind in ("gate", "gate_up"):
                w13[..., :count, :].copy_(tensor[..., start:start + count, :])
            if kind in ("up", "gate_up"):
                offset = size if kind == "gate_up" else 0
                w13[..., count:, :].copy_(tensor[..., offset + start:offset + start + count, :])
            if kind == "down":
                w2.copy_(tensor[..., start:start + count])
        experts = range(self.num_experts) if expert is None else (expert,)
        for part in ("gate", "up") if kind == "gate_up" else (kind,):
            self._loaded[part].update(experts)

    def loaded_parameters(self) -> set[str]:
        """``w13`` once every expert's gate and up are loaded, ``w2`` once every down is."""
        full = {part for part, experts in self._loaded.items() if len(experts) == self.num_experts}
        return ({"w13"} if {"gate", "up"} <= full else set()) | ({"w2"} if "down" in full else set())

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_weights [T, k] (any float dtype), topk_ids int [T, k] -> [T, H] in x's dtype."""
        from tokenmill.kernels.fused_moe import fused_moe, fused_moe_reference  # imports Triton: only when run

        moe = fused_moe if x.is_cuda else fused_moe_reference
        out = moe(x.contiguous(), self.w13, self.w2, topk_weights, topk_ids, self.activation)
        return self.tensor_parallel.all_reduce(out)

    def extra_repr(self) -> str:
        parallel = f", features {self.start}:{self.start + self.count}" if self.count != self.intermediate_size else ""
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}{parallel}, activation={self.activation!r}")


class SparseMoE(nn.Module):
    """The sparse MLP of one layer (module docstring): ``gate`` the router, ``experts``, and with
    ``shared_intermediate_size`` a ``shared_expert`` scaled per token by sigmoid(``shared_expert_gate``).
    Names follow the HuggingFace checkpoints (``mlp.gate``, ``mlp.shared_expert_gate``...)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, act: str, *,
                 renormalize: bool, round_weights: bool, shared_intermediate_size: int | None = None,
                 what: str = "moe_intermediate_size") -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}] (the experts), got {top_k}")
        self.top_k, self.renormalize, self.round_weights = top_k, renormalize, round_weights
        self.gate = Linear(hidden_size, num_experts, bias=False, logits=True)
        self.experts = Experts(hidden_size, num_experts, intermediate_size, act, what)
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, act)
            self.shared_expert_gate = Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, H]
        weights, ids = route(self.gate(flat), self.top_k, self.renormalize)
        if self.round_weights:
            weights = weights.to(x.dtype)
        out = self.experts(flat, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(x.shape)


def sparse_moe(config: Any, *, num_experts: int, intermediate_size: int, renormalize: bool, round_weights: bool,
               shared_intermediate_size: int | None = None,
               what: str = "moe_intermediate_size") -> Callable[[], SparseMoE]:
    """A builder of the config's sparse MLP (``num_experts_per_tok`` of ``num_experts``, ``hidden_act``);
    ``what``: the config field of ``intermediate_size``, for the error when it does not split across
    tensor-parallel ranks."""
    return lambda: SparseMoE(config.hidden_size, num_experts, config.num_experts_per_tok, intermediate_size,
                             config.hidden_act, renormalize=renormalize, round_weights=round_weights,
                             shared_intermediate_size=shared_intermediate_size, what=what)


class MoEDecoderForCausalLM(DecoderForCausalLM):
    """The decoder skeleton with sparse MLPs: ``load_weights`` also takes the experts' tensors, in each
    layout of the module docstring, and Mixtral's ``block_sparse_moe`` names."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        experts: dict[str, Experts] = {}

        def the_others() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = name.replace(".block_sparse_moe.", ".mlp.")
                match = _EXPERT_TENSOR.fullmatch(name)
                if match is None:
                    if name.endswith(".mlp.shared_expert_gate.weight") and isinstance(tensor, torch.Tensor) \
                            and tensor.dim() == 1:
                        tensor = tensor[None]  # llama.cpp may store the gate's one row as a vector
                    yield name, tensor
                    continue
                prefix = match[1]
                module = experts.get(prefix)
                if module is None:
                    module = experts[prefix] = self._experts(prefix, name)
                module.load(_EXPERT_KINDS[match[3]], tensor, None if match[2] is None else int(match[2]))

        loaded = super().load_weights(the_others())
        for prefix, module in experts.items():
            loaded |= {f"{prefix}.{leaf}" for leaf in module.loaded_parameters()}
        return loaded

    def _experts(self, prefix: str, name: str) -> Experts:
        try:
            module = self.get_submodule(prefix)
        except AttributeError:
            module = None
        if not isinstance(module, Experts):
            raise ValueError(f"unexpected weight '{name}': {type(self).__name__} for this config has no experts "
                             f"'{prefix}' (a dense layer, or no such layer)")
        return module
