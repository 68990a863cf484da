"""Held-out acceptance while training (train/acceptance.py): τ logged per measured step, the best drafter kept as
drafter/ (ties: the later step), early stopping, and a resumed run continuing the same record."""
import json
from pathlib import Path

import pytest
import torch

from tiny_assets import tiny_overrides

from drafters import load_drafter
from target.model import load_target, stop_tokens
from train.acceptance import (BEST_DIR, LAST_DIR, RECORD, Answers, Record, acceptance_proposer, greedy_path,
                              heldout_prompts, heldout_tau, loop_tau, teacher_forced_accepts)
from train.config import ConfigError, load_config
from train.kinds import recipe_class
from train.push import model_card
from train.recipe import run

REPO = Path(__file__).resolve().parents[1]


def _train(assets, out: Path, kind: str, *overrides: str):
    cfg = load_config(str(REPO / "configs" / f"{kind}_tiny.yaml"),
                      tiny_overrides(assets, out, "training.acceptance_every=1", *overrides))
    return run(recipe_class(cfg.drafter.kind), cfg), cfg


def _taus(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["heldout_tau"] for r in rows if "heldout_tau" in r}


def test_record_keeps_the_later_of_equal_bests_and_counts_measurements_without_a_rise():
    r = Record({})
    assert [r.add(s, t) for s, t in [(1, 1.2), (2, 1.5), (3, 1.5), (4, 1.4)]] == [True, True, True, False]
    assert (r.best_step, r.best_tau, r.stale) == (3, 1.5, 2)
    assert r.add(5, 1.6) and r.stale == 0


def test_heldout_prompts_are_the_turns_before_the_first_supervised_token():
    rows = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}, {"input_ids": [9, 10], "loss_mask": [1, 1]},
            {"input_ids": [3, 4, 5], "loss_mask": [0, 1, 0]}]
    assert [p.tolist() for p in heldout_prompts(rows, 5)] == [[5, 6], [3]]
    assert len(heldout_prompts(rows, 1)) == 1


def test_training_keeps_the_drafter_with_the_best_heldout_tau(assets, tmp_path):
    """EAGLE-3 at a high learning rate: τ moves from step to step. drafter/ is the best step's drafter (its τ,
    measured again on the same prompts, is the recorded one), drafter-last/ the last step's when they differ."""
    out = tmp_path / "run"
    result, cfg = _train(assets, out, "eagle3", "training.max_steps=4", "training.lr=0.01")
    taus = _taus(out)
    assert sorted(taus) == [1, 2, 3, 4] and all(t >= 1 for t in taus.values())
    best = max(s for s in taus if taus[s] == max(taus.values()))
    saved = json.loads((out / "drafter" / "config.json").read_text())["heldout_acceptance"]
    assert saved == {"step": best, "heldout_tau": taus[best]}
    assert (out / LAST_DIR).is_dir() == (best != 4) and not (out / BEST_DIR).exists()
    target, tokenizer = load_target(assets["target"])
    drafter = load_drafter(str(out / "drafter"), target).eval()
    rows = _heldout_rows(cfg, tokenizer)
    answers = Answers(target, heldout_prompts(rows, cfg.training.acceptance_prompts), cfg.training.acceptance_tokens,
                      stop_tokens(target, tokenizer))
    measured = heldout_tau(drafter, "eagle", target, answers, cfg.training.acceptance_depth)
    assert round(measured["tau"], 6) == taus[best]
    card = model_card(str(out / "drafter"), "someone/tiny-eagle3", None)
    assert f"Saved from training step {best}: held-out τ {taus[best]:.3f}" in card
    record = json.loads((out / RECORD).read_text())
    assert record["best_step"] == best and {int(s): t for s, t in record["taus"].items()} == taus


def _heldout_rows(cfg, tokenizer) -> list[dict]:
    """The held-out conversations' tokens as the recipe splits them: the last ones of the token dataset."""
    from data.embedded import resolve_data
    from data.tokenize import build_token_dataset
    c = cfg.data
    ds, _ = build_token_dataset(resolve_data(c.train), tokenizer, c.max_length, c.cache_dir, c.limit)
    n = len(ds)
    rows = ds[n - min(c.holdout_max, int(n * c.holdout_fraction)):]
    return [{"input_ids": i, "loss_mask": m} for i, m in zip(rows["input_ids"], rows["loss_mask"])]


def test_early_stopping_ends_the_run_when_tau_stops_rising(assets, tmp_path):
    """A learning rate too small to change any draft: τ stays equal, so after `patience` measurements without a
    rise the run stops, saving the drafter (the later of the equal ones)."""
    out = tmp_path / "run"
    result, _ = _train(assets, out, "medusa", "training.max_steps=6", "training.lr=1e-12",
                       "training.early_stop_patience=2")
    assert result.finished and result.cut and result.step == 3
    taus = _taus(out)
    assert sorted(taus) == [1, 2, 3] and len(set(taus.values())) == 1
    assert json.loads((out / "drafter" / "config.json").read_text())["heldout_acceptance"]["step"] == 3


def test_a_resumed_run_continues_the_same_record(assets, tmp_path):
    whole, _ = _train(assets, tmp_path / "whole", "medusa", "training.max_steps=4", "training.lr=0.01",
                      "checkpoint.every_steps=1")
    part = tmp_path / "part"
    first, _ = _train(assets, part, "medusa", "training.max_steps=4", "training.lr=0.01", "checkpoint.every_steps=1",
                      "training.stop_after=2")
    assert not first.finished
    _train(assets, part, "medusa", "training.max_steps=4", "training.lr=0.01", "checkpoint.every_steps=1")
    assert _taus(part) == _taus(tmp_path / "whole")
    assert json.loads((part / RECORD).read_text()) == json.loads((tmp_path / "whole" / RECORD).read_text())
    for name in ("drafter", LAST_DIR):
        assert (part / name).is_dir() == (tmp_path / "whole" / name).is_dir()
    a = load_drafter(str(part / "drafter")).state_dict()
    b = load_drafter(str(tmp_path / "whole" / "drafter")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_needs_the_measurement(assets, tmp_path):
    with pytest.raises(ConfigError, match="training.early_stop_patience"):
        load_config(str(REPO / "configs" / "medusa_tiny.yaml"),
                    tiny_overrides(assets, tmp_path, "training.early_stop_patience=2"))


def test_greedy_path_follows_the_children_that_carry_the_answer():
    from inference.tree import TokenTree

    tree = TokenTree(torch.tensor([9, 4, 5, 6, 7]), [-1, 0, 0, 2, 2])  # root 9: children 4 and 5; 5: 6 and 7
    assert greedy_path(tree, [5, 7, 1]) == [0, 2, 4]
    assert greedy_path(tree, [4, 6]) == [0, 1]
    assert greedy_path(tree, [3]) == [0] and greedy_path(tree, []) == [0]


def _drafters(target):
    from conftest import perturbed_medusa
    from drafters import DFlashModel, EagleModel
    from drafters.draft_lm import build_draft_lm

    torch.manual_seed(1)
    eagles = {}
    for version in (1, 3):
        eagle = EagleModel.from_target(target, version=version)
        with torch.no_grad():
            for p in eagle.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
        eagle.attach_target(target)
        eagles[f"eagle{version}"] = ("eagle", eagle.eval())
    peagle = EagleModel.from_target(target, version=3, parallel_drafts=4)
    dflash = DFlashModel.from_target(target, block_size=5)
    with torch.no_grad():
        for drafter in (peagle, dflash):
            for p in drafter.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return {"medusa": ("medusa", perturbed_medusa(target)), **eagles, "peagle": ("eagle", peagle.eval()),
            "dflash": ("dflash", dflash.eval()), "draft_lm": ("draft_lm", build_draft_lm(target, 2, [0]).eval())}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_teacher_forced_tau_is_the_loops_tau_for_every_kind(arch):
    """The estimate drafts against the target's own greedy answers with the features of one forward; the loop
    decodes those answers with verify forwards. Under greedy acceptance both take the same steps: the same
    accepted lengths (the last step's may differ: the loop also compares drafts past the answer's end) and τ."""
    from conftest import make_tiny_target

    target = make_tiny_target(arch).eval()
    prompts = [torch.tensor([5, 17, 99, 3, 42, 7]), torch.tensor([8, 8, 120, 64, 3])]
    answers = Answers(target, prompts, 24, set())
    accepted = 0
    for name, (kind, drafter) in _drafters(target).items():
        estimate = heldout_tau(drafter, kind, target, answers, depth=3)
        loop = loop_tau(drafter, kind, target, prompts, 24, set(), depth=3)
        assert estimate["tau"] == pytest.approx(loop["tau"], abs=1e-12), name
        proposer = acceptance_proposer(drafter, kind, target, 3)
        for prompt, answer in zip(prompts, answers.of(getattr(proposer, "feature_layers", None))):
            from inference.speculative import speculative_generate
            steps = teacher_forced_accepts(proposer, answer)
            real = speculative_generate(target, proposer, prompt, 24, set()).accept_lengths
            assert steps[:-1] == real[:-1] and len(steps) == len(real), name
            accepted += sum(steps)
    assert accepted > 0  # some drafts were accepted: the steps had something to agree on


@pytest.mark.parametrize("tree", ["[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]", "dynamic"])
def test_teacher_forced_tau_of_a_tree_is_the_loops_tau(tree):
    """training.acceptance_tree: the estimate follows the tree's greedy path through the target's answer; the
    loop verifies the same tree. Same τ for every kind that drafts trees (dynamic: EAGLE's drafters only)."""
    from conftest import make_tiny_target

    target = make_tiny_target().eval()
    prompts = [torch.tensor([5, 17, 99, 3, 42, 7]), torch.tensor([8, 8, 120, 64, 3])]
    answers = Answers(target, prompts, 24, set())
    multi = 0
    for name, (kind, drafter) in _drafters(target).items():
        if kind == "draft_lm" or (tree == "dynamic" and name in ("medusa", "peagle", "dflash")):
            continue
        estimate = heldout_tau(drafter, kind, target, answers, 3, tree)
        loop = loop_tau(drafter, kind, target, prompts, 24, set(), 3, tree)
        chain = heldout_tau(drafter, kind, target, answers, 3)
        assert estimate["tau"] == pytest.approx(loop["tau"], abs=1e-12), name
        assert estimate["tau"] >= chain["tau"] - 1e-12, name  # the tree holds the chain's path to depth 3
        multi += estimate["tau"] > chain["tau"]
    assert multi  # some tree accepted a token the chain missed: the trees were measured as trees


def test_the_acceptance_tree_is_a_tree_and_not_for_draft_lms(assets, tmp_path):
    for kind, tree, problem in [("eagle3", "auto", "sized after training"), ("eagle3", "[[0, 0]]", "without its parent"),
                                ("draft_lm", "dynamic", "draft LM")]:
        with pytest.raises(ConfigError, match=f"training.acceptance_tree.*{problem}"):
            load_config(str(REPO / "configs" / f"{kind}_tiny.yaml"),
                        tiny_overrides(assets, tmp_path, f"training.acceptance_tree={tree}"))


def test_training_logs_the_trees_tau_and_picks_by_it(assets, tmp_path):
    out = tmp_path / "run"
    _train(assets, out, "medusa", "training.max_steps=2", "training.acceptance_tree=[[0], [1], [0, 0], [0, 0, 0]]")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if "heldout_tau" in r]
    assert [r["step"] for r in measured] == [1, 2]
    assert all(r["heldout_tau"] >= r["heldout_chain_tau"] for r in measured)
    record = json.loads((out / RECORD).read_text())
    assert {int(s): t for s, t in record["taus"].items()} == {r["step"]: r["heldout_tau"] for r in measured}
