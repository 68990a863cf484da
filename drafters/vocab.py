"""Frequency-ranked draft vocabularies (FR-Spec, Zhao et al., 2025): a drafter proposes tokens from the N most
frequent tokens of its training data only, through the matching rows of its LM head. On a small target the LM
head is a large share of a draft step; a few thousand rows are a fraction of it. Verification is unchanged, so
decoding stays lossless; the draft simply cannot propose the rare tokens outside the set. The set lives in the
drafter's config as `draftsmith.draft_vocab` (counted by data/vocab.py).
"""
from __future__ import annotations

import torch


def draftsmith_meta(config) -> dict:
    """What draftsmith records in a drafter's config (`config.draftsmith`): target, draft vocabulary, ..."""
    return getattr(config, "draftsmith", None) or {}


def get_draft_vocab(config) -> list[int] | None:
    """The frequent-token draft vocabulary recorded in a drafter's config, or None (the full vocabulary)."""
    return draftsmith_meta(config).get("draft_vocab")


def draft_ids(draft_vocab: list[int], vocab_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The draft vocabulary as sorted, distinct token ids [N], checked to lie in [0, vocab_size)."""
    vocab = torch.tensor(sorted(set(draft_vocab)), device=device)
    if len(vocab) == 0 or vocab[0] < 0 or vocab[-1] >= vocab_size:
        raise ValueError(f"draft_vocab must be token ids in [0, {vocab_size}); got {len(vocab)} ids "
                         f"from {vocab.min().item() if len(vocab) else None} to "
                         f"{vocab.max().item() if len(vocab) else None}")
    return vocab


def vocab_head(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A causal LM's LM head restricted to the token ids [N]: (weight rows [N, H], bias rows [N] or None), for
    logits over a draft vocabulary (soft-capping, where the model has it, is the caller's: target.model.softcap)."""
    head = model.get_output_embeddings()
    return head.weight[ids], None if head.bias is None else head.bias[ids]


def draft_head_rows(weight: torch.Tensor, draft_vocab: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sorted draft vocabulary [N], the LM-head rows of those tokens [N, H]) from a head weight [V, H]."""
    vocab = draft_ids(draft_vocab, weight.shape[0], weight.device)
    return vocab, weight.detach()[vocab].contiguous()
