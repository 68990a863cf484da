"""Machinery shared by the training entry scripts: process group, DeepSpeed engine, LR schedule, checkpoints with
resume, metrics (tqdm, metrics.jsonl, wandb). Nothing here knows which drafter is being trained."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# DeepSpeed picks its accelerator when first imported: on a machine without CUDA it must be told "cpu".
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
import deepspeed  # noqa: E402

import yaml  # noqa: E402

from cli.errors import NoSpaceLeft, UserError  # noqa: E402
from cli.files import file_record, record_problem, reporting_full_disk  # noqa: E402
from .config import CheckpointConfig, LoggingConfig, TrainingConfig  # noqa: E402
from .ds_extensions import skip_unused_extensions, watch_build_locks  # noqa: E402

DEFAULT_TIMEOUT_MINUTES = 30.0  # training.timeout_minutes: collectives during training
# The other ranks wait while the main rank does one-off work (fills the token cache, measures and saves the drafter):
# those waits have their own, long limit, so that a slow tokenization does not end the run.
MAIN_RANK_WORK_TIMEOUT = timedelta(hours=6)
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE.json"  # written by rank 0 once every rank has finished writing the checkpoint
CHECKPOINT_CONFIG = "config.yaml"  # the run's config, in each checkpoint: a resume must match it


# --- processes -------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    main_work_group: object = None  # gloo group with MAIN_RANK_WORK_TIMEOUT (None with one rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait_for_main(self) -> None:
        """Barrier around the main rank's one-off work (long timeout; nothing to wait for with one rank)."""
        if self.main_work_group is not None:
            dist.barrier(group=self.main_work_group)


class MainRankFailed(SystemExit):
    """Raised on the other ranks when the main rank's step failed: they exit quietly (status 1), the main rank says
    why."""

    def __init__(self):
        super().__init__(1)


def on_main(d: Dist, work):
    """`work()` on the main rank only, its result given to every rank; if it raises, every rank stops (none is left
    waiting in a collective for a rank that has gone)."""
    result, error = None, None
    if d.is_main:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 (re-raised below, after the other ranks are told)
            error = err
    if d.world_size > 1:
        box = [error is not None, result]
        dist.broadcast_object_list(box, src=0, group=d.main_work_group)
        if box[0] and not d.is_main:
            raise MainRankFailed()
        result = box[1]
    if error is not None:
        raise error
    return result


_ENV_WE_SET: list[str] = []  # single-process defaults, removed again by shutdown_distributed


def init_distributed(local_rank: int | None = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Dist:
    """Join (or, run as a plain `python` process, create) the process group: gloo on CPU, nccl on CUDA.

    deepspeed and torchrun export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; a plain process gets a one-rank group on a
    free local port. `local_rank` is the launcher's --local_rank argument, used when LOCAL_RANK is not set. A
    collective that waits longer than `timeout_minutes` (a frozen or dead peer) raises.
    """
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": str(max(local_rank or 0, 0)),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None}
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value if value is not None else str(_free_port())
            _ENV_WE_SET.append(key)
    cuda = torch.cuda.is_available()
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    else:
        # One process per core group: without this every rank starts one thread per core and they fight.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", os.environ["WORLD_SIZE"])))
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    skip_unused_extensions()
    with watch_build_locks():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                   verbose=False)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    slow = dist.new_group(backend="gloo", timeout=MAIN_RANK_WORK_TIMEOUT) if dist.get_world_size() > 1 else None
    return Dist(dist.get_rank(), dist.get_world_size(), local, device, slow)


def shutdown_distributed(clean: bool = True, d: Dist | None = None) -> None:
    """Leave the process group. After a clean run all ranks meet first: tearing gloo down while a peer still
    talks aborts some CPU runs at exit (with `d`, the meeting waits as long as the main rank's one-off work may
    take). After an error no barrier (the other ranks may never arrive)."""
    if dist.is_initialized():
        if clean and d is not None and d.main_work_group is not None:
            d.wait_for_main()
        elif clean:
            dist.barrier()
        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, so a later run can start
    while _ENV_WE_SET:
        os.environ.pop(_ENV_WE_SET.pop(), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small float64 tensor over ranks (on `device`: nccl needs CUDA tensors)."""
    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu()


# --- optimizer, schedule, engine -------------------------------------------------------------------------------


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """LR factor of optimizer step s (0-based): linear warm-up to 1 over warmup_steps, then cosine to
    min_lr_ratio at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_engine(module: torch.nn.Module, training: TrainingConfig, total_steps: int):
    """DeepSpeed engine around `module` (the trainable part only) with a torch AdamW and a warm-up + cosine
    LambdaLR, both stepped by DeepSpeed once per optimizer step."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]  # weight matrices
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]  # biases
    groups = [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # (DeepSpeed drops empty groups, e.g. no biases under LoRA, which would desynchronise the LR scheduler)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=training.lr, betas=tuple(training.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, training.warmup_steps, training.min_lr_ratio))
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,  # one token-budgeted micro-batch per forward
        "gradient_accumulation_steps": training.grad_accum,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": {"stage": training.zero_stage},
        "bf16": {"enabled": training.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no fused-op compile
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


class NonFinite(UserError):
    """The loss or the weights stopped being finite numbers."""


def stop_if_not_finite(bad_micro_batches: int, step: int, d: Dist, output_dir: str) -> None:
    """Stop every rank when a micro-batch of optimizer step `step` had an inf/nan loss: nothing is saved from
    here, so the last checkpoint keeps the last good weights."""
    bad = bad_micro_batches
    if d.world_size > 1:
        bad = int(all_reduce_sum(torch.tensor([float(bad)], dtype=torch.float64), d.device).item())
    if bad:
        raise NonFinite(f"the loss is not finite (inf or nan) at step {step} ({bad} micro-batch(es)); stopped "
                        f"without saving, {_last_good(output_dir)}. Lower training.lr, keep training.grad_clip > 0, "
                        "or check the data")


def check_finite_weights(module: torch.nn.Module, d: Dist, what: str, output_dir: str) -> None:
    """Refuse to save `module` when a weight is inf/nan on any rank (under ZeRO-3 each rank checks its shard)."""
    bad = sum(int(not torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in module.parameters())
    if d.world_size > 1:
        bad = int(all_reduce_sum(torch.tensor([float(bad)], dtype=torch.float64), d.device).item())
    if bad:
        raise NonFinite(f"{what} has non-finite (inf or nan) weights; not saved, {_last_good(output_dir)}. Lower "
                        "training.lr or keep training.grad_clip > 0")


def _last_good(output_dir: str) -> str:
    found = complete_checkpoints(output_dir)
    return f"{found[-1]} keeps the last good weights" if found else "and no checkpoint was written"


def gathered_state_dict(module: torch.nn.Module, is_main: bool) -> dict | None:
    """A full CPU copy of `module`'s state dict on the main rank (None elsewhere). Collective under ZeRO-3,
    where every rank holds a shard; a no-op gather otherwise."""
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if is_main:
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    return None


# --- checkpoints -----------------------------------------------------------------------------------------------


def checkpoint_dir(output_dir: str, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:08d}"


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Checkpoints whose completion marker exists, oldest first; half-written ones are not listed."""
    root = Path(output_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file()) if root.is_dir() else []


def resume_path(checkpoint: CheckpointConfig, output_dir: str, say=print) -> Path | None:
    """The checkpoint to resume from: `resume: auto` -> the newest complete one whose files are intact (a damaged
    newer one is passed over, and `say` is told), None if there is none; `none` -> None; else the given directory,
    which must be complete and intact."""
    if checkpoint.resume == "none":
        if complete_checkpoints(output_dir):
            raise FileExistsError(
                f"checkpoint.resume=none but {Path(output_dir) / CHECKPOINTS} holds checkpoints of an earlier run, "
                f"which a later resume=auto would mix with this one: use another output_dir or delete them")
        return None
    if checkpoint.resume == "auto":
        found, damaged = complete_checkpoints(output_dir), []
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            damaged.append(path.name)
            say(f"checkpoint {path} is damaged ({problem}); it is passed over")
        if damaged:
            raise UserError(f"every checkpoint in {Path(output_dir) / CHECKPOINTS} is damaged ({', '.join(damaged)}); "
                            "delete them to start again, or give another output_dir")
        return None
    path = Path(checkpoint.resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(
            f"checkpoint.resume={checkpoint.resume!r} is not a complete checkpoint (no {COMPLETE} in it); give a "
            f"{CHECKPOINTS}/step_* directory of an earlier run, or 'auto' / 'none'")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"checkpoint.resume={checkpoint.resume!r} is damaged ({problem}); give another checkpoint")
    return path


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (None: they are as written). Checkpoints written before
    files were recorded are taken as they are."""
    try:
        files = json.loads((path / COMPLETE).read_text()).get("files")
    except (OSError, ValueError, AttributeError) as err:
        return f"its {COMPLETE} is unreadable: {err}"
    return record_problem(path, files or {})


def checkpoint_config(path: Path) -> dict | None:
    """The config recorded in a checkpoint (None for checkpoints written before configs were recorded)."""
    file = path / CHECKPOINT_CONFIG
    return yaml.safe_load(file.read_text()) if file.is_file() else None


def save_checkpoint(engine, output_dir: str, step: int, client_state: dict, d: Dist, keep_last: int,
                    config: dict | None = None) -> Path:
    """engine.save_checkpoint + this rank's RNG states (+ the run's `config`); then, once all ranks are done, the
    completion marker (atomic rename, listing each file's size and checksum) and pruning to the newest `keep_last`
    complete checkpoints. A full disk is reported as such; the checkpoints written before stay complete."""
    path = checkpoint_dir(output_dir, step)
    if d.is_main and (path / COMPLETE).exists():  # overwriting a checkpoint: it is incomplete until re-marked
        (path / COMPLETE).unlink()
    dist.barrier()
    try:
        with reporting_full_disk(path.parent, f"checkpoint {path.name}"):
            engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state, save_latest=False)
            torch.save(rng_state(), path / f"rng_rank{d.rank}.pt")
            if d.is_main and config is not None:
                (path / CHECKPOINT_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    except NoSpaceLeft:
        shutil.rmtree(path, ignore_errors=True)  # half-written: it only takes space
        raise
    dist.barrier()
    if d.is_main:
        with reporting_full_disk(path.parent, f"checkpoint {path.name}"):
            files = file_record(path, skip=(COMPLETE,))
            tmp = path / f".{COMPLETE}.tmp"
            tmp.write_text(json.dumps({"step": step, **client_state, "files": files}) + "\n")
            os.replace(tmp, path / COMPLETE)
        # Older than keep_last, half-written, or newer than this step (what this run has redone since resuming
        # from an earlier checkpoint, e.g. past a damaged one) is stale.
        complete = [p for p in complete_checkpoints(output_dir) if p.name <= path.name]
        stale = complete[:-keep_last] + [p for p in path.parent.glob("step_*")
                                         if p.name > path.name or not (p / COMPLETE).is_file() and p.name < path.name]
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load_checkpoint(engine, path: Path, d: Dist) -> dict:
    """Restore module, optimizer, scheduler and this rank's RNG states; returns the client state."""
    loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}; see its log lines above")
    if client_state.get("world_size") != d.world_size:
        raise UserError(
            f"{path} was written by {client_state.get('world_size')} ranks, this run has {d.world_size}: the data "
            f"split differs, so it cannot continue exactly. Launch with the same number of ranks or resume=none.")
    rng_file = path / f"rng_rank{d.rank}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def publish_dir(tmp: Path, final: Path) -> None:
    """Replace directory `final` by the finished `tmp` with renames, so `final` is never half-written."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --- metrics ---------------------------------------------------------------------------------------------------


class MetricsLog:
    """Rank 0's record of training: one JSON object per log step in <output_dir>/metrics.jsonl, the same row
    to wandb when enabled (WANDB_MODE=offline keeps it local), and a tqdm bar. Other ranks get a no-op."""

    def __init__(self, output_dir: str, cfg: LoggingConfig, d: Dist, total_steps: int, start_step: int,
                 run_config: dict):
        self.enabled = d.is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = self.wandb = None
        if not self.enabled:
            return
        from tqdm.auto import tqdm
        # A resumed run keeps the rows up to its checkpoint and drops any logged after it by the interrupted run.
        rows = self._rows() if start_step > 0 else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")  # replaced whole: a kill here keeps the old rows
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start_step))
        tmp.replace(self.path)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not cfg.progress_bar, file=sys.stderr)
        if cfg.wandb:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=run_config,
                                    dir=output_dir)

    def _rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.path}:{i + 1} is not a JSON line; delete that line and run again")
                # the last line, cut by a kill while it was written: its step runs again after the checkpoint
        return rows

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.bar is not None:
            tau = {"tau": f"{row['heldout_tau']:.2f}"} if "heldout_tau" in row else {}
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", sup_tok_s=f"{row['supervised_tokens_per_s']:.0f}",
                                 tok_s=f"{row['tokens_per_s']:.0f}", **tau, refresh=False)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if not isinstance(v, list)} | {
                f"{name}/head{k}": x for name in ("head_loss", "head_acc", "heldout_alpha")
                for k, x in enumerate(row.get(name, []))
            }, step=row["step"])

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class Window:
    """Sums over the micro-batches since the last log row; `row()` all-reduces them over ranks."""

    def __init__(self, num_heads: int):
        self.num_heads = num_heads
        self.reset()

    def reset(self) -> None:
        self.loss = self.micro = self.tokens = self.slots = 0.0
        self.heads = torch.zeros(self.num_heads, 3, dtype=torch.float64)
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, head_stats: torch.Tensor, batch: dict) -> None:
        self.loss += loss.item()
        self.micro += 1
        self.tokens += float(batch["attention_mask"].sum())
        self.slots += batch["attention_mask"].numel()
        self.heads += head_stats.detach().double().cpu()

    def pending_tokens(self, d: Dist) -> int:
        """Tokens (all ranks, padding excluded) of the micro-batches since the last row."""
        return int(all_reduce_sum(torch.tensor([self.tokens], dtype=torch.float64), d.device).item())

    def row(self, d: Dist) -> dict:
        """Metrics over all ranks: mean micro-batch loss, per-head CE and top-1 accuracy, throughput, and the
        window's tokens (window_tokens; the recipe turns them into a running total)."""
        local = torch.tensor([self.loss, self.micro, self.tokens, self.slots], dtype=torch.float64)
        total = all_reduce_sum(torch.cat([local, self.heads.flatten()]), d.device)
        loss, micro, tokens, slots = total[:4].tolist()
        heads = total[4:].view(self.num_heads, 3)  # per head: loss sum, right, positions
        count = heads[:, 2].clamp(min=1)
        seconds = max(time.perf_counter() - self.start, 1e-9)
        self.reset()
        return {
            "loss": loss / max(micro, 1),
            "head_loss": (heads[:, 0] / count).tolist(),
            "head_acc": (heads[:, 1] / count).tolist(),
            "tokens_per_s": tokens / seconds,
            # the positions the loss covers (its first head or step): the objective's choice, e.g. every real
            # token for a draft LM with positions: all
            "supervised_tokens_per_s": float(heads[0, 2]) / seconds,
            "padding_fraction": 1 - tokens / max(slots, 1),
            "window_tokens": tokens,
        }
