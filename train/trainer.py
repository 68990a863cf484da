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

from .config import CheckpointConfig, LoggingConfig, TrainingConfig  # noqa: E402

# Rank 0 may evaluate for many minutes while the other ranks wait in the final barrier: allow for it.
PROCESS_GROUP_TIMEOUT = timedelta(hours=3)
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE.json"  # written by rank 0 once every rank has finished writing the checkpoint


# --- processes -------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV_WE_SET: list[str] = []  # single-process defaults, removed again by shutdown_distributed


def init_distributed(local_rank: int | None = None) -> Dist:
    """Join (or, run as a plain `python` process, create) the process group: gloo on CPU, nccl on CUDA.

    deepspeed and torchrun export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; a plain process gets a one-rank group on a
    free local port. `local_rank` is the launcher's --local_rank argument, used when LOCAL_RANK is not set.
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
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT,
                               verbose=False)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local, device)


def shutdown_distributed(clean: bool = True) -> None:
    """Leave the process group. After a clean run all ranks meet first: tearing gloo down while a peer still
    talks aborts some CPU runs at exit. After an error no barrier (the other ranks may never arrive)."""
    if dist.is_initialized():
        if clean:
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


def resume_path(checkpoint: CheckpointConfig, output_dir: str) -> Path | None:
    """The checkpoint to resume from: `resume: auto` -> the newest complete one (None if there is none),
    `none` -> None, else the given directory, which must be complete."""
    if checkpoint.resume == "none":
        if complete_checkpoints(output_dir):
            raise FileExistsError(
                f"checkpoint.resume=none but {Path(output_dir) / CHECKPOINTS} holds checkpoints of an earlier run, "
                f"which a later resume=auto would mix with this one: use another output_dir or delete them")
        return None
    if checkpoint.resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(checkpoint.resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(
            f"checkpoint.resume={checkpoint.resume!r} is not a complete checkpoint (no {COMPLETE} in it); give a "
            f"{CHECKPOINTS}/step_* directory of an earlier run, or 'auto' / 'none'")
    return path


def save_checkpoint(engine, output_dir: str, step: int, client_state: dict, d: Dist, keep_last: int) -> Path:
    """engine.save_checkpoint + this rank's RNG states; then, once all ranks are done, the completion marker
    (atomic rename) and pruning to the newest `keep_last` complete checkpoints."""
    path = checkpoint_dir(output_dir, step)
    if d.is_main and (path / COMPLETE).exists():  # overwriting a checkpoint: it is incomplete until re-marked
        (path / COMPLETE).unlink()
    dist.barrier()
    engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state, save_latest=False)
    torch.save(rng_state(), path / f"rng_rank{d.rank}.pt")
    dist.barrier()
    if d.is_main:
        tmp = path / f".{COMPLETE}.tmp"
        tmp.write_text(json.dumps({"step": step, **client_state}) + "\n")
        os.replace(tmp, path / COMPLETE)
        complete = complete_checkpoints(output_dir)
        stale = complete[:-keep_last] + [p for p in path.parent.glob("step_*")
                                         if not (p / COMPLETE).is_file() and p.name < path.name]
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
        raise RuntimeError(
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
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start_step))
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not cfg.progress_bar, file=sys.stderr)
        if cfg.wandb:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=run_config,
                                    dir=output_dir)

    def _rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", sup_tok_s=f"{row['supervised_tokens_per_s']:.0f}",
                                 tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if not isinstance(v, list)} | {
                f"{name}/head{k}": x for name in ("head_loss", "head_acc") for k, x in enumerate(row.get(name, []))
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

    def row(self, d: Dist) -> dict:
        """Metrics over all ranks: mean micro-batch loss, per-head CE and top-1 accuracy, throughput."""
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
        }
