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

from target.attention import AttentionLayout, attention_layout
from target.model import target_forward
from .kv_cache import GrowingLayer, growing_cache
from .tree import TokenTree, TreeShape, tree_shape


class Proposer(Protocol):
    """What every drafter kind implements to take part in verification. `hidden_states` below are the target's
    last hidden states [.., H], or, when the proposer has a `feature_layers` list (EAGLE-3), the concatenated
    outputs of those decoder layers [.., len * H]."""

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """A new sequence: input_ids [T] the prompt, hidden_states [T, H] the target's features for it."""

    def propose(self, root: int) -> TokenTree:
        """Candidate continuations after `root`, the token the target chose last (not yet in its KV cache)."""

    def update(self, tokens: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """Learn what was accepted: tokens [n] entered the target's cache, hidden_states [n, H] are theirs;
        tokens[0] is the root of the step. Updates may follow each other without a propose in between (a step
        answered by prompt lookup, inference.lookup.LookupProposer): the proposer then keeps what each brought."""


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


def _typical_ok(tree: TokenTree, shape: TreeShape, logits: torch.Tensor, acceptance: Acceptance) -> list[bool]:
    """Typical acceptance of each non-root node given its parent: p(x) > min(epsilon, delta * exp(-H(p)))."""
    probs = torch.softmax(logits.float() / acceptance.temperature, dim=-1)       # [N, V]
    entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)              # [N]
    threshold = torch.minimum(torch.full_like(entropy, acceptance.epsilon), acceptance.delta * (-entropy).exp())
    tokens = tree.tokens[1:].to(logits.device)
    return (probs[shape.parents, tokens] > threshold[shape.parents]).tolist()


def _deepest_accepted(tree: TokenTree, shape: TreeShape, ok: list[bool]) -> int:
    """The deepest node whose whole path is accepted (ties: the earliest); ok[i - 1]: node i given its parent."""
    accepted = [True] + [False] * (len(tree) - 1)
    for i in range(1, len(tree)):
        accepted[i] = ok[i - 1] and accepted[tree.parents[i]]
    return max(range(len(tree)), key=lambda i: (accepted[i] and shape.depths[i], -i))


def _accept(tree: TokenTree, tokens: list[int], shape: TreeShape, logits: torch.Tensor, acceptance: Acceptance,
            generator: torch.Generator | None) -> tuple[int, int]:
    """(the last accepted node, the target's next token after it). tokens: the tree's tokens on the host;
    logits [N, V]: the target's logits after each node. Greedy reads them back once ([N] argmaxes)."""
    if acceptance.temperature > 0 and not acceptance.typical:
        return speculative_sampling(tree, logits, acceptance.temperature, generator)
    if acceptance.temperature == 0:
        choice = logits.argmax(-1).tolist()
        best = _deepest_accepted(tree, shape, [tokens[i] == choice[p] for i, p in enumerate(tree.parents) if i])
        return best, choice[best]
    best = _deepest_accepted(tree, shape, _typical_ok(tree, shape, logits, acceptance))
    return best, int(_choose(logits[best:best + 1], acceptance, generator))


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


def keep_cache_entries(cache: DynamicCache, prefix_len: int, keep: list[int]) -> None:
    """Keep cache positions [0, prefix_len) followed by prefix_len + keep (keep: n sorted offsets); drop the rest.
    When keep is 0..n-1 (a chain's accepted prefix) the entries are already in place: only the tail is cut."""
    n = len(keep)
    moved = None if keep == list(range(n)) else torch.tensor(keep, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, GrowingLayer):  # growing_cache builds only these
            raise NotImplementedError(f"verification drops rejected drafts from attention caches only, got "
                                      f"{type(layer).__name__}; build the cache with inference.kv_cache.growing_cache")
        for name in ("keys", "values"):
            kv = getattr(layer, name)                               # [1, heads, prefix_len + N, head_dim]
            if moved is not None:
                kv[:, :, prefix_len:prefix_len + n] = kv[:, :, prefix_len + moved]
            setattr(layer, name, kv[:, :, :prefix_len + n])


def _finish(new: list[int], out: list[int], max_new_tokens: int, eos: set[int]) -> bool:
    """Append `new` to `out`, cut at eos or the budget; True when generation is over."""
    for t in new:
        out.append(t)
        if t in eos or len(out) >= max_new_tokens:
            return True
    return False


class StepClock:
    """Where the loop's time goes, part by part and step by step (inference.profile_step, inference.calibrate):
      draft   the proposer: propose, and update with what was accepted
      tree    the verify forward's inputs: positions and attention mask
      verify  the target's forward pass
      accept  choosing the accepted path and the next token (reads the logits back)
      cache   compacting the target's KV cache to the accepted path
      other   the rest: bookkeeping between steps
    On a GPU each lap waits for the queued work, so its time lands on the part that launched it."""
    PARTS = ("draft", "tree", "verify", "accept", "cache", "other")

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
        self._last = 0.0

    def start_step(self) -> None:
        self._sync()
        self.steps.append(dict.fromkeys(self.PARTS, 0.0))
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.steps[-1][part] += now - self._last
        self._last = now


def _no_lap(part: str) -> None:
    pass


@dataclass
class Decoding:
    """One sequence in the verification loop: the target's KV cache, its dtype and device, and `root`, the token
    the target chose last (not yet in the cache)."""
    cache: DynamicCache
    root: int
    feature_layers: list[int] | None   # the proposer's (EAGLE-3): the target returns these layers' outputs
    dtype: torch.dtype
    device: torch.device
    layout: AttentionLayout

    def features(self, out) -> torch.Tensor:
        """What the proposer reads of a target output: [1, T, H] last hidden states or [1, T, F] layer outputs."""
        return out.features if self.feature_layers else out.hidden_states


def prefill(target: PreTrainedModel, input_ids: torch.Tensor, feature_layers: list[int] | None,
            acceptance: Acceptance, generator: torch.Generator | None) -> tuple[Decoding, torch.Tensor]:
    """The prompt's forward: fills the cache and chooses the first token. Returns the decoding state and what
    the proposer reads of the prompt ([T, H] hidden states, or [T, F] feature_layers outputs) for its begin()."""
    layout = attention_layout(target.config)  # first: it refuses layers verification cannot roll back
    cache = growing_cache(target.config)
    out = target_forward(target, input_ids[None], past_key_values=cache, logits_at=1, feature_layers=feature_layers)
    seq = Decoding(cache, int(_choose(out.logits[0], acceptance, generator)[0]), feature_layers,
                   out.hidden_states.dtype, input_ids.device, layout)
    return seq, seq.features(out)[0]


def verify_mask(shape: TreeShape, prefix_len: int, layout: AttentionLayout) -> torch.Tensor | dict[str, torch.Tensor]:
    """The verify forward's additive mask [1, 1, N, prefix_len + N]; where sliding-window and full-attention
    layers mix (Gemma 2/3, Qwen2 with max_window_layers), one per layer kind, as those models take it."""
    if layout.window is None:
        return shape.attention_mask(prefix_len)
    sliding = shape.attention_mask(prefix_len, layout.window)
    if not layout.mixed:
        return sliding
    return {"full_attention": shape.attention_mask(prefix_len), "sliding_attention": sliding}


def verify_step(target: PreTrainedModel, proposer: Proposer, seq: Decoding, acceptance: Acceptance,
                generator: torch.Generator | None, clock: StepClock | None = None) -> list[int]:
    """Draft -> verify in one forward -> keep the longest accepted path. Returns the new tokens: the accepted
    drafts, then the target's bonus token (the next root). A root-only proposal is a plain decoding step."""
    lap = clock.lap if clock is not None else _no_lap
    if clock is not None:
        clock.start_step()
    tree = proposer.propose(seq.root)
    lap("draft")
    tokens = tree.tokens.tolist()
    prefix_len = seq.cache.get_seq_length()
    shape = tree_shape(tuple(tree.parents), seq.device, seq.dtype)
    ids = tree.tokens.to(seq.device)[None]                                     # [1, N]
    mask = None if len(tree) == 1 else verify_mask(shape, prefix_len, seq.layout)
    lap("tree")
    out = target_forward(target, ids, past_key_values=seq.cache, position_ids=(prefix_len + shape.positions)[None],
                         attention_mask=mask, feature_layers=seq.feature_layers)
    lap("verify")
    best, seq.root = _accept(tree, tokens, shape, out.logits[0], acceptance, generator)
    path = tree.path_to(best)                                                   # [n], root first
    lap("accept")
    if len(tree) > 1:
        keep_cache_entries(seq.cache, prefix_len, path)
    lap("cache")
    index = torch.tensor(path, device=seq.device)
    proposer.update(ids[0, index], seq.features(out)[0, index])
    lap("draft")
    new = [tokens[i] for i in path[1:]] + [seq.root]
    lap("other")
    return new


@torch.no_grad()
def speculative_generate(target: PreTrainedModel, proposer: Proposer, input_ids: torch.Tensor,
                         max_new_tokens: int, eos: set[int], acceptance: Acceptance = Acceptance(),
                         generator: torch.Generator | None = None, clock: StepClock | None = None) -> GenerationResult:
    """Prefill, then verify steps until eos or max_new_tokens. clock: time each step's parts (StepClock)."""
    start = time.perf_counter()
    seq, features = prefill(target, input_ids, getattr(proposer, "feature_layers", None), acceptance, generator)
    proposer.begin(input_ids, features)
    result = GenerationResult([], forwards=1)
    done = _finish([seq.root], result.tokens, max_new_tokens, eos)
    while not done:
        new = verify_step(target, proposer, seq, acceptance, generator, clock)
        result.forwards += 1
        result.accept_lengths.append(len(new) - 1)
        done = _finish(new, result.tokens, max_new_tokens, eos)
    result.seconds = time.perf_counter() - start
    return result


class NoDraft:
    """The proposer of plain decoding: the root alone, so every step is one target forward of one token."""

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        pass

    def propose(self, root: int) -> TokenTree:
        return TokenTree(torch.tensor([root]), [-1])

    def update(self, tokens: torch.Tensor, hidden_states: torch.Tensor) -> None:
        pass


def plain_generate(target: PreTrainedModel, input_ids: torch.Tensor, max_new_tokens: int, eos: set[int],
                   acceptance: Acceptance = Acceptance(), generator: torch.Generator | None = None) -> GenerationResult:
    """Plain autoregressive decoding (the baseline, tau = 1): the verification loop without drafts, so that the
    baseline and speculative decoding pay the same per-step bookkeeping."""
    result = speculative_generate(target, NoDraft(), input_ids, max_new_tokens, eos, acceptance, generator)
    result.accept_lengths = []
    return result
