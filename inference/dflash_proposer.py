"""A DFlash drafter's side of the verification protocol (drafters/dflash.py).

The proposer keeps every layer's context keys and values for the verified positions (the target's features of
each token that entered its cache, computed once when the token is verified). `propose(root)` runs one drafter
forward over the block [root, mask, ...] at the next positions, which attends to all of the context and, both ways,
to itself: slot k's scores give depth k. The tree is static rank paths over the B - 1 depths (a chain: every slot's
top-1); the block's own keys are never kept. Drafts are deterministic (top-k): speculative sampling verifies them
with point-mass draft distributions.
"""
from __future__ import annotations

import torch

from drafters.dflash import DFlashModel
from drafters.vocab import draft_head_rows
from target.packing import linear_like

from .tree import RankPaths, TokenTree


class DFlashProposer:
    def __init__(self, drafter: DFlashModel, paths: list[tuple[int, ...]], draft_vocab: list[int] | None = None):
        """draft_vocab (FR-Spec): rank candidates among these target ids with those rows of the target's head."""
        self.drafter = drafter
        self.shape = RankPaths(paths, drafter.config.depths, "DFlash")
        self.paths, self.depth = self.shape.paths, self.shape.depth
        self.feature_layers = drafter.config.feature_layers
        head = drafter.target.get_output_embeddings()
        self.ids, self.head = None, None                                       # the target's whole head
        if draft_vocab is not None:
            self.ids, rows = draft_head_rows(head.weight, draft_vocab)          # [N], [N, H]
            self.head = linear_like(rows, head)
        self.context: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # per layer [1, kv, T, D] each
        self.base = 0                                                          # verified positions in the context

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self.context, self.base = None, 0
        self._extend(hidden_states)

    def update(self, tokens: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self._extend(hidden_states)

    @torch.no_grad()
    def _extend(self, features: torch.Tensor) -> None:
        """The context keys and values of the features [n, F] of the next n verified positions."""
        n = features.shape[0]
        pos = torch.arange(self.base, self.base + n, device=features.device)[None]
        new = self.drafter.context(features[None], pos)
        self.context = new if self.context is None else [
            (torch.cat([k, nk], 2), torch.cat([v, nv], 2)) for (k, v), (nk, nv) in zip(self.context, new)]
        self.base += n

    @torch.no_grad()
    def propose(self, root: int) -> TokenTree:
        if self.context is None:
            raise RuntimeError("DFlashProposer.propose called before begin(input_ids, hidden_states)")
        d = self.drafter
        B = d.config.block_size  # the whole block even for a shallower tree: its slots attend to each other both ways
        device = self.context[0][0].device
        tokens = torch.tensor([[root] + [d.config.mask_token_id] * (B - 1)], device=device)   # [1, B]
        pos = torch.arange(self.base, self.base + B, device=device)[None]
        out = d(tokens, pos, self.context)                                      # [1, B, H]
        return self.shape.tree(root, d.logits(out[0, 1:self.depth + 1], self.head), self.ids)  # [depth, V or N]
