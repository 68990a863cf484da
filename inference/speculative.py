"""The verification loop: a drafter proposes a token tree, the target scores every node in one forward pass,
and the longest path the target agrees with is kept (its KV entries compacted, the rest dropped).

At temperature 0, greedy verification is lossless: the output is token for token the target's own greedy output.
At temperature > 0 there are two rules:
  - speculative sampling (Leviathan et al. 2023, Chen et al. 2023; recursive rejection sampling over siblings for
    trees, SpecInfer / EAGLE), the default: lossless in distribution, for sampled drafts whose distributions q
    come with the tree (`TokenTree.draft_probs`) and for deterministic (top-k) drafts alike;
  - typical acceptance (Medusa, Cai et al. 2024, sec. 3.3.1), on request (`Acceptance(typical=True)`): LOSSY, it
    accepts any candidate the target finds "typical enough", so the output distribution is not the target's.

Batch size 1 throughout (as in Spec-Bench); shapes below drop the batch dimension where it is always 1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from target.model import target_forward
from .tree import TokenTree, tree_attention_mask


class Proposer(Protocol):
    """What every drafter kind implements to take part in verification. `hidden_states` below are the target's
    last hidden states [.., H], or, when the proposer has a `feature_layers` list (EAGLE-3), the concatenated
    outputs of those decoder layers [.., len * H]."""

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """A new sequence: input_ids [T] the prompt, hidden_states [T, H] the target's features for it."""

    def propose(self, root: int) -> TokenTree:
        """Candidate continuations after `root`, the token the target chose last (not yet in its KV cache)."""

    def update(self, tokens: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Learn what was accepted: tokens [n] entered the target's cache, hidden_states [n, H] are theirs."""


@dataclass
class GenerationResult:
    tokens: list[int]                     # the new tokens, eos included if emitted
    forwards: int                         # target forward passes, prefill included
    accept_lengths: list[int] = field(default_factory=list)  # per verify step: drafted tokens accepted
    seconds: float = 0.0


@dataclass
class Acceptance:
    """How candidates are accepted. temperature 0: greedy (lossless). temperature > 0: speculative sampling over
    the tree (lossless in distribution), or with typical=True Medusa's typical acceptance (lossy) with its
    defaults epsilon (posterior_threshold) 0.09 and delta (posterior_alpha) 0.3."""
    temperature: float = 0.0
    typical: bool = False
    epsilon: float = 0.09
    delta: float = 0.3


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [N, V] (or [V]) -> one token per row, drawn on the generator's device."""
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _choose(logits: torch.Tensor, acceptance: Acceptance, generator: torch.Generator | None) -> torch.Tensor:
    """logits [N, V] -> the target's token after each node [N] (argmax, or a sample at the temperature)."""
    if acceptance.temperature == 0:
        return logits.argmax(-1)
    return sample(torch.softmax(logits.float() / acceptance.temperature, dim=-1), generator)


def _accepted_nodes(tree: TokenTree, logits: torch.Tensor, acceptance: Acceptance) -> list[bool]:
    """Which nodes lie on a path the target accepts. logits [N, V]: the target's logits after each node."""
    if acceptance.temperature == 0:
        ok = (tree.tokens[1:] == logits.argmax(-1)[tree.parents[1:]]).tolist()
    else:  # typical acceptance: p(x) > min(epsilon, delta * exp(-H(p)))
        probs = torch.softmax(logits.float() / acceptance.temperature, dim=-1)       # [N, V]
        entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)              # [N]
        threshold = torch.minimum(torch.full_like(entropy, acceptance.epsilon), acceptance.delta * (-entropy).exp())
        parents = torch.tensor(tree.parents[1:], device=logits.device)
        ok = (probs[parents, tree.tokens[1:]] > threshold[parents]).tolist()
    accepted = [True] + [False] * (len(tree) - 1)
    for i in range(1, len(tree)):
        accepted[i] = ok[i - 1] and accepted[tree.parents[i]]
    return accepted


def speculative_sampling(tree: TokenTree, logits: torch.Tensor, temperature: float,
                         generator: torch.Generator | None) -> tuple[int, int]:
    """Lossless speculative sampling over a token tree: Leviathan et al. 2023 (Algorithm 1) on a chain, and its
    recursive rejection sampling over siblings (SpecInfer, Miao et al. 2024; EAGLE) on trees.

    logits [N, V]: the target's logits after each node; p_n = softmax(logits[n] / temperature). Starting at the
    root, the children c of the current node are tried in order: c (token x) is accepted with probability
    min(1, p(x) / q(x)), where q is the distribution c was drawn from (`tree.draft_probs[c - 1]`) or, for
    deterministic drafts (top-k, no draft_probs), the point mass on x, so the probability is p(x). On acceptance the
    walk descends into c; on rejection p <- norm(max(0, p - q)) (for a point mass: p with x removed) and the next
    sibling is tried. When no child is accepted, the next token is drawn from the current p. Each emitted token is
    then distributed exactly as the target's own sample. Returns (the last accepted node, the next token)."""
    p_all = torch.softmax(logits.float() / temperature, dim=-1)                    # [N, V]
    children: list[list[int]] = [[] for _ in range(len(tree))]
    for i, parent in enumerate(tree.parents[1:], start=1):
        children[parent].append(i)
    device = generator.device if generator is not None else "cpu"
    node = 0
    while True:
        p = p_all[node]                                                              # [V]
        for c in children[node]:
            x = int(tree.tokens[c])
            q = None if tree.draft_probs is None else tree.draft_probs[c - 1].to(p)   # [V] or a point mass
            ratio = p[x] if q is None else p[x] / q[x].clamp_min(1e-20)
            if float(torch.rand((), generator=generator, device=device)) < float(ratio):
                node = c
                break
            residual = p.clone() if q is None else (p - q).clamp_min(0)
            if q is None:
                residual[x] = 0
            if residual.sum() > 0:  # else p == q up to rounding: a rejection had probability ~0; keep p
                p = residual / residual.sum()
        else:
            return node, int(sample(p, generator))


def keep_cache_entries(cache: DynamicCache, prefix_len: int, keep: torch.Tensor) -> None:
    """Keep cache positions [0, prefix_len) followed by prefix_len + keep (keep [n], sorted); drop the rest.
    When keep is 0..n-1 (a chain's accepted prefix) the entries are already in place: only the tail is cut."""
    n = len(keep)
    in_place = bool((keep == torch.arange(n, device=keep.device)).all())
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"tree verification compacts full-attention caches only, got {type(layer).__name__} "
                                      "(sliding-window or linear-attention layers); use a chain-only drafter")
        for name in ("keys", "values"):
            kv = getattr(layer, name)                               # [1, heads, prefix_len + N, head_dim]
            if not in_place:
                kv[:, :, prefix_len:prefix_len + n] = kv[:, :, prefix_len + keep]
            setattr(layer, name, kv[:, :, :prefix_len + n])


def _finish(new: list[int], out: list[int], max_new_tokens: int, eos: set[int]) -> bool:
    """Append `new` to `out`, cut at eos or the budget; True when generation is over."""
    for t in new:
        out.append(t)
        if t in eos or len(out) >= max_new_tokens:
            return True
    return False


@torch.no_grad()
def plain_generate(target: PreTrainedModel, input_ids: torch.Tensor, max_new_tokens: int, eos: set[int],
                   acceptance: Acceptance = Acceptance(), generator: torch.Generator | None = None) -> GenerationResult:
    """Plain autoregressive decoding: one target forward per token (the baseline, tau = 1)."""
    start = time.perf_counter()
    cache = DynamicCache(config=target.config)
    out = target_forward(target, input_ids[None], past_key_values=cache, logits_at=1)
    result, forwards = [], 1
    while not _finish(_choose(out.logits[0], acceptance, generator).tolist(), result, max_new_tokens, eos):
        out = target_forward(target, torch.tensor([[result[-1]]], device=input_ids.device), past_key_values=cache,
                             logits_at=1)
        forwards += 1
    return GenerationResult(result, forwards, seconds=time.perf_counter() - start)


@torch.no_grad()
def speculative_generate(target: PreTrainedModel, proposer: Proposer, input_ids: torch.Tensor,
                         max_new_tokens: int, eos: set[int], acceptance: Acceptance = Acceptance(),
                         generator: torch.Generator | None = None) -> GenerationResult:
    """Draft -> verify in one forward -> keep the longest accepted path (+ the target's bonus token)."""
    start = time.perf_counter()
    cache = DynamicCache(config=target.config)
    layers = getattr(proposer, "feature_layers", None)
    out = target_forward(target, input_ids[None], past_key_values=cache, logits_at=1, feature_layers=layers)
    proposer.begin(input_ids, (out.features if layers else out.hidden_states)[0])
    result = GenerationResult([], forwards=1)
    root = _choose(out.logits[0], acceptance, generator).tolist()
    done = _finish(root, result.tokens, max_new_tokens, eos)
    device = input_ids.device
    while not done:
        tree = proposer.propose(result.tokens[-1])
        tree.tokens = tree.tokens.to(device)
        prefix_len = cache.get_seq_length()
        depths = torch.tensor(tree.depths(), device=device)
        out = target_forward(
            target, tree.tokens[None], past_key_values=cache, position_ids=(prefix_len + depths)[None],
            attention_mask=tree_attention_mask(tree, prefix_len, out.hidden_states.dtype).to(device),
            feature_layers=layers,
        )
        result.forwards += 1
        logits = out.logits[0]                                              # [N, V]
        if acceptance.temperature > 0 and not acceptance.typical:
            best, bonus = speculative_sampling(tree, logits, acceptance.temperature, generator)
            bonus = [bonus]
        else:
            accepted = _accepted_nodes(tree, logits, acceptance)
            best = max(range(len(tree)), key=lambda i: (accepted[i] and depths[i].item(), -i))
            bonus = _choose(logits[best:best + 1], acceptance, generator).tolist()
        path = torch.tensor(tree.path_to(best), device=device)             # [n], root first
        keep_cache_entries(cache, prefix_len, path)
        proposer.update(tree.tokens[path], (out.features if layers else out.hidden_states)[0, path])
        result.accept_lengths.append(len(path) - 1)
        done = _finish(tree.tokens[path[1:]].tolist() + bonus, result.tokens, max_new_tokens, eos)
    result.seconds = time.perf_counter() - start
    return result
