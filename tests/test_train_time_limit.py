"""training.max_minutes: a run that runs out of time leaves a checkpoint and the drafter trained so far, marks the
last metrics row, and a re-run without the limit resumes from that checkpoint to the end."""
import json
from pathlib import Path

from tiny_assets import tiny_overrides
from train import trainer
from train.config import load_config
from train.train_heads import run

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "medusa_tiny.yaml")


def test_time_limit_saves_checkpoint_and_drafter_then_resumes(assets, tmp_path):
    common = ("training.max_steps=5", "checkpoint.every_steps=null", "logging.log_every=2")
    cut = run(load_config(TINY, tiny_overrides(assets, tmp_path, *common, "training.max_minutes=1e-9")))
    assert cut.cut and cut.finished and cut.step == 1
    assert (tmp_path / "drafter" / "config.json").is_file()
    assert [p.name for p in trainer.complete_checkpoints(str(tmp_path))] == ["step_00000001"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("cut")) for r in rows] == [(1, True)] and rows[0]["tokens"] > 0

    resumed = run(load_config(TINY, tiny_overrides(assets, tmp_path, *common)))
    assert not resumed.cut and resumed.step == 5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4, 5]
    assert rows[0]["tokens"] < rows[1]["tokens"] < rows[2]["tokens"] < rows[3]["tokens"]
