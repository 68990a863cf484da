"""Medusa training: the loss against a slow direct computation, a few real training steps (every drafter parameter
moves, no target parameter does), exact resume, and a 2-rank DeepSpeed launch on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_target_unchanged
import torch.nn.functional as F

from drafters import MedusaModel, load_drafter
from target.model import load_target
from tiny_assets import metric_rows, tiny_overrides
from train import trainer
from train.config import CheckpointConfig, load_config
from train.objectives import IGNORE, MedusaObjective, head_topk_accuracy, medusa_labels
from train.train_heads import run

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "medusa_tiny.yaml")


# --- the loss --------------------------------------------------------------------------------------------------


def perturbed_drafter(target, num_heads=3, seed=0):
    """Medusa heads whose blocks and LM heads differ from the fresh (identity + target head) initialisation."""
    drafter = MedusaModel.from_target(target, num_heads=num_heads)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return drafter


def tiny_batch(extra_padding=0):
    """Two right-padded rows (lengths 14 and 10) with assistant spans, two separate ones in row 0."""
    gen = torch.Generator().manual_seed(3)
    T = 14 + extra_padding
    input_ids = torch.zeros(2, T, dtype=torch.long)
    input_ids[0, :14] = torch.randint(3, 256, (14,), generator=gen)
    input_ids[1, :10] = torch.randint(3, 256, (10,), generator=gen)
    attention_mask = (input_ids != 0).long()
    loss_mask = torch.zeros_like(input_ids)
    loss_mask[0, 3:7] = loss_mask[0, 9:14] = 1
    loss_mask[1, 4:10] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def reference_loss(drafter, target, batch, labels, decay):
    """Straight from the definition: every head's logits everywhere, then loop over (k, b, t)."""
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    out = target(ids, attention_mask=attn, output_hidden_states=True)
    all_logits = drafter(out.hidden_states[-1])  # [K, B, T, V]
    K, B, T, _ = all_logits.shape
    total, counts, correct = 0.0, [], []
    for k in range(K):
        terms, hits = [], 0
        for b in range(B):
            for t in range(T - k - 2):
                j = t + k + 2  # the token head k predicts from position t
                if mask[b, j] and attn[b, j] and attn[b, t]:
                    y = ids[b, j] if labels == "data" else out.logits[b, j - 1].argmax()
                    terms.append(-F.log_softmax(all_logits[k, b, t], -1)[y])
                    hits += int(all_logits[k, b, t].argmax() == y)
        total = total + decay ** k * torch.stack(terms).mean()
        counts.append(len(terms))
        correct.append(hits)
    return total, counts, correct


@pytest.mark.parametrize("labels", ["target", "data"])
def test_medusa_loss_equals_direct_computation(tiny_target, labels, monkeypatch):
    target = tiny_target.double()
    drafter = perturbed_drafter(target)
    objective = MedusaObjective(drafter, target, head_decay=0.8, labels=labels)
    batch = tiny_batch()
    expected, counts, correct = reference_loss(drafter, target, batch, labels, 0.8)
    # The objective never asks for all heads' logits at all positions, and the target's LM head runs only
    # where a label is needed (positions followed by an assistant token), not on the whole [B, T] grid.
    monkeypatch.setattr(MedusaModel, "forward", lambda *a: pytest.fail("materialised [K, B, T, V] logits"))
    lm_rows = []
    target.lm_head.register_forward_hook(lambda m, inp, out: lm_rows.append(inp[0].shape[0]))
    loss, stats = objective(**batch)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    assert stats[:, 2].tolist() == counts and stats[:, 1].tolist() == correct
    assert sum(lm_rows) == (int(batch["loss_mask"][:, 1:].sum()) if labels == "target" else 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in drafter.parameters())


def test_padding_changes_nothing(tiny_target):
    target = tiny_target.double()
    objective = MedusaObjective(perturbed_drafter(target), target)
    loss, stats = objective(**tiny_batch())
    padded_loss, padded_stats = objective(**tiny_batch(extra_padding=7))
    torch.testing.assert_close(padded_loss, loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(padded_stats, stats, rtol=0, atol=1e-9)


def test_target_labels_are_greedy_tokens_and_equal_data_labels_on_greedy_text(tiny_target):
    """On text the target generated greedily, its greedy labels are the data tokens; on random text they differ."""
    text = torch.tensor([[1, 17, 23, 5]])
    for _ in range(12):  # greedy continuation, eos or not
        text = torch.cat([text, tiny_target(text).logits[:, -1:].argmax(-1)], dim=1)  # [1, 16] at the end
    attention_mask = torch.ones_like(text)
    loss_mask = torch.zeros_like(text)
    loss_mask[:, 4:] = 1
    hidden = tiny_target(text, output_hidden_states=True).hidden_states[-1]
    greedy = medusa_labels(tiny_target, hidden, text, loss_mask, attention_mask, 3, "target")
    data = medusa_labels(tiny_target, hidden, text, loss_mask, attention_mask, 3, "data")
    assert torch.equal(greedy, data) and (greedy != IGNORE).sum() == 3 * 12  # every head, every answer token
    batch = tiny_batch()
    hidden = tiny_target(batch["input_ids"], output_hidden_states=True).hidden_states[-1]
    args = (batch["input_ids"], batch["loss_mask"], batch["attention_mask"], 3)
    assert not torch.equal(medusa_labels(tiny_target, hidden, *args, "target"),
                           medusa_labels(tiny_target, hidden, *args, "data"))


def test_head_topk_accuracy_equals_direct_count(tiny_target):
    target = tiny_target.double()
    drafter = perturbed_drafter(target)
    batch = tiny_batch()
    acc = head_topk_accuracy(drafter, target, [batch], topk=10)
    out = target(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    logits = drafter(out.hidden_states[-1])  # [K, B, T, V]
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    for k in range(3):
        hits, n = torch.zeros(10), 0
        for b, t in ((b, t) for b in range(2) for t in range(ids.shape[1] - k - 2)):
            if mask[b, t + k + 2] and attn[b, t]:
                y = out.logits[b, t + k + 1].argmax()
                hits += (logits[k, b, t].topk(10).indices == y).double()
                n += 1
        torch.testing.assert_close(torch.tensor(acc[k]), (hits / n).float(), rtol=0, atol=1e-7)
        assert sum(acc[k]) <= 1 + 1e-9


def test_warmup_then_cosine_to_min_ratio():
    factor = trainer.warmup_cosine(total_steps=12, warmup_steps=2, min_lr_ratio=0.1)
    values = [factor(s) for s in range(12)]
    assert values[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(values[2:], values[3:]))  # strictly decreasing after warm-up
    assert values[-1] == pytest.approx(0.1)


# --- checkpoints -----------------------------------------------------------------------------------------------


def test_auto_resume_takes_newest_complete_checkpoint(tmp_path):
    for step, complete in [(2, True), (4, True), (6, False)]:  # step 6: a run died while writing it
        path = trainer.checkpoint_dir(str(tmp_path), step)
        path.mkdir(parents=True)
        if complete:
            (path / trainer.COMPLETE).write_text("{}")
    newest = trainer.checkpoint_dir(str(tmp_path), 4)
    assert trainer.resume_path(CheckpointConfig(resume="auto"), str(tmp_path)) == newest
    assert trainer.resume_path(CheckpointConfig(resume="none"), str(tmp_path / "fresh")) is None
    with pytest.raises(FileExistsError, match="checkpoint.resume=none but .* holds checkpoints of an earlier run"):
        trainer.resume_path(CheckpointConfig(resume="none"), str(tmp_path))
    assert trainer.resume_path(CheckpointConfig(resume=str(newest)), "elsewhere") == newest
    assert trainer.resume_path(CheckpointConfig(resume="auto"), str(tmp_path / "fresh")) is None
    with pytest.raises(FileNotFoundError, match=r"step_00000006' is not a complete checkpoint \(no COMPLETE.json"):
        trainer.resume_path(CheckpointConfig(resume=str(trainer.checkpoint_dir(str(tmp_path), 6))), "x")


# --- training runs (DeepSpeed, CPU, in-process) -----------------------------------------------------------------



@pytest.mark.parametrize("overrides", [
    ["logging.wandb=true"],
    ["training.zero_stage=1", "training.grad_accum=2"],
    ["training.zero_stage=2", "training.precision=bf16"],
    ["training.zero_stage=3"],
    ["drafter.share_lm_head=true", "training.labels=data", "drafter.draft_vocab=100"],
], ids=["zero0-wandb", "zero1-accum2", "zero2-bf16", "zero3", "shared-head-data-labels"])
def test_training_moves_every_drafter_parameter_and_no_target_parameter(assets, tmp_path, monkeypatch, overrides):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(TINY, tiny_overrides(assets, tmp_path / "run", "training.max_steps=3", *overrides))
    result = run(cfg)
    assert result.finished and result.step == 3

    assert_target_unchanged(result.target, assets["target"])
    pristine, _ = load_target(assets["target"])
    initial = MedusaModel.from_target(pristine, cfg.drafter.num_heads, cfg.drafter.num_layers,
                                      cfg.drafter.share_lm_head)
    saved = load_drafter(str(tmp_path / "run" / "drafter"), pristine)
    trained = dict(saved.named_parameters())
    assert trained.keys() == dict(initial.named_parameters()).keys()
    for name, p in initial.named_parameters():
        assert not torch.equal(p, trained[name]), f"drafter parameter {name} did not change"
    if cfg.drafter.draft_vocab:
        assert len(saved.config.draftsmith["draft_vocab"]) == 100
    accuracy = saved.config.head_topk_accuracy
    assert len(accuracy) == 3 and all(len(row) == 10 and 0 <= sum(row) <= 1 + 1e-9 for row in accuracy)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"epoch", "lr", "loss", "head_loss", "head_acc", "tokens_per_s", "supervised_tokens_per_s",
            "padding_fraction"} <= rows[0].keys()
    assert all(len(r["head_loss"]) == len(r["head_acc"]) == 3 and r["supervised_tokens_per_s"] > 0 for r in rows)
    assert not (tmp_path / "run" / "eval.json").exists()  # eval.questions=null
    if cfg.logging.wandb:
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_resume_continues_exactly_where_the_run_stopped(assets, tmp_path):
    """4 optimizer steps of 2 micro-batches (crossing an epoch of 7 micro-batches) in one go, and as 2 + 2."""
    common = ("training.max_steps=4", "training.grad_accum=2", "checkpoint.every_steps=2", "checkpoint.keep_last=1")
    full = run(load_config(TINY, tiny_overrides(assets, tmp_path / "full", *common)))
    assert [p.name for p in trainer.complete_checkpoints(str(tmp_path / "full"))] == ["step_00000004"]

    stopped = run(load_config(TINY, tiny_overrides(assets, tmp_path / "split", *common, "training.stop_after=2")))
    assert not stopped.finished and stopped.step == 2 and not (tmp_path / "split" / "drafter").exists()
    resumed = run(load_config(TINY, tiny_overrides(assets, tmp_path / "split", *common)))
    assert resumed.finished and resumed.step == 4

    assert metric_rows(tmp_path / "split") == metric_rows(tmp_path / "full")
    assert metric_rows(tmp_path / "full")[-1]["step"] == 4
    for (name, p), q in zip(full.drafter.named_parameters(), resumed.drafter.parameters()):
        assert torch.equal(p, q), name


# --- 2 ranks -----------------------------------------------------------------------------------------------------


def launch_two_ranks(overrides: list[str]) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 train/train_heads.py ...` on CPU (the `deepspeed` script is this runner module)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(trainer._free_port()), "train/train_heads.py", "--config", TINY, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


TWO_RANK = ("data.max_tokens=256", "training.max_steps=4", "checkpoint.every_steps=2", "eval.limit=2",
            "eval.max_new_tokens=8", "eval.tree=chain")


@pytest.fixture(scope="module")
def two_rank_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks") / "full"
    overrides = tiny_overrides(assets, out, *TWO_RANK)
    overrides[overrides.index("eval.questions=null")] = f"eval.questions={assets['eval.questions']}"
    return out, overrides, launch_two_ranks(overrides)


def test_two_rank_deepspeed_run(two_rank_run):
    out, _, proc = two_rank_run
    assert proc.stdout.count("data: ") == 1  # the data summary line comes from rank 0 only
    assert "15 micro-batches of <= 256 tokens per epoch (7 per rank)" in proc.stdout
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3, 4]
    assert [p.name for p in trainer.complete_checkpoints(str(out))] == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in trainer.checkpoint_dir(str(out), 4).glob("rng_rank*.pt")) == \
        ["rng_rank0.pt", "rng_rank1.pt"]
    report = json.loads((out / "eval.json").read_text())
    assert report["setup"]["num_questions"] == 2 and "overall" in report
    drafter = load_drafter(str(out / "drafter"))
    assert drafter.config.num_heads == 3 and len(drafter.config.head_topk_accuracy) == 3


@pytest.mark.slow
def test_two_rank_resume_matches_uninterrupted_run(two_rank_run):
    out, overrides, _ = two_rank_run
    split = out.parent / "split"
    overrides = [f"output_dir={split}" if o.startswith("output_dir=") else o for o in overrides]
    launch_two_ranks(overrides + ["training.stop_after=2"])
    assert not (split / "drafter").exists()
    proc = launch_two_ranks(overrides)
    assert "resumed from" in proc.stdout and "step 2 (epoch 0, batch 2)" in proc.stdout
    assert metric_rows(split) == metric_rows(out)
    a, b = load_drafter(str(out / "drafter")), load_drafter(str(split / "drafter"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_metrics_count_the_positions_the_loss_covers():
    """supervised_tokens_per_s counts the objective's positions (here 10: e.g. a draft LM distilled at every
    token), not the batch's assistant tokens (3)."""
    window = trainer.Window(num_heads=1)
    batch = {"attention_mask": torch.ones(1, 12), "loss_mask": torch.tensor([[0.0] * 9 + [1.0] * 3])}
    window.add(torch.tensor(2.0), torch.tensor([[20.0, 4.0, 10.0]]), batch)
    d = trainer.init_distributed()  # a one-rank gloo group: row() all-reduces over ranks
    try:
        row = window.row(d)
    finally:
        trainer.shutdown_distributed()
    assert (row["loss"], row["head_loss"], row["head_acc"], row["padding_fraction"]) == (2.0, [2.0], [0.4], 0.0)
    assert row["supervised_tokens_per_s"] / row["tokens_per_s"] == pytest.approx(10 / 12, rel=1e-12)


def test_bench_step_measures_every_drafter_at_a_shape(tmp_path):
    """train.bench_step on the tiny shape: one row per drafter kind, each training step moved the drafter's
    weights, the ratio is step / target forward, and the JSON holds the printed rows; bad arguments are refused."""
    from train import bench_step

    out = tmp_path / "rows.json"
    rows = bench_step.main(["--shape", "tiny", "--batch-size", "2", "--seq-len", "32", "--dtype", "float32",
                            "--warmup", "0", "--repeats", "1", "--ttt-steps", "2", "--cod-ratio", "0.5",
                            "--output", str(out)])
    assert [r["drafter"] for r in rows] == list(bench_step.DRAFTERS)
    for r in rows:
        assert r["first_param_changed"], r["drafter"]
        assert r["ratio"] == pytest.approx(r["train_step_s"] / r["target_forward_s"])
        assert r["trainable_params"] > 0
    assert json.loads(out.read_text()) == rows
    with pytest.raises(ValueError, match="--shape 'huge'"):
        bench_step.main(["--shape", "huge"])
    for bad in (["--drafters", "medusa,hydra"], ["--seq-len", "2"], ["--ttt-steps", "0"], ["--assistant", "0"],
                ["--cod-ratio", "1.5"]):
        with pytest.raises(SystemExit):
            bench_step.main(["--shape", "tiny", *bad])
