"""The KV cache of the verification loop: transformers' DynamicCache whose full-attention layers keep their keys
and values in a buffer with room to grow (gpt-fast's preallocated cache, inside transformers' Cache API).

transformers' DynamicLayer appends with torch.cat, which copies every cached entry of every layer at every step
(on SmolLM2 with a 400-token context, some 18 MB per step). A GrowingLayer writes only the step's own entries
into its buffer and hands out views of the filled part, so attention still sees exactly the cached positions;
cutting the cache (crop) or compacting it (speculative.keep_cache_entries) moves the end, and later entries
overwrite what was dropped. The buffer doubles when full.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

MIN_ROOM = 256  # positions allocated beyond the first update: a prompt plus a typical answer fits without growing


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values [B, heads, T, head_dim] are views of buffers with room to grow."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.get_seq_length(), key_states.shape[-2]
        if self.key_buffer is None or n + m > self.key_buffer.shape[-2]:
            self._grow(n + m, key_states, value_states)
        self.key_buffer[..., n:n + m, :] = key_states
        self.value_buffer[..., n:n + m, :] = value_states
        self.keys, self.values = self.key_buffer[..., :n + m, :], self.value_buffer[..., :n + m, :]
        return self.keys, self.values

    def _grow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New buffers of room for max(needed + MIN_ROOM, twice the old room) positions, the cache copied in."""
        old = 0 if self.key_buffer is None else self.key_buffer.shape[-2]
        room = max(needed + MIN_ROOM, 2 * old)
        n = self.get_seq_length()
        buffers = []
        for states, cached in ((key_states, self.keys), (value_states, self.values)):
            buffer = states.new_empty(*states.shape[:-2], room, states.shape[-1])   # [B, heads, room, head_dim]
            if n:
                buffer[..., :n, :] = cached
            buffers.append(buffer)
        self.key_buffer, self.value_buffer = buffers


def growing_cache(config: PretrainedConfig) -> DynamicCache:
    """A DynamicCache for a model of this config whose attention layers are all GrowingLayers. Sliding-window
    layers keep every position too (transformers' own keep only the window, which a rejected draft would have
    pushed out): the window is applied by the attention mask instead, so cache position = sequence position in
    every layer and dropping rejected entries is the same operation everywhere."""
    cache = DynamicCache(config=config)
    other = sorted({type(layer).__name__ for layer in cache.layers
                    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)})
    if other:  # load_target refuses such targets first, with their layer kinds (target/attention.py)
        raise ValueError(f"{config.model_type}: cache layers {other} keep a state that cannot drop rejected drafts; "
                         "use a model whose layers all use full or sliding-window attention")
    cache.layers = [GrowingLayer() if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache
