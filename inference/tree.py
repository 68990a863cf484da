"""Token trees: candidate continuations verified by the target in one forward pass.

A tree is a list of nodes in topological order (every parent before its children). Node 0 is the root: the
token the target already chose (the previous step's bonus token), not yet in the KV cache. A chain is a tree
whose node i has parent i - 1. Each node attends to the KV cache and to its ancestors (and itself), and sits at
position `prefix_len + depth` (the "tree attention" of Medusa / SpecInfer).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass
class TokenTree:
    tokens: torch.Tensor   # [N] long, tokens[0] = root
    parents: list[int]     # [N], parents[0] = -1, parents[i] < i
    # [N - 1, V] for drafts SAMPLED from a draft model: row i - 1 is the distribution node i was drawn from
    # (siblings drawn from one distribution repeat its row); None for deterministic (greedy / top-k) drafts.
    draft_probs: torch.Tensor | None = None

    def __post_init__(self):
        if self.parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(self.parents) if i > 0):
            raise ValueError(f"not a topologically ordered tree: parents={self.parents}")
        if self.draft_probs is not None:
            if self.draft_probs.dim() != 2 or self.draft_probs.shape[0] != len(self) - 1:
                raise ValueError(f"draft_probs must be [N - 1, V] = [{len(self) - 1}, V], got "
                                 f"{tuple(self.draft_probs.shape)}")

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def __len__(self) -> int:
        return len(self.parents)

    @classmethod
    def chain(cls, tokens: torch.Tensor, draft_probs: torch.Tensor | None = None) -> "TokenTree":
        return cls(tokens, [i - 1 for i in range(len(tokens))], draft_probs)

    def depths(self) -> list[int]:
        depth = [0] * len(self)
        for i in range(1, len(self)):
            depth[i] = depth[self.parents[i]] + 1
        return depth

    def ancestor_mask(self) -> torch.Tensor:
        """[N, N] bool: mask[i, j] is True when j is i or an ancestor of i."""
        n = len(self)
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[self.parents[i]]
        return mask

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, inclusive."""
        path = [node]
        while self.parents[path[-1]] != -1:
            path.append(self.parents[path[-1]])
        return path[::-1]


def orphan_paths(paths) -> list[tuple[int, ...]]:
    """The rank paths whose parent (the path less its last rank) is neither the root nor among `paths`, shortest
    first: a static tree cannot place them."""
    present = {tuple(p) for p in paths}
    return sorted((p for p in present if len(p) > 1 and p[:-1] not in present), key=lambda p: (len(p), p))


class RankPaths:
    """A static tree of rank paths for drafters that score every depth at once (Medusa heads, P-EAGLE and DFlash
    positions): node (r_1, ..., r_d) carries the rank-r_d candidate of depth d; a chain is [(0,), (0, 0), ...]."""

    def __init__(self, paths: list[tuple[int, ...]], max_depth: int, what: str):
        if not paths:
            raise ValueError(f"a {what} tree needs at least one non-root node")
        too_deep = [p for p in paths if len(p) > max_depth]
        if too_deep:
            raise ValueError(f"tree paths {too_deep[:3]} are deeper than the {max_depth} depths {what} drafts: give "
                             f"rank paths of at most {max_depth} ranks")
        self.paths = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))  # parents before children
        orphans = orphan_paths(self.paths)
        if orphans:
            raise ValueError(f"tree paths {orphans[:3]} have no parent path in the tree")
        index = {(): 0} | {path: i for i, path in enumerate(self.paths, start=1)}
        self.parents = [-1] + [index[p[:-1]] for p in self.paths]
        self.depth = max(len(p) for p in self.paths)
        self.topk = [1 + max(p[d] for p in self.paths if len(p) > d) for d in range(self.depth)]

    def tree(self, root: int, logits: torch.Tensor, ids: torch.Tensor | None = None) -> TokenTree:
        """logits [>= depth, N]: depth d's scores over N candidates (ids [N]: their target ids; None: N = V)."""
        top = logits[:self.depth].topk(max(self.topk)).indices                         # [depth, max(topk)]
        ranked = (top if ids is None else ids[top]).tolist()                         # one read-back per step
        tokens = [root] + [ranked[len(p) - 1][p[-1]] for p in self.paths]
        return TokenTree(torch.tensor(tokens), self.parents)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [Q, K] (True: query may attend to key) -> additive attention mask [1, 1, Q, K] on the same device:
    0 where allowed, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def tree_attention_mask(tree: TokenTree, prefix_len: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive mask [1, 1, N, prefix_len + N] on `device` (default: the CPU): 0 where a node may attend, the
    dtype's minimum elsewhere."""
    shape = tree_shape(tuple(tree.parents), torch.device(device or "cpu"), dtype)
    return shape.attention_mask(prefix_len)


@dataclass(frozen=True)
class TreeShape:
    """What verification needs of a tree's shape, built once per shape, dtype and device (tree_shape): a static
    tree is verified with the same positions and mask block at every step."""
    depths: list[int]            # [N]
    positions: torch.Tensor      # [N] long: the depths, on the device
    parents: torch.Tensor        # [N - 1] long: parents[1:], on the device
    block: torch.Tensor          # [N, N] additive mask among the nodes: 0 on ancestors and self

    def attention_mask(self, prefix_len: int, window: int | None = None) -> torch.Tensor:
        """[1, 1, N, prefix_len + N]: every node sees the whole cache and its own ancestors; with a sliding
        `window`, only the keys k (cache position = sequence position) with position(node) - k < window."""
        n = len(self.depths)
        mask = torch.zeros(1, 1, n, prefix_len + n, dtype=self.block.dtype, device=self.block.device)
        mask[0, 0, :, prefix_len:] = self.block
        if window is not None:
            queries = prefix_len + self.positions[:, None]                                # [N, 1]
            keys = torch.cat([torch.arange(prefix_len, device=mask.device), queries[:, 0]])  # [prefix_len + N]
            mask[0, 0].masked_fill_(queries - keys[None] >= window, torch.finfo(mask.dtype).min)
        return mask


@lru_cache(maxsize=256)
def tree_shape(parents: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> TreeShape:
    tree = TokenTree(torch.zeros(len(parents), dtype=torch.long), list(parents))
    depths = tree.depths()
    return TreeShape(depths, torch.tensor(depths, device=device), torch.tensor(parents[1:], device=device),
                     additive_mask(tree.ancestor_mask(), dtype)[0, 0].to(device))


def expected_accept_lengths(paths: list[tuple[int, ...]], accuracy: list[list[float]]) -> list[float]:
    """Medusa's estimate of how often each tree path is accepted: the product of the per-head accuracies of the
    ranks along it (accuracy[k][i] = P(rank-i token of head k is right)), heads treated as independent."""
    values = []
    for path in paths:
        p = 1.0
        for depth, rank in enumerate(path):
            p *= accuracy[depth][rank] if rank < len(accuracy[depth]) else 0.0
        values.append(p)
    return values


def grow_tree(accuracy: list[list[float]], max_nodes: int) -> list[tuple[int, ...]]:
    """The Medusa "optimal sparse tree": greedily add the candidate path with the highest expected acceptance,
    whose parent is already in the tree. Returns up to `max_nodes` non-root paths (tuples of per-head ranks) in
    the order added, so every prefix of the result is itself the best tree of that size and parents come first.
    """
    num_heads, topk = len(accuracy), len(accuracy[0])
    chosen: list[tuple[int, ...]] = []
    frontier = {(i,) for i in range(topk)}
    while frontier and len(chosen) < max_nodes:
        best = max(sorted(frontier), key=lambda p: expected_accept_lengths([p], accuracy)[0])
        frontier.remove(best)
        chosen.append(best)
        if len(best) < num_heads:
            frontier.update(best + (i,) for i in range(topk))
    return chosen
