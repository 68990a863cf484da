"""The target's attention layout, as verification needs it: which layers attend over a sliding window, and a
refusal for layers whose cache cannot drop a rejected draft (recurrent or linear-attention state)."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

VERIFIABLE = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class AttentionLayout:
    kinds: tuple[str, ...]  # per layer: "full_attention" or "sliding_attention"
    window: int | None      # the sliding layers' window: position q sees key k when q - k < window (transformers)

    @property
    def mixed(self) -> bool:
        return len(set(self.kinds)) > 1


def attention_layout(config: PretrainedConfig) -> AttentionLayout:
    """The layout of a causal LM's decoder layers; ValueError (one line) for layers verification cannot roll back."""
    text = config.get_text_config(decoder=True)
    kinds, kwargs = get_layer_types_and_kwargs(text)
    other = sorted(set(kinds) - set(VERIFIABLE))
    if other:
        raise ValueError(f"{text.model_type} targets have {', '.join(other)} layers, whose cache keeps a state that "
                         "cannot drop rejected drafts, so speculative decoding cannot verify on them; use a target "
                         "whose layers all use full or sliding-window attention")
    windows = {kw["sliding_window"] for kind, kw in zip(kinds, kwargs) if kind == "sliding_attention"}
    if len(windows) > 1:
        raise ValueError(f"{text.model_type} targets with several sliding windows ({sorted(windows)}) are not "
                         "supported; use a target with one window")
    return AttentionLayout(tuple(kinds), windows.pop() if windows else None)
