"""Proposers: each drafter kind's side of the verification protocol (`inference.speculative.Proposer`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from drafters.medusa import MedusaModel
from drafters.vocab import draft_head_rows

from .tree import RankPaths, TokenTree


class MedusaProposer:
    """Medusa tree drafting: node path (r_1, ..., r_d) carries the rank-r_d token of head d-1, read from the
    target's last hidden state h_t; the root is x_{t+1}, the target's own choice."""

    def __init__(self, drafter: MedusaModel, paths: list[tuple[int, ...]], draft_vocab: list[int] | None = None):
        self.shape = RankPaths(paths, drafter.config.num_heads, "Medusa")
        self.drafter = drafter
        self.paths, self.depth = self.shape.paths, self.shape.depth
        self.hidden: torch.Tensor | None = None  # [H], the target's hidden state that chose the root
        # FR-Spec (drafters/vocab.py): rank candidates among the frequent tokens only, with those rows of each
        # head's LM head ([N, H] instead of [V, H]); shared-head drafters share one matrix.
        self.vocab: torch.Tensor | None = None
        self.sub_heads: list[torch.Tensor] = []
        if draft_vocab is not None:
            rows: dict[int, torch.Tensor] = {}
            for k in range(self.depth):
                weight = drafter.head_weight(k)
                if id(weight) not in rows:
                    self.vocab, rows[id(weight)] = draft_head_rows(weight, draft_vocab)
                self.sub_heads.append(rows[id(weight)])

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self.hidden = hidden_states[-1]

    @torch.no_grad()
    def propose(self, root: int) -> TokenTree:
        states = torch.stack(self.drafter.head_states(self.hidden, self.depth))      # [depth, H]
        return self.shape.tree(root, self._depth_logits(states), self.vocab)          # logits [depth, V or N]

    def _depth_logits(self, states: torch.Tensor) -> torch.Tensor:
        """states [depth, H] -> each head's logits [depth, V] (or [depth, N] over the draft vocabulary). Heads that
        share one LM head (share_lm_head) project together: the matrix is read once, not once per head."""
        shared = self.drafter.config.share_lm_head
        if self.vocab is not None:
            heads = self.sub_heads
            return F.linear(states, heads[0]) if shared else torch.stack([F.linear(s, w) for s, w in zip(states, heads)])
        if shared:
            return self.drafter.head_logits(0, states)
        return torch.stack([self.drafter.head_logits(d, s) for d, s in enumerate(states)])

    def update(self, tokens: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self.hidden = hidden_states[-1]
