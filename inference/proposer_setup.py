"""Building a drafter's proposer for evaluation: the kind's proposer with its tree (Medusa and EAGLE: a static
tree calibrated on this machine, or a chain, JSON rank paths, EAGLE-2 dynamic trees) or chain settings (draft LMs:
k, siblings, confidence, prompt lookup), and a record of that setup for the report."""
from __future__ import annotations

import json
import sys

import torch
from transformers import PreTrainedModel

from drafters import EagleModel, MedusaModel
from drafters.kinds import check_table, kind_of
from drafters.vocab import get_draft_vocab

from .calibrate import NODE_COUNTS, choose_chain, choose_tree, draft_cost_ratio, loop_step_costs
from .dflash_proposer import DFlashProposer
from .draft_lm_proposer import DraftLMProposer
from .eagle_proposer import EagleProposer, ParallelEagleProposer
from .lookup import LookupProposer, PromptLookup
from .proposers import MedusaProposer
from .speculative import NoDraft

CHAIN_LENGTHS = (1, 2, 3, 4, 6, 8)  # draft-LM chains the cost model times
# Used when a drafter carries no measured per-head accuracy (e.g. untrained heads): a deliberately modest guess.
PRIOR_ACCURACY = [[0.5 * 0.7 ** k * 0.3 ** i for i in range(4)] for k in range(8)]


def medusa_proposer(drafter: MedusaModel, target: PreTrainedModel, tree: str, max_nodes: int,
                    draft_vocab: list[int] | None = None, min_speedup: float = 1.05):
    """tree: 'auto' (calibrated on this device; plain decoding when no tree pays), 'chain' (top-1 of every head)
    or a JSON list of rank paths."""
    make = lambda paths: MedusaProposer(drafter, paths, draft_vocab)  # noqa: E731
    if tree != "auto":
        return make(fixed_paths(tree, drafter.config.num_heads)), {"tree": tree}
    accuracy = drafter.config.head_topk_accuracy
    if not accuracy:
        print("warning: the drafter records no per-head accuracy; sizing the tree with a prior guess",
              file=sys.stderr)
        accuracy = PRIOR_ACCURACY[:drafter.config.num_heads]
    return calibrated_tree(accuracy, target, make, None, max_nodes, min_speedup)


def fixed_paths(tree: str, depth: int) -> list[tuple[int, ...]]:
    """The rank paths of a tree given by name: 'chain' (top-1 at each of `depth` depths) or a JSON list."""
    return [(0,) * d for d in range(1, depth + 1)] if tree == "chain" else [tuple(p) for p in json.loads(tree)]


def calibrated_tree(accuracy: list[list[float]], target: PreTrainedModel, make_proposer,
                    feature_layers: list[int] | None, max_nodes: int, min_speedup: float):
    """The static tree of rank paths that maximises predicted tokens per second on this device (choose_tree):
    accuracy[d][i] = P(rank-i candidate at depth d is right), real loop steps timed for every candidate tree of
    <= max_nodes nodes (make_proposer(paths), reading the target's feature_layers) and for plain decoding.
    Returns (proposer, setup record for the report); the proposer is NoDraft (plain decoding) when no tree is
    predicted at least min_speedup times faster than plain decoding."""
    costs = loop_step_costs(target, make_proposer, feature_layers)
    choice = choose_tree(accuracy, [n for n in NODE_COUNTS if n <= max_nodes], costs, min_speedup)
    calibration = {"plain": choice.plain, "candidates": choice.table, "best": choice.best,
                   "min_speedup": min_speedup, "expected_tau": choice.expected_tau,
                   "predicted_speedup": choice.predicted_speedup}
    if choice.paths is None:
        return NoDraft(), {"tree": "auto", "decoding": "plain", "calibration": calibration}
    return make_proposer(choice.paths), {"tree": "auto", "calibration": calibration}


def eagle_proposer(drafter: EagleModel, target: PreTrainedModel, tree: str, max_nodes: int, depth: int, topk: int,
                   draft_vocab: list[int] | None = None, min_speedup: float = 1.05):
    """tree: 'auto' (a static tree calibrated on this device from the drafter's held-out accuracy per depth and
    rank, at most `depth` deep, or plain decoding when none pays: see calibrated_tree), 'dynamic' (EAGLE-2,
    max_nodes nodes), 'chain' (depth tokens) or JSON rank paths (a static tree)."""
    setup = {"tree": tree, "depth": depth, "topk": topk}
    if drafter.config.parallel_drafts:
        return parallel_proposer(drafter, drafter.config.parallel_drafts, target, tree, max_nodes, min_speedup,
                                 lambda paths: ParallelEagleProposer(drafter, paths), "a P-EAGLE drafter", depth)
    if tree == "dynamic":
        proposer = EagleProposer(drafter, "dynamic", depth=depth, topk=topk, nodes=max_nodes, draft_vocab=draft_vocab)
        return proposer, {**setup, "nodes": max_nodes}
    make = lambda paths: EagleProposer(drafter, "static", paths=paths, draft_vocab=draft_vocab)  # noqa: E731
    if tree != "auto":
        return make(fixed_paths(tree, depth)), setup
    proposer, calibrated = calibrated_tree(eagle_accuracy(drafter)[:depth], target, make,
                                           drafter.config.feature_layers, max_nodes, min_speedup)
    return proposer, {**setup, **calibrated}


def parallel_proposer(drafter, depth: int, target: PreTrainedModel, tree: str, max_nodes: int, min_speedup: float,
                      make, what: str, chain_depth: int):
    """Drafters that score all `depth` depths in one forward (P-EAGLE, DFlash): static trees of rank paths over
    them ('auto': calibrated like Medusa's from the held-out accuracy per depth and rank; 'chain': the first
    min(chain_depth, depth), so that --tree-depth sets the chain of every EAGLE-style kind alike)."""
    if tree == "dynamic":
        raise ValueError(f"--tree dynamic grows a tree one drafter forward per depth; {what} drafts all {depth} "
                         "depths in one forward: use --tree auto, chain or JSON rank paths")
    if tree == "chain":
        depth = min(depth, chain_depth)
    if tree != "auto":
        return make(fixed_paths(tree, depth)), {"tree": tree, "depth": depth}
    proposer, calibrated = calibrated_tree(eagle_accuracy(drafter)[:depth], target, make,
                                           drafter.config.feature_layers, max_nodes, min_speedup)
    return proposer, {"tree": tree, "depth": depth, **calibrated}


def eagle_accuracy(drafter: EagleModel) -> list[list[float]]:
    """acc[d][i] for calibrated_tree: the held-out per-depth, per-rank accuracy recorded at training; a drafter
    that records top-1 only gets chains; one that records nothing, the prior guess (with a warning)."""
    config = drafter.config
    if config.step_topk_accuracy:
        return config.step_topk_accuracy
    if config.step_accuracy:
        return [[a] for a in config.step_accuracy]
    print("warning: the drafter records no held-out accuracy per depth; sizing the tree with a prior guess",
          file=sys.stderr)
    return PRIOR_ACCURACY


def tree_record(proposer) -> dict:
    """The static tree a proposer verifies, for the report: nodes (the root included) and rank paths."""
    paths = getattr(proposer, "paths", [])
    return {"nodes": len(paths) + 1, "paths": [list(p) for p in paths]}


def _medusa_setup(drafter, target, vocab, o: dict, temperature, generator):
    proposer, setup = medusa_proposer(drafter, target, o["tree"], o["max_tree_nodes"], vocab, o["min_speedup"])
    return proposer, {**setup, **tree_record(proposer), "draft_vocab": len(vocab) if vocab else "full"}


def _eagle_setup(drafter, target, vocab, o: dict, temperature, generator):
    proposer, setup = eagle_proposer(drafter, target, o["tree"], o["max_tree_nodes"], o["tree_depth"],
                                     o["tree_topk"], vocab, o["min_speedup"])
    if o["tree"] != "dynamic":
        setup.update(tree_record(proposer))
    ids = drafter.draft_ids() if vocab is None or drafter.config.eagle_version == 3 else vocab
    parallel = {"parallel_drafts": drafter.config.parallel_drafts} if drafter.config.parallel_drafts else {}
    return proposer, {**setup, "eagle_version": drafter.config.eagle_version, **parallel, "draft_vocab": len(ids)}


def _draft_lm_setup(drafter, target, vocab, o: dict, temperature, generator):
    """A chain of k tokens (adaptive by default) with siblings / confidence stops; plain decoding instead when the
    cost model predicts no chain length pays (greedy, for a draft whose held-out agreement training recorded)."""
    proposer = DraftLMProposer(drafter, k=o["draft_k"], adaptive=o["adaptive_k"], k_max=max(8, o["draft_k"]),
                               temperature=temperature, generator=generator, draft_vocab=vocab,
                               siblings=o["draft_siblings"], confidence=o["draft_confidence"],
                               sibling_depth=o["sibling_depth"])
    cost = draft_cost_ratio(target, proposer)
    setup = {"k": o["draft_k"], "adaptive": o["adaptive_k"], "k_max": proposer.k_max,
             "siblings": o["draft_siblings"], "sibling_depth": o["sibling_depth"],
             "confidence": o["draft_confidence"], "draft_vocab": len(vocab) if vocab else "full", **cost}
    agreement = (getattr(drafter.config, "draftsmith", None) or {}).get("heldout_agreement")
    if agreement is None or temperature > 0:  # no measured agreement, or sampled drafts: nothing to predict from
        return proposer, setup
    make = lambda k: DraftLMProposer(drafter, k=k, draft_vocab=vocab)  # noqa: E731
    ks = [k for k in CHAIN_LENGTHS if k <= proposer.k_max]
    setup["calibration"], pays = choose_chain(agreement, ks, loop_step_costs(target, make), o["min_speedup"])
    if not pays:
        return NoDraft(), {**setup, "decoding": "plain"}
    return proposer, setup


def _dflash_setup(drafter, target, vocab, o: dict, temperature, generator):
    make = lambda paths: DFlashProposer(drafter, paths, vocab)  # noqa: E731
    proposer, setup = parallel_proposer(drafter, drafter.config.depths, target, o["tree"], o["max_tree_nodes"],
                                        o["min_speedup"], make, "a DFlash drafter", o["tree_depth"])
    return proposer, {**setup, **tree_record(proposer), "block_size": drafter.config.block_size,
                      "draft_vocab": len(vocab) if vocab else "full"}


# drafter kind -> (drafter, target, draft vocabulary or None, options, temperature, generator) -> (proposer, setup)
PROPOSER_SETUPS = {"medusa": _medusa_setup, "eagle": _eagle_setup, "dflash": _dflash_setup,
                   "draft_lm": _draft_lm_setup}
check_table(PROPOSER_SETUPS, "inference/proposer_setup.py PROPOSER_SETUPS")


def make_proposer(drafter, target: PreTrainedModel, *, temperature: float = 0.0,
                  generator: torch.Generator | None = None, **options):
    """The drafter's proposer and a description of its setup for the report. options: the proposer fields of
    inference.eval_config.EvalConfig (defaults from there); the draft vocabulary is the frequent-token set recorded
    at training unless full_draft_vocab. With prompt_lookup, every kind's proposer gets prompt lookup beside it:
    a copy of prompt_lookup_tokens tokens where the last prompt_lookup..2 tokens occurred before (LookupProposer)."""
    from .eval_config import EvalConfig

    o = {**EvalConfig().proposer_options(), **options}
    unknown = sorted(set(o) - set(EvalConfig().proposer_options()))
    if unknown:
        raise TypeError(f"make_proposer got unknown options {unknown}")
    vocab = None if o["full_draft_vocab"] else get_draft_vocab(drafter.config)
    proposer, setup = PROPOSER_SETUPS[kind_of(drafter)](drafter, target, vocab, o, temperature, generator)
    if o["prompt_lookup"]:
        lookup = PromptLookup(o["prompt_lookup"], 2, o["prompt_lookup_tokens"])
        proposer = LookupProposer(proposer, lookup)
        setup["prompt_lookup"] = {"max_ngram": lookup.max_ngram, "min_ngram": lookup.min_ngram,
                                  "tokens": lookup.num_tokens}
    return proposer, setup
