"""An EAGLE drafter's side of the verification protocol: chains, static trees and EAGLE-2 dynamic trees.

The drafter keeps a KV cache over verified pairs only: pair j = (the target's feature at position j, token j + 1)
at position id j (drafters/eagle.py). `propose(root)` first feeds the pairs that verification added since the last
call (the last of them carries the new root), then drafts by depth: every node fed at depth d is the pair
(its parent's output, its token) at position base - 1 + d and attends to the verified cache and to its own draft
ancestors. The draft nodes' cache entries are dropped when the proposal is made, so the cache again holds
verified pairs only (the next call re-feeds accepted tokens with the target's true features, as EAGLE does).

Tree shapes:
  dynamic   EAGLE-2 (Li et al., 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees"):
            each depth expands the `topk` nodes with the highest cumulative draft log-probability (confidence),
            each into its `topk` best children; after `depth` steps the `nodes - 1` best drafted nodes by
            confidence form the tree (a child never outranks its parent, so the choice is a tree).
  static    a fixed set of rank paths, e.g. [(0,), (1,), (0, 0)]: node (r_1..r_d) is the rank-r_d child of node
            (r_1..r_{d-1}); a chain is [(0,), (0, 0), ...].
Drafts are deterministic (top-k), so speculative sampling verifies them with point-mass draft distributions.
P-EAGLE drafters (parallel_drafts) draft every depth in one forward: ParallelEagleProposer, static trees only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from drafters.eagle import EagleModel
from drafters.vocab import draft_head_rows
from target.packing import linear_like

from .tree import RankPaths, TokenTree, additive_mask, orphan_paths


@dataclass
class DraftNodes:
    """The drafted tree while it grows. Node 0 is the root (its output comes from the verified feed)."""
    tokens: list[int]
    parents: list[int]
    depths: list[int]
    scores: list[float]                     # cumulative draft log-probability (confidence) of the path
    paths: list[tuple[int, ...]]            # rank path from the root (static trees)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # node -> drafter output [H] once fed
    fed: list[int] = field(default_factory=list)  # draft nodes in the drafter's cache, in cache order

    def add(self, token: int, parent: int, score: float, rank: int) -> None:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.scores.append(score)
        self.paths.append(self.paths[parent] + (rank,))


class EagleProposer:
    def __init__(self, drafter: EagleModel, tree: str = "dynamic", depth: int = 5, topk: int = 4, nodes: int = 16,
                 paths: list[tuple[int, ...]] | None = None, draft_vocab: list[int] | None = None, prune: bool = True):
        """tree: 'dynamic' (depth, topk, nodes as in EAGLE-2) or 'static' (`paths`; a chain is
        [(0,), (0, 0), ...]). prune (dynamic): stop drafting deeper once no deeper node can be among the best
        `nodes` (the same tree, fewer drafter forwards). draft_vocab (EAGLE-1 only; FR-Spec): rank candidates
        among these target ids with those rows of the target's LM head. EAGLE-3 drafts over its own draft
        vocabulary."""
        if tree not in ("dynamic", "static"):
            raise ValueError(f"tree={tree!r}: use 'dynamic' or 'static' (with paths)")
        if tree == "static":
            if not paths:
                raise ValueError("a static tree needs rank paths, e.g. [(0,), (1,), (0, 0)]")
            orphans = orphan_paths(paths)
            if orphans:
                raise ValueError(f"tree paths {orphans[:3]} have no parent path in the tree")
            depth = max(len(p) for p in paths)
        elif depth < 1 or topk < 1 or nodes < 2:
            raise ValueError(f"dynamic trees need depth >= 1, topk >= 1 and nodes >= 2; got {depth}, {topk}, {nodes}")
        self.drafter, self.mode, self.depth, self.topk, self.nodes = drafter, tree, depth, topk, nodes
        self.prune = prune
        self.paths = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p)) if paths else []
        self.path_set = set(self.paths)
        self.parent_paths = {p[:-1] for p in self.paths}                        # static nodes with children
        self.feature_layers = drafter.config.feature_layers                   # EAGLE-3's; None for EAGLE-1
        if draft_vocab is not None and drafter.config.eagle_version == 1:
            self.ids, rows = draft_head_rows(drafter.head_weight(), draft_vocab)  # [N], [N, H]
            self.head = linear_like(rows, drafter.target.get_output_embeddings())
        else:
            self.ids, self.head = drafter.draft_ids(), None                     # the drafter's own head
        self.cache: DynamicCache | None = None
        self.base = 0                                                           # verified pairs in the cache
        self.pending_features: torch.Tensor | None = None                      # [n, F]
        self.pending_tokens: list[int] = []                                     # [n - 1]; the root completes them

    # --- the protocol ------------------------------------------------------------------------------------------

    def begin(self, input_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """A new sequence: the prompt's features [T, F] and tokens x_2..x_T wait for the first root."""
        self.cache, self.base = DynamicCache(), 0
        self.pending_features, self.pending_tokens = hidden_states, input_ids[1:].tolist()

    def update(self, tokens: torch.Tensor, hidden_states: torch.Tensor) -> None:
        """tokens [n] (root + accepted drafts) entered the target's cache with features [n, F]. When the pairs of
        an earlier update are still pending (that step was proposed without the drafter: prompt lookup), this
        step's root completes them and the new pairs follow."""
        if self.pending_features is None:
            self.pending_features, self.pending_tokens = hidden_states, tokens[1:].tolist()
        else:
            self.pending_features = torch.cat([self.pending_features, hidden_states])     # [n' + n, F]
            self.pending_tokens += tokens.tolist()

    @torch.no_grad()
    def propose(self, root: int) -> TokenTree:
        if self.cache is None:
            raise RuntimeError("EagleProposer.propose called before begin(input_ids, hidden_states)")
        tree = DraftNodes([root], [-1], [0], [0.0], [()])
        tree.outputs[0] = self._feed_verified(root)
        for d in range(self.depth):
            expand = self._to_expand(tree, d)
            if not expand or self._settled(tree, expand):
                break
            if d > 0:
                self._feed(tree, expand)
            self._add_children(tree, expand)
        if tree.fed:  # drop the draft nodes: the cache holds verified pairs only (transformers 5: a negative count)
            self.cache.crop(-len(tree.fed))
        return self._final_tree(tree)

    # --- drafting ----------------------------------------------------------------------------------------------

    def _feed_verified(self, root: int) -> torch.Tensor:
        """Feed the pending verified pairs (the last one's token is `root`); returns the root's output [H]."""
        d = self.drafter
        tokens = torch.tensor([self.pending_tokens + [root]], device=self.ids.device)   # [1, n]
        n = tokens.shape[1]
        hidden = d.fuse(self.pending_features[None])                                     # [1, n, H]
        pos = torch.arange(self.base, self.base + n, device=tokens.device)[None]
        allowed = torch.ones(n, self.base + n, dtype=torch.bool).tril(self.base)
        out = d(tokens, hidden, pos, self._additive(allowed, hidden.dtype), self.cache)  # [1, n, H]
        self.base += n
        self.pending_features, self.pending_tokens = None, []
        return out[0, -1]

    def _feed(self, tree: DraftNodes, nodes: list[int]) -> None:
        """One drafter forward over draft `nodes` (all at one depth): each reads its parent's output and its
        token, attends to the verified cache and its fed ancestors."""
        d = self.drafter
        tokens = torch.tensor([[tree.tokens[i] for i in nodes]], device=self.ids.device)  # [1, m]
        hidden = torch.stack([tree.outputs[tree.parents[i]] for i in nodes])[None]       # [1, m, H]
        pos = torch.tensor([[self.base - 1 + tree.depths[i] for i in nodes]], device=tokens.device)
        draft = [[j in ancestors for j in tree.fed] + [c == r for c in range(len(nodes))]
                 for r, ancestors in enumerate(set(self._ancestors(tree, i)) for i in nodes)]  # [m, fed + m]
        allowed = torch.cat([torch.ones(len(nodes), self.base, dtype=torch.bool), torch.tensor(draft)], dim=1)
        out = d(tokens, hidden, pos, self._additive(allowed, hidden.dtype), self.cache)   # [1, m, H]
        tree.fed += nodes
        for r, i in enumerate(nodes):
            tree.outputs[i] = out[0, r]

    def _add_children(self, tree: DraftNodes, nodes: list[int]) -> None:
        """The best children of every fed node in `nodes`, scored by cumulative log-probability."""
        outs = torch.stack([tree.outputs[i] for i in nodes])                               # [m, H]
        logp = torch.log_softmax(self._logits(outs).float(), -1)
        k = min(self._children_wanted(tree, nodes), logp.shape[-1])
        top = logp.topk(k, dim=-1)                                                          # [m, k]
        targets, values = self.ids[top.indices].tolist(), top.values.tolist()   # read back once per depth
        for r, i in enumerate(nodes):
            for rank in range(k):
                if self.mode == "static" and tree.paths[i] + (rank,) not in self.path_set:
                    continue
                tree.add(targets[r][rank], i, tree.scores[i] + values[r][rank], rank)

    def _to_expand(self, tree: DraftNodes, d: int) -> list[int]:
        """Nodes at depth d whose children are drafted next."""
        at_depth = [i for i in range(len(tree.tokens)) if tree.depths[i] == d]
        if self.mode == "static":
            return [i for i in at_depth if tree.paths[i] in self.parent_paths]
        return sorted(at_depth, key=lambda i: (-tree.scores[i], i))[:self.topk]

    def _settled(self, tree: DraftNodes, expand: list[int]) -> bool:
        """Dynamic trees: True when no descendant of `expand` can enter the final tree, so drafting can stop with
        the same result. A child's score is at most its parent's and it is created later (losing ties), so once
        nodes - 1 drafted nodes score at least the best node to expand, the choice is made."""
        if self.mode != "dynamic" or not self.prune or len(tree.tokens) - 1 < self.nodes - 1:
            return False
        kept = sorted(tree.scores[1:], reverse=True)[self.nodes - 2]
        return kept >= max(tree.scores[i] for i in expand)

    def _children_wanted(self, tree: DraftNodes, nodes: list[int]) -> int:
        if self.mode == "dynamic":
            return self.topk
        return 1 + max(p[-1] for p in self.paths if p[:-1] in {tree.paths[i] for i in nodes})

    def _final_tree(self, tree: DraftNodes) -> TokenTree:
        """Static: every drafted node. Dynamic: the nodes - 1 most confident (ties: earlier first), which include
        their parents, renumbered in creation order (parents before children)."""
        chosen = list(range(1, len(tree.tokens)))
        if self.mode == "dynamic":
            chosen = sorted(sorted(chosen, key=lambda i: (-tree.scores[i], i))[:self.nodes - 1])
        index = {0: 0} | {old: new for new, old in enumerate(chosen, start=1)}
        tokens = [tree.tokens[0]] + [tree.tokens[i] for i in chosen]
        parents = [-1] + [index[tree.parents[i]] for i in chosen]
        return TokenTree(torch.tensor(tokens), parents)

    @staticmethod
    def _ancestors(tree: DraftNodes, i: int) -> list[int]:
        out = []
        while i > 0:
            out.append(i)
            i = tree.parents[i]
        return out

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs [..., H] -> logits [..., N] over the candidates (self.ids)."""
        return self.drafter.logits(out, self.head)

    def _additive(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """bool [m, K] -> additive mask [1, 1, m, K] on the drafter's device."""
        return additive_mask(allowed.to(self.ids.device), dtype)


class ParallelEagleProposer(EagleProposer):
    """P-EAGLE (drafters/eagle.py, parallel_drafts K): one drafter forward feeds the pending verified pairs and K - 1
    placeholders after the root's pair; the root's output and the placeholders' give depths 1..K, and the tree is
    the static rank paths over them (a chain: the top-1 of every depth). The placeholders' cache entries are dropped,
    so the cache again holds verified pairs only."""

    def __init__(self, drafter: EagleModel, paths: list[tuple[int, ...]]):
        super().__init__(drafter, "static", paths=paths)
        self.shape = RankPaths(paths, drafter.config.parallel_drafts, "P-EAGLE")
        self.slot_hidden: torch.Tensor | None = None  # [H] placeholder_hidden, fused once (under the loop's packing)

    @torch.no_grad()
    def propose(self, root: int) -> TokenTree:
        if self.cache is None:
            raise RuntimeError("ParallelEagleProposer.propose called before begin(input_ids, hidden_states)")
        d, slots = self.drafter, self.shape.depth - 1
        n = len(self.pending_tokens) + 1
        tokens = torch.tensor([self.pending_tokens + [root] + [-1] * slots], device=self.ids.device)  # [1, n + slots]
        hidden = d.fuse(self.pending_features[None])                                                 # [1, n, H]
        if slots:
            if self.slot_hidden is None:
                self.slot_hidden = d.placeholder_hidden().to(hidden.dtype)
            hidden = torch.cat([hidden, self.slot_hidden.expand(1, slots, -1)], dim=1)               # [1, n + slots, H]
        m = n + slots
        pos = torch.arange(self.base, self.base + m, device=tokens.device)[None]
        allowed = torch.ones(m, self.base + m, dtype=torch.bool).tril(self.base)
        out = d(tokens, hidden, pos, self._additive(allowed, hidden.dtype), self.cache)             # [1, m, H]
        self.base += n
        self.pending_features, self.pending_tokens = None, []
        if slots:
            self.cache.crop(-slots)
        logits = self._logits(out[0, n - 1:])                                                       # [depth, N]
        return self.shape.tree(root, logits, self.ids)
