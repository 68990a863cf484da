"""What every drafter's training script shares: setup -> train -> save -> cleanup around a DeepSpeed engine.

A recipe subclass says what is trained and how it is saved:
  build_objective()          the nn.Module DeepSpeed wraps: the drafter (its only trainable submodule, `.drafter`)
                             plus the frozen target; forward(input_ids, attention_mask, loss_mask) returns
                             (loss, stats [num_stats, 3] = (loss sum, top-1 hits, count) per row)
  num_stats                  rows of those stats (Medusa: one per head; draft LM: one)
  inference_drafter(state)   main rank, after training: the trained drafter rebuilt from a full state dict on the
                             target's device and dtype, measured (e.g. held-out accuracy), ready to evaluate
  save_drafter(drafter, dir) write it in its Hub format

Data, batching, resume, checkpoints, logging, the final evaluation and the push live here, once.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cli.errors import ArgumentParser
from train import trainer  # first: it sets DS_ACCELERATOR before anything imports deepspeed
from cli.files import reporting_full_disk  # noqa: E402
from data.batching import collate, length_bucketed_batches, padding_fraction  # noqa: E402
from data.embedded import resolve_data  # noqa: E402
from data.tokenize import build_token_dataset  # noqa: E402
from data.vocab import draft_vocab_entry  # noqa: E402
from drafters.provenance import record_provenance  # noqa: E402
from drafters.vocab import draftsmith_meta  # noqa: E402
from target.model import load_target, stop_tokens  # noqa: E402
from train import acceptance, kinds  # noqa: E402
from train import run_dir  # noqa: E402
from train.config import ConfigError, TrainConfig, dump_config, load_config  # noqa: E402
from train.watchdog import StallWatch  # noqa: E402


@dataclass
class TrainResult:
    output_dir: Path
    step: int  # optimizer steps done
    finished: bool  # False when training.stop_after ended the run early (resume it later)
    drafter: torch.nn.Module | None  # the saved drafter (main rank, finished runs), ready for inference
    target: torch.nn.Module
    cut: bool = False  # training.max_minutes ended it before its last step (the drafter is saved all the same)


class Recipe:
    num_stats: int = 1

    def __init__(self, cfg: TrainConfig, local_rank: int | None = None):
        self.cfg = cfg
        self.local_rank = local_rank
        self._draft_vocabs: dict[int, dict] = {}  # draft_vocab(n), counted once

    # --- what a drafter kind provides -------------------------------------------------------------------------

    def build_objective(self) -> torch.nn.Module:
        raise NotImplementedError

    def inference_drafter(self, state: dict, measure: bool = True) -> torch.nn.Module:
        """The drafter in inference form from a gathered state dict; measure: its held-out statistics too."""
        raise NotImplementedError

    def save_drafter(self, drafter: torch.nn.Module, path: Path) -> None:
        raise NotImplementedError

    # --- setup -------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, tc = self.cfg, self.cfg.training
        self.d = d = trainer.init_distributed(self.local_rank, tc.timeout_minutes)
        trainer.seed_everything(tc.seed)
        self.out = Path(cfg.output_dir)
        resume = trainer.on_main(d, self._claim_output_dir)
        self.target, self.tokenizer = load_target(cfg.target, dtype=tc.target_dtype, device=str(d.device))
        self._setup_data()
        if tc.acceptance_every and not self.holdout:
            raise ValueError(f"training.acceptance_every={tc.acceptance_every} measures on held-out conversations, "
                             f"and {cfg.data.train} leaves none: raise data.holdout_fraction / data.holdout_max")
        self.objective = self.build_objective()
        self.engine = trainer.build_engine(self.objective, tc, self.total_steps)
        self.step, self.position = 0, (0, 0)  # optimizer steps done; (epoch, next micro-batch) in the data
        self.tokens = 0  # tokens trained on so far (all ranks, padding excluded): the learning curves' x axis
        if resume is not None:
            state = trainer.load_checkpoint(self.engine, resume, d)
            self.step, self.position = state["step"], (state["epoch"], state["batch"])
            self.tokens = state.get("tokens", 0)
            self._print(f"resumed from {resume} at step {self.step} (epoch {state['epoch']}, batch {state['batch']})")
        self.metrics = trainer.MetricsLog(cfg.output_dir, cfg.logging, d, self.total_steps, self.step, cfg.to_dict())
        self.record = acceptance.Record.load(self.out, self.step) if tc.acceptance_every else None

    def _claim_output_dir(self) -> Path | None:
        """Main rank, before anything is written: lock the output folder for this run, pick the checkpoint to resume
        from and check it was made with this config, then record the config. Returns the checkpoint (or None)."""
        cfg = self.cfg
        run_dir.prepare_output_dir(cfg.output_dir)
        self.lock = run_dir.OutputDirLock(self.out)
        resume = trainer.resume_path(cfg.checkpoint, cfg.output_dir, say=self._print)
        self._check_same_run(resume)
        with reporting_full_disk(self.out, "config.yaml"):
            dump_config(cfg, str(self.out / "config.yaml"))
        return resume

    def _check_same_run(self, resume: Path | None) -> None:
        """Continuing a checkpoint, or replacing a finished run's results, needs the settings they were made with."""
        recorded = self.out / "config.yaml"
        if resume is not None:
            saved = trainer.checkpoint_config(resume)
            where = resume if saved is not None else recorded
            if saved is None and recorded.is_file():
                saved = yaml.safe_load(recorded.read_text())
            advice = ("resume with those settings (training.max_steps, epochs, stop_after, max_minutes and the "
                      "logging, checkpoint, eval and push sections may change), or give another output_dir")
        elif recorded.is_file() and (self.out / "drafter").exists():
            saved, where = yaml.safe_load(recorded.read_text()), recorded
            advice = "give another output_dir, or delete the finished run there first"
        else:
            return
        if saved is not None:
            run_dir.check_same_run(saved, self.cfg.to_dict(), str(where), advice)

    def _setup_data(self) -> None:
        cfg, d = self.cfg.data, self.d
        source = resolve_data(cfg.train)
        if not d.is_main:
            d.wait_for_main()  # wait while the main rank fills the token cache, then read it
        self.ds, report = build_token_dataset(source, self.tokenizer, cfg.max_length, cfg.cache_dir, cfg.limit)
        if d.is_main:
            d.wait_for_main()
        self.lengths = list(self.ds["length"])
        n = len(self.lengths)
        held = min(cfg.holdout_max, int(n * cfg.holdout_fraction))
        self.train_lengths, self.holdout = self.lengths[: n - held], list(range(n - held, n))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        first = length_bucketed_batches(self.train_lengths, cfg.max_tokens, self.cfg.training.seed, 0,
                                        cfg.max_batch_size)
        per_rank = len(first) // d.world_size
        if per_rank == 0:
            raise ValueError(f"{cfg.train}: {len(first)} micro-batches of <= {cfg.max_tokens} tokens cannot feed "
                             f"{d.world_size} ranks; use more data (data.limit) or a smaller data.max_tokens")
        tc = self.cfg.training
        self.total_steps = tc.max_steps or sum(
            len(self.epoch_batches(e)) for e in range(tc.epochs)) // tc.grad_accum
        if self.total_steps == 0:
            raise ValueError(f"{per_rank} micro-batches per rank and epoch make no optimizer step with "
                             f"training.grad_accum={tc.grad_accum}; lower grad_accum or add data")
        padding = padding_fraction(first, self.train_lengths)
        self._print(f"data: {report.summary()} | {n - held:,} train / {held:,} held-out conversations, "
                    f"{sum(self.train_lengths):,} train tokens, {len(first):,} micro-batches of <= {cfg.max_tokens:,} "
                    f"tokens per epoch ({per_rank:,} per rank), padding {padding:.1%} | {self.total_steps:,} "
                    f"optimizer steps")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of `epoch`: a disjoint slice, the same count on every rank (lock-step)."""
        c, d = self.cfg.data, self.d
        batches = length_bucketed_batches(self.train_lengths, c.max_tokens, self.cfg.training.seed, epoch,
                                          c.max_batch_size)
        return batches[d.rank::d.world_size][: len(batches) // d.world_size]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = self.ds[indices]
        examples = [{"input_ids": i, "loss_mask": m} for i, m in zip(rows["input_ids"], rows["loss_mask"])]
        return {k: v.to(self.d.device) for k, v in collate(examples, self.pad_id).items()}

    def holdout_batches(self):
        """Micro-batches of the held-out conversations (main rank, after training)."""
        c = self.cfg.data
        lengths = [self.lengths[i] for i in self.holdout]
        for b in length_bucketed_batches(lengths, c.max_tokens, 0, 0, c.max_batch_size):
            yield self.batch([self.holdout[j] for j in b])

    def draft_vocab(self, n: int) -> dict:
        """FR-Spec / EAGLE-3: the n most frequent tokens of the training conversations (`draft_vocab`), with the share
        of the held-out assistant tokens they cover (`draft_vocab_heldout_coverage`). Counted once per n: training
        and the saved drafter use the same entry."""
        if n not in self._draft_vocabs:
            self._draft_vocabs[n] = draft_vocab_entry(self.ds, len(self.train_lengths), self.holdout,
                                                      self.target.config.get_text_config().vocab_size, n)
        return self._draft_vocabs[n]

    def record_draft_vocab(self, config, n: int, say: bool = True) -> None:
        """The draft vocabulary (see draft_vocab) into config.draftsmith."""
        entry = self.draft_vocab(n)
        config.draftsmith = {**draftsmith_meta(config), **entry}
        if say:
            self._print(f"draft vocabulary: the {len(entry['draft_vocab']):,} most frequent training tokens cover "
                        f"{entry['draft_vocab_heldout_coverage']:.1%} of the held-out assistant tokens")

    # --- train -------------------------------------------------------------------------------------------------

    def train(self) -> bool:
        """Run to training.max_steps / epochs; False if training.stop_after ended it first (after a checkpoint).
        training.max_minutes ends it early too, with a checkpoint, but returns True: the drafter as trained so far
        is saved (self.cut says so)."""
        self.stall = StallWatch(self.d.rank, self.cfg.training.timeout_minutes)
        try:
            return self._train()
        finally:
            self.stall.close()

    def _train(self) -> bool:
        cfg, engine = self.cfg, self.engine
        window = trainer.Window(self.num_stats)
        deadline = time.monotonic() + 60 * cfg.training.max_minutes if cfg.training.max_minutes else None
        self.cut = self.stopped_early = False
        epoch, start = self.position
        nonfinite = 0  # micro-batches of this optimizer step with an inf/nan loss
        while self.step < self.total_steps:
            batches = self.epoch_batches(epoch)
            for i in range(start, len(batches)):
                batch = self.batch(batches[i])
                lr = engine.get_lr()[0]
                loss, stats = engine(**batch)  # the target under no_grad; the drafter at supervised positions
                nonfinite += not bool(torch.isfinite(loss))
                engine.backward(loss)
                engine.step()  # DeepSpeed steps optimizer + scheduler every training.grad_accum micro-batches
                window.add(loss, stats, batch)
                if engine.global_steps == self.step:
                    continue  # inside a gradient-accumulation cycle
                self.step, self.position = engine.global_steps, (epoch, i + 1)
                trainer.stop_if_not_finite(nonfinite, self.step, self.d, cfg.output_dir)
                self.stall.beat(self.step)
                self.metrics.step()
                last = self.step == self.total_steps
                self.cut = not last and self._out_of_time(deadline)
                measured = self.measure_acceptance(last or self.cut)
                if self.step % cfg.logging.log_every == 0 or last or self.cut or measured:
                    row = window.row(self.d)
                    self.tokens += int(row.pop("window_tokens"))
                    self.metrics.log({"step": self.step, "epoch": epoch + (i + 1) / len(batches), "lr": lr,
                                      "tokens": self.tokens, **row, **(measured or {}),
                                      **({"cut": True} if self.cut else {}),
                                      **({"total_steps": self.total_steps} if last or self.cut else {})})
                patience = cfg.training.early_stop_patience
                if measured and patience and self.record.stale >= patience and not last:
                    self.cut = self.stopped_early = True  # ends like max_minutes: a checkpoint, the drafter saved
                    self._print(f"stopped early after step {self.step}: held-out tau has not improved for "
                                f"{patience} measurements (best {self.record.best_tau:.3f} at step "
                                f"{self.record.best_step}; training.early_stop_patience)")
                every = cfg.checkpoint.every_steps
                stop = self.step == cfg.training.stop_after and not last
                if (every and self.step % every == 0) or stop or self.cut:
                    self.save_checkpoint(window)
                if stop:
                    self._print(f"stopped after step {self.step} (training.stop_after); re-run to resume")
                    return False
                if self.cut:
                    if not self.stopped_early:
                        self._print(f"stopped after step {self.step} of {self.total_steps}: training.max_minutes="
                                    f"{cfg.training.max_minutes:g} ran out; saving the drafter as it is (re-run to "
                                    "resume)")
                    return True
                if last:
                    return True
            epoch, start = epoch + 1, 0
        return True

    def _out_of_time(self, deadline: float | None) -> bool:
        """training.max_minutes has run out, agreed by every rank (so that all leave at the same step)."""
        if deadline is None:
            return False
        over = torch.tensor([float(time.monotonic() >= deadline)], dtype=torch.float64)
        return bool(trainer.all_reduce_sum(over, self.d.device).item()) if self.d.world_size > 1 else bool(over.item())

    def measure_acceptance(self, final: bool) -> dict | None:
        """Every training.acceptance_every steps and at the end: the held-out τ of the drafter as it is (main rank
        measures, every rank learns it), recorded; a new best is saved to drafter-best (checkpoint.select)."""
        tc = self.cfg.training
        if self.record is None or (self.step % tc.acceptance_every and not final):
            return None
        state = trainer.gathered_state_dict(self.engine.module.drafter, self.d.is_main)  # collective under ZeRO-3
        tau, alpha, loop = torch.zeros(1, dtype=torch.float64), [], None
        if self.d.is_main:
            drafter, kind = self.inference_drafter(state, measure=False), self.cfg.drafter.kind
            with torch.random.fork_rng(devices=[]):  # training's random stream stays as without the measurement
                result = acceptance.heldout_tau(drafter, kind, self.target, self._heldout_answers(),
                                                tc.acceptance_depth)
                tree = {"tree": tc.acceptance_tree, "max_tree_nodes": self.cfg.eval.max_tree_nodes,
                        "tree_topk": self.cfg.eval.tree_topk} if tc.acceptance_tree else {}
                if tree:  # the tree's τ picks the best drafter; the chain's is logged beside it
                    chain_tau = result["tau"]
                    result = acceptance.heldout_tau(drafter, kind, self.target, self._heldout_answers(),
                                                    tc.acceptance_depth, **tree)
                if tc.acceptance_loop:
                    loop = acceptance.loop_tau(drafter, kind, self.target, self._heldout_answers().prompts,
                                               tc.acceptance_tokens, stop_tokens(self.target, self.tokenizer),
                                               tc.acceptance_depth, **tree)["tau"]
            tau[0], alpha = result["tau"], result["alpha"]
        if self.d.world_size > 1:
            tau = trainer.all_reduce_sum(tau, self.d.device)  # the other ranks add 0
        tau = round(float(tau[0]), 6)
        new_best = self.record.add(self.step, tau)
        if new_best and self.d.is_main and self.cfg.checkpoint.select == "acceptance" and not final:  # final: save()
            self._save_drafter(state, acceptance.BEST_DIR, {"step": self.step, "heldout_tau": tau})
        if self.d.is_main:
            self.record.save(self.out)
        row = {"heldout_tau": tau, "heldout_alpha": [round(a, 4) for a in alpha]}
        if tc.acceptance_tree and self.d.is_main:
            row["heldout_chain_tau"] = round(chain_tau, 6)
        return row if loop is None else {**row, "heldout_loop_tau": round(loop, 6)}

    def _heldout_answers(self) -> acceptance.Answers:
        """The target's greedy answers to the first turns of training.acceptance_prompts held-out conversations."""
        if not hasattr(self, "heldout_answers"):
            rows = self.ds[self.holdout]
            rows = [{"input_ids": i, "loss_mask": m} for i, m in zip(rows["input_ids"], rows["loss_mask"])]
            prompts = acceptance.heldout_prompts(rows, self.cfg.training.acceptance_prompts)
            self.heldout_answers = acceptance.Answers(self.target, prompts, self.cfg.training.acceptance_tokens,
                                                      stop_tokens(self.target, self.tokenizer))
        return self.heldout_answers

    def save_checkpoint(self, window: trainer.Window) -> None:
        epoch, batch = self.position
        tokens = self.tokens + window.pending_tokens(self.d)  # the steps since the last metrics row included
        state = {"step": self.step, "epoch": epoch, "batch": batch, "world_size": self.d.world_size, "tokens": tokens}
        trainer.check_finite_weights(self.engine.module.drafter, self.d, f"the drafter at step {self.step}",
                                     self.cfg.output_dir)
        trainer.save_checkpoint(self.engine, self.cfg.output_dir, self.step, state, self.d,
                                self.cfg.checkpoint.keep_last, self.cfg.to_dict())

    # --- save --------------------------------------------------------------------------------------------------

    def save(self) -> torch.nn.Module | None:
        """Main rank: rebuild and measure the trained drafter, save it to <output_dir>/drafter (atomically)."""
        trainer.check_finite_weights(self.engine.module.drafter, self.d, "the trained drafter", self.cfg.output_dir)
        state = trainer.gathered_state_dict(self.engine.module.drafter, self.d.is_main)  # collective under ZeRO-3
        if not self.d.is_main:
            return None
        self.metrics.close_bar()
        r, best = self.record, self.out / acceptance.BEST_DIR
        last = None if r is None else {"step": self.step, "heldout_tau": r.taus.get(self.step)}
        if r is None or self.cfg.checkpoint.select == "last" or r.best_step == self.step or not best.is_dir():
            drafter = self._save_drafter(state, "drafter", last)
            shutil.rmtree(best, ignore_errors=True)
            self._print(f"saved drafter to {self.out / 'drafter'}")
            return drafter
        self._save_drafter(state, acceptance.LAST_DIR, last)
        trainer.publish_dir(best, self.out / "drafter")
        self._print(f"saved drafter to {self.out / 'drafter'}: step {r.best_step}'s, the best held-out tau "
                    f"({r.best_tau:.3f}; the last step's {last['heldout_tau']:.3f} is in {acceptance.LAST_DIR}/)")
        from drafters import load_drafter
        return load_drafter(str(self.out / "drafter"), self.target).to(self.d.device).eval()

    def _save_drafter(self, state: dict, name: str, heldout: dict | None) -> torch.nn.Module:
        """Main rank: the drafter of `state` in inference form, measured, saved to <output_dir>/<name> atomically;
        heldout (its step and held-out τ) recorded in its config."""
        drafter = self.inference_drafter(state)
        record_provenance(drafter.config, self.cfg.drafter.kind, self.target.config, self.cfg.target)
        if heldout is not None:
            drafter.config.heldout_acceptance = heldout
        tmp = Path(tempfile.mkdtemp(dir=self.out, prefix=f".{name}.tmp-"))
        with reporting_full_disk(self.out, "the drafter"):
            self.save_drafter(drafter, tmp)
        trainer.publish_dir(tmp, self.out / name)
        return drafter

    def publish(self, drafter: torch.nn.Module) -> None:
        """Main rank, once the other ranks have left: evaluate the drafter into eval.json, push it if push.repo_id
        is set (no rank waits on these, however long they take)."""
        cfg = self.cfg
        if cfg.eval.questions:
            self.evaluate(drafter)
        if cfg.push.repo_id:
            from train.push import push_drafter
            eval_path = self.out / "eval.json"
            push_drafter(str(self.out / "drafter"), cfg.push.repo_id, private=cfg.push.private,
                         eval_path=str(eval_path) if eval_path.is_file() else None)

    def evaluate(self, drafter: torch.nn.Module) -> None:
        from inference.evaluate import evaluate_drafter
        from inference.report import format_table, write_report
        report = evaluate_drafter(self.target, self.tokenizer, drafter, self.cfg.eval)
        tmp = self.out / ".eval.json.tmp"
        write_report(report, str(tmp))
        tmp.replace(self.out / "eval.json")
        print(format_table(report), flush=True)

    # --- cleanup -----------------------------------------------------------------------------------------------

    def cleanup(self, clean: bool = True) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "engine", None) is not None:
            self.engine.destroy()
        trainer.shutdown_distributed(clean, getattr(self, "d", None))

    def release(self) -> None:
        """Unlock the output folder (last: after the evaluation has written into it)."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()

    def _print(self, message: str) -> None:
        if self.d.is_main:
            print(message, flush=True)


def run(recipe_cls: type[Recipe], cfg: TrainConfig, local_rank: int | None = None) -> TrainResult:
    """Train (or resume) as configured; every rank calls this."""
    recipe = recipe_cls(cfg, local_rank)
    try:
        try:
            recipe.setup()
            finished = recipe.train()
            drafter = recipe.save() if finished else None
        except BaseException:
            recipe.cleanup(clean=False)
            raise
        recipe.cleanup()
        if drafter is not None:
            recipe.publish(drafter)  # main rank, after the other ranks have left
    finally:
        recipe.release()
    return TrainResult(Path(cfg.output_dir), recipe.step, finished, drafter, recipe.target, recipe.cut)


def parse_args(argv: list[str] | None, description: str) -> tuple[TrainConfig, int | None]:
    p = ArgumentParser(description=description)
    p.add_argument("--config", help="YAML file (configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. training.lr=3e-4 output_dir=runs/x")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides), args.local_rank


def main(recipes: dict[str, type[Recipe]], argv: list[str] | None, description: str) -> TrainResult:
    """The entry scripts' main: parse, pick the recipe of the config's drafter kind, run."""
    try:
        cfg, local_rank = parse_args(argv, description)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    if cfg.drafter.kind not in recipes:
        sys.exit(f"config error: drafter.kind is {cfg.drafter.kind!r}, but this script trains "
                 f"{' / '.join(recipes)} drafters; use {kinds.script(cfg.drafter.kind)}")
    return run(recipes[cfg.drafter.kind], cfg, local_rank)

