"""Held-out acceptance while training (training.acceptance_every): the τ of greedy chain drafting by the drafter as
it is, on the target's own greedy answers to the first turns of held-out conversations; the best drafter by that
τ (checkpoint.select: acceptance) and early stopping (training.early_stop_patience) follow it.

The τ is teacher-forced: the target answers each prompt once (plain decoding) and one forward over prompt and
answer gives its features at every position; then the drafter's own proposer drafts against that answer, step
by step, fed the tokens and features the verification loop would feed it. Under greedy acceptance the loop's
steps are exactly these, so the estimate is the loop's τ on those answers (up to float rounding between one
forward and the loop's verify forwards) at the cost of the drafter's forwards alone. `loop_tau` runs the loop
itself (training.acceptance_loop)."""
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


@dataclass
class Answer:
    """A held-out prompt and the target's greedy answer to it, with what a proposer reads of the target there."""
    ids: torch.Tensor        # [P + n]: the prompt, then the answer (its first token is the prefill's choice)
    prompt_len: int          # P
    features: torch.Tensor   # [P + n, F]: last hidden states, or the proposer's feature layers (EAGLE-3)


class Answers:
    """The target's greedy answers to the held-out prompts, made once (the target is frozen) and read again at
    every measurement; features per set of feature layers that a proposer reads."""

    def __init__(self, target, prompts: list[torch.Tensor], max_new_tokens: int, eos: set[int]):
        from inference.speculative import plain_generate  # inference is loaded only when measuring

        self.target, self.prompts, self._features = target, [p.to(target.device) for p in prompts], {}
        with torch.no_grad():
            self.tokens = [plain_generate(target, p, max_new_tokens, eos).tokens for p in self.prompts]

    def of(self, feature_layers: list[int] | None) -> list[Answer]:
        key = tuple(feature_layers or ())
        if key not in self._features:
            self._features[key] = [self._answer(p, t, feature_layers) for p, t in zip(self.prompts, self.tokens)]
        return self._features[key]

    @torch.no_grad()
    def _answer(self, prompt: torch.Tensor, tokens: list[int], feature_layers: list[int] | None) -> Answer:
        from target.model import target_forward

        ids = torch.cat([prompt, torch.tensor(tokens, dtype=prompt.dtype, device=prompt.device)])
        out = target_forward(self.target, ids[None], logits_at=0, feature_layers=feature_layers)
        return Answer(ids, len(prompt), (out.features if feature_layers else out.hidden_states)[0])


def greedy_path(tree, answer: list[int]) -> list[int]:
    """The tree's nodes (root first) that greedy verification accepts when the target's next tokens are `answer`:
    from the root, the child carrying the next token, while there is one."""
    tokens, path = tree.tokens.tolist(), [0]
    for want in answer:
        child = next((i for i, p in enumerate(tree.parents) if p == path[-1] and tokens[i] == want), None)
        if child is None:
            break
        path.append(child)
    return path


@torch.no_grad()
def teacher_forced_accepts(proposer, answer: Answer) -> list[int]:
    """The drafts accepted at each verify step of a greedy decode of `answer`: the proposer drafts from each root
    (the last token the target chose), the target's answer decides, and the proposer is updated with the accepted
    path's tokens and the target's features there, as inference.speculative.verify_step updates it."""
    ids, r = answer.ids.tolist(), answer.prompt_len   # r: the root's position
    proposer.begin(answer.ids[:r], answer.features[:r])
    accepts = []
    while r < len(ids) - 1:  # the loop stops once the answer is out: its last token is the last step's bonus
        path = greedy_path(proposer.propose(ids[r]), ids[r + 1:])
        accepts.append(len(path) - 1)
        proposer.update(answer.ids[r:r + len(path)], answer.features[r:r + len(path)])
        r += len(path)
    return accepts


def acceptance_proposer(drafter, kind: str, target, depth: int, tree: str | None = None, **options):
    """The drafter's proposer drafting greedy chains of `depth` tokens, or the tree `tree` ('dynamic' or JSON rank
    paths; not draft LMs) with the proposer `options` of inference.eval_config (a dynamic tree's size)."""
    from inference.proposer_setup import make_proposer

    if kind == "draft_lm":
        return make_proposer(drafter, target, draft_k=depth, adaptive_k=False)[0]
    return make_proposer(drafter, target, tree=tree or "chain", tree_depth=depth, **options)[0]


def heldout_tau(drafter, kind: str, target, answers: Answers, depth: int, tree: str | None = None,
                **options) -> dict:
    """{tau, alpha}: teacher-forced tokens per target forward of greedy chain (or `tree`) drafting (prefill
    excluded) over the held-out answers, and α_k = P(k drafts accepted | k - 1 were) for k = 1..depth."""
    proposer = acceptance_proposer(drafter, kind, target, depth, tree, **options)
    accepted, tokens = [], 0
    for answer in answers.of(getattr(proposer, "feature_layers", None)):
        accepted += teacher_forced_accepts(proposer, answer)
        tokens += len(answer.ids) - answer.prompt_len - 1  # the prefill's token is plain decoding's
    return summary(accepted, tokens, depth)


@torch.no_grad()
def loop_tau(drafter, kind: str, target, prompts: list[torch.Tensor], max_new_tokens: int, eos: set[int],
             depth: int, tree: str | None = None, **options) -> dict:
    """{tau, alpha} of the verification loop itself, greedy chains of `depth` (or `tree`), answering the prompts."""
    from inference.speculative import speculative_generate

    proposer = acceptance_proposer(drafter, kind, target, depth, tree, **options)
    accepted, tokens = [], 0
    for prompt in prompts:
        result = speculative_generate(target, proposer, prompt.to(target.device), max_new_tokens, eos)
        accepted += result.accept_lengths
        tokens += len(result.tokens) - 1
    return summary(accepted, tokens, depth)


def summary(accepted: list[int], tokens: int, depth: int) -> dict:
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
