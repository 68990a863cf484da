"""The GPU pipeline's config (train/pipeline.py): YAML + `key=value` overrides, typed and checked like a training
config (train/config.py), and every drafter's training config and evaluation options checked before anything runs.
Each stage has a wall-clock limit in minutes that the stage honours itself (regeneration and training stop with
what they have); `grace_minutes` later the pipeline ends the process, so that nothing hangs."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from inference.eval_config import EvalConfig, check
from train.config import TrainConfig, load_config


@dataclass
class RegenerateStage:
    input: str = "sharegpt"  # conversations whose every assistant turn the target answers anew (data.regenerate)
    limit: int | None = 4000  # the first N usable conversations
    max_new_tokens: int = 192  # per assistant turn
    max_prompt_tokens: int | None = 1024  # answer a conversation while its prompt fits (training's max_length)
    temperature: float = 0.0
    batch_size: int = 512
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the target's, as the drafters will meet it
    seed: int = 0
    minutes: float = 2.0  # stop after the batch during which this much time has passed

    def __post_init__(self):
        check(self.minutes > 0, "regenerate.minutes", self.minutes, "must be > 0")


@dataclass
class DrafterStage:
    config: str  # its training config (configs/*.yaml); target, data and output paths are the pipeline's
    overrides: list[str] = field(default_factory=list)  # key=value overrides of that config
    minutes: float = 2.0  # training.max_minutes: then a checkpoint, and the drafter as trained so far
    eval: EvalConfig = field(default_factory=EvalConfig)  # proposer options; the question set is `evaluate`'s

    def __post_init__(self):
        check(self.minutes > 0, "minutes", self.minutes, "must be > 0")


@dataclass
class EvaluateStage:
    questions: str = "mt-bench"  # the fixed question set every drafter is measured on (greedy, lossless check)
    per_category: int | None = 1
    limit: int | None = None
    max_new_tokens: int = 128
    minutes: float = 3.0  # per drafter; its process is ended beyond this (+ grace_minutes)

    def __post_init__(self):
        check(self.minutes > 0, "evaluate.minutes", self.minutes, "must be > 0")


@dataclass
class RegressionStage:
    """A few of the questions, measured again with the tree the main evaluation used: the card's floor for
    tests/test_zoo_regression.py (tau_floor = floor * the tau measured here, rounded down)."""
    per_category: int | None = 1
    limit: int | None = 2
    max_new_tokens: int = 64
    floor: float = 0.85

    def __post_init__(self):
        check(0 < self.floor <= 1, "regression.floor", self.floor, "must be in (0, 1]")


@dataclass
class CurvesStage:
    field: str = "chain_tau"  # the metrics.jsonl field plotted against training tokens (train/curves.py)
    depth: int = 5  # chain_tau: draft depth


@dataclass
class PipelineConfig:
    target: str  # every drafter's target: embedded name or checkpoint directory
    work_dir: str  # regenerated data, token cache, training runs with checkpoints: stays here
    output_dir: str  # what a GPU run brings back (small): zoo/, eval/, runs/*/metrics.jsonl, logs/, curves, summary
    device: str = "cuda"  # regeneration and evaluation (training takes the GPU when there is one)
    parallel: bool = True  # train (and evaluate) the drafters at the same time: small drafters leave a GPU idle
    processes: bool = True  # each stage in its own process (false: in this process, one after another)
    grace_minutes: float = 1.5  # beyond a stage's own limit (loading, saving) before its process is ended
    regenerate: RegenerateStage = field(default_factory=RegenerateStage)
    drafters: dict[str, DrafterStage] = field(default_factory=dict)  # zoo name -> stage
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    regression: RegressionStage = field(default_factory=RegressionStage)
    curves: CurvesStage = field(default_factory=CurvesStage)

    def __post_init__(self):
        check(bool(self.drafters), "drafters", self.drafters, "must name at least one drafter to train")
        for name in self.drafters:
            check(re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) is not None, "drafters", name,
                  "is a zoo folder name: lower-case letters, digits, '_' and '-'")
        check(self.grace_minutes > 0, "grace_minutes", self.grace_minutes, "must be > 0")
        check(self.processes or not self.parallel, "parallel", self.parallel, "needs processes: true")

    def training_overrides(self, name: str, regenerated: str, work_dir: str) -> list[str]:
        """The stage's own overrides, then the pipeline's: one target, the regenerated data, its own run folder,
        the time limit, no evaluation inside training (the pipeline evaluates the zoo copy)."""
        stage = self.drafters[name]
        return [*stage.overrides, f"target={self.target}", f"output_dir={work_dir}/runs/{name}",
                f"data.train={regenerated}", f"data.cache_dir={work_dir}/token_cache", "eval.questions=null",
                f"training.max_minutes={stage.minutes}", "logging.progress_bar=false", "push.repo_id=null"]

    def training_config(self, name: str, regenerated: str, work_dir: str) -> TrainConfig:
        cfg = load_config(self.drafters[name].config, self.training_overrides(name, regenerated, work_dir))
        self.drafters[name].eval.check_kind(cfg.drafter.kind)
        return cfg
