"""Acceptance metrics, pooled over verify steps as Spec-Bench does.

tau: new tokens per target forward (prefill included, the bonus token counted; 1.00 for plain decoding).
acceptance_by_depth[k]: fraction of verify steps that accepted at least k+1 drafted tokens.
alpha[k] (EAGLE's alpha_k): acceptance at depth k+1 given all earlier depths were accepted.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .speculative import GenerationResult


@dataclass
class Tally:
    new_tokens: int = 0
    target_forwards: int = 0
    seconds: float = 0.0
    baseline_tokens: int = 0
    baseline_seconds: float = 0.0
    accept_lengths: Counter = field(default_factory=Counter)

    def add(self, spec: GenerationResult, baseline: GenerationResult) -> None:
        self.new_tokens += len(spec.tokens)
        self.target_forwards += spec.forwards
        self.seconds += spec.seconds
        self.accept_lengths.update(spec.accept_lengths)
        self.baseline_tokens += len(baseline.tokens)
        self.baseline_seconds += baseline.seconds

    def merge(self, other: "Tally") -> None:
        for name in ("new_tokens", "target_forwards", "seconds", "baseline_tokens", "baseline_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.accept_lengths.update(other.accept_lengths)

    def summary(self) -> dict:
        tokens_per_s = self.new_tokens / self.seconds if self.seconds else 0.0
        baseline_tokens_per_s = self.baseline_tokens / self.baseline_seconds if self.baseline_seconds else 0.0
        steps = sum(self.accept_lengths.values())
        depth = max(self.accept_lengths, default=0)
        reached = [sum(c for n, c in self.accept_lengths.items() if n >= k) for k in range(depth + 2)]
        return {
            "tau": self.new_tokens / self.target_forwards if self.target_forwards else 0.0,
            "speedup": tokens_per_s / baseline_tokens_per_s if baseline_tokens_per_s else 0.0,
            "tokens_per_s": tokens_per_s,
            "baseline_tokens_per_s": baseline_tokens_per_s,
            "target_forwards": self.target_forwards,
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "baseline_seconds": self.baseline_seconds,
            "verify_steps": steps,
            "accept_length_histogram": {str(n): self.accept_lengths[n] for n in range(depth + 1)},
            "acceptance_by_depth": [reached[k] / steps for k in range(1, depth + 1)] if steps else [],
            "alpha": [reached[k] / reached[k - 1] for k in range(1, depth + 1) if reached[k - 1]],
        }


REPEAT_NGRAM = 8


def repeated_ngrams(tokens: list[int], n: int = REPEAT_NGRAM) -> int:
    """How many of `tokens` end an n-gram that already occurred earlier in them: verbatim repetition, which
    prompt lookup and drafts continue cheaply (a small target's long greedy answers loop)."""
    seen, repeats = set(), 0
    for i in range(n, len(tokens) + 1):
        gram = tuple(tokens[i - n:i])
        repeats += gram in seen
        seen.add(gram)
    return repeats


def answer_repetition(answers: list[dict]) -> dict:
    """Pooled over the report's answers (evaluate._answer_record): turns, turns that ran to the token budget, and
    the share of new tokens that end a repeated n-gram."""
    turns = [(n, stop, r) for a in answers for n, stop, r in zip(a["new_tokens"], a["stopped"], a["repeated"])]
    tokens = sum(n for n, _, _ in turns)
    return {"ngram": REPEAT_NGRAM, "turns": len(turns), "turns_at_budget": sum(not stop for _, stop, _ in turns),
            "repeated_share": sum(r for _, _, r in turns) / tokens if tokens else 0.0}
