"""A training run's output folder: usable, held by one run at a time, and never mixing two configs.

    out = prepare_output_dir(cfg.output_dir)     # a writable folder, or a one-line error
    lock = OutputDirLock(out)                    # a second run into `out` refuses, naming this process
    check_same_run(saved_config, cfg.to_dict(), where)   # resuming with other settings refuses, naming the keys
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from cli.errors import UserError
from cli.files import reporting_full_disk

LOCK_FILE = ".draftsmith.lock"
# Keys that may change between a run and its resumption: how long it runs, how it logs, checkpoints, evaluates and
# publishes, where caches live. Everything else (data, model, optimizer, schedule) must match the checkpoint.
RESUMABLE = ("output_dir", "training.max_steps", "training.epochs", "training.stop_after", "training.timeout_minutes",
             "training.max_minutes", "data.cache_dir", "logging.", "checkpoint.", "eval.", "push.")


class OutputDirBusy(UserError):
    """Another live process holds the output folder."""


class ConfigChanged(UserError):
    """The output folder holds a run made with other settings."""


def prepare_output_dir(path: str) -> Path:
    """`path` as an existing, writable folder (created if missing)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        with reporting_full_disk(out, "a first file"):
            probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"output_dir {out} is not usable: {err.strerror or err}; give a folder you can write to")
    return out


class OutputDirLock:
    """An exclusive lock on <output_dir>/.draftsmith.lock (flock: the kernel drops it when the process ends, so a
    killed run leaves no stale lock). The file says which process holds it."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise OutputDirBusy(f"output_dir {out} is in use by {holder}; wait for that run to end, or give this run "
                                "another output_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        self.file.flush()

    def release(self) -> None:
        """Unlock (the file stays: deleting a locked file would let a third run lock a new one beside it)."""
        if not self.file.closed:
            self.file.close()


def flatten(config: dict, prefix: str = "") -> dict:
    """{'training': {'lr': 1e-3}} -> {'training.lr': 1e-3} (mappings inside a field, such as losses, stay whole
    only below the sections)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and not prefix:
            flat.update(flatten(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every non-resumable key whose value differs (keys missing from either side, such
    as a field added since, are not compared)."""
    old, new = flatten(saved), flatten(current)
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in new
            if key in old and old[key] != new[key] and not key.startswith(RESUMABLE)]


def check_same_run(saved: dict, current: dict, where: str, advice: str) -> None:
    """Refuse to continue the run recorded in `where` with settings that differ from it."""
    differences = config_differences(saved, current)
    if differences:
        raise ConfigChanged(f"{where} was made with other settings ({'; '.join(differences)}); {advice}")
