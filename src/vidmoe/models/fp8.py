"""fp8 (e4m3) weights for the experts' linear layers: one byte per weight plus a scale per row.

`FP8Linear` stores `weight` as float8_e4m3fn and `scale_weight` (float32, one per output channel)
so that the real weight is `weight * scale_weight[:, None]`; the names are ComfyUI's
`fp8_scaled` names, so such files load into it without a key map. The forward dequantises one
layer at a time to the input's dtype (any device, the CPU included); on GPUs with fp8 tensor cores
`matmul="scaled"` multiplies in fp8 instead (`torch._scaled_mm`, the input quantised per row).

Shape legend: O output features, I input features, M rows of the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MATMULS = ("dequant", "scaled")
# The linear layers of a Wan block that hold most of its weights. Embeddings, modulation and the
# head stay in the compute dtype, as ComfyUI's fp8 files keep them.
BLOCK_LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "cross_attn.k_img",
    "cross_attn.v_img",
    "ffn.0",
    "ffn.2",
)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3 quantisation.

    Args:
        weight: (O, I) in any float dtype.
    Returns:
        (O, I) float8_e4m3fn values and (O,) float32 scales with weight ~= q * scale[:, None].
    """
    w = weight.detach().float()  # (O, I)
    amax = w.abs().amax(dim=1)  # (O,)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # (O,) all-zero rows: 1
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # (O, I)
    return q, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(O, I) fp8 values times (O,) or () scales -> (O, I) in `dtype` (computed in float32)."""
    scale = scale.float()
    if scale.ndim == 1:
        scale = scale[:, None]  # (O, 1)
    return (weight.float() * scale).to(dtype)


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored in fp8 (e4m3) with one float32 scale per row."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        matmul: str = "dequant",
        device=None,
    ):
        super().__init__()
        if matmul not in MATMULS:
            raise ValueError(f"matmul must be one of {', '.join(MATMULS)}; got {matmul!r}")
        self.in_features, self.out_features, self.matmul = in_features, out_features, matmul
        self.compute_dtype = dtype  # what the block computes in (the dtype the weight stood for)
        w = torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)  # (O, I) fp8
        self.register_buffer("scale_weight", torch.ones(out_features, device=device))  # (O,)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, matmul: str = "dequant") -> FP8Linear:
        """Quantise a float `nn.Linear` (per output channel); the bias keeps its dtype."""
        q, scale = quantize_weight(linear.weight)
        dtype = linear.weight.dtype
        out = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            dtype=dtype,
            matmul=matmul,
            device=linear.weight.device,
        )
        out.weight.data, out.scale_weight = q, scale
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` cast every floating tensor, fp8 included: keep the storage
        # format (fp8 weight, float32 scales) and take only the device from such a cast.
        weight, scale = self.weight.detach(), self.scale_weight.detach()  # aliases survive swaps
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE:
            self.compute_dtype = self.weight.dtype
            self.weight = nn.Parameter(weight.to(self.weight.device), requires_grad=False)
        if self.scale_weight.dtype != torch.float32:
            self.scale_weight = scale.to(self.scale_weight.device)
        return self

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """(O, I) weight in `dtype`."""
        return dequantize(self.weight, self.scale_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., I) -> (..., O)
        if self.matmul == "scaled" and x.is_cuda:
            return self._scaled_mm(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """fp8 x fp8 on tensor cores: the input quantised per row, the weight per column of W^T."""
        rows = x.reshape(-1, self.in_features)  # (M, I)
        sx = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # (M, 1)
        xq = (rows / sx).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # (M, I)
        out = torch._scaled_mm(
            xq,
            self.weight.t(),
            scale_a=sx,
            scale_b=self.scale_weight.float()[None, :],
            bias=None if self.bias is None else self.bias.to(x.dtype),
            out_dtype=x.dtype,
        )  # (M, O)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, matmul={self.matmul}"
        )


def fp8_layer_names(module: nn.Module) -> list[str]:
    """Names of the block linear layers `quantize_fp8_` converts (`blocks.N.<BLOCK_LINEARS>`)."""
    names = []
    for name, sub in module.named_modules():
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "blocks" and ".".join(parts[2:]) in BLOCK_LINEARS:
            if isinstance(sub, (nn.Linear, FP8Linear)):
                names.append(name)
    return names


def quantize_fp8_(module: nn.Module, *, matmul: str = "dequant") -> nn.Module:
    """Replace the block linear layers of an expert with `FP8Linear`, in place, one at a time.

    A module on the meta device gets empty fp8 shells (to be filled by `load_into`, e.g. from a
    ComfyUI fp8_scaled file); a materialised one is quantised per output channel, and each float
    weight is released as soon as its layer is converted.
    Returns:
        `module`, for chaining.
    """
    for name in fp8_layer_names(module):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        linear = getattr(owner, leaf)
        if isinstance(linear, FP8Linear):
            continue
        if linear.weight.is_meta:
            new = FP8Linear(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                dtype=linear.weight.dtype,
                matmul=matmul,
                device="meta",
            )
        else:
            new = FP8Linear.from_linear(linear, matmul=matmul)
        setattr(owner, leaf, new)
    return module


def fp8_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers as stored (fp8 weights count one byte)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
