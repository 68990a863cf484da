"""Held-out acceptance while training (training.acceptance_every): the verification loop's τ with a greedy chain
from the drafter as it is, on the first turns of the held-out conversations; the best drafter by that τ
(checkpoint.select: acceptance) and early stopping (training.early_stop_patience) follow it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


BEST_DIR, LAST_DIR, RECORD = "drafter-best", "drafter-last", "heldout_acceptance.json"


def heldout_prompts(rows: list[dict], n: int) -> list[torch.Tensor]:
    """The first user turn (everything before the first supervised token) of up to n held-out conversations.
    rows: {input_ids, loss_mask} token lists."""
    prompts = []
    for row in rows:
        mask = row["loss_mask"]
        first = next((i for i, m in enumerate(mask) if m), 0)
        if first > 0:
            prompts.append(torch.tensor(row["input_ids"][:first]))
        if len(prompts) == n:
            break
    return prompts


@torch.no_grad()
def heldout_tau(drafter, kind: str, target, prompts: list[torch.Tensor], max_new_tokens: int,
                eos: set[int], depth: int) -> dict:
    """{tau, alpha}: tokens per target forward of greedy chain drafting (prefill excluded) over the prompts, and
    α_k = P(draft k accepted | drafts 1..k-1 accepted) for k = 1..depth."""
    from inference.proposer_setup import make_proposer  # inference is loaded only when measuring
    from inference.speculative import speculative_generate

    options = {"tree": "chain", "tree_depth": depth} if kind != "draft_lm" else {"draft_k": depth, "adaptive_k": False}
    proposer, _ = make_proposer(drafter, target, **options)
    accepted: list[int] = []
    tokens = 0
    for prompt in prompts:
        result = speculative_generate(target, proposer, prompt.to(target.device), max_new_tokens, eos)
        accepted += result.accept_lengths
        tokens += len(result.tokens) - 1  # the prefill's token is plain decoding's
    reached = [sum(a >= k for a in accepted) for k in range(depth + 1)]   # steps with at least k accepted
    alpha = [reached[k] / reached[k - 1] if reached[k - 1] else 0.0 for k in range(1, depth + 1)]
    return {"tau": tokens / max(len(accepted), 1), "alpha": alpha}


@dataclass
class Record:
    """The held-out τ of every measured step; the best so far (ties: the later step) and how many measurements
    since τ last rose above every earlier one (for early stopping: a tie is no improvement)."""
    taus: dict[int, float]
    best_step: int | None = None
    best_tau: float = float("-inf")
    stale: int = 0

    def add(self, step: int, tau: float) -> bool:
        """Record step's τ; True when it is the new best."""
        self.taus[step] = tau
        self.stale = 0 if tau > self.best_tau else self.stale + 1
        if tau >= self.best_tau:
            self.best_step, self.best_tau = step, tau
            return True
        return False

    def save(self, out: Path) -> None:
        tmp = out / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(out / RECORD)

    @classmethod
    def load(cls, out: Path, resumed_step: int) -> "Record":
        """The record of a run resumed at `resumed_step`: what it measured up to that step (the steps after it are
        trained and measured again, identically)."""
        file = out / RECORD
        if not file.is_file():
            return cls({})
        raw = json.loads(file.read_text())
        record = cls({})
        for step, tau in sorted((int(s), t) for s, t in raw["taus"].items()):
            if step <= resumed_step:
                record.add(step, tau)
        return record
