"""The GPU pipeline end to end on tiny assets in one process (regenerate -> train 4 drafters -> zoo -> evaluate ->
cards, curves), its stage runner (time limits end processes, parallel stages overlap), and its shipped configs."""
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from drafters import load_drafter
from target.model import load_target
from train.config import ConfigError, load_dataclass
from train.curves import chain_tau, curve, flattens, main as curves_main
from train.pipeline import Pipeline, main
from train.pipeline_config import PipelineConfig
from train.stages import Stage, run_stages
from test_zoo_regression import assert_keeps_floor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PIPELINES = sorted(CONFIGS.glob("pipeline_*.yaml"))
NAMES = ["medusa", "eagle1", "eagle3", "draft_lm"]


@pytest.fixture(scope="module")
def pipeline_run(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    overrides = [f"target={assets['target']}", f"regenerate.input={assets['data.train']}",
                 f"evaluate.questions={assets['eval.questions']}", f"work_dir={root / 'work'}",
                 f"output_dir={root / 'out'}"]
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(CONFIGS / "pipeline_tiny.yaml"), *overrides])
    return root / "out", exit_.value.code


@pytest.fixture(scope="module")
def pipeline_in_processes(assets, tmp_path_factory):
    """The same run with every stage in its own process, trainings and evaluations at the same time (as on a GPU)."""
    root = tmp_path_factory.mktemp("pipeline_processes")
    overrides = [f"target={assets['target']}", f"regenerate.input={assets['data.train']}",
                 f"evaluate.questions={assets['eval.questions']}", f"work_dir={root / 'work'}",
                 f"output_dir={root / 'out'}", "processes=true", "parallel=true"]
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(CONFIGS / "pipeline_tiny.yaml"), *overrides])
    return root / "out", exit_.value.code


@pytest.mark.parametrize("run", ["pipeline_run", pytest.param("pipeline_in_processes", marks=pytest.mark.slow)])
def test_every_stage_runs_and_leaves_measured_zoo_folders(run, assets, request):
    out, code = request.getfixturevalue(run)
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and all(s["ok"] for s in summary["stages"].values()), summary["stages"]
    assert set(summary["stages"]) == {"regenerate", *(f"{s}_{n}" for n in NAMES for s in ("train", "zoo")),
                                      *(f"evaluate_{n}{x}" for n in NAMES for x in ("", ".regression"))}
    target, _ = load_target(assets["target"])
    for name in NAMES:
        folder = out / "zoo" / "target" / name
        manifest = json.loads((folder / "zoo.json").read_text())
        card = manifest["card"]
        assert card["measured"]["mismatches"] == 0 and card["measured"]["tau"] >= 1.0
        assert card["measured"]["answers"] == 3  # 2 questions, one of them with two turns
        assert card["regression"]["mismatches"] == 0
        assert card["regression"]["tau_floor"] <= card["regression"]["tau"]
        assert card["training"]["steps"] == card["training"]["total_steps"] == 3 and card["training"]["tokens"] > 0
        assert card["data"]["conversations"] == summary["data"]["256"]["conversations"] > 0
        assert f"| measured tau | **{card['measured']['tau']:.2f}**" in (folder / "README.md").read_text()
        assert load_drafter(str(folder), target) is not None
        assert (out / "runs" / name / "metrics.jsonl").is_file() and (out / "logs" / f"train_{name}.log").is_file()
    assert (out / "curves.png").stat().st_size > 0 and "| draft_lm |" in (out / "curves.md").read_text()
    assert not list(out.rglob("*.pt")) and not list(out.rglob("checkpoints"))  # checkpoints stay in work_dir


def test_regression_questions_reuse_the_calibrated_tree_and_the_floor_holds(pipeline_run):
    out, _ = pipeline_run
    main_report = json.loads((out / "eval" / "medusa.json").read_text())
    card = json.loads((out / "zoo" / "target" / "medusa" / "zoo.json").read_text())["card"]
    assert json.loads(card["regression"]["eval"]["tree"]) == main_report["setup"]["proposer"]["paths"]
    regression = json.loads((out / "eval" / "medusa.regression.json").read_text())
    assert regression["setup"]["num_questions"] == 1 and regression["setup"]["max_new_tokens"] == 8
    assert_keeps_floor(out / "zoo" / "target" / "medusa")  # what tests/test_zoo_regression.py runs on zoo/


def sleeper(name: str, seconds: float, tmp_path: Path, timeout_s: float = 30.0) -> Stage:
    return Stage(name, "timeit", ["-n", "1", "-r", "1", f"import time; time.sleep({seconds})"],
                 tmp_path / f"{name}.log", timeout_s)


def test_a_stage_past_its_limit_is_ended_and_parallel_stages_overlap(tmp_path):
    start = time.monotonic()
    results = run_stages([sleeper("slow", 60, tmp_path, timeout_s=1.0), sleeper("a", 1.5, tmp_path),
                          sleeper("b", 1.5, tmp_path)], processes=True, parallel=True)
    assert time.monotonic() - start < 15  # not 60 s, and the two sleeps overlapped
    assert results["slow"].returncode is None and not results["slow"].ok
    assert "past this stage's limit" in results["slow"].tail()
    assert results["a"].ok and results["b"].ok and results["a"].seconds < 10


def test_an_interrupted_wait_ends_the_running_stages(tmp_path):
    """A pipeline ended by a signal must not leave its stages running (each has its own process group)."""
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    stage = Stage("long", "timeit", ["-n", "1", "-r", "1", code], tmp_path / "long.log", 300.0)

    def interrupt(*_):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 8.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_stages([stage], processes=True, parallel=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_a_failing_stage_is_reported_with_its_log(tmp_path):
    failing = Stage("fail", "timeit", ["-n", "1", "1/0"], tmp_path / "fail.log", 30.0)
    for processes in (True, False):
        result = run_stages([failing], processes=processes, parallel=False)["fail"]
        assert not result.ok and "ZeroDivisionError" in result.tail(20)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipeline_configs_parse_with_their_training_configs(path, tmp_path):
    cfg = load_dataclass(PipelineConfig, str(path), [f"work_dir={tmp_path}", f"output_dir={tmp_path / 'out'}"])
    pipeline = Pipeline(cfg)
    assert set(pipeline.train_cfgs) == set(NAMES) | ({"peagle", "dflash"} if "gpu" in path.name else set())
    for name, tc in pipeline.train_cfgs.items():
        assert tc.training.max_minutes == cfg.drafters[name].minutes and tc.eval.questions is None
        assert tc.data.train == str(tmp_path / "regenerated.jsonl")


def test_bad_pipeline_configs_are_refused(tmp_path):
    path = CONFIGS / "pipeline_tiny.yaml"
    with pytest.raises(ConfigError, match=r"unknown key drafters\.medusa\.minute in drafters\.medusa"):
        load_dataclass(PipelineConfig, str(path), ["drafters.medusa.minute=1"])
    with pytest.raises(ConfigError, match=r"eval\.tree='dynamic' \(EAGLE-2 dynamic trees\) is for eagle drafters"):
        Pipeline(load_dataclass(PipelineConfig, str(path), ["drafters.medusa.eval.tree=dynamic"]))
    with pytest.raises(ConfigError, match=r"parallel=True needs processes: true"):
        load_dataclass(PipelineConfig, str(path), ["parallel=true"])


def test_chain_tau_and_where_a_curve_flattens(tmp_path):
    assert chain_tau([0.5, 0.25], depth=3) == pytest.approx(1 + 0.5 + 0.125 + 0.03125)
    rows = [{"step": i, "tokens": 100 * i, "head_acc": [a]} for i, a in enumerate([0.1, 0.5, 0.75, 0.8, 0.82], 1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert curve(tmp_path, "head_acc[0]") == [(100, 0.1), (200, 0.5), (300, 0.75), (400, 0.8), (500, 0.82)]
    points = curve(tmp_path, "head_acc[0]")
    assert (flattens(points, 0.9), flattens(points, 0.95)) == (300, 400)  # 0.9 * 0.82 <= 0.75 < 0.95 * 0.82
    curves_main([str(tmp_path), "--field", "chain_tau", "--depth", "2", "--output", str(tmp_path / "c.png"),
                 "--table", str(tmp_path / "c.md")])
    assert (tmp_path / "c.png").stat().st_size > 0
    assert f"| {tmp_path.name} | 500 | {1 + 0.82 + 0.82 ** 2:.3f} |" in (tmp_path / "c.md").read_text()
    with pytest.raises(SystemExit):
        curves_main([str(tmp_path), "--field", "tau_heldout", "--output", str(tmp_path / "x.png")])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
