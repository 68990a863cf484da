"""Every command ends a user error in one line (what, where, what to do) and a non-zero status; --debug shows the
traceback. Run as users run them: in a subprocess, from the command line."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(cwd),
           "DRAFTSMITH_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


COMMANDS = {  # a command with one user mistake -> what its one line must name
    "train": (["train/train_heads.py", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    "evaluate": (["-m", "inference.evaluate", "--target", "{tmp}/t", "--drafter", "{tmp}/d",
                  "--questions", "{tmp}/missing.jsonl"], "missing.jsonl"),
    "benchmark": (["-m", "inference.benchmark", "--target", "{tmp}/t", "--drafters", "{tmp}/missing-drafter",
                   "--questions", "mt-bench", "--output", "{tmp}/bench"], "is neither an embedded name"),
    "regenerate": (["-m", "data.regenerate", "--target", "{tmp}/t", "--input", "{tmp}/missing.jsonl",
                    "--output", "{tmp}/out.jsonl"], "missing.jsonl"),
    "features": (["-m", "train.features", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    "export": (["-m", "train.export", "--drafter", "{tmp}/missing-drafter", "--format", "vllm",
                "--output", "{tmp}/export"], "missing-drafter"),
    "push": (["-m", "train.push", "--drafter", "{tmp}/missing-drafter", "--repo-id", "user/name",
              "--dry-run", "{tmp}/upload"], "missing-drafter"),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_user_error_is_one_line(name, tmp_path):
    argv, names = COMMANDS[name]
    done = run(*(a.format(tmp=tmp_path) for a in argv), cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode in (1, 2), done.stderr
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_debug_shows_the_traceback(tmp_path):
    argv, _ = COMMANDS["features"]
    done = run(*(a.format(tmp=tmp_path) for a in argv), "--debug", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
