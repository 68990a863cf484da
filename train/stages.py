"""Running the pipeline's stages: each one a module's `main(argv)`, in its own process with a wall-clock limit
(several at once, or one after another), or in this process (tests, debugging). A stage's output goes to its log
file; a process past its limit is ended (SIGTERM, then SIGKILL) with its process group, and reported as such."""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KILL_WAIT_S = 10.0  # between SIGTERM and SIGKILL


@dataclass
class Stage:
    name: str
    module: str  # run as `python -m module *argv`, or module.main(argv) in this process
    argv: list[str]
    log: Path
    timeout_s: float


@dataclass
class StageResult:
    name: str
    ok: bool
    seconds: float
    returncode: int | None  # None: ended at its time limit (or, in this process, an exception)
    log: str

    def tail(self, lines: int = 5) -> str:
        text = Path(self.log).read_text(errors="replace") if Path(self.log).is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


def run_stages(stages: list[Stage], processes: bool, parallel: bool,
               threads: int | None = None) -> dict[str, StageResult]:
    """Run `stages` (at the same time when parallel) and return their results by name. threads: OMP_NUM_THREADS of
    each process (None: leave it)."""
    for stage in stages:
        stage.log.parent.mkdir(parents=True, exist_ok=True)
    if not processes:
        return {s.name: _run_here(s) for s in stages}
    if not parallel:
        return {s.name: _wait([_start(s, threads)])[0] for s in stages}
    return {r.name: r for r in _wait([_start(s, threads) for s in stages])}


def _run_here(stage: Stage) -> StageResult:
    start = time.monotonic()
    code = 0
    with open(stage.log, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            returned = importlib.import_module(stage.module).main(stage.argv)
            code = returned if isinstance(returned, int) else 0
        except SystemExit as exit_:  # argparse and sys.exit("message"): the message is the stage's last line
            if exit_.code not in (None, 0):
                print(exit_.code)
                code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:  # a failed stage is reported with its traceback; the pipeline goes on without it
            traceback.print_exc()
            code = None
    return StageResult(stage.name, code == 0, time.monotonic() - start, code, str(stage.log))


def _start(stage: Stage, threads: int | None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(stage.log, "w")
    proc = subprocess.Popen([sys.executable, "-m", stage.module, *stage.argv], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # its own group: ended as one
    log.close()
    return stage, proc, time.monotonic()


def _wait(running: list) -> list[StageResult]:
    """Wait for every started stage; end those past their time limit, and all of them if the wait is interrupted
    (the pipeline ended by a signal: their own process groups would outlive it)."""
    try:
        return _wait_all(running)
    finally:
        for _, proc, _ in running:
            _end(proc)


def _wait_all(running: list) -> list[StageResult]:
    results = []
    while running:
        for item in list(running):
            stage, proc, start = item
            elapsed = time.monotonic() - start
            if proc.poll() is None and elapsed < stage.timeout_s:
                continue
            timed_out = proc.poll() is None
            if timed_out:
                _end(proc)
                with open(stage.log, "a") as log:
                    log.write(f"\n[pipeline] ended after {elapsed:.0f} s: past this stage's limit of "
                              f"{stage.timeout_s:.0f} s\n")
            code = None if timed_out else proc.returncode
            results.append(StageResult(stage.name, code == 0, time.monotonic() - start, code, str(stage.log)))
            running.remove(item)
        if running:
            time.sleep(0.2)
    return results


def _end(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL if it is still there KILL_WAIT_S later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(KILL_WAIT_S)
            return
        except subprocess.TimeoutExpired:
            continue
