"""Fault injection: kills at the worst moments, stale locks, two runs on one folder, changed configs, non-finite
losses, damaged checkpoints and caches, full and read-only disks. Each ends in a correct result (bit for bit what an
uninterrupted run gives) or a one-line error naming the cause, and loses at most the work since the last checkpoint.

Kills are real SIGKILLs of a child process, sent from inside it at a chosen point (the child wraps one function of
the code under test to kill itself there); small disks are tmpfs mounts in a private mount namespace (skipped where
this is not allowed)."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cli.errors import UserError
from tiny_assets import metric_rows, tiny_overrides
from train import run_dir, trainer
from train.config import load_config
from train.ds_extensions import LockWatch, watch_build_locks
from train.train_heads import run
from train.watchdog import StallWatch

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "medusa_tiny.yaml")
COMMON = ("training.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=2")


def child(code: str, env: dict | None = None, timeout: float = 300, wrap: list[str] = ()) -> subprocess.Popen:
    """Start `code` in a fresh Python process that imports the repository and tests/ (wrap: a command prefix)."""
    prelude = f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
    env = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.Popen([*wrap, sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s (a hang)\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def train_child(assets, out: Path, *overrides: str, kill_when: str = "", wrap: list[str] = ()) -> subprocess.Popen:
    """Train the tiny Medusa config in a child; `kill_when` is code run first that may patch a function to SIGKILL
    the child at a chosen moment."""
    return child(f"""
        import os, signal
        from train import recipe, trainer
        from train.config import load_config
        from train.train_heads import run
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        {textwrap.indent(textwrap.dedent(kill_when), ' ' * 8).strip()}
        run(load_config({TINY!r}, {tiny_overrides(assets, out, *overrides)!r}))
        """, wrap=wrap)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """The reference: 4 steps in one go (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("faults") / "full"
    return out, run(load_config(TINY, tiny_overrides(assets, out, *COMMON)))


# --- kills -----------------------------------------------------------------------------------------------------


KILLS = {
    # after optimizer step 3 (the checkpoint of step 2 is the last one)
    "during-training": """
        beat = recipe.StallWatch.beat
        recipe.StallWatch.beat = lambda self, step: die() if step == 3 else beat(self, step)
        """,
    # while checkpoint 4 is written (the second save): DeepSpeed's files are there, the RNG states and the
    # completion marker are not
    "during-checkpoint-save": """
        rng_state, saves = trainer.rng_state, []
        trainer.rng_state = lambda: die() if saves.append(1) or len(saves) == 2 else rng_state()
        """,
}


@pytest.mark.parametrize("when", KILLS)
def test_kill_then_rerun_gives_the_uninterrupted_weights(assets, tmp_path, uninterrupted, when):
    full_dir, full = uninterrupted
    out = tmp_path / "killed"
    code, _, err = finish(train_child(assets, out, *COMMON, kill_when=KILLS[when]))
    assert code == -signal.SIGKILL, err[-2000:]
    assert [p.name for p in trainer.complete_checkpoints(str(out))] == ["step_00000002"]
    resumed = run(load_config(TINY, tiny_overrides(assets, out, *COMMON)))
    assert resumed.finished and resumed.step == 4
    same_weights(full.drafter, resumed.drafter)
    assert metric_rows(out) == metric_rows(full_dir)
    assert [p.name for p in trainer.complete_checkpoints(str(out))] == ["step_00000002", "step_00000004"]


# --- kills of the data commands: regeneration and feature dumps --------------------------------------------------


def command_child(module: str, argv: list[str], kill_when: str) -> subprocess.Popen:
    """Run `python -m <module> argv` in a child (as run_main runs it); `kill_when` patches the module first so that the
    child SIGKILLs itself at a chosen moment. One thread, as in this process: the two runs' numbers must agree."""
    return child(f"""
        import os, signal
        from cli.errors import run_main
        import {module} as command
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        {textwrap.indent(textwrap.dedent(kill_when), ' ' * 8).strip()}
        run_main(command.main, {argv!r})
        """, env={"OMP_NUM_THREADS": "1"})


def regen_argv(assets, out: Path) -> list[str]:
    """12 conversations in batches of 3, sampled (so every (record, turn) seed matters), 4 new tokens a turn."""
    return ["--target", assets["target"], "--input", assets["data.train"], "--output", str(out), "--limit", "12",
            "--batch-size", "3", "--max-new-tokens", "4", "--temperature", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def regenerated(assets, tmp_path_factory):
    """The reference: the uninterrupted file's bytes."""
    from data import regenerate

    out = tmp_path_factory.mktemp("regen") / "full.jsonl"
    regenerate.main(regen_argv(assets, out))
    return out.read_bytes()


REGEN_KILLS = {
    # two batches are on disk; the third is being generated
    "between-batches": """
        answer, calls = command.regenerate_conversations, []
        command.regenerate_conversations = lambda *a: die() if calls.append(1) or len(calls) == 3 else answer(*a)
        """,
    # the third batch's lines are being written: half of their bytes reached the file
    "mid-write": """
        append, calls = command._append, []
        class Cut:
            def __init__(self, f):
                self.f = f
            def write(self, data):
                self.f.write(data[:len(data) // 2])
                self.f.flush()
                die()
        command._append = lambda f, records: append(Cut(f) if calls.append(1) or len(calls) == 3 else f, records)
        """,
}


@pytest.mark.parametrize("when", REGEN_KILLS)
def test_a_killed_regeneration_reruns_to_the_uninterrupted_file(assets, tmp_path, regenerated, when, capsys):
    from data import regenerate

    out = tmp_path / "out.jsonl"
    code, _, err = finish(command_child("data.regenerate", regen_argv(assets, out), REGEN_KILLS[when]))
    assert code == -signal.SIGKILL, err[-2000:]
    killed = out.read_bytes()
    complete = killed[:killed.rfind(b"\n") + 1]
    lines = complete.count(b"\n")  # two whole batches, and a line of the third when its write was cut after it
    assert (lines, killed != complete) == ((7, True) if when == "mid-write" else (6, False))
    assert regenerated.startswith(complete)
    capsys.readouterr()
    regenerate.main(regen_argv(assets, out))
    assert f"wrote {12 - lines} records ({lines} already done)" in capsys.readouterr().out  # kept lines not redone
    assert out.read_bytes() == regenerated


def features_argv(assets, out: Path, tmp_path: Path) -> list[str]:
    """The tiny EAGLE-3 config's features of 48 conversations, 8 to a shard: 6 shards."""
    return ["--config", str(REPO / "configs" / "eagle3_tiny.yaml"), "--output", str(out), "--shard-size", "8",
            "--dtype", "float32", *tiny_overrides(assets, tmp_path / "unused")]


@pytest.fixture(scope="module")
def dumped(assets, tmp_path_factory):
    """The reference: every file of an uninterrupted dump, name -> bytes."""
    from train import features

    root = tmp_path_factory.mktemp("features")
    features.main(features_argv(assets, root / "full", root))
    return {p.name: p.read_bytes() for p in (root / "full").iterdir()}


FEATURE_KILLS = {
    # two shards are on disk; the third is being computed (8 target forwards a shard)
    "between-shards": """
        from data import features
        forward, calls = features.target_forward, []
        features.target_forward = lambda *a, **k: die() if calls.append(1) or len(calls) == 17 else forward(*a, **k)
        """,
    # the third shard's temporary file holds half of its bytes
    "mid-shard-write": """
        from data import features
        save, calls = features.save_file, []
        def cut(tensors, path):
            save(tensors, path)
            if calls.append(1) or len(calls) == 3:
                os.truncate(path, os.path.getsize(path) // 2)
                die()
        features.save_file = cut
        """,
}


@pytest.mark.parametrize("when", FEATURE_KILLS)
def test_a_killed_feature_dump_reruns_to_the_uninterrupted_cache(assets, tmp_path, dumped, when, capsys):
    from train import features

    out = tmp_path / "cache"
    argv = features_argv(assets, out, tmp_path)
    code, _, err = finish(command_child("train.features", argv, FEATURE_KILLS[when]))
    assert code == -signal.SIGKILL, err[-2000:]
    survived = {p.name: p.stat().st_ino for p in out.glob("shard_*.safetensors")}
    assert sorted(survived) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert bool(list(out.glob(".shard_*.tmp"))) == (when == "mid-shard-write")
    capsys.readouterr()
    features.main(argv)
    assert "(4 shards written now)" in capsys.readouterr().out
    assert {p.name: p.stat().st_ino for p in out.glob("shard_*.safetensors") if p.name in survived} == survived
    assert {p.name: p.read_bytes() for p in out.iterdir()} == dumped  # no temporary file left either


# --- DeepSpeed's build lock ------------------------------------------------------------------------------------


def test_a_stale_build_lock_is_removed_and_a_live_one_is_named(tmp_path, monkeypatch, capsys):
    """A compile interrupted by Ctrl-C leaves torch's `lock` file, and every later run waited on it forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.write_text("")
    held = tmp_path / "other_op" / "lock"
    held.parent.mkdir()
    holder = child(f"""
        import os, time
        fd = os.open({str(held)!r}, os.O_CREAT | os.O_EXCL)   # as torch's FileBaton holds it while it builds
        print('holding', flush=True)
        time.sleep(120)
        """)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with watch_build_locks(poll_seconds=0.05):
            time.sleep(0.3)
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert not stale.exists() and held.exists()
    assert f"removed the stale build lock {stale}: the compile of deepspeed_shm_comm that left it was " \
           "interrupted" in err
    assert f"waiting for process {holder.pid}, which is compiling DeepSpeed's C++ extension other_op" in err
    held.unlink()

    own = tmp_path / "own_op" / "lock"  # this process builds: say so while it does
    own.parent.mkdir()
    fd = os.open(own, os.O_CREAT | os.O_EXCL)
    try:
        LockWatch(tmp_path).check()
    finally:
        os.close(fd)
    assert f"compiling DeepSpeed's C++ extension own_op in {own.parent} (once per machine" in capsys.readouterr().err


def test_cpu_training_never_waits_on_the_shm_extension_build(tmp_path):
    """With a stale lock in the shm extension's build folder, starting the process group hung forever; training
    never uses that extension, so it is not compiled at all (nothing appears in a fresh extensions folder)."""
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.write_text("")
    proc = child("""
        from train import trainer
        import deepspeed.comm.comm as comm
        d = trainer.init_distributed()
        print('shm op:', comm.cdb.shm_comm_op)
        trainer.shutdown_distributed()
        """, env={"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    code, out, err = finish(proc, timeout=90)
    assert code == 0, err[-2000:]
    assert "shm op: None" in out
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("build.ninja"))


# --- the output folder ------------------------------------------------------------------------------------------


def test_a_second_run_into_a_busy_output_dir_refuses_with_the_holder(assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = child(f"""
        from pathlib import Path
        from train.run_dir import OutputDirLock
        lock = OutputDirLock(Path({str(out)!r}))
        print('locked', flush=True)
        import time; time.sleep(120)
        """)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_dir.OutputDirBusy, match=rf"output_dir {out} is in use by process {holder.pid} on "
                                                          r".* wait for that run to end, or give this run another"):
            run(load_config(TINY, tiny_overrides(assets, out, "training.max_steps=1")))
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()
    # the holder was killed: the kernel dropped its lock, so nothing stale is left behind
    assert run(load_config(TINY, tiny_overrides(assets, out, "training.max_steps=1"))).finished


@pytest.mark.slow
def test_two_concurrent_runs_one_refuses_the_other_finishes(assets, tmp_path, uninterrupted):
    full_dir, full = uninterrupted
    out = tmp_path / "shared"
    procs = [train_child(assets, out, *COMMON) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 1]
    refused = next(err for code, _, err in results if code == 1)
    assert "is in use by process" in refused.strip().splitlines()[-1]
    assert metric_rows(out) == metric_rows(full_dir)
    same_weights(full.drafter, run(load_config(TINY, tiny_overrides(assets, out, *COMMON))).drafter)


def test_output_dir_that_is_a_file_is_one_line(assets, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UserError, match=rf"output_dir {path} is a file; give a folder"):
        run(load_config(TINY, tiny_overrides(assets, path, "training.max_steps=1")))
    assert path.read_text() == "x"


def small_disk(path: Path, size: str, read_only: bool = False) -> list[str]:
    """A command prefix that runs its command with a tmpfs of `size` mounted on `path` (private mount namespace)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {path}"], capture_output=True).returncode:
        pytest.skip("mounting a small filesystem needs unshare + mount permissions")
    options = f"size={size}" + (",ro" if read_only else "")
    return ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {path} && exec \"$0\" \"$@\""]


def test_read_only_output_dir_is_one_line(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    proc = child(f"""
        from train.run_dir import prepare_output_dir
        prepare_output_dir({str(mount / 'run')!r})
        """, wrap=small_disk(mount, "1m", read_only=True))
    code, _, err = finish(proc, timeout=60)
    assert code == 1 and f"UserError: output_dir {mount / 'run'} is not usable: Read-only file system; give a " \
                          "folder you can write to" in err


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_one_before(assets, tmp_path):
    """A checkpoint takes ~0.9 MB: the first fits on a 1.5 MB disk, the second does not."""
    mount = tmp_path / "small"
    mount.mkdir()
    out = mount / "run"
    overrides = tiny_overrides(assets, out, "training.max_steps=4", "checkpoint.every_steps=2",
                               "checkpoint.keep_last=3")
    proc = child(f"""
        import os
        from train.train_heads import main
        from cli.errors import run_main
        try:
            run_main(main, ["--config", {TINY!r}, *{overrides!r}])
        finally:
            print(sorted(os.listdir({str(out / "checkpoints")!r})), flush=True)
        """, wrap=small_disk(mount, "1500k"))
    code, printed, err = finish(proc)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith(f"error: no space left on device while writing checkpoint step_00000004 to "
                                         f"{out / 'checkpoints'} ("), err[-3000:]
    assert last.endswith("free some space there or write to another disk")
    assert printed.strip().splitlines()[-1] == "['step_00000002']"  # complete; the half-written one is gone


# --- resuming -----------------------------------------------------------------------------------------------------


def test_resuming_with_other_settings_refuses_naming_the_keys(assets, tmp_path, uninterrupted):
    full_dir, full = uninterrupted
    out = tmp_path / "run"
    run(load_config(TINY, tiny_overrides(assets, out, *COMMON, "training.stop_after=2")))
    recorded = (out / "config.yaml").read_bytes()
    with pytest.raises(run_dir.ConfigChanged, match=r"step_00000002 was made with other settings \(data\.max_length: "
                                                    r"128 -> 96; training\.lr: 0\.001 -> 0\.002\); resume with those"):
        run(load_config(TINY, tiny_overrides(assets, out, *COMMON, "training.lr=2e-3", "data.max_length=96")))
    assert (out / "config.yaml").read_bytes() == recorded  # the record of the run is not touched
    # How long it runs, where it logs, how it evaluates may change: max_steps 3 -> 4 continues the same run
    run(load_config(TINY, tiny_overrides(assets, out, *COMMON, "training.max_steps=3", "logging.log_every=2")))
    resumed = run(load_config(TINY, tiny_overrides(assets, out, *COMMON)))
    same_weights(full.drafter, resumed.drafter)
    # resume=none into a finished run's folder refuses before writing anything
    recorded = (out / "config.yaml").read_bytes()
    with pytest.raises(FileExistsError, match="checkpoint.resume=none but"):
        run(load_config(TINY, tiny_overrides(assets, out, *COMMON, "checkpoint.resume=none", "training.lr=5e-3")))
    assert (out / "config.yaml").read_bytes() == recorded


def test_a_finished_run_without_checkpoints_is_not_replaced_by_other_settings(assets, tmp_path):
    out = tmp_path / "run"
    run(load_config(TINY, tiny_overrides(assets, out, "training.max_steps=1", "checkpoint.every_steps=null")))
    weights = (out / "drafter" / "model.safetensors").read_bytes()
    with pytest.raises(run_dir.ConfigChanged, match=r"config\.yaml was made with other settings \(training\.seed: "
                                                    r"0 -> 1\); give another output_dir, or delete the finished run"):
        run(load_config(TINY, tiny_overrides(assets, out, "training.max_steps=1", "checkpoint.every_steps=null",
                                             "training.seed=1")))
    assert (out / "drafter" / "model.safetensors").read_bytes() == weights


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(assets, tmp_path, uninterrupted, capsys):
    full_dir, full = uninterrupted
    out = tmp_path / "run"
    run(load_config(TINY, tiny_overrides(assets, out, *COMMON, "checkpoint.every_steps=1", "training.stop_after=3")))
    newest = trainer.checkpoint_dir(str(out), 3)
    states = newest / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: torch.load would read it without a word
    states.write_bytes(bytes(data))
    capsys.readouterr()
    resumed = run(load_config(TINY, tiny_overrides(assets, out, *COMMON, "checkpoint.every_steps=1")))
    printed = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged (mp_rank_00_model_states.pt is not what was written (checksum)); it is " \
           "passed over" in printed
    assert "resumed from" in printed and "step_00000002 at step 2" in printed
    same_weights(full.drafter, resumed.drafter)
    assert [p.name for p in trainer.complete_checkpoints(str(out))] == ["step_00000003", "step_00000004"]
    assert trainer.checkpoint_problem(newest) is None  # step 3 was written again


# --- non-finite numbers ---------------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_at_its_step_and_saves_nothing(assets, tmp_path):
    """lr 1e30 (finite, so the config takes it): step 1 moves the weights to ~1e30, step 2's loss overflows."""
    out = tmp_path / "run"
    with pytest.raises(trainer.NonFinite, match=r"the loss is not finite \(inf or nan\) at step 2 \(1 micro-batch"
                                                r"\(es\)\); stopped without saving, .*step_00000001 keeps the last good"):
        run(load_config(TINY, tiny_overrides(assets, out, "training.max_steps=4", "checkpoint.every_steps=1",
                                             "training.lr=1e30", "training.grad_clip=0", "training.warmup_steps=0")))
    assert [p.name for p in trainer.complete_checkpoints(str(out))] == ["step_00000001"]
    assert not (out / "drafter").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    d = trainer.init_distributed()
    try:
        module = torch.nn.Linear(2, 2)
        trainer.check_finite_weights(module, d, "the drafter", str(tmp_path))
        with torch.no_grad():
            module.weight[0, 1] = float("nan")
        with pytest.raises(trainer.NonFinite, match=r"the drafter has non-finite \(inf or nan\) weights; not saved, "
                                                    r"and no checkpoint was written"):
            trainer.check_finite_weights(module, d, "the drafter", str(tmp_path))
    finally:
        trainer.shutdown_distributed()


# --- stalls ---------------------------------------------------------------------------------------------------------


def test_a_stalled_step_is_reported_once(capsys):
    watch = StallWatch(rank=1, timeout_minutes=30, factor=10, min_seconds=0.3, poll_seconds=0.02)
    try:
        for step in range(1, 4):  # steps of ~10 ms
            watch.beat(step)
            time.sleep(0.01)
        assert capsys.readouterr().err == ""
        time.sleep(0.6)  # step 4 stalls
    finally:
        watch.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rank 1: step 4 has run for ")
    assert "a peer rank may be stalled; the run stops when a collective has waited training.timeout_minutes=30" in err


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    from types import SimpleNamespace

    from train.config import LoggingConfig

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 2.0}\n{"step": 10, "loss": 1.5}\n{"step": 15, "lo')
    log = trainer.MetricsLog(str(tmp_path), LoggingConfig(progress_bar=False), SimpleNamespace(is_main=True), 20, 10, {})
    assert path.read_text() == '{"step": 5, "loss": 2.0}\n{"step": 10, "loss": 1.5}\n'
    log.close()
    path.write_text('{"step": 5}\nnot json\n{"step": 10}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not a JSON line; delete that line"):
        trainer.MetricsLog(str(tmp_path), LoggingConfig(progress_bar=False), SimpleNamespace(is_main=True), 20, 10,
                           {})


def test_a_config_record_is_written_whole_or_not_at_all(assets, tmp_path, monkeypatch):
    from train import config as config_module

    cfg = load_config(str(REPO / "configs" / "medusa_tiny.yaml"), tiny_overrides(assets, tmp_path / "run"))
    record = tmp_path / "config.yaml"
    config_module.dump_config(cfg, str(record))
    before = record.read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(config_module.yaml, "safe_dump", killed)
    with pytest.raises(KeyboardInterrupt):
        config_module.dump_config(cfg, str(record))
    assert record.read_text() == before and load_config(str(record)).to_dict() == cfg.to_dict()
