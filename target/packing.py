"""Faster CPU inference for frozen models: linear layers with weights prepacked for oneDNN, and grouped-query
attention without copies of the KV cache.

Decoding a small model on a CPU is bound by the linear layers, and torch's default CPU GEMM (MKL) is slow for the
few-row inputs of speculative decoding; oneDNN with a prepacked weight is much faster there (`python -m
inference.calibrate --target smollm2-135m-instruct` prints both). One row (plain decoding) goes through the packed
weight too: torch's GEMV looks faster on one weight timed alone, in cache, but inside a decoding step, where every
weight streams from memory, it made the plain baseline slower. Baseline and speculative decoding run the same
packed model, so speedups stay like-for-like (`python -m inference.profile_step` times both).

    with packed_linears(target), packed_linears(drafter), grouped_query_attention(target):
        ...  # inference only: no autograd through packed layers

Packing is skipped (and the context does nothing) off-CPU or without oneDNN; bfloat16 layers are packed only
where the CPU has bf16 instructions. Packed layers refuse to run with autograd on: a layer packed while training
would silently stop learning.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

BATCH_HINT = 4  # rows the packed layout is tuned for: a verify forward of a few tree nodes


def can_pack() -> bool:
    """True when this torch build has oneDNN's prepacked linear (x86 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is stored prepacked for oneDNN; same outputs up to float rounding.

    Keeps the original `weight` (same storage, for code that reads its dtype or device) and `bias`."""

    def __init__(self, linear: nn.Linear, batch_hint: int = BATCH_HINT):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            raise RuntimeError("PackedLinear is for inference (it has no backward): run it under torch.no_grad()")
        rows = x.reshape(-1, self.in_features).contiguous()                       # [N, in]
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, bias, "none", [], "")   # [N, out]
        return out.reshape(*x.shape[:-1], self.out_features)


def linear_like(weight: torch.Tensor, reference: nn.Module) -> nn.Module:
    """A frozen bias-free linear layer over `weight` [out, in], packed when `reference` is a PackedLinear: rows taken
    from a packed layer (a draft vocabulary's rows of the LM head) then run on the same fast path."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return PackedLinear(linear) if isinstance(reference, PackedLinear) else linear


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes oneDNN can prepack here: float32, and bfloat16 only on CPUs with bf16 instructions (AVX512-BF16
    or AVX-NE-CONVERT; elsewhere oneDNN refuses to reorder a bf16 weight, and torch's own bf16 GEMV runs)."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def _packable(module: nn.Module, dtypes: tuple[torch.dtype, ...]) -> bool:
    w = getattr(module, "weight", None)
    return type(module) is nn.Linear and w.device.type == "cpu" and w.dtype in dtypes


@contextlib.contextmanager
def packed_linears(model: nn.Module, batch_hint: int = BATCH_HINT, enabled: bool = True):
    """Swap every frozen CPU nn.Linear of `model` for a PackedLinear inside the block; restore them after.
    Yields how many layers were packed."""
    swapped: list[tuple[nn.Module, str, nn.Linear]] = []
    if enabled and can_pack():
        dtypes = packable_dtypes()
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _packable(child, dtypes):
                    setattr(parent, name, PackedLinear(child, batch_hint))
                    swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


GROUPED_SDPA = "draftsmith_grouped_sdpa"


def grouped_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' SDPA attention, except for masked multi-token queries (tree verification) of a
    grouped-query model: there transformers copies every key/value head for each of its query heads (the whole KV
    cache, per layer, per verify forward); here the kernel shares them (`enable_gqa`). Same outputs.

    query [B, heads, N, d], key/value [B, kv_heads, T, d], attention_mask [B, 1, N, T] -> ([B, N, heads, d], None)."""
    if (attention_mask is None or query.shape[2] == 1 or getattr(module, "num_key_value_groups", 1) == 1
            or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # masks are built exactly as for "sdpa"


@contextlib.contextmanager
def grouped_query_attention(model: PreTrainedModel, enabled: bool = True):
    """Run a CPU model that uses transformers' SDPA attention with `grouped_sdpa` inside the block; restore after.
    Off-CPU nothing changes: on an H200 the A/B of the verify forward was launch-bound, no gain could be measured.
    Yields whether the attention was swapped."""
    before = model.config._attn_implementation
    swap = enabled and before == "sdpa" and model.device.type == "cpu"
    if swap:
        model.set_attn_implementation(GROUPED_SDPA)
    try:
        yield swap
    finally:
        if swap:
            model.set_attn_implementation(before)
