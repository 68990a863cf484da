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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny target whose LM head is its own tensor, a Medusa drafter for it, and questions."""
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import perturbed_medusa
    from target.model import load_target
    from tiny_assets import write_questions, write_tiny_target

    root = tmp_path_factory.mktemp("cli")
    target_dir = write_tiny_target(root / "target")
    target, _ = load_target(target_dir)
    perturbed_medusa(target).save_pretrained(root / "drafter")
    headless = Path(write_tiny_target(root / "headless"))  # a base model's checkpoint: no LM head
    weights = load_file(headless / "model.safetensors")
    assert "lm_head.weight" in weights
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, headless / "model.safetensors",
              metadata={"format": "pt"})
    torch.manual_seed(0)
    return {"target": target_dir, "headless": str(headless), "drafter": root / "drafter",
            "questions": write_questions(root / "q.jsonl")}


def evaluate_error(argv: list[str], capsys) -> str:
    from cli.errors import run_main
    from inference.evaluate import main

    with pytest.raises(SystemExit) as stop:
        run_main(main, argv)
    lines = [line for line in capsys.readouterr().err.splitlines()  # transformers' loading bar aside
             if line.strip() and not line.startswith("Loading weights")]
    assert stop.value.code == 1 and len(lines) == 1, lines
    return lines[0]


def test_a_target_without_its_lm_head_is_refused_in_one_line(saved, capsys):
    err = evaluate_error(["--target", saved["headless"], "--drafter", str(saved["drafter"]), "--questions",
                          saved["questions"]], capsys)
    assert err.startswith(f"error: target '{saved['headless']}' lacks weights for lm_head.weight")


def test_a_damaged_drafter_folder_is_one_line(saved, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "drafter"
    shutil.copytree(saved["drafter"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk or a half copy
    err = evaluate_error(["--target", saved["target"], "--drafter", str(damaged), "--questions",
                          saved["questions"]], capsys)
    assert err.startswith(f"error: drafter {damaged} cannot be read (") and "save it again" in err


ORPHAN = "[[0], [1, 0, 0]]"  # [1, 0] and [1] are missing: no static tree can place [1, 0, 0]


@pytest.mark.parametrize("command, tree", [
    ("inference.evaluate", ["--drafter", "{tmp}/no-drafter", "--tree", ORPHAN]),
    ("inference.benchmark", ["--drafters", "{tmp}/no-drafter", "--tree", ORPHAN, "--output", "{tmp}/bench"]),
    ("inference.benchmark", ["--drafters", f"{{tmp}}/no-drafter@tree={ORPHAN}", "--output", "{tmp}/bench"]),
], ids=["evaluate", "benchmark", "benchmark-per-drafter"])
def test_a_malformed_tree_is_refused_before_any_model_loads(command, tree, tmp_path, capsys):
    """Neither target nor drafter exists: had either been loaded first, its error would come instead."""
    import importlib

    from tiny_assets import write_questions

    main = importlib.import_module(command).main
    argv = ["--target", str(tmp_path / "no-target"), "--questions", write_questions(tmp_path / "q.jsonl"),
            *(a.format(tmp=tmp_path) for a in tree)]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert "tree='[[0], [1, 0, 0]]' has the path [1, 0, 0] without its parent [1, 0]: add the parent path" in lines[0]


def test_a_tree_deeper_than_the_drafter_drafts_is_one_line(saved, capsys):
    """How deep the drafter drafts (3 Medusa heads) is known once it is loaded: one line then."""
    err = evaluate_error(["--target", saved["target"], "--drafter", str(saved["drafter"]), "--questions",
                          saved["questions"], "--tree", "[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]"], capsys)
    assert err == "error: tree paths [(0, 0, 0, 0)] are deeper than the 3 depths Medusa drafts: give rank paths of " \
                  "at most 3 ranks"
