"""The one set of evaluation options, used by `python -m inference.evaluate` (its flags are generated from these
fields), by inference.benchmark and by training's end-of-run evaluation (the `eval:` section of a training config).
Each option is declared once here, with the drafter kinds it applies to, and validated once: the general rules in
__post_init__, the kind-dependent ones in check_kind(), both before any model loads.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .tree import orphan_paths

ALL_KINDS = None  # an option every drafter kind takes
DRAFT_LM, EAGLE, HEADS = ("draft_lm",), ("eagle",), ("medusa", "eagle", "dflash")
FEATURE_DRAFTERS = ("eagle", "dflash")


class ConfigError(ValueError):
    """A config file, override or flag is wrong; the message names the key, where it came from and what is allowed."""


def check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {rule}")


def option(default, help: str, kinds: tuple[str, ...] | None = ALL_KINDS, flag: str | None = None,
           invert: bool = False):
    """A field with its help text, the drafter kinds it applies to, and (for booleans) a CLI flag that sets it to
    `not default` when given (e.g. --fixed-k for adaptive_k=True)."""
    return field(default=default, metadata={"help": help, "kinds": kinds, "flag": flag, "invert": invert})


@dataclass
class EvalConfig:
    questions: str | None = option(None, "embedded name (mt-bench) or Spec-Bench-format JSONL; null: no evaluation")
    per_category: int | None = option(None, "first N questions of each category")
    limit: int | None = option(None, "at most N questions in all")
    max_new_tokens: int = option(128, "new tokens per answer turn")
    temperature: float = option(0.0, "> 0: speculative sampling (lossless in distribution)")
    typical_acceptance: bool = option(False, "with temperature > 0: Medusa's typical acceptance instead (LOSSY: the "
                                      "output distribution is not the target's)", flag="--typical-acceptance")
    check_lossless: bool = option(False, "count answers that differ from plain greedy decoding")
    seed: int = option(0, "sampling seed")
    pack: bool = option(True, "CPU: keep torch's default linear layers (no oneDNN prepacking) and transformers' SDPA "
                        "attention for target and drafter", flag="--no-pack", invert=True)
    tree: str = option("auto", "'auto' (a static tree calibrated on this machine), 'chain', JSON rank paths, or for "
                       "EAGLE 'dynamic' (EAGLE-2 trees of max_tree_nodes nodes)", HEADS)
    min_speedup: float = option(1.05, "auto (and draft LMs): decode plainly unless the best tree (chain) is predicted "
                                "at least this many times faster than plain decoding (the cost model's margin)")
    max_tree_nodes: int = option(64, "auto: the largest tree tried; EAGLE dynamic trees: the nodes verified", HEADS)
    tree_depth: int = option(5, "EAGLE: draft steps per proposal (dynamic tree / static tree limit / chain length); "
                             "P-EAGLE, DFlash: chain length (at most their depths)", FEATURE_DRAFTERS)
    tree_topk: int = option(4, "EAGLE dynamic trees: nodes expanded per depth, and children per node", EAGLE)
    draft_k: int = option(4, "draft LMs: tokens drafted per step (the start value when adaptive)", DRAFT_LM)
    adaptive_k: bool = option(True, "draft LMs: keep k fixed (default: adaptive k)", DRAFT_LM, flag="--fixed-k",
                              invert=True)
    draft_siblings: int = option(0, "draft LMs, greedy: also verify the draft's next N ranked first tokens",
                                 DRAFT_LM)
    sibling_depth: int = option(1, "draft LMs, with draft_siblings: give the chain's tokens at depths 1..D their N "
                                "runners-up (no extra draft forward; more tree nodes)", DRAFT_LM)
    draft_confidence: float = option(0.0, "draft LMs: stop a step's chain once the draft's probability of its token "
                                     "is below this (0: off); draft_k is then the longest chain", DRAFT_LM)
    compare_hf: bool = option(False, "draft LMs: also time transformers' assisted generation with the same draft "
                              "(with prompt_lookup, also its own prompt lookup, without a draft)", DRAFT_LM)
    full_draft_vocab: bool = option(False, "draft over the whole vocabulary even when the drafter records a "
                                    "frequent-token set (drafter.draft_vocab at training)")
    draft_dtype: Literal["float32", "bfloat16", "float16"] | None = option(
        None, "draft LMs: run the draft in this dtype (null: the target's), e.g. bfloat16 beside a float32 target",
        DRAFT_LM)
    prompt_lookup: int = option(0, "where the last N (down to 2) tokens occurred before, propose what followed them "
                                "(prompt lookup, no drafter run) and the drafter's proposal elsewhere; 0: off")
    prompt_lookup_tokens: int = option(8, "tokens copied per prompt-lookup proposal")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check(not isinstance(value, float) or math.isfinite(value), f"eval.{f.name}", value, "must be finite")
        check(self.per_category is None or self.per_category >= 1, "eval.per_category", self.per_category,
              "must be >= 1 or null")
        check(self.limit is None or self.limit >= 1, "eval.limit", self.limit, "must be >= 1 or null")
        check(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "must be >= 1")
        check(self.temperature >= 0, "eval.temperature", self.temperature, "must be >= 0 (0: greedy)")
        check(not (self.check_lossless and self.temperature > 0), "eval.check_lossless", self.check_lossless,
              "compares against greedy decoding: use temperature 0")
        check(not (self.typical_acceptance and self.temperature == 0), "eval.typical_acceptance",
              self.typical_acceptance, "applies to sampling: give temperature > 0")
        check(self.min_speedup > 0, "eval.min_speedup", self.min_speedup, "must be > 0 (1: any predicted gain)")
        check(self.max_tree_nodes >= 1, "eval.max_tree_nodes", self.max_tree_nodes, "must be >= 1")
        check(self.tree_depth >= 1, "eval.tree_depth", self.tree_depth, "must be >= 1")
        check(self.tree_topk >= 1, "eval.tree_topk", self.tree_topk, "must be >= 1")
        check(self.draft_k >= 1, "eval.draft_k", self.draft_k, "must be >= 1")
        check(self.draft_siblings >= 0, "eval.draft_siblings", self.draft_siblings, "must be >= 0")
        check(self.sibling_depth >= 1, "eval.sibling_depth", self.sibling_depth, "must be >= 1")
        check(self.sibling_depth == 1 or self.draft_siblings, "eval.sibling_depth", self.sibling_depth,
              "gives chain tokens runners-up: set draft_siblings too")
        check(not (self.draft_siblings and self.temperature > 0), "eval.draft_siblings", self.draft_siblings,
              "is for greedy evaluation (temperature 0)")
        check(0 <= self.draft_confidence < 1, "eval.draft_confidence", self.draft_confidence, "must be in [0, 1)")
        check(self.prompt_lookup == 0 or self.prompt_lookup >= 2, "eval.prompt_lookup", self.prompt_lookup,
              "is the longest n-gram matched: >= 2, or 0 (off)")
        check(self.prompt_lookup_tokens >= 1, "eval.prompt_lookup_tokens", self.prompt_lookup_tokens, "must be >= 1")
        check(self.draft_dtype in (None, "float32", "bfloat16", "float16"), "eval.draft_dtype", self.draft_dtype,
              "must be one of float32, bfloat16, float16 or null (the target's dtype)")
        check_tree(self.tree, "eval.tree")

    def check_kind(self, kind: str) -> None:
        """Refuse options set away from their defaults that `kind` does not use (one line naming the kinds that do)."""
        for f in dataclasses.fields(self):
            kinds = f.metadata.get("kinds")
            if kinds is not None and kind not in kinds and getattr(self, f.name) != f.default:
                raise ConfigError(f"eval.{f.name}={getattr(self, f.name)!r} is for {' and '.join(kinds)} drafters; "
                                  f"this drafter is {kind}: leave it at {f.default!r}")
        check(self.tree != "dynamic" or kind == "eagle", "eval.tree", self.tree,
              f"(EAGLE-2 dynamic trees) is for eagle drafters; this drafter is {kind}")

    def for_kind(self, kind: str) -> "EvalConfig":
        """This config as a drafter of `kind` takes it, the options of other kinds at their defaults: the benchmark
        gives one set of options to drafters of several kinds (see unused_options for the check that goes with it)."""
        return dataclasses.replace(self, **{f.name: f.default for f in dataclasses.fields(self)
                                            if f.metadata["kinds"] is not None and kind not in f.metadata["kinds"]})

    def unused_options(self, kinds: set[str]) -> list[str]:
        """Kind-specific options set away from their defaults that no drafter of `kinds` takes."""
        return [f.name for f in dataclasses.fields(self) if f.metadata["kinds"] is not None
                and getattr(self, f.name) != f.default and not kinds & set(f.metadata["kinds"])]

    def proposer_options(self) -> dict:
        """The fields that shape the drafter's proposer (inference.proposer_setup.make_proposer's keywords)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in PROPOSER_FIELDS}


PROPOSER_FIELDS = ("tree", "min_speedup", "max_tree_nodes", "tree_depth", "tree_topk", "draft_k", "adaptive_k", "draft_siblings",
                   "sibling_depth", "draft_confidence", "full_draft_vocab", "prompt_lookup", "prompt_lookup_tokens")


TREE_NAMES = ("auto", "chain", "dynamic")


def check_tree(tree: str, key: str) -> None:
    """Refuse a tree that is neither a name nor JSON rank paths a static tree can be built from. Whether its paths
    are deeper than the drafter drafts is known only once the drafter is loaded (inference.tree.RankPaths)."""
    if tree not in TREE_NAMES:
        problem = _rank_paths_problem(tree)
        check(problem is None, key, tree, problem)


def _rank_paths_problem(tree: str) -> str | None:
    """What is wrong with `tree` as a JSON list of rank paths (None: nothing)."""
    try:
        paths = json.loads(tree)
    except (TypeError, ValueError, RecursionError):  # not text (a YAML list), not JSON, nested past the parser
        paths = None
    if not isinstance(paths, list) or not paths or not all(isinstance(p, list) and p for p in paths):
        return "must be auto, chain, dynamic or a JSON list of rank paths such as [[0], [0, 0], [1]]"
    bad = next((p for p in paths if not all(type(r) is int and r >= 0 for r in p)), None)  # (a bool is an int)
    if bad is not None:
        return f"has the path {bad}: a path lists ranks, integers >= 0 (0: the top candidate at that depth)"
    orphans = orphan_paths(paths)
    if orphans:
        path = list(orphans[0])
        return f"has the path {path} without its parent {path[:-1]}: add the parent path or leave that path out"
    return None
