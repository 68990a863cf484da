"""A draft LM's side of the verification protocol: chain drafting (Leviathan et al., 2023; Chen et al., 2023),
gamma = k draft tokens per step, greedy or sampled (then verified by speculative sampling).

The draft keeps its own KV cache over the accepted sequence. Between steps it holds three kinds of tokens:
  base     tokens in the draft cache that the target accepted (prompt + accepted text)
  tail     tokens in the draft cache past `base` that are not yet known to be accepted (the last root and drafts)
  pending  accepted tokens not yet in the draft cache (the last draft token when all k were accepted)
`update` keeps the longest part of `tail` that the target accepted, crops the rest from the cache, and queues
the accepted tokens the cache lacks; `propose` feeds those together with the new root in one forward pass.
A step answered without the draft (prompt lookup, inference.lookup.LookupProposer) leaves the tail empty: everything
the target accepts is queued.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import DynamicCache, PreTrainedModel

from drafters.vocab import draft_ids, vocab_head

from .kv_cache import growing_cache
from .speculative import sample
from target.model import softcap, target_forward
from .tree import TokenTree


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class DraftLMProposer:
    """Chain proposer for a draft causal LM sharing the target's vocabulary.

    siblings (greedy only): the draft's next `siblings` ranked tokens after its top-1 join the first draft token
    as alternatives at depth 1, a tree verified in the same target forward (on a CPU a few more nodes cost almost
    nothing, inference.calibrate); they need no extra draft forward, only the first step's logits. With
    sibling_depth D the chain's tokens at depths 1..D get such alternatives, each from the logits it was drawn
    from: the runners-up at depth d are children of the chain's node at depth d - 1.

    confidence: drafting stops early once the draft's probability of its own token falls below it (the token is
    still proposed): a dynamic draft length, like transformers' assistant_confidence_threshold; k is then the most
    tokens a step drafts. 0 disables it.

    Adaptive k (adaptive=True), with a = drafted tokens the target accepted in the last step:
      a == k          -> k + 1 (at most k_max): the draft was right all the way, try a longer chain;
      a <= 1, a < d   -> k - 1 (at least k_min), d the tokens drafted (k, or fewer after a confidence stop): the
                         first or second draft token was rejected; drafting further
                         costs draft forwards that are thrown away;
      otherwise       -> k unchanged.
    """

    def __init__(self, draft_model: PreTrainedModel | PeftModel, k: int = 4, adaptive: bool = False,
                 k_min: int = 1, k_max: int = 8, temperature: float = 0.0,
                 generator: torch.Generator | None = None, draft_vocab: list[int] | None = None,
                 siblings: int = 0, confidence: float = 0.0, sibling_depth: int = 1):
        if not 1 <= k_min <= k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
        if not (k_min <= k <= k_max if adaptive else k >= 1):
            bounds = f" and within [k_min={k_min}, k_max={k_max}]" if adaptive else ""
            raise ValueError(f"k={k} must be >= 1{bounds}")
        # LoRA layers are injected into the base model in place, so the unwrapped model runs with its adapters.
        self.draft = draft_model.get_base_model() if isinstance(draft_model, PeftModel) else draft_model
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy drafts)")
        if siblings < 0 or (siblings and temperature > 0):
            raise ValueError(f"siblings={siblings}: extra depth-1 candidates (>= 0) are for greedy drafting only "
                             f"(temperature 0, got {temperature}); use siblings=0 when sampling")
        if sibling_depth < 1:
            raise ValueError(f"sibling_depth={sibling_depth}: the chain depths given siblings, 1 .. sibling_depth; "
                             "must be >= 1")
        if not 0 <= confidence < 1:
            raise ValueError(f"confidence={confidence} must be in [0, 1): drafting stops below this draft "
                             "probability (0: never)")
        self.siblings, self.sibling_depth, self.confidence = siblings, sibling_depth, confidence
        self.k, self.adaptive, self.k_min, self.k_max = k, adaptive, k_min, k_max
        self.temperature, self.generator = temperature, generator
        self.vocab, self.head, self.head_bias = self._draft_head(draft_vocab)
        self.vocab_size = self.draft.get_output_embeddings().weight.shape[0]
        self.cache: DynamicCache | None = None
        self.tail: list[int] = []
        self.pending: list[int] = []

    def _draft_head(self, draft_vocab: list[int] | None) -> tuple[torch.Tensor | None, ...]:
        """FR-Spec (Zhao et al., 2025): draft over the most frequent tokens only, with the LM head's rows of those
        tokens ([N, H] instead of [V, H]; its bias [N] if it has one). On a small model the LM head is much of a
        draft step's cost (SmolLM2: 28M of 135M parameters). Verification is unchanged, so decoding stays
        lossless; q is 0 outside the set."""
        if draft_vocab is None:
            return None, None, None
        weight = self.draft.get_output_embeddings().weight
        vocab = draft_ids(draft_vocab, weight.shape[0], weight.device)                  # [N]
        rows, bias = vocab_head(self.draft, vocab)                                       # [N, H], [N] or None
        return vocab, rows.detach().contiguous(), None if bias is None else bias.detach()

    @torch.no_grad()
    def draft_forward(self, tokens: list[int]) -> torch.Tensor:
        """Append `tokens` to the draft cache; returns the draft's logits after the last one: [V], or [N] over
        the draft vocabulary."""
        device = self.draft.get_input_embeddings().weight.device
        ids = torch.tensor([tokens], device=device)
        if self.head is None:
            return target_forward(self.draft, ids, past_key_values=self.cache, logits_at=1, use_cache=True
                                  ).logits[0, -1]
        hidden = target_forward(self.draft, ids, past_key_values=self.cache, logits_at=0, use_cache=True
                                ).hidden_states[0, -1]                  # [H]
        return softcap(self.draft.config, F.linear(hidden, self.head, self.head_bias))   # [N]

    def _draw(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None, float]:
        """One draft token from logits [V] or [N] (the draft vocabulary): argmax, or a sample with its
        distribution q [V] over the full vocabulary; and the token's draft probability when `confidence` is set
        (at temperature 1 for greedy drafts), else 1."""
        if self.temperature == 0:
            i = int(logits.argmax())
            p = float(torch.softmax(logits.float(), dim=-1)[i]) if self.confidence else 1.0
            return (i if self.vocab is None else int(self.vocab[i])), None, p
        q = torch.softmax(logits.float() / self.temperature, dim=-1)
        i = int(sample(q, self.generator))
        if self.vocab is None:
            return i, q, float(q[i])
        full = torch.zeros(self.vocab_size, device=q.device)
        return int(self.vocab[i]), full.scatter_(0, self.vocab, q), float(q[i])

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """input_ids [T]: the prompt, queued for a fresh draft cache (the first propose prefills it together with
        the root, in one forward). hidden_states [T, H] (the target's) are not used."""
        self.cache = growing_cache(self.draft.config)
        self.tail, self.pending = [], input_ids.tolist()

    def propose(self, root: int) -> TokenTree:
        """Feed pending accepted tokens + root, then draft k tokens (k draft forwards in all; fewer when the
        confidence stop ends the chain): greedily, or sampled at the temperature, with the draft distributions q_i
        attached for speculative sampling."""
        if self.cache is None:
            raise RuntimeError("DraftLMProposer.propose called before begin(input_ids, hidden_states)")
        self.tail = [root]
        logits = self.draft_forward(self.pending + [root])                   # [V]
        self.pending = []
        drafts, probs, extra, extra_parents = [], [], [], []
        for i in range(self.k):
            if i < self.sibling_depth:  # alternatives to the token drawn next, children of chain node i
                runners_up = self._runners_up(logits)
                extra += runners_up
                extra_parents += [i] * len(runners_up)
            token, q, p = self._draw(logits)                             # q_i [V] when sampling
            drafts.append(token)
            if q is not None:
                probs.append(q)
            if i == self.k - 1 or p < self.confidence:  # the last draft token is not fed: its logits are unused
                break
            logits = self.draft_forward(drafts[-1:])
            self.tail.append(drafts[-1])
        if extra:  # root -> chain of the drafts, plus runners-up as siblings of the chain's first tokens
            return TokenTree(torch.tensor([root] + drafts + extra), list(range(-1, len(drafts))) + extra_parents)
        return TokenTree.chain(torch.tensor([root] + drafts), torch.stack(probs) if probs else None)

    def _runners_up(self, logits: torch.Tensor) -> list[int]:
        """The tokens ranked 2 .. siblings + 1 by one draft step's logits [V] or [N] (target ids)."""
        if not self.siblings:
            return []
        ranked = logits.topk(min(1 + self.siblings, logits.shape[-1])).indices[1:]
        return (ranked if self.vocab is None else self.vocab[ranked]).tolist()

    def update(self, tokens: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """tokens [n]: root + the n - 1 accepted drafts, now in the target's cache. Roll the draft cache back to
        the accepted prefix of what it drafted; queue accepted tokens it does not hold yet."""
        accepted, drafted = tokens.tolist(), len(self.tail)  # tail: root + all drafts but the last; [] if not run
        kept = 0 if self.pending else _common_prefix_len(self.tail, accepted)
        self.cache.crop(-(drafted - kept))  # transformers 5: a negative count removes that many (0: none)
        self.pending += accepted[kept:]
        self.tail = []
        if self.adaptive and drafted:
            self.k = self._next_k(len(accepted) - 1, drafted)

    def _next_k(self, a: int, drafted: int) -> int:
        if a >= self.k:
            return min(self.k + 1, self.k_max)
        if a <= 1 and a < drafted:
            return max(self.k - 1, self.k_min)
        return self.k
