"""The one evaluation config (inference/eval_config.py): each rule checked once, the same in a training config's
`eval:` section (at startup, before any model loads) and on the evaluation command line."""
from pathlib import Path

import pytest

from inference.eval_config import ConfigError, EvalConfig
from inference.evaluate import build_parser, config_from_args, eval_argv
from train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-1.0), r"eval\.temperature=-1\.0 must be >= 0"),
    (dict(temperature=float("inf")), r"eval\.temperature=inf must be finite"),
    (dict(max_new_tokens=0), r"eval\.max_new_tokens=0 must be >= 1"),
    (dict(check_lossless=True, temperature=0.7), r"eval\.check_lossless=True compares against greedy decoding"),
    (dict(typical_acceptance=True), r"eval\.typical_acceptance=True applies to sampling"),
    (dict(draft_siblings=-1), r"eval\.draft_siblings=-1 must be >= 0"),
    (dict(draft_siblings=1, temperature=0.7), r"eval\.draft_siblings=1 is for greedy"),
    (dict(sibling_depth=0), r"eval\.sibling_depth=0 must be >= 1"),
    (dict(sibling_depth=2), r"eval\.sibling_depth=2 gives chain tokens runners-up: set draft_siblings"),
    (dict(draft_confidence=1.0), r"eval\.draft_confidence=1\.0 must be in \[0, 1\)"),
    (dict(draft_dtype="fp8"), r"eval\.draft_dtype='fp8' must be one of"),
    (dict(prompt_lookup=1), r"eval\.prompt_lookup=1 is the longest n-gram matched: >= 2, or 0"),
    (dict(prompt_lookup_tokens=0), r"eval\.prompt_lookup_tokens=0 must be >= 1"),
    (dict(tree="[[0], [x]]"), r"eval\.tree='\[\[0\], \[x\]\]' must be auto, chain, dynamic or a JSON list"),
    (dict(tree="[[0], []]"), r"eval\.tree='\[\[0\], \[\]\]' must be auto, chain, dynamic or a JSON list"),
    (dict(tree="[[0], [0, -1]]"), r"eval\.tree='\[\[0\], \[0, -1\]\]' has the path \[0, -1\]: a path lists ranks, "
                                  r"integers >= 0"),
    (dict(tree="[[true]]"), r"eval\.tree='\[\[true\]\]' has the path \[True\]: a path lists ranks"),
    (dict(tree="[[0], [1, 0, 0]]"), r"eval\.tree='\[\[0\], \[1, 0, 0\]\]' has the path \[1, 0, 0\] without its "
                                    r"parent \[1, 0\]: add the parent path or leave that path out"),
    (dict(limit=0), r"eval\.limit=0 must be >= 1 or null"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**options)


@pytest.mark.parametrize("kind, options, message", [
    ("medusa", dict(compare_hf=True), r"eval\.compare_hf=True is for draft_lm drafters; this drafter is medusa"),
    ("eagle", dict(draft_k=3), r"eval\.draft_k=3 is for draft_lm drafters; this drafter is eagle"),
    ("medusa", dict(draft_dtype="bfloat16"), r"eval\.draft_dtype='bfloat16' is for draft_lm drafters"),
    ("draft_lm", dict(tree_depth=3), r"eval\.tree_depth=3 is for eagle and dflash drafters; this drafter is draft_lm"),
    ("medusa", dict(tree="dynamic"), r"eval\.tree='dynamic' \(EAGLE-2 dynamic trees\) is for eagle drafters"),
])
def test_options_of_other_kinds_are_refused(kind, options, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**options).check_kind(kind)


def test_a_kind_takes_its_own_options():
    EvalConfig(draft_siblings=2, sibling_depth=3, prompt_lookup=3, draft_dtype="bfloat16").check_kind("draft_lm")
    EvalConfig(tree="dynamic", tree_depth=3, tree_topk=2, prompt_lookup=3).check_kind("eagle")
    EvalConfig(tree="[[0], [0, 0], [1]]", max_tree_nodes=8, prompt_lookup=3).check_kind("medusa")


def test_training_config_refuses_at_startup_what_evaluation_would():
    """Before: these passed validation, trained to the end and failed inside save -> evaluate."""
    with pytest.raises(ConfigError, match=r"eval\.check_lossless=True compares against greedy"):
        load_config(str(CONFIGS / "medusa_tiny.yaml"), ["eval.check_lossless=true", "eval.temperature=0.7"])
    with pytest.raises(ConfigError, match=r"eval\.compare_hf=True is for draft_lm drafters; this drafter is medusa"):
        load_config(str(CONFIGS / "medusa_tiny.yaml"), ["eval.compare_hf=true"])


def test_command_line_builds_the_same_config():
    args = build_parser().parse_args(["--target", "t", "--drafter", "d", "--questions", "q", "--fixed-k",
                                      "--draft-k", "3", "--no-pack", "--temperature", "0.5", "--seed", "7"])
    assert config_from_args(args) == EvalConfig(questions="q", adaptive_k=False, draft_k=3, pack=False,
                                                temperature=0.5, seed=7)


@pytest.mark.parametrize("config", [
    EvalConfig(questions="mt-bench"),
    EvalConfig(questions="q.jsonl", per_category=1, limit=2, max_new_tokens=64, check_lossless=True, pack=False,
               tree="[[0], [0, 0], [1]]", max_tree_nodes=8),
    EvalConfig(questions="q", adaptive_k=False, draft_k=3, draft_siblings=2, sibling_depth=2, draft_confidence=0.25,
               prompt_lookup=3, draft_dtype="bfloat16", seed=7),
    EvalConfig(questions="q", temperature=0.5, typical_acceptance=True),
])
def test_flags_written_for_a_config_give_it_back(config):
    args = build_parser().parse_args(["--target", "t", "--drafter", "d", *eval_argv(config)])
    assert config_from_args(args) == config


def test_command_line_error_is_the_config_rule_in_flag_names(capsys):
    from inference.evaluate import main

    with pytest.raises(SystemExit):
        main(["--target", "t", "--drafter", "d", "--questions", "q", "--sibling-depth", "2"])
    assert "--sibling-depth=2 gives chain tokens runners-up: set draft_siblings too" in capsys.readouterr().err
