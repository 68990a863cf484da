"""Token-budget batches of similar lengths, and right-padded collation.

A batch costs B * T_max tokens of compute, so examples are grouped by length: shuffle, sort within large
chunks, cut greedily under the token budget, shuffle the batches. Sorting only within chunks of ~100
batches keeps each epoch's order random while leaving almost no padding.
"""
from __future__ import annotations

import numpy as np
import torch

CHUNK_BATCHES = 100  # sort within chunks of about this many typical batches


def _check_batching_args(lengths: np.ndarray, max_tokens: int, max_batch_size: int | None) -> None:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be None or >= 1, got {max_batch_size}")
    if lengths.size and lengths.min() < 1:
        bad = int(np.argmin(lengths))
        raise ValueError(f"lengths[{bad}] = {int(lengths[bad])}: every example needs at least one token; "
                         "drop empty examples before batching.")


def _chunk_size(lengths: np.ndarray, max_tokens: int) -> int:
    typical_batch = max(1, max_tokens // max(1, int(np.median(lengths))))
    return CHUNK_BATCHES * typical_batch


def _cut(indices: np.ndarray, lengths: np.ndarray, max_tokens: int, max_batch_size: int | None) -> list[list[int]]:
    """Greedy cut of indices sorted by decreasing length: the first of each batch sets T_max."""
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in indices.tolist():
        full = batch and ((len(batch) + 1) * lengths[batch[0]] > max_tokens
                          or (max_batch_size is not None and len(batch) >= max_batch_size))
        if full:
            batches.append(batch)
            batch = []
        batch.append(i)  # an example longer than max_tokens goes alone into its own batch
    if batch:
        batches.append(batch)
    return batches


def length_bucketed_batches(lengths: list[int], max_tokens: int, seed: int, epoch: int,
                            max_batch_size: int | None = None) -> list[list[int]]:
    """Batches of example indices, each with B * T_max <= max_tokens (a longer single example is a batch alone).

    Deterministic given (seed, epoch); every index appears exactly once.
    """
    lengths_arr = np.asarray(lengths, dtype=np.int64)  # [N]
    _check_batching_args(lengths_arr, max_tokens, max_batch_size)
    if lengths_arr.size == 0:
        return []
    rng = np.random.default_rng([seed, epoch])  # a (seed, epoch) pair, so seed=1/epoch=0 != seed=0/epoch=1
    order = rng.permutation(lengths_arr.size)
    chunk = _chunk_size(lengths_arr, max_tokens)
    batches: list[list[int]] = []
    for c in range(0, order.size, chunk):
        part = order[c:c + chunk]
        part = part[np.argsort(-lengths_arr[part], kind="stable")]
        batches += _cut(part, lengths_arr, max_tokens, max_batch_size)
    return [batches[b] for b in rng.permutation(len(batches))]


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the computed tokens (sum of B * T_max) that are padding."""
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return (computed - real) / computed if computed else 0.0


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` / `loss_mask` lists to the longest example.

    Returns input_ids [B, T] (pad_token_id past each end), attention_mask [B, T] and loss_mask [B, T]
    (both 0 past each end), all int64.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; pass the tokenizer's pad id, or its eos id if it has no pad token "
                         "(padding is masked out of attention and loss either way).")
    if not examples:
        raise ValueError("collate got an empty batch")
    for b, ex in enumerate(examples):
        if len(ex["input_ids"]) != len(ex["loss_mask"]):
            raise ValueError(f"example {b} of the batch has {len(ex['input_ids'])} input_ids but "
                             f"{len(ex['loss_mask'])} loss_mask entries; they must align token for token.")
    T = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), T), pad_token_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)  # [B, T]
    loss_mask = torch.zeros((len(examples), T), dtype=torch.long)  # [B, T]
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.as_tensor(ex["loss_mask"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
