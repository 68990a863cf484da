"""The GPU pipeline: regenerate -> train every drafter -> write each to the zoo -> measure tau -> cards, curves.

    python -m train.pipeline --config configs/pipeline_smollm2_gpu.yaml [key=value ...]

1. regenerate  the target answers the configured conversations anew (data.regenerate, --max-minutes)
2. train       every drafter of `drafters`, at the same time when `parallel` (training.max_minutes each: then a
               checkpoint, and the drafter as trained so far)
3. zoo         each trained drafter as a zoo folder: <output_dir>/zoo/<target>/<name> (train.zoo_export)
4. evaluate    each zoo drafter on the fixed question set (inference.evaluate on `device`, greedy, lossless check),
               then on the regression questions with the tree it used: the card's floor
5. report      the card of every zoo folder (README.md), learning curves (curves.png, curves.md), summary.md and
               summary.json; the runs' metrics.jsonl and config.yaml, the logs and the reports

Everything to bring back from a GPU machine lies in output_dir (docs/gpu.md: a few tens of MiB); the data,
token cache and checkpoints stay in work_dir. A stage that fails or runs past its limit is reported, and the
others go on. Re-running the same command continues each stage where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

from cli.errors import ArgumentParser, run_main
from train.config import load_dataclass
from train.pipeline_config import PipelineConfig
from train.stages import Stage, run_stages


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="YAML file (configs/pipeline_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. regenerate.limit=1000 device=cpu")
    args = p.parse_args(argv)
    # `timeout` and schedulers end a job with SIGTERM: leave through the report (and end the running stages)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("pipeline: ended by SIGTERM; reporting what is done"))
    summary = Pipeline(load_dataclass(PipelineConfig, args.config, args.overrides)).run()
    sys.exit(0 if all(s["ok"] for s in summary["stages"].values()) else 1)


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.work = Path(cfg.work_dir).resolve()  # stages run in the repository: paths must not depend on the cwd
        self.out = Path(cfg.output_dir).resolve()
        self.run_cfg = _resolved(cfg)  # what the stages are given; cfg as written names things in cards
        self.regenerated = self.work / "regenerated.jsonl"
        self.train_cfgs = {name: self.run_cfg.training_config(name, str(self.regenerated), str(self.work))
                           for name in cfg.drafters}  # every config checked before anything runs
        self.summary = {"config": dataclasses.asdict(cfg), "stages": {}, "drafters": {}}

    def run(self) -> dict:
        started = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self._prepare_target()
            if self._stage_group([self._regenerate_stage()])["regenerate"].ok or self.regenerated.is_file():
                try:
                    self.summary["data"] = self._data_report()
                except ValueError as err:  # e.g. nothing regenerated within the limit
                    self._record("tokenize", False, 0.0, str(err))
            if "data" in self.summary:
                self._export(self._train())
                self._evaluate()
        finally:  # also when ended by a signal: cards, curves and summary of what is done
            self.summary["seconds"] = time.monotonic() - started
            self._report()
        return self.summary

    # --- stages -------------------------------------------------------------------------------------------------

    def _prepare_target(self) -> None:
        """Load the target once here (an embedded one is built into the cache now, not by several stages at once)."""
        import torch
        import transformers

        from drafters.zoo import target_digest
        from target.model import load_target

        self.target, self.tokenizer = load_target(self.run_cfg.target)
        device = self.cfg.device
        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
        self.summary.update(target=self.cfg.target, target_sha256=target_digest(self.target),
                            hardware=f"{device}: {name}; torch {torch.__version__}, "
                                     f"transformers {transformers.__version__}")

    def _regenerate_stage(self) -> Stage:
        r, cfg = self.run_cfg.regenerate, self.run_cfg
        argv = ["--target", cfg.target, "--input", r.input, "--output", str(self.regenerated),
                "--max-new-tokens", str(r.max_new_tokens), "--temperature", str(r.temperature),
                "--batch-size", str(r.batch_size), "--seed", str(r.seed), "--dtype", r.dtype, "--device", cfg.device,
                "--max-minutes", str(r.minutes)]
        argv += ["--limit", str(r.limit)] if r.limit else []
        argv += ["--max-prompt-tokens", str(r.max_prompt_tokens)] if r.max_prompt_tokens else []
        return self._stage("regenerate", "data.regenerate", argv, r.minutes)

    def _data_report(self) -> dict:
        """Tokenize the regenerated file once per max_length into the shared token cache (the trainings read it
        from there) and report what the drafters train on."""
        from data.tokenize import build_token_dataset

        report = {}
        for length in sorted({c.data.max_length for c in self.train_cfgs.values()}):
            ds, load = build_token_dataset(str(self.regenerated), self.tokenizer, length,
                                           str(self.work / "token_cache"))
            report[length] = {"conversations": len(ds), "tokens": sum(ds["length"]),
                              "assistant_tokens": sum(map(sum, ds["loss_mask"])), "load": load.summary()}
        return report

    def _train(self) -> list[str]:
        from train import kinds

        stages = []
        for name, tc in self.train_cfgs.items():
            module = kinds.script(tc.drafter.kind).removesuffix(".py").replace("/", ".")
            argv = ["--config", self.run_cfg.drafters[name].config,
                    *self.run_cfg.training_overrides(name, str(self.regenerated), str(self.work))]
            stages.append(self._stage(f"train_{name}", module, argv, self.cfg.drafters[name].minutes))
        results = self._stage_group(stages, threads=self._threads(len(stages)))
        return [name for name in self.train_cfgs if results[f"train_{name}"].ok]

    def _export(self, trained: list[str]) -> None:
        from train.zoo_export import export

        for name in trained:
            folder = self.zoo_dir(name)
            start = time.monotonic()
            try:
                export(str(self.work / "runs" / name / "drafter"), self.target, self.cfg.target, str(folder), name)
                self._record(f"zoo_{name}", True, time.monotonic() - start, None)
            except (OSError, ValueError) as err:
                self._record(f"zoo_{name}", False, time.monotonic() - start, f"{type(err).__name__}: {err}")

    def _evaluate(self) -> None:
        """The fixed question set, then the regression questions with the tree each drafter used there."""
        names = [n for n in self.cfg.drafters if (self.zoo_dir(n) / "zoo.json").is_file()]
        main = {n: self.eval_config(n) for n in names}
        self._eval_group(main, "")
        regression = {n: self.regression_config(n) for n in names if self.report_path(n, "").is_file()}
        self._eval_group({n: c for n, c in regression.items() if c is not None}, ".regression")

    def _eval_group(self, configs: dict, suffix: str) -> None:
        from inference.evaluate import eval_argv

        self.report_path("", "").parent.mkdir(parents=True, exist_ok=True)
        stages = [self._stage(f"evaluate_{name}{suffix}", "inference.evaluate",
                              ["--target", self.run_cfg.target, "--drafter", str(self.zoo_dir(name)), "--device",
                               self.cfg.device, "--output", str(self.report_path(name, suffix)), *eval_argv(config)],
                              self.cfg.evaluate.minutes)
                  for name, config in configs.items()]
        self._stage_group(stages, threads=self._threads(len(stages)))

    def eval_config(self, name: str):
        e = self.run_cfg.evaluate
        return dataclasses.replace(self.cfg.drafters[name].eval, questions=e.questions, per_category=e.per_category,
                                   limit=e.limit, max_new_tokens=e.max_new_tokens, check_lossless=True,
                                   temperature=0.0)

    def regression_config(self, name: str):
        """The main evaluation's options on the regression questions, a calibrated tree replaced by the one it
        chose there (calibration depends on the machine; the floor must not). None when that calibration chose
        plain decoding: no floor says anything about the drafter then."""
        r, config = self.cfg.regression, self.eval_config(name)
        proposer = json.loads(self.report_path(name, "").read_text())["setup"]["proposer"]
        if config.tree == "auto" and "paths" in proposer:  # (draft LMs draft chains: no tree)
            if not proposer["paths"]:
                return None
            config = dataclasses.replace(config, tree=json.dumps(proposer["paths"]))
        return dataclasses.replace(config, per_category=r.per_category, limit=r.limit,
                                   max_new_tokens=r.max_new_tokens)

    # --- report -------------------------------------------------------------------------------------------------

    def _report(self) -> None:
        from train.curves import write_curves
        from train.zoo_card import record_card

        curves = {}
        for name in self.cfg.drafters:
            run = self.work / "runs" / name
            for file in ("metrics.jsonl", "config.yaml"):
                if (run / file).is_file():
                    (self.out / "runs" / name).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(run / file, self.out / "runs" / name / file)
            if (run / "metrics.jsonl").is_file():
                curves[name] = run
            card = self.card(name)
            self.summary["drafters"][name] = card
            if (self.zoo_dir(name) / "zoo.json").is_file():
                record_card(self.zoo_dir(name), card)
        if curves:
            c = self.cfg.curves
            try:
                self.summary["curves"] = write_curves(curves, c.field, self.out / "curves.png", self.out / "curves.md",
                                                      c.depth)
            except ValueError as err:
                self.summary["curves"] = str(err)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        (self.out / "summary.md").write_text(self.table())
        print(self.table(), end="")

    def card(self, name: str) -> dict:
        """The card sections (train/zoo_card.py) of one drafter, from what the stages left."""
        cfg, stage, tc = self.cfg, self.cfg.drafters[name], self.train_cfgs[name]
        card = {"config": {"path": stage.config, "overrides": stage.overrides},
                "hardware": self.summary.get("hardware")}
        data = self.summary.get("data", {}).get(tc.data.max_length)
        if data:
            card["data"] = {"source": cfg.regenerate.input, **{k: data[k] for k in ("conversations", "tokens",
                                                                                      "assistant_tokens")},
                            "regenerated": dataclasses.asdict(cfg.regenerate)}
        rows = self._metrics(name)
        trained = self.summary["stages"].get(f"train_{name}")
        if rows and trained:
            last = rows[-1]
            card["training"] = {"seconds": trained["seconds"], "steps": last["step"],
                                "total_steps": last.get("total_steps", last["step"]), "tokens": last.get("tokens", 0),
                                "cut": bool(last.get("cut")),
                                "parallel_with": [n for n in cfg.drafters if n != name] if cfg.parallel else []}
        main, regression = self._eval_report(name, ""), self._eval_report(name, ".regression")
        if main:
            e = cfg.evaluate
            card["measured"] = {"questions": e.questions, "per_category": e.per_category, "limit": e.limit,
                                "max_new_tokens": e.max_new_tokens, "answers": main["lossless"]["checked"],
                                "tau": main["overall"]["tau"], "alpha": main["overall"]["alpha"],
                                "mismatches": main["lossless"]["mismatches"], "device": main["setup"]["device"],
                                "eval": _proposer_summary(main["setup"]["proposer"])}
        if regression and self.regression_config(name) is not None:
            tau = regression["overall"]["tau"]
            card["regression"] = {"eval": dataclasses.asdict(self.regression_config(name)), "tau": tau,
                                  "tau_floor": math.floor(100 * cfg.regression.floor * tau) / 100,
                                  "mismatches": regression["lossless"]["mismatches"]}
        return card

    def table(self) -> str:
        lines = [f"# GPU pipeline: {self.cfg.target}", "", f"{self.summary.get('hardware', '')}; "
                 f"{self.summary.get('seconds', 0):.0f} s in all", "",
                 "| stage | ok | seconds |", "| --- | --- | ---: |"]
        lines += [f"| {n} | {'yes' if s['ok'] else 'NO: ' + s['error']} | {s['seconds']:.0f} |"
                  for n, s in self.summary["stages"].items()]
        lines += ["", "| drafter | steps | tokens | cut | tau | mismatches | regression floor |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
        for name, card in self.summary["drafters"].items():
            t, m, r = card.get("training", {}), card.get("measured", {}), card.get("regression", {})
            lines.append(f"| {name} | {t.get('steps', '-')} | {t.get('tokens', '-')} | {t.get('cut', '-')} | "
                         f"{m.get('tau', float('nan')):.2f} | {m.get('mismatches', '-')} | "
                         f"{r.get('tau_floor', float('nan')):.2f} |")
        return "\n".join(lines) + "\n"

    # --- helpers ------------------------------------------------------------------------------------------------

    def zoo_dir(self, name: str) -> Path:
        return self.out / "zoo" / Path(self.cfg.target).name / name

    def report_path(self, name: str, suffix: str) -> Path:
        return self.out / "eval" / f"{name}{suffix}.json"

    def _eval_report(self, name: str, suffix: str) -> dict | None:
        path = self.report_path(name, suffix)
        return json.loads(path.read_text()) if path.is_file() else None

    def _metrics(self, name: str) -> list[dict]:
        path = self.work / "runs" / name / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def _stage(self, name: str, module: str, argv: list[str], minutes: float) -> Stage:
        return Stage(name, module, argv, self.out / "logs" / f"{name}.log",
                     60 * (minutes + self.cfg.grace_minutes))

    def _threads(self, stages: int) -> int | None:
        import os

        return max(1, (os.cpu_count() or 1) // stages) if self.cfg.parallel and self.cfg.processes else None

    def _stage_group(self, stages: list[Stage], threads: int | None = None) -> dict:
        started = time.monotonic()
        try:
            results = run_stages(stages, self.cfg.processes, self.cfg.parallel, threads)
        except BaseException:  # a signal: these stages were ended unfinished
            for stage in stages:
                self._record(stage.name, False, time.monotonic() - started, "ended with the pipeline")
            raise
        for name, r in results.items():
            error = None if r.ok else ("past its time limit" if r.returncode is None and self.cfg.processes
                                       else f"failed ({r.log}): {r.tail(2)}")
            self._record(name, r.ok, r.seconds, error)
        return results

    def _record(self, name: str, ok: bool, seconds: float, error: str | None) -> None:
        self.summary["stages"][name] = {"ok": ok, "seconds": seconds, **({"error": error} if error else {})}
        print(f"[pipeline] {name}: {'ok' if ok else error} ({seconds:.0f} s)", flush=True)


def _resolved(cfg: PipelineConfig) -> PipelineConfig:
    """cfg with its existing relative paths made absolute (stages run in the repository); names (sharegpt, an
    embedded target) stay as they are."""
    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() else path
    return dataclasses.replace(
        cfg, target=absolute(cfg.target),
        regenerate=dataclasses.replace(cfg.regenerate, input=absolute(cfg.regenerate.input)),
        evaluate=dataclasses.replace(cfg.evaluate, questions=absolute(cfg.evaluate.questions)),
        drafters={n: dataclasses.replace(s, config=absolute(s.config)) for n, s in cfg.drafters.items()})


def _proposer_summary(proposer: dict) -> dict:
    """The few proposer settings a card shows (tree kind and size, draft length), not calibration tables."""
    keys = ("tree", "nodes", "depth", "topk", "k", "adaptive", "draft_vocab", "eagle_version")
    return {k: proposer[k] for k in keys if k in proposer}


if __name__ == "__main__":
    run_main(main)
