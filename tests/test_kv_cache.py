"""The verification loop's KV cache (inference/kv_cache.py): the same attention as transformers' DynamicCache
through prefill, decode steps, a compacted tree step, crops and growth, while writing in place."""
import torch
from transformers import DynamicCache

from conftest import make_tiny_target
from inference import kv_cache
from inference.kv_cache import GrowingLayer, growing_cache
from inference.speculative import keep_cache_entries
from target.model import target_forward


def run(target, cache) -> list[torch.Tensor]:
    """Prefill, two decode steps, a 3-node tree step compacted to its path [0, 2], a crop, one more step:
    the logits of every forward."""
    logits = [target_forward(target, torch.tensor([[1, 7, 9, 30, 4]]), past_key_values=cache).logits]
    for token in (11, 12):
        logits.append(target_forward(target, torch.tensor([[token]]), past_key_values=cache).logits)
    prefix = cache.get_seq_length()
    mask = torch.zeros(1, 1, 3, prefix + 3)
    mask[0, 0, 1, prefix + 2] = mask[0, 0, 2, prefix + 1] = torch.finfo(torch.float32).min  # siblings 1, 2
    logits.append(target_forward(target, torch.tensor([[5, 6, 8]]), past_key_values=cache, attention_mask=mask,
                                 position_ids=torch.tensor([[prefix, prefix + 1, prefix + 1]])).logits)
    keep_cache_entries(cache, prefix, [0, 2])
    cache.crop(-1)
    logits.append(target_forward(target, torch.tensor([[8, 3]]), past_key_values=cache).logits)
    return logits


def test_growing_cache_attends_like_dynamic_cache_and_writes_in_place():
    target = make_tiny_target("llama")
    cache = growing_cache(target.config)
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    ours, reference = run(target, cache), run(target, DynamicCache(config=target.config))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)
    layer = cache.layers[0]
    buffer = layer.key_buffer.data_ptr()
    target_forward(target, torch.tensor([[13]]), past_key_values=cache)
    assert layer.key_buffer.data_ptr() == buffer == layer.keys.data_ptr()  # the step wrote into the same buffer
    assert cache.get_seq_length() == 5 + 2 + 2 - 1 + 2 + 1


def test_growing_cache_grows_keeping_its_entries(monkeypatch):
    monkeypatch.setattr(kv_cache, "MIN_ROOM", 2)
    target = make_tiny_target("llama")
    ids = torch.tensor([[1, 7, 9, 30, 4, 5, 6, 8, 2, 3, 10, 11]])
    cache, reference = growing_cache(target.config), DynamicCache(config=target.config)
    for chunk in ids.split(3, dim=1):  # room for 5, then 10, then 20 positions: it grows twice
        torch.testing.assert_close(target_forward(target, chunk, past_key_values=cache).logits,
                                   target_forward(target, chunk, past_key_values=reference).logits)
    assert cache.layers[0].key_buffer.shape[-2] >= 12 and torch.equal(cache.layers[0].keys, reference.layers[0].keys)
