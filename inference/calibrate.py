"""Size the draft tree for the hardware it runs on, or decide that no tree pays.

A bigger tree accepts more tokens per verify step but makes each step slower; on a CPU the forward cost grows
quickly with the node count (the reference Medusa 64-node tree ran 5x slower than plain decoding on SmolLM2 here),
and the loop's own work per step (the drafter, the tree's mask and positions, reading the logits back, compacting
the KV cache, bookkeeping) matters more the faster the forward is. So the cost of a candidate tree is measured as a
whole: real loop steps (speculative.verify_step) with that tree on a context of random tokens, part by part
(speculative.StepClock), against real plain-decoding steps through the same loop. The tree kept maximises

    predicted speedup(n) = expected tau(n) * t_plain_step / t_step(n)

expected tau(n) = 1 + the expected acceptances of its n - 1 drafted nodes (from the drafter's held-out accuracy).
When no candidate is predicted at least `min_speedup` times faster than plain decoding, decoding stays plain.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from cli.errors import ArgumentParser, run_main
from .kv_cache import growing_cache
from .speculative import Acceptance, NoDraft, Proposer, StepClock, prefill, verify_step
from target.model import target_forward
from .tree import TokenTree, expected_accept_lengths, grow_tree, tree_attention_mask

NODE_COUNTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)


def run_seconds(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` untimed ones, the GPU (if any) synchronised
    around each so its queued work is counted."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _best_seconds(fn, repeats: int) -> float:
    return min(run_seconds(fn, repeats))  # interference only ever adds time: the fastest repeat is the cost


def star_verify_steps(target: PreTrainedModel, node_counts, context_len: int = 256) -> dict[int, Callable[[], None]]:
    """For each n of node_counts, a function that runs one target forward of an n-node tree (a star: root + n - 1
    children) on top of a context_len-token KV cache of random tokens, then crops the cache back."""
    vocab = target.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(vocab, (1, context_len), generator=gen).to(target.device)
    cache = growing_cache(target.config)  # the verification loop's cache
    with torch.no_grad():
        target_forward(target, context, past_key_values=cache, logits_at=1)
    dtype = target.get_output_embeddings().weight.dtype
    steps = {}
    for n in node_counts:
        tree = TokenTree(torch.randint(vocab, (n,), generator=gen), [-1] + [0] * (n - 1))
        tokens = tree.tokens.to(target.device)[None]
        mask = tree_attention_mask(tree, context_len, dtype).to(target.device)
        positions = (context_len + torch.tensor(tree.depths(), device=target.device))[None]

        def step(tokens=tokens, mask=mask, positions=positions, n=n):
            target_forward(target, tokens, past_key_values=cache, position_ids=positions, attention_mask=mask)
            cache.crop(-n)  # transformers 5: a negative count removes that many tokens
        steps[n] = step
    return steps


@torch.no_grad()
def verify_latency(target: PreTrainedModel, node_counts=NODE_COUNTS, context_len: int = 256,
                   repeats: int = 5) -> dict[int, float]:
    """Seconds (best of `repeats`) of one target forward of n tree nodes on top of a context_len-token KV cache."""
    return {n: _best_seconds(step, repeats) for n, step in star_verify_steps(target, node_counts, context_len).items()}


class LoopTimer:
    """Times real verification-loop steps of any proposer, part by part, on one context_len-token context of
    random tokens (prefilled once): `warmup` untimed steps (the proposer's own prefill among them), then `steps`
    timed ones; the cache is cut back to the context after each proposer."""

    def __init__(self, target: PreTrainedModel, feature_layers: list[int] | None = None, context_len: int = 256,
                 steps: int = 6, warmup: int = 2):
        vocab = target.config.get_text_config().vocab_size
        self.ids = torch.randint(vocab, (context_len,), generator=torch.Generator().manual_seed(0)).to(target.device)
        self.target, self.steps, self.warmup = target, steps, warmup
        with torch.no_grad():
            self.seq, self.features = prefill(target, self.ids, feature_layers, Acceptance(), None)
        self.root = self.seq.root

    @torch.no_grad()
    def __call__(self, proposer: Proposer) -> dict[str, float]:
        """Median seconds of each loop part (StepClock.PARTS) and of the whole step ("step") with `proposer`."""
        self.seq.root = self.root
        proposer.begin(self.ids, self.features)
        clock = StepClock()
        for _ in range(self.warmup + self.steps):
            verify_step(self.target, proposer, self.seq, Acceptance(), None, clock)
        self.seq.cache.crop(-(self.seq.cache.get_seq_length() - len(self.ids)))  # transformers 5: count to remove
        timed = clock.steps[self.warmup:]
        costs = {part: statistics.median(s[part] for s in timed) for part in StepClock.PARTS}
        return {**costs, "step": statistics.median(sum(s.values()) for s in timed)}


def cost_row(costs: dict[str, float]) -> dict[str, float]:
    """A step's costs for the report, in ms: the whole step, the verify forward, the drafter, and the loop's own
    work (tree, accept, cache, other)."""
    overhead = sum(costs[p] for p in StepClock.PARTS if p not in ("verify", "draft"))
    return {"step_ms": 1e3 * costs["step"], "verify_ms": 1e3 * costs["verify"], "draft_ms": 1e3 * costs["draft"],
            "loop_ms": 1e3 * overhead}


@dataclass
class TreeChoice:
    paths: list[tuple[int, ...]] | None  # non-root nodes, as per-head rank paths; None: decode plainly
    expected_tau: float              # predicted tokens per verify step (1 when plain)
    predicted_speedup: float         # predicted tokens/s over plain decoding (1 when plain)
    best: dict                       # the best candidate, chosen or not
    table: list[dict]                # every candidate: nodes, expected_tau, step costs (ms), predicted speedup
    plain: dict                      # plain decoding's step costs (ms)


def choose_tree(accuracy: list[list[float]], node_counts, step_costs: Callable[[list], dict],
                min_speedup: float = 1.0) -> TreeChoice:
    """accuracy[k][i]: P(rank-i token of depth k is right). step_costs(paths) -> seconds per loop part of a step
    with the tree of those rank paths, or of a plain-decoding step for paths=None (LoopTimer). Keeps the tree
    of the highest predicted speedup, or none (paths None) when that is below min_speedup."""
    plain = step_costs(None)
    table = []
    for n in sorted(n for n in node_counts if n >= 2):
        paths = grow_tree(accuracy, n - 1)
        if len(paths) < n - 1:
            break  # the tree cannot grow further with these heads and ranks
        tau = 1 + sum(expected_accept_lengths(paths, accuracy))
        costs = step_costs(paths)
        table.append({"nodes": n, "expected_tau": tau, **cost_row(costs),
                      "predicted_speedup": tau * plain["step"] / costs["step"]})
    if not table:
        raise ValueError("no candidate tree: measure at least one node count >= 2")
    best = max(table, key=lambda row: row["predicted_speedup"])
    if best["predicted_speedup"] < min_speedup:
        return TreeChoice(None, 1.0, 1.0, best, table, cost_row(plain))
    return TreeChoice(grow_tree(accuracy, best["nodes"] - 1), best["expected_tau"], best["predicted_speedup"], best,
                      table, cost_row(plain))


def chain_tau(agreement: float, k: int) -> float:
    """Expected tokens per verify step of a k-token greedy chain whose tokens each agree with the target's with
    probability p, independently (Leviathan et al.: (1 - p^(k+1)) / (1 - p))."""
    return float(k + 1) if agreement >= 1 else (1 - agreement ** (k + 1)) / (1 - agreement)


def choose_chain(agreement: float, ks, step_costs: Callable, min_speedup: float = 1.0) -> tuple[dict, bool]:
    """A draft LM's cost model: for each chain length k, tau from its held-out greedy agreement with the target
    (chain_tau) and real loop steps timed with step_costs(k) (step_costs(None): plain decoding). Returns the
    calibration record (as calibrated trees write it; nodes = k + 1) and whether the best k is predicted at least
    min_speedup times faster than plain decoding."""
    plain = step_costs(None)
    table = []
    for k in ks:
        tau, costs = chain_tau(agreement, k), step_costs(k)
        table.append({"nodes": k + 1, "expected_tau": tau, **cost_row(costs),
                      "predicted_speedup": tau * plain["step"] / costs["step"]})
    best = max(table, key=lambda row: row["predicted_speedup"])
    pays = best["predicted_speedup"] >= min_speedup
    return {"plain": cost_row(plain), "candidates": table, "best": best, "min_speedup": min_speedup,
            "heldout_agreement": agreement, "expected_tau": best["expected_tau"] if pays else 1.0,
            "predicted_speedup": best["predicted_speedup"] if pays else 1.0}, pays


def loop_step_costs(target: PreTrainedModel, make_proposer, feature_layers: list[int] | None = None,
                    context_len: int = 256) -> Callable[[list | None], dict]:
    """A step_costs function for `choose_tree`: real loop steps with make_proposer(paths), or plain ones."""
    timer = LoopTimer(target, feature_layers, context_len)
    return lambda paths: timer(NoDraft() if paths is None else make_proposer(paths))


@torch.no_grad()
def draft_cost_ratio(target: PreTrainedModel, proposer, context_len: int = 256, repeats: int = 5) -> dict:
    """c = seconds of one draft-LM step (a 1-token forward and its next-token logits, as when drafting) over
    seconds of one target decode step, both on a context_len-token cache: the cost side of speculative decoding
    (Leviathan et al.'s c)."""
    vocab = target.config.get_text_config().vocab_size
    context = torch.randint(vocab, (context_len,), generator=torch.Generator().manual_seed(0)).to(target.device)
    proposer.begin(context, None)
    proposer.propose(0)  # fills the draft cache with the context

    def draft_step():
        proposer.draft_forward([1])
        proposer.cache.crop(-1)
    draft = _best_seconds(draft_step, repeats)
    target_step = verify_latency(target, (1,), context_len, repeats)[1]
    return {"draft_step_ms": draft * 1e3, "target_step_ms": target_step * 1e3, "cost_ratio": draft / target_step}


def main(argv: list[str] | None = None) -> None:
    """Print the target's verify latency per node count, with torch's defaults and with draftsmith's CPU inference
    (oneDNN-packed linear layers, grouped-query attention without KV copies)."""

    from target.model import load_target
    from target.packing import grouped_query_attention, packed_linears

    p = ArgumentParser(description="Time one verify forward of the target for several tree sizes.")
    p.add_argument("--target", required=True, help="embedded name (smollm2-135m-instruct), path or Hub id")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    target, _ = load_target(args.target, dtype=args.dtype)
    default = verify_latency(target, context_len=args.context_len, repeats=args.repeats)
    with packed_linears(target) as n, grouped_query_attention(target):
        packed = verify_latency(target, context_len=args.context_len, repeats=args.repeats) if n else {}
    print(f"{'nodes':>5} {'default ms':>11} {'packed ms':>10}   (best of {args.repeats}, "
          f"{args.context_len}-token context, {torch.get_num_threads()} threads)")
    for nodes, seconds in default.items():
        packed_ms = f"{packed[nodes] * 1e3:>10.1f}" if packed else f"{'n/a':>10}"
        print(f"{nodes:>5} {seconds * 1e3:>11.1f} {packed_ms}")


if __name__ == "__main__":
    run_main(main)
