"""fp8 weights (``quantization="fp8"``): a bf16/fp16/fp32 checkpoint quantized at load.

    W [out, in] ──per output channel: scale = amax(|W[o]|) / 448──> q = W / scale as float8_e4m3fn
    x @ W.T  =  (x @ q.T) * scale            (scale broadcast over the output columns)

On a CUDA device with fp8 tensor cores (compute capability 8.9 or newer) the product runs in
``torch._scaled_mm``: x is quantized per token (its own amax, dynamically, as vLLM's dynamic fp8
does) and both scales are applied to the fp32 accumulator. Elsewhere (CPU, older GPUs) the same
weight is dequantized a tile of output channels at a time and multiplied in x's dtype: the same
values, so CPU tests check the code a GPU runs but for the activation rounding.
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_TILE_ROWS = 1024  # output channels dequantized at once on the emulated path


def has_fp8_matmul(device: torch.device) -> bool:
    """Whether ``device`` multiplies fp8 natively (``torch._scaled_mm`` on sm_89+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Weight:
    """A weight [out_features, in_features] as e4m3 values and one float32 scale per output channel."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor) -> None:
        if data.dtype != FP8 or data.dim() != 2 or scale.shape != (data.shape[0],):
            raise ValueError(f"an fp8 weight needs float8_e4m3fn data [out, in] and float32 scales [out], got "
                             f"{data.dtype} {list(data.shape)} and {list(scale.shape)}")
        self.data = data
        self.scale = scale.float()
        self.out_features, self.in_features = data.shape

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Fp8Weight:
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        # rows contiguous whatever the layout of ``weight`` (a CPU Linear keeps its weight column-major)
        return cls((w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if has_fp8_matmul(x2.device) and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            out = self._scaled_mm(x2)
        else:
            out = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
            for start in range(0, self.out_features, _TILE_ROWS):
                rows = slice(start, start + _TILE_ROWS)
                tile = self.data[rows].to(x.dtype) * self.scale[rows, None].to(x.dtype)
                out[:, rows] = x2 @ tile.T
        return out.reshape(*x.shape[:-1], self.out_features)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        x_scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        xq = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return torch._scaled_mm(xq, self.data.T, scale_a=x_scale, scale_b=self.scale[None, :],
                                out_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16).to(x.dtype)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        data, scale = (self.data, self.scale) if rows is None else (self.data[rows], self.scale[rows])
        return data.float() * scale[..., None]

    def take_rows(self, index: torch.Tensor) -> Fp8Weight:
        """The weight made of rows ``index`` (int64 [n]), each with its own scale."""
        index = index.to(self.data.device)
        return Fp8Weight(self.data[index], self.scale[index])

    def take_columns(self, start: int, stop: int) -> Fp8Weight:
        """Input columns ``start:stop``; the scales stay those of the whole rows, so the values are unchanged."""
        return Fp8Weight(self.data[:, start:stop].contiguous(), self.scale)

    def to(self, device: torch.device) -> Fp8Weight:
        return Fp8Weight(self.data.to(device), self.scale.to(device))
