"""DFlash block drafters (Chen, Liang, Liu, 2026, "DFlash: Block Diffusion for Flash Speculative Decoding").

A few decoder layers of the target's family draft a whole block in one forward. The block is B positions at
a..a+B-1: the root x_a (the token the target chose last) and B - 1 mask tokens, attending to each other both ways.
The target's features of the context (positions < a) are fused once, ctx = hidden_norm(fc(concat of the chosen
layers' outputs)), and enter every layer as extra keys and values: layer l's keys are [k_proj(ctx), k_proj(x)],
its values likewise, its queries q_proj(x) of the block alone. Block slot k (1..B-1) predicts the token at its
own position a + k through `norm` and the target's frozen LM head. The target's embedding (of the mask token
too) and LM head are borrowed and never saved: the checkpoint is fc, hidden_norm, layers.*, norm, the names the
reference (z-lab/dflash), SGLang's DFLASH and vLLM read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .eagle import family_classes, family_layer_config, project


def default_feature_layers(num_target_layers: int, num_layers: int) -> list[int]:
    """The reference's choice of target layers (outputs of these layers, one per drafter layer): the middle layer
    for one drafter layer, else evenly from layer 1 to layer L - 3 (clipped into [0, L) for shallow targets,
    distinct and sorted)."""
    if num_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    ids = [round(start + i * (end - start) / (num_layers - 1)) for i in range(num_layers)]
    return sorted({min(max(i, 0), num_target_layers - 1) for i in ids})


class DFlashConfig(PretrainedConfig):
    model_type = "draftsmith_dflash"

    def __init__(self, target_config: dict | None = None, num_layers: int = 1, block_size: int = 8,
                 feature_layers: list[int] | None = None, mask_token_id: int | None = None,
                 layer_family: str | None = None,
                 target_name_or_path: str | None = None, target_revision: str | None = None,
                 step_accuracy: list[float] | None = None, step_topk_accuracy: list[list[float]] | None = None,
                 **kwargs):
        """feature_layers: target layers whose OUTPUTS are fused (= hidden_states[i + 1]). mask_token_id: the
        target token whose embedding fills the masked slots. layer_family: None (the target's family) or 'llama' /
        'qwen3' (that layer at the target's sizes; qwen3 is the reference's, the layer SGLang's DFLASH runs). step_accuracy / step_topk_accuracy: held-out
        accuracy per block slot 1..B-1 (per rank), written by training; it sizes the evaluation's tree."""
        self.target_config = target_config or {}
        self.num_layers, self.block_size = num_layers, block_size
        self.feature_layers, self.mask_token_id = feature_layers, mask_token_id
        self.layer_family = layer_family
        self.target_name_or_path, self.target_revision = target_name_or_path, target_revision
        self.step_accuracy, self.step_topk_accuracy = step_accuracy, step_topk_accuracy
        super().__init__(**kwargs)

    @property
    def hidden(self) -> int:
        return self.target_config["hidden_size"]

    @property
    def depths(self) -> int:
        """Tokens drafted per forward: the block's masked slots."""
        return self.block_size - 1


@torch.no_grad()
def copy_gain(source: nn.Module, norm: nn.Module) -> None:
    """Give `norm` the per-channel gain of the RMSNorm `source`, whichever convention each uses (Llama's x * w,
    Gemma's x * (1 + w)): an RMSNorm maps the all-ones vector (RMS 1) to its gain."""
    ones = torch.ones(1, norm.weight.numel(), dtype=norm.weight.dtype, device=norm.weight.device)
    gain = source(ones.to(next(source.parameters()).dtype)).to(norm.weight.dtype)[0]
    norm.weight.zero_()
    offset = norm(ones)[0]                                   # 0 for x * w, 1 for x * (1 + w)
    norm.weight.copy_(gain - offset)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, h, T, D] with cos, sin [B, T, D] (the halves convention of Llama and Qwen)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


class DFlashModel(PreTrainedModel):
    config_class = DFlashConfig
    base_model_prefix = "dflash"
    _no_split_modules = []

    def __init__(self, config: DFlashConfig):
        super().__init__(config)
        if config.block_size < 2 or config.num_layers < 1 or not config.feature_layers:
            raise ValueError(f"a DFlash drafter needs block_size >= 2, num_layers >= 1 and feature_layers; got "
                             f"{config.block_size}, {config.num_layers}, {config.feature_layers}")
        lc = family_layer_config(config.target_config, config.num_layers, config.layer_family)
        layer_cls, norm_cls, rotary_cls = family_classes(lc)
        H, eps = config.hidden, lc.rms_norm_eps
        self.fc = nn.Linear(len(config.feature_layers) * H, H, bias=False)
        self.hidden_norm = norm_cls(H, eps=eps)
        self.layers = nn.ModuleList(layer_cls(lc, layer_idx=i) for i in range(config.num_layers))
        self.norm = norm_cls(H, eps=eps)
        self._rotary = (rotary_cls, lc)
        self._rope: list[nn.Module] = []
        self._target: list[nn.Module] = []
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif getattr(module, "weight", None) is not None and module.weight.dim() == 1:
            nn.init.ones_(module.weight)  # RMSNorm
        else:  # MoE experts and routers as bare parameters
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, std=0.02) if p.dim() >= 2 else nn.init.zeros_(p)

    @classmethod
    def from_target(cls, target: PreTrainedModel, num_layers: int = 1, block_size: int = 8,
                    feature_layers: list[int] | None = None, mask_token_id: int | None = None,
                    layer_family: str | None = None, target_name_or_path: str | None = None) -> "DFlashModel":
        """A fresh drafter for `target`; mask_token_id defaults to the target's pad token, else its eos token."""
        tc = target.config.get_text_config()
        L = tc.num_hidden_layers
        layers = list(feature_layers) if feature_layers else default_feature_layers(L, num_layers)
        bad = [i for i in layers if not 0 <= i < L]
        if bad:
            raise ValueError(f"feature_layers {bad} are not decoder layers of the target (it has {L}: 0..{L - 1})")
        if mask_token_id is None:
            eos = tc.eos_token_id[0] if isinstance(tc.eos_token_id, list) else tc.eos_token_id
            mask_token_id = tc.pad_token_id if tc.pad_token_id is not None else eos
        if mask_token_id is None or not 0 <= mask_token_id < tc.vocab_size:
            raise ValueError(f"mask_token_id {mask_token_id} is not a token of the target (vocabulary {tc.vocab_size}); "
                             "set drafter.mask_token_id")
        config = DFlashConfig(target_config=tc.to_dict(), num_layers=num_layers, block_size=block_size,
                              feature_layers=layers, mask_token_id=mask_token_id, layer_family=layer_family,
                              target_name_or_path=target_name_or_path or tc._name_or_path or None,
                              target_revision=getattr(tc, "_commit_hash", None))
        model = cls(config)
        if getattr(target.get_output_embeddings(), "bias", None) is not None:
            raise ValueError("the target's LM head has a bias; DFlash drafters support bias-free LM heads only")
        target_norm = getattr(target.get_decoder(), "norm", None)
        if target_norm is not None:  # the output feeds the target's LM head, as the target's own final state does
            copy_gain(target_norm, model.norm)
        model.attach_target(target)
        return model.to(device=target.get_output_embeddings().weight.device)

    def attach_target(self, target: PreTrainedModel) -> None:
        """Check that the target fits (family, sizes, layers) and borrow its embedding and LM head."""
        tc, mine = target.config.get_text_config(), self.config.target_config
        problems = [f"{k}: drafter {mine.get(k)}, target {getattr(tc, k, None)}"
                    for k in ("model_type", "hidden_size", "vocab_size") if mine.get(k) != getattr(tc, k, None)]
        if max(self.config.feature_layers) >= tc.num_hidden_layers:
            problems.append(f"feature_layers {self.config.feature_layers} need {max(self.config.feature_layers) + 1} "
                            f"layers, target has {tc.num_hidden_layers}")
        if problems:
            raise ValueError(f"DFlash drafter (trained for target {self.config.target_name_or_path!r}) does not fit "
                             f"target {tc._name_or_path!r}: {'; '.join(problems)}. Load the target it was trained on.")
        self._target[:] = [target]

    @property
    def target(self) -> PreTrainedModel:
        if not self._target:
            raise RuntimeError("this DFlash drafter has no target: call attach_target(target) first")
        return self._target[0]

    def rotary(self, device: torch.device) -> nn.Module:
        if not self._rope or self._rope[0].inv_freq.device != device:
            cls, config = self._rotary
            self._rope[:] = [cls(config=config).to(device)]
        return self._rope[0]

    # --- forward ----------------------------------------------------------------------------------------------

    def context(self, features: torch.Tensor, position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The target's features [B, T, F] at positions [B, T] -> every layer's context keys and values
        ([B, kv, T, D] each, normed and rotated): computed once per position, in training and decoding alike."""
        ctx = self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))                 # [B, T, H]
        cos, sin = self.rotary(ctx.device)(ctx, position_ids)
        return [self._keys_values(layer.self_attn, ctx, cos, sin) for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                context: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Block tokens input_ids [B, n] at position_ids [B, n] (one or more blocks side by side), attending to
        `context` (per layer, from `context()`) and to the block's own keys through attention_mask (additive
        [B or 1, 1, n, T + n]; None: everything). Returns the last layer's output [B, n, H] (before `norm`)."""
        x = self.target.get_input_embeddings()(input_ids).to(self.fc.weight.dtype)       # [B, n, H]
        cos, sin = self.rotary(x.device)(x, position_ids)
        for layer, (ck, cv) in zip(self.layers, context):
            h = layer.input_layernorm(x)
            x = x + self._attention(layer.self_attn, h, ck, cv, cos, sin, attention_mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def _keys_values(self, attn: nn.Module, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, n, H] -> keys, values [B, kv, n, D] (k_norm per head where the family has it, then rotary)."""
        B, n, _ = x.shape
        k = attn.k_proj(x).view(B, n, -1, attn.head_dim)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        v = attn.v_proj(x).view(B, n, -1, attn.head_dim).transpose(1, 2)
        return rotate(k.transpose(1, 2), cos, sin), v

    def _attention(self, attn: nn.Module, x: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, cos, sin,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """Block queries over [context | block] keys: x [B, n, H] -> [B, n, H]."""
        B, n, _ = x.shape
        q = attn.q_proj(x).view(B, n, -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = rotate(q.transpose(1, 2), cos, sin)                                          # [B, h, n, D]
        k, v = self._keys_values(attn, x, cos, sin)
        k, v = torch.cat([ck.expand(B, -1, -1, -1), k], 2), torch.cat([cv.expand(B, -1, -1, -1), v], 2)
        groups = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                             attn_mask=mask, scale=attn.scaling)        # [B, h, n, D]
        return attn.o_proj(out.transpose(1, 2).reshape(B, n, -1))

    def logits(self, out: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """Outputs [..., H] -> logits [..., V] through `norm` and the target's LM head (or `head`, a linear layer
        over its rows of a draft vocabulary: [..., N])."""
        return project(head if head is not None else self.target.get_output_embeddings(), self.norm(out))
