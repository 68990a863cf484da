"""Proposers: each drafter kind's side of the verification protocol (`inference.speculative.Proposer`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from drafters.medusa import MedusaModel
from drafters.vocab import draft_head_rows

from .tree import TokenTree


class MedusaProposer:
    """Medusa tree drafting: node path (r_1, ..., r_d) carries the rank-r_d token of head d-1, read from the
    target's last hidden state h_t; the root is x_{t+1}, the target's own choice."""

    def __init__(self, drafter: MedusaModel, paths: list[tuple[int, ...]], draft_vocab: list[int] | None = None):
        if not paths:
            raise ValueError("a Medusa tree needs at least one non-root node")
        too_deep = [p for p in paths if len(p) > drafter.config.num_heads]
        if too_deep:
            raise ValueError(f"tree paths {too_deep[:3]} are deeper than the drafter's "
                             f"{drafter.config.num_heads} heads")
        ordered = sorted(paths, key=len)  # parents before children
        index = {(): 0}
        for i, path in enumerate(ordered, start=1):
            index[path] = i
        missing = [p for p in index if p and p[:-1] not in index]
        if missing:
            raise ValueError(f"tree paths {missing[:3]} have no parent path in the tree")
        self.drafter = drafter
        self.paths = ordered
        self.parents = [-1] + [index[p[:-1]] for p in self.paths]
        self.depth = max(len(p) for p in paths)
        self.topk = [1 + max((p[d] for p in paths if len(p) > d), default=0) for d in range(self.depth)]
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
        logits = self._depth_logits(states)                                           # [depth, V] or [depth, N]
        top = torch.cat([logits[d].topk(k).indices for d, k in enumerate(self.topk)])  # [sum(topk)]
        ranked = (top if self.vocab is None else self.vocab[top]).tolist()            # one read-back per step
        starts = [sum(self.topk[:d]) for d in range(self.depth)]
        tokens = [root] + [ranked[starts[len(p) - 1] + p[-1]] for p in self.paths]
        return TokenTree(torch.tensor(tokens), self.parents)

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
