"""Draft-LM distillation: the objective against a direct computation, real training runs (full and LoRA) through
train/train_draft_lm.py, exact resume, the saved draft loading as a drafter, and the evaluation with --compare-hf."""
import json
from pathlib import Path

import pytest
import torch

from conftest import assert_target_unchanged
from target.model import target_forward
import torch.nn.functional as F

from drafters import load_drafter
from drafters.draft_lm import build_draft_lm
from target.model import load_target
from tiny_assets import metric_rows, tiny_overrides
from train.config import load_config
from train.losses import forward_kl, total_variation
from train.objectives import DraftLMObjective
from train.train_draft_lm import main, run

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "draft_lm_tiny.yaml")


def _direct_objective_case(target):
    """A tiny batch (row 1 padded) and a perturbed 1-layer draft, both float64."""
    draft = build_draft_lm(target, num_layers=1).double()
    with torch.no_grad():
        for p in draft.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 12), generator=gen)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 9:] = 0
    loss_mask = torch.zeros_like(ids)
    loss_mask[0, 4:12] = loss_mask[1, 2:6] = 1
    return draft, ids, attention_mask, loss_mask


@pytest.mark.parametrize("positions", ["assistant", "all"])
def test_draft_objective_equals_direct_computation(tiny_target, positions):
    target = tiny_target.double()
    draft, ids, attention_mask, loss_mask = _direct_objective_case(target)
    objective = DraftLMObjective(draft, target, {"forward_kl": 1.0, "tvd": 0.5, "ce": 0.25}, temperature=2.0,
                                 positions=positions)
    loss, stats = objective(ids, attention_mask, loss_mask)

    terms, hits = [], 0
    p_all, q_all = target(ids, attention_mask=attention_mask).logits, draft(ids, attention_mask=attention_mask).logits
    for b in range(2):
        for t in range(11):
            if (loss_mask[b, t + 1] or positions == "all") and attention_mask[b, t + 1]:
                lp, lq = F.log_softmax(p_all[b, t] / 2, -1)[None], F.log_softmax(q_all[b, t] / 2, -1)[None]
                ce = -F.log_softmax(q_all[b, t], -1)[ids[b, t + 1]]
                terms.append(forward_kl(lp, lq)[0] + 0.5 * total_variation(lp, lq)[0] + 0.25 * ce)
                hits += int(p_all[b, t].argmax() == q_all[b, t].argmax())
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(loss, expected)
    assert stats.tolist() == [[pytest.approx(expected.item() * len(terms)), hits, len(terms)]]
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert draft.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0



def test_draft_vocab_loss_equals_direct_computation(tiny_target):
    """loss_vocab: draft: both distributions over the draft vocabulary's ids only (renormalised), positions whose
    next token is outside left out and counted; hits compare argmaxes over those ids."""
    target = tiny_target.double()
    torch.manual_seed(0)
    draft, ids, attention_mask, loss_mask = _direct_objective_case(target)
    supervised = [(b, t) for b in range(2) for t in range(11) if loss_mask[b, t + 1] and attention_mask[b, t + 1]]
    outside = {int(ids[b, t + 1]) for b, t in supervised[::3]}  # a third of the next tokens lack a draft id
    vocab = sorted(set(range(256)) - outside)
    objective = DraftLMObjective(draft, target, {"forward_kl": 1.0, "ce": 0.5}, temperature=2.0, vocab=vocab)
    loss, stats = objective(ids, attention_mask, loss_mask)

    rows = torch.tensor(vocab)
    p_all = target(ids, attention_mask=attention_mask).logits[..., rows]
    q_all = draft(ids, attention_mask=attention_mask).logits[..., rows]
    terms, hits = [], 0
    for b, t in supervised:
        if int(ids[b, t + 1]) in outside:
            continue
        lp, lq = F.log_softmax(p_all[b, t] / 2, -1)[None], F.log_softmax(q_all[b, t] / 2, -1)[None]
        ce = -F.log_softmax(q_all[b, t], -1)[vocab.index(int(ids[b, t + 1]))]
        terms.append(forward_kl(lp, lq)[0] + 0.5 * ce)
        hits += int(p_all[b, t].argmax() == q_all[b, t].argmax())
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(loss, expected)
    assert stats.tolist() == [[pytest.approx(expected.item() * len(terms)), hits, len(terms)]]
    assert objective.outside == len(supervised) - len(terms) > 0


def test_draft_vocabulary_logits_are_soft_capped_like_the_full_ones(tiny_target):
    """Soft-capping (Gemma 2) acts on each logit alone: logits over a draft vocabulary are the capped full logits'
    rows, in the loss and in drafting."""
    from inference.draft_lm_proposer import DraftLMProposer
    from target.model import lm_logits
    from train.objectives import _logits
    draft, ids, attention_mask, loss_mask = _direct_objective_case(tiny_target)
    draft.config.final_logit_softcapping = 3.0  # small enough to change most logits
    rows = torch.arange(0, 256, 2)
    hidden = target_forward(draft, ids, attention_mask, logits_at=0, use_cache=False).hidden_states[0]
    full = lm_logits(draft, hidden)                                                     # [T, V]
    assert full.abs().max() < 3.0 and not torch.allclose(full, draft.get_output_embeddings()(hidden))
    torch.testing.assert_close(_logits(draft, hidden, rows), full[:, rows])
    proposer = DraftLMProposer(draft, draft_vocab=rows.tolist())
    proposer.begin(ids[0], None)
    torch.testing.assert_close(proposer.draft_forward(ids[0].tolist()), full[-1, rows])


def test_ce_alone_never_runs_the_target(tiny_target):
    """With 'ce' the only loss the teacher is not needed: the target sees no forward, the loss is the draft's CE
    on the data's next tokens and hits count its argmax against them."""
    target = tiny_target.double()
    torch.manual_seed(0)
    draft, ids, attention_mask, loss_mask = _direct_objective_case(target)
    calls = []
    hook = target.model.register_forward_pre_hook(lambda *a: calls.append(1))
    objective = DraftLMObjective(draft, target, {"ce": 1.0, "tvd": 0.0}, positions="all")
    loss, stats = objective(ids, attention_mask, loss_mask)
    hook.remove()
    assert calls == [] and objective.teacher_free

    q_all = draft(ids, attention_mask=attention_mask).logits
    pos = [(b, t) for b in range(2) for t in range(11) if attention_mask[b, t + 1]]
    ce = torch.stack([-F.log_softmax(q_all[b, t], -1)[ids[b, t + 1]] for b, t in pos])
    torch.testing.assert_close(loss, ce.mean())
    hits = sum(int(q_all[b, t].argmax() == ids[b, t + 1]) for b, t in pos)
    assert stats.tolist() == [[pytest.approx(ce.sum().item()), hits, len(pos)]]
    loss.backward()
    assert draft.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_training_moves_draft_layers_only_and_evaluates_against_hf(assets, tmp_path):
    out = tmp_path / "run"
    extra = ["training.max_steps=3", f"eval.questions={assets['eval.questions']}", "eval.max_new_tokens=12",
             "eval.check_lossless=true"]
    cfg = load_config(TINY, tiny_overrides(assets, out, *extra))
    result = run(cfg)
    assert result.finished and result.step == 3

    assert_target_unchanged(result.target, assets["target"])
    pristine, _ = load_target(assets["target"])
    initial = dict(build_draft_lm(pristine, 2, [0]).named_parameters())
    saved = load_drafter(str(out / "drafter"), pristine)
    assert saved.config.draftsmith["kind"] == "draft_lm" and 0 <= saved.config.draftsmith["heldout_agreement"] <= 1
    for name, p in saved.named_parameters():
        frozen = "embed_tokens" in name or "lm_head" in name  # train_embeddings: false
        assert torch.equal(p, initial[name]) == frozen, f"{name}: {'changed' if frozen else 'did not change'}"
    assert (out / "drafter" / "tokenizer.json").is_file()

    report = json.loads((out / "eval.json").read_text())
    assert report["setup"]["drafter_kind"] == "draft_lm" and report["setup"]["proposer"]["k"] == 3
    assert report["setup"]["proposer"]["draft_vocab"] == 200 == len(saved.config.draftsmith["draft_vocab"])
    assert 0.5 < saved.config.draftsmith["draft_vocab_heldout_coverage"] <= 1
    cost = report["setup"]["proposer"]
    assert cost["cost_ratio"] == pytest.approx(cost["draft_step_ms"] / cost["target_step_ms"]) and cost["cost_ratio"] > 0
    assert report["lossless"] == {"checked": 3, "mismatches": 0}  # 2 questions, one with two turns
    hf = report["hf_assisted"]
    assert hf["lossless"] == {"checked": 3, "mismatches": 0}  # greedy assisted generation is lossless too
    for row in (report["overall"], hf["overall"]):
        assert row["tau"] == pytest.approx(row["new_tokens"] / row["target_forwards"]) and row["tau"] >= 1
    assert hf["overall"]["new_tokens"] == report["overall"]["new_tokens"]


def test_teacher_free_training_over_the_draft_vocabulary(assets, tmp_path):
    """drafter.losses={ce: 1.0} + loss_vocab: draft trains the layers through the script; the saved draft records
    its 200-token vocabulary and a held-out agreement measured over it."""
    out = tmp_path / "ce"
    result = run(load_config(TINY, tiny_overrides(assets, out, "training.max_steps=2", "drafter.losses={ce: 1.0}",
                                                  "drafter.loss_vocab=draft")))
    assert result.finished and result.step == 2
    pristine, _ = load_target(assets["target"])
    initial = dict(build_draft_lm(pristine, 2, [0]).named_parameters())
    saved = load_drafter(str(out / "drafter"), pristine)
    meta = saved.config.draftsmith
    assert len(meta["draft_vocab"]) == 200 and 0 <= meta["heldout_agreement"] <= 1
    for name, p in saved.named_parameters():
        frozen = "embed_tokens" in name or "lm_head" in name
        assert torch.equal(p, initial[name]) == frozen, f"{name}: {'changed' if frozen else 'did not change'}"


def test_lora_training_changes_only_adapters_and_saved_adapters_reload(assets, tmp_path):
    out = tmp_path / "lora"
    cfg = load_config(TINY, tiny_overrides(assets, out, "training.max_steps=2", "drafter.lora=true",
                                      "drafter.save_merged=false", "drafter.init_layers=[0, 1]"))
    result = run(cfg)
    pristine, _ = load_target(assets["target"])
    initial = build_draft_lm(pristine, 2, [0, 1])
    assert (out / "drafter" / "adapter_config.json").is_file()
    saved = load_drafter(str(out / "drafter"), pristine)
    lora = {n: p for n, p in saved.named_parameters() if "lora_" in n}
    assert lora and all(not torch.equal(p, torch.zeros_like(p)) for n, p in lora.items() if "lora_B" in n)
    base = dict(initial.named_parameters())
    for name, p in saved.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace("base_model.model.", "").replace(".base_layer", "")]), name
    ids = torch.tensor([[5, 9, 33, 7, 100]])
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, result.drafter(ids).logits, rtol=0, atol=0)


def test_resume_continues_exactly(assets, tmp_path):
    common = ("training.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=1")
    full = run(load_config(TINY, tiny_overrides(assets, tmp_path / "full", *common)))
    stopped = run(load_config(TINY, tiny_overrides(assets, tmp_path / "split", *common, "training.stop_after=2")))
    assert not stopped.finished
    resumed = run(load_config(TINY, tiny_overrides(assets, tmp_path / "split", *common)))
    assert resumed.finished and metric_rows(tmp_path / "split") == metric_rows(tmp_path / "full")
    for (name, p), q in zip(full.drafter.named_parameters(), resumed.drafter.parameters()):
        assert torch.equal(p, q), name


def test_scripts_refuse_the_other_kind(capsys):
    with pytest.raises(SystemExit, match="this script trains draft_lm drafters; use train/train_heads.py"):
        main(["--config", str(REPO / "configs" / "medusa_tiny.yaml")])
