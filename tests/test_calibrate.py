"""The cost model (inference/calibrate.py): whole loop steps timed part by part, the tree of the highest
predicted speedup, plain decoding when none pays by the margin, and the prediction beside the measurement."""
import json

import pytest
import torch

from conftest import make_tiny_target
from inference.calibrate import LoopTimer, chain_tau, choose_chain, choose_tree
from inference.proposers import MedusaProposer
from inference.speculative import NoDraft, StepClock
from inference.tree import expected_accept_lengths, grow_tree
from test_evaluate import saved  # noqa: F401 (a fixture: a tiny saved target, Medusa drafter, questions)
from test_speculative import perturbed_medusa

ACCURACY = [[0.6, 0.2], [0.4, 0.1]]


def linear_costs(plain: float, per_node: float):
    """Step costs of a machine where a step costs `plain` seconds plus `per_node` for each drafted node."""
    def costs(paths):
        step = plain + per_node * (0 if paths is None else len(paths))
        return {**dict.fromkeys(StepClock.PARTS, 0.0), "verify": step, "step": step}
    return costs


def test_choose_tree_keeps_the_best_predicted_speedup():
    choice = choose_tree(ACCURACY, [1, 2, 3, 4, 5], linear_costs(0.010, 0.001))
    speedups = {}
    for n in (2, 3, 4, 5):
        paths = grow_tree(ACCURACY, n - 1)
        speedups[n] = (1 + sum(expected_accept_lengths(paths, ACCURACY))) * 0.010 / (0.010 + 0.001 * (n - 1))
    best = max(speedups, key=speedups.get)
    assert [row["nodes"] for row in choice.table] == [2, 3, 4, 5]
    assert [row["predicted_speedup"] for row in choice.table] == pytest.approx(list(speedups.values()))
    assert choice.paths == grow_tree(ACCURACY, best - 1) and choice.predicted_speedup == pytest.approx(speedups[best])
    assert choice.plain["step_ms"] == pytest.approx(10.0)


def test_no_tree_pays_when_drafted_nodes_cost_more_than_they_bring():
    """Each node costs a whole plain step here, and the margin refuses a best candidate just under it."""
    choice = choose_tree(ACCURACY, [1, 2, 4], linear_costs(0.010, 0.010))
    assert choice.paths is None and choice.predicted_speedup == 1.0 and choice.best["predicted_speedup"] < 1
    margin = choose_tree(ACCURACY, [2, 3], linear_costs(0.010, 0.001))
    assert margin.paths is not None
    refused = choose_tree(ACCURACY, [2, 3], linear_costs(0.010, 0.001), min_speedup=margin.predicted_speedup + 0.01)
    assert refused.paths is None and refused.best == margin.best


def chain_costs(plain: float, per_token: float):
    """Step costs of a machine where a draft-LM step costs `plain` seconds plus `per_token` per drafted token."""
    def costs(k):
        step = plain + per_token * (k or 0)
        return {**dict.fromkeys(StepClock.PARTS, 0.0), "verify": step, "step": step}
    return costs


def test_chain_tau_is_the_expected_accepted_run_plus_the_bonus_token():
    assert chain_tau(0.5, 1) == pytest.approx(1.5) and chain_tau(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert chain_tau(0.0, 4) == 1.0 and chain_tau(1.0, 4) == 5.0


def test_choose_chain_keeps_the_best_chain_or_decodes_plainly():
    record, pays = choose_chain(0.6, [1, 2, 4], chain_costs(0.010, 0.002))
    speedups = {k: chain_tau(0.6, k) * 0.010 / (0.010 + 0.002 * k) for k in (1, 2, 4)}
    assert [row["predicted_speedup"] for row in record["candidates"]] == pytest.approx(list(speedups.values()))
    assert pays and record["best"]["nodes"] == max(speedups, key=speedups.get) + 1
    assert record["predicted_speedup"] == pytest.approx(max(speedups.values()))
    record, pays = choose_chain(0.05, [1, 2, 4], chain_costs(0.010, 0.002), min_speedup=1.05)
    assert not pays and (record["expected_tau"], record["predicted_speedup"]) == (1.0, 1.0)
    assert record["best"]["predicted_speedup"] < 1.05


@pytest.mark.parametrize("agreement, margin, drafts", [(0.0, 1.05, False), (1.0, 0.01, True)])
def test_a_draft_lm_that_cannot_pay_decodes_plainly(agreement, margin, drafts):
    """The held-out agreement training recorded predicts the chain's tau; a draft that agrees with nothing is
    predicted slower than plain decoding on any machine. One that always agrees is kept at any positive margin:
    timings on a loaded machine can make even k + 1 tokens per step look slow, so its margin is near zero."""
    from drafters.draft_lm import build_draft_lm
    from inference.draft_lm_proposer import DraftLMProposer
    from inference.proposer_setup import make_proposer

    target = make_tiny_target("llama").eval()
    draft = build_draft_lm(target, 1, [0]).eval()
    draft.config.draftsmith = {**getattr(draft.config, "draftsmith", {}), "heldout_agreement": agreement}
    with torch.no_grad():
        proposer, setup = make_proposer(draft, target, min_speedup=margin)
    assert isinstance(proposer, DraftLMProposer if drafts else NoDraft)
    assert (setup.get("decoding") == "plain") != drafts and setup["calibration"]["heldout_agreement"] == agreement
    assert [row["nodes"] for row in setup["calibration"]["candidates"]] == [2, 3, 4, 5, 7, 9]


def test_loop_timer_times_every_part_of_real_steps():
    target = make_tiny_target("llama")
    drafter = perturbed_medusa(target)
    timer = LoopTimer(target, context_len=32, steps=3, warmup=1)
    tree = timer(MedusaProposer(drafter, grow_tree(ACCURACY, 3)))
    plain = timer(NoDraft())
    assert set(tree) == {*StepClock.PARTS, "step"} and all(v >= 0 for v in tree.values())
    assert tree["verify"] > 0 and tree["draft"] > 0 and tree["cache"] > 0
    assert plain["step"] > 0 and timer.seq.cache.get_seq_length() == 32  # cut back to the context


@pytest.mark.parametrize("min_speedup", [100.0, 0.01])
def test_evaluation_decodes_plainly_when_no_tree_pays_and_reports_the_prediction(saved, capsys, min_speedup):
    """A margin no tree can reach: plain decoding, said in one line, lossless; a margin every tree passes: the
    best tree. Either way the report holds the prediction beside the measurement."""
    from inference.evaluate import main

    out = saved["root"] / f"eval_{min_speedup}.json"
    main(["--target", saved["target"], "--drafter", saved["drafter"], "--questions", saved["questions"],
          "--max-new-tokens", "12", "--check-lossless", "--max-tree-nodes", "4", "--min-speedup", str(min_speedup),
          "--output", str(out)])
    report, printed = json.loads(out.read_text()), capsys.readouterr().out
    setup, prediction = report["setup"]["proposer"], report["prediction"]
    assert report["lossless"]["mismatches"] == 0
    assert set(prediction) >= {"predicted_speedup", "measured_speedup", "predicted_tau", "measured_tau"}
    assert f"cost model: predicted {prediction['predicted_speedup']:.2f}x" in printed
    if min_speedup > 1:
        assert setup["decoding"] == "plain" and setup["nodes"] == 1 and prediction["predicted_speedup"] == 1.0
        assert report["overall"]["tau"] == 1.0 and "no tree pays on this machine for this drafter" in printed
    else:
        assert "decoding" not in setup and 2 <= setup["nodes"] <= 4
        assert prediction["predicted_tau"] == setup["calibration"]["best"]["expected_tau"] > 1
        assert "no tree pays" not in printed
