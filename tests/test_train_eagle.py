"""EAGLE training through the shared recipe (train/train_heads.py, drafter.kind=eagle): every drafter parameter
moves and no target parameter does, per-step statistics are logged, the held-out per-step accuracy is recorded,
and the evaluation writes the same report fields as for the other drafter kinds, losslessly."""
import json
from pathlib import Path

import pytest
import torch

from conftest import assert_target_unchanged

from drafters import EagleModel, load_drafter
from target.model import load_target
from tiny_assets import tiny_overrides
from train import push
from train.config import ConfigError, load_config
from train.train_heads import main, run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", [1, 3])
def test_eagle_training_end_to_end(assets, tmp_path, version):
    config = str(REPO / "configs" / f"eagle{version}_tiny.yaml")
    overrides = tiny_overrides(assets, tmp_path / "run", "training.max_steps=3",
                               f"eval.questions={assets['eval.questions']}", "eval.check_lossless=true")
    cfg = load_config(config, overrides)
    result = run(cfg)
    assert result.finished and result.step == 3

    assert_target_unchanged(result.target, assets["target"])
    pristine, _ = load_target(assets["target"])
    saved = load_drafter(str(tmp_path / "run" / "drafter"), pristine)
    assert isinstance(saved, EagleModel) and saved.config.eagle_version == version
    torch.manual_seed(cfg.training.seed)  # the recipe's initialisation, rebuilt
    initial = EagleModel.from_target(pristine, version, saved.config.feature_layers,
                                     saved.draft_ids().tolist() if version == 3 else None)
    trained = dict(saved.named_parameters())
    assert trained.keys() == dict(initial.named_parameters()).keys()
    for name, p in initial.named_parameters():
        assert not torch.equal(p, trained[name]), f"drafter parameter {name} did not change"
    steps = cfg.drafter.ttt_steps if version == 3 else 1
    assert len(saved.config.step_accuracy) == steps and all(0 <= a <= 1 for a in saved.config.step_accuracy)
    topk = saved.config.step_topk_accuracy  # [steps][10], rank 0 = top-1, shares of one count per step
    assert len(topk) == steps and all(len(row) == 10 and sum(row) <= 1 + 1e-9 for row in topk)
    assert [row[0] for row in topk] == pytest.approx(saved.config.step_accuracy)
    if version == 3:
        assert len(saved.d2t) == cfg.drafter.draft_vocab == 200
        assert 0 < saved.config.draftsmith["draft_vocab_heldout_coverage"] <= 1

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(len(r["head_acc"]) == steps for r in rows)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["setup"]["drafter_kind"] == "eagle" and report["setup"]["proposer"]["tree"] == "dynamic"
    assert report["lossless"]["mismatches"] == 0 and report["lossless"]["checked"] == 3  # eval.limit=2: one 2-turn question
    assert {"tau", "alpha", "speedup", "acceptance_by_depth"} <= report["overall"].keys()

    dry = tmp_path / "dry"  # the Hub folder: the model card says what the drafter is and what it measured
    push.main(["--drafter", str(tmp_path / "run" / "drafter"), "--repo-id", "someone/tiny-eagle", "--eval",
               str(tmp_path / "run" / "eval.json"), "--dry-run", str(dry)])
    card = (dry / "README.md").read_text()
    assert f"EAGLE-{version}" in card and "Held-out top-1 accuracy per draft step" in card and "| **overall** |" in card


def test_config_errors_name_the_key(tmp_path):
    config = str(REPO / "configs" / "eagle1_tiny.yaml")
    with pytest.raises(ConfigError, match="drafter.feature_layers"):
        load_config(config, ["drafter.feature_layers=[1, 2]"])  # EAGLE-1 reads the last hidden state
    with pytest.raises(ConfigError, match="drafter.ttt_steps"):
        load_config(str(REPO / "configs" / "eagle3_tiny.yaml"), ["drafter.ttt_steps=0"])
    with pytest.raises(ConfigError, match="eval.tree_depth"):
        load_config(config, ["eval.tree_depth=0"])
    with pytest.raises(SystemExit, match="train/train_draft_lm.py"):
        main(["--config", str(REPO / "configs" / "draft_lm_tiny.yaml"), f"output_dir={tmp_path}"])


def test_step_time_reports_the_ratio_on_the_tiny_config(assets, tmp_path, capsys):
    """python -m train.step_time runs the config's real recipe and prints per-batch times and their ratio."""
    from train import step_time

    overrides = [o for o in tiny_overrides(assets, tmp_path / "unused") if not o.startswith("output_dir=")]
    step_time.main(["--config", str(REPO / "configs" / "eagle3_tiny.yaml"), "--batches", "2", "--repeats", "1",
                    *overrides, "drafter.ttt_steps=2"])
    out = capsys.readouterr().out
    assert out.count("ratio") == 2
    assert "eagle (" in out and "training step / target forward =" in out and "over 2 micro-batches" in out
