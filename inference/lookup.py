"""Prompt lookup (Saxena, 2023; transformers' `prompt_lookup_num_tokens`; REST-style copying): when the last
n tokens of the sequence occurred before, propose the tokens that followed them then. It costs no model forward,
and small targets copy a lot: answers quote their prompt (summaries, extraction, RAG) and repeat themselves.

An index maps each n-gram (min_ngram <= n <= max_ngram) to where its most recent earlier occurrence ended, so a
lookup is one dictionary probe per n instead of a scan of the sequence. LookupProposer puts it beside any
drafter kind's proposer.
"""
from __future__ import annotations

import torch

from .tree import TokenTree


class PromptLookup:
    """The sequence so far (prompt + accepted tokens) and its n-gram index.

    propose(): `num_tokens` tokens continuing the most recent earlier occurrence of the sequence's longest suffix
    n-gram, trying n = max_ngram down to min_ngram; [] when none occurred before. A continuation that runs into
    the present goes on as the loop it implies: after "a b c a b" it is "c a b c a ...".
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, num_tokens: int = 8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, "
                             f"max_ngram={max_ngram}")
        if num_tokens < 1:
            raise ValueError(f"prompt lookup num_tokens={num_tokens} must be >= 1 (tokens copied per proposal)")
        self.max_ngram, self.min_ngram, self.num_tokens = max_ngram, min_ngram, num_tokens
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> start of what followed its last occurrence

    def reset(self, tokens: list[int]) -> None:
        self.tokens, self.index = [], {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before `token` are followed by it
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.index[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def propose(self) -> list[int]:
        end = len(self.tokens)
        for n in range(min(self.max_ngram, end), self.min_ngram - 1, -1):
            start = self.index.get(tuple(self.tokens[end - n:]))
            if start is not None:  # a copy that reaches the end repeats: a loop of period end - start
                return [self.tokens[start + i % (end - start)] for i in range(self.num_tokens)]
        return []


class LookupProposer:
    """Prompt lookup beside a drafter (any kind's proposer, inference.speculative.Proposer): where the sequence's
    last tokens occurred before, a step proposes the copy that followed them as a chain and the drafter is not
    run; elsewhere the drafter proposes its tree. Copies are deterministic proposals: speculative sampling treats
    each as a point mass q = 1 on its token (accepted with probability p(x), the residual p with x removed), so
    the output stays distributed as the target's. The drafter still sees every accepted token (its update()).

    steps: proposals that were copies; accepted: copied tokens the target accepted."""

    def __init__(self, drafter, lookup: PromptLookup):
        self.drafter, self.lookup = drafter, lookup
        self.feature_layers = getattr(drafter, "feature_layers", None)
        self.steps = self.accepted = 0
        self.copied = False

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self.lookup.reset(input_ids.tolist())
        self.copied = False
        self.drafter.begin(input_ids, hidden_states)

    def propose(self, root: int) -> TokenTree:
        self.lookup.extend([root])
        copy = self.lookup.propose()
        self.copied = bool(copy)
        if not copy:
            return self.drafter.propose(root)
        self.steps += 1
        return TokenTree.chain(torch.tensor([root] + copy))

    def update(self, tokens: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """tokens [n]: the root (already in the lookup's sequence) and the accepted tokens after it."""
        self.lookup.extend(tokens[1:].tolist())
        self.accepted += (len(tokens) - 1) * self.copied
        self.drafter.update(tokens, hidden_states)
