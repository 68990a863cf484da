"""Parallel drafters (one drafter forward drafts every depth): P-EAGLE (EAGLE-3 with placeholders) and DFlash (a
block drafter). Training equals drafting, the placeholders train, and decoding is lossless in two architectures."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from conftest import make_tiny_target
from drafters import DFlashModel, EagleModel
from inference.dflash_proposer import DFlashProposer
from inference.eagle_proposer import ParallelEagleProposer
from inference.speculative import plain_generate, speculative_generate
from target.model import target_forward
from target.packing import PackedLinear, can_pack, packed_linears
from test_eagle import PROMPTS, greedy_text
from train.dflash_objective import DFlashObjective
from train.eagle_objective import Eagle3Objective

REPO = Path(__file__).resolve().parents[1]
CHAIN = [(0,), (0, 0), (0, 0, 0)]
TREE = [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]


def train(drafter, objective, target, steps: int = 60):
    torch.manual_seed(0)
    ids = greedy_text(target, prompts=PROMPTS)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        loss, _ = objective(ids, mask, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter.eval()


def test_peagle_training_step_equals_the_one_forward_draft():
    """P-EAGLE's unrolled step i at anchor j computes what one drafting forward computes at depth i + 1 after the
    verified pairs 0..j: the placeholders' positions, inputs and attention are the same."""
    target = make_tiny_target()
    drafter = EagleModel.from_target(target, version=3, parallel_drafts=3).eval()
    ids = greedy_text(target, n_rows=1, length=12)
    captured = []
    drafter.register_forward_hook(lambda m, args, out: captured.append(out[0]) and None)
    Eagle3Objective(drafter, target, steps=3)(ids, torch.ones_like(ids), torch.ones_like(ids))
    unrolled = captured[:]                                                # 3 x [T - 1, H]
    features = target_forward(target, ids, feature_layers=drafter.config.feature_layers).features
    for j in (0, 4, 7):
        n = j + 1
        tokens = torch.cat([ids[:, 1:n + 1], torch.full((1, 2), -1)], dim=1)
        hidden = torch.cat([drafter.fuse(features[:, :n]), drafter.placeholder_hidden().expand(1, 2, -1)], dim=1)
        mask = torch.zeros(1, 1, n + 2, n + 2).masked_fill(torch.ones(n + 2, n + 2).triu(1).bool(), -1e30)
        out = drafter(tokens, hidden, torch.arange(n + 2)[None], mask, DynamicCache())[0]
        for i in range(3):
            assert torch.allclose(out[n - 1 + i], unrolled[i][j], atol=1e-5), (j, i)


@pytest.mark.parametrize("parallel_drafts", [None, 3])
def test_cod_steps_run_nested_anchors_and_compute_what_the_full_unrolling_does(parallel_drafts):
    """COD (cod_ratio 0.5, floor 0.3), EAGLE-3 and P-EAGLE: in training, step i runs ceil(n max(0.5^i, 0.3)) anchors,
    each among step i-1's, and computes at each exactly what the full unrolling (which equals drafting, the tests
    above and in test_eagle.py) computes there, and supervises only those; held-out (eval) runs every anchor."""
    target = make_tiny_target()
    drafter = EagleModel.from_target(target, version=3, parallel_drafts=parallel_drafts)
    objective = Eagle3Objective(drafter, target, steps=3, cod_ratio=0.5, cod_min=0.3)
    ids = greedy_text(target, n_rows=2, length=14)
    ones, loss_mask = torch.ones_like(ids), torch.ones_like(ids)
    loss_mask[:, :6] = 0  # a prompt: COD runs the supervised anchors first
    captured, drawn = [], []
    drafter.register_forward_hook(lambda m, args, out: captured.append(out) and None)
    draw = objective.cod_anchors
    objective.cod_anchors = lambda n, supervised: drawn.append(draw(n, supervised)) or drawn[-1]
    _, full_stats = objective.eval()(ids, ones, loss_mask)
    full = captured[:]
    captured.clear()
    _, stats = objective.train()(ids, ones, loss_mask)
    B, T = ids.shape
    n = T - 1
    anchors, sizes = drawn[-1]
    assert drawn[0] == (None, [n] * 3) and sizes == [n, math.ceil(n * 0.5), math.ceil(n * 0.3)]
    assert sorted(anchors.tolist()) == list(range(n))
    for i in range(3):
        kept = anchors[:sizes[i]] if i else torch.arange(n)
        assert captured[i].shape == (B, sizes[i], drafter.config.hidden)
        torch.testing.assert_close(captured[i], full[i][:, kept], atol=1e-5, rtol=1e-5)
        # supervised: anchors whose step-i token x_{j+1+i} is followed by an answer token
        supervised = lambda j: (j + 2 + i >= 6) & (j + 2 + i < T)
        assert stats[i, 2] == B * int(supervised(kept).sum())
        assert full_stats[i, 2] == B * int(supervised(torch.arange(n)).sum())
    assert sizes[1] <= T - 6 and (anchors[:sizes[1]] + 3 >= 6).all()  # step 1 ran supervised anchors only


def test_peagle_placeholders_are_trained_and_the_target_is_not():
    target = make_tiny_target()
    drafter = EagleModel.from_target(target, version=3, parallel_drafts=3)
    before = {k: v.clone() for k, v in drafter.state_dict().items()}
    frozen = {k: v.clone() for k, v in target.state_dict().items()}
    train(drafter, Eagle3Objective(drafter, target, steps=3), target, steps=2)
    after = drafter.state_dict()
    assert not torch.equal(before["mask_hidden"], after["mask_hidden"])
    assert not torch.equal(before["mask_embedding"], after["mask_embedding"])
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in frozen.items())


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def peagle(request):
    target = make_tiny_target(request.param)
    drafter = EagleModel.from_target(target, version=3, parallel_drafts=3)
    return target, train(drafter, Eagle3Objective(drafter, target, steps=3), target)


def accepted_if_lossless(target, make_proposer) -> int:
    """Drafts accepted over PROMPTS, 40 tokens each, after checking every answer is the target's greedy one."""
    accepted = 0
    for prompt in map(torch.tensor, PROMPTS):
        result = speculative_generate(target, make_proposer(), prompt, 40, set())
        assert result.tokens == plain_generate(target, prompt, 40, set()).tokens
        accepted += sum(result.accept_lengths)
    return accepted


def test_peagle_drafts_through_its_packed_head_and_fuses_the_placeholder_once(peagle):
    """Inference packs the drafter's nn.Linear layers (target.packing); the head must be reached as a module for
    that to serve it, and the constant placeholder feature is fused once per proposer, not per step."""
    target, drafter = peagle
    calls = {"lm_head": 0, "fc": 0}
    hooks = [getattr(drafter, name).register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(
        name, calls[name] + 1)) for name in calls]
    try:
        result = speculative_generate(target, ParallelEagleProposer(drafter, CHAIN), torch.tensor(PROMPTS[0]), 12,
                                      set())
    finally:
        for hook in hooks:
            hook.remove()
    steps = len(result.accept_lengths)
    assert calls["lm_head"] == steps               # one projection of every depth per step
    assert calls["fc"] == steps + 1                # each step's verified features, and the placeholder once


@pytest.mark.parametrize("paths", [CHAIN, TREE], ids=["chain", "tree"])
def test_peagle_greedy_decoding_is_lossless_and_accepts_drafts(peagle, paths):
    target, drafter = peagle
    assert accepted_if_lossless(target, lambda: ParallelEagleProposer(drafter, paths)) >= 10


# --- DFlash ------------------------------------------------------------------------------------------------------


def test_dflash_training_block_equals_the_decoding_block():
    """A training block at anchor a computes what decoding computes after verifying positions 0..a-1 with x_a as
    the root: the same context (positions < a), the same slots, both ways inside the block."""
    target = make_tiny_target("qwen2")
    drafter = DFlashModel.from_target(target, num_layers=2, block_size=4).eval()
    ids = greedy_text(target, n_rows=1, length=16)
    objective = DFlashObjective(drafter, target, num_anchors=5).eval()
    captured = []
    drafter.register_forward_hook(lambda m, args, out: captured.append((args[0], args[1], out)) and None)
    objective(ids, torch.ones_like(ids), torch.ones_like(ids))
    tokens, positions, out = captured[0]                                 # [1, A*4], [1, A*4], [1, A*4, H]
    features = target_forward(target, ids, feature_layers=drafter.config.feature_layers).features
    anchors = positions[0, ::4].tolist()
    assert len(anchors) == 5 and tokens[0, ::4].tolist() == ids[0, anchors].tolist()
    for b, a in enumerate(anchors):
        proposer = DFlashProposer(drafter, [(0,)])
        proposer.begin(ids[0, :a], features[0, :a])
        context = drafter.context(features[:, :a], torch.arange(a)[None])
        block = drafter(tokens[:, 4 * b:4 * b + 4], positions[:, 4 * b:4 * b + 4], context)
        assert torch.allclose(block[0], out[0, 4 * b:4 * b + 4], atol=1e-5), a
        assert all(torch.equal(k, pk) for (k, _), (pk, _) in zip(context, proposer.context))


def test_dflash_loss_is_the_weighted_soft_cross_entropy_of_every_slot():
    """The objective's loss, recomputed block by block from decoding-time forwards and the target's logits."""
    target = make_tiny_target()
    drafter = DFlashModel.from_target(target, num_layers=1, block_size=3).eval()
    ids = greedy_text(target, n_rows=1, length=12)
    mask = torch.ones_like(ids)
    loss_mask = mask.clone()
    loss_mask[0, :5] = 0                                                  # x_0..x_4 not supervised
    objective = DFlashObjective(drafter, target, num_anchors=64, gamma=2.0).eval()
    loss, stats = objective(ids, mask, loss_mask)
    torch.set_grad_enabled(False)
    out = target_forward(target, ids, feature_layers=drafter.config.feature_layers)
    logits = target(ids).logits[0]
    total = weight = 0.0
    count = torch.zeros(2)
    for a in range(4, 11):                                                # anchors whose next token is supervised
        context = drafter.context(out.features[:, :a], torch.arange(a)[None])
        block = drafter(torch.tensor([[ids[0, a], drafter.config.mask_token_id, drafter.config.mask_token_id]]),
                        torch.arange(a, a + 3)[None], context)[0]
        for k in (1, 2):
            if a + k >= ids.shape[1]:
                continue
            w = math.exp(-(k - 1) / 2.0)
            p = torch.softmax(logits[a + k - 1], -1)
            total += w * float(-(p * torch.log_softmax(drafter.logits(block[k]), -1)).sum())
            weight += w
            count[k - 1] += 1
    torch.set_grad_enabled(True)
    assert float(loss) == pytest.approx(total / weight, rel=1e-5)
    assert stats[:, 2].tolist() == count.tolist()


def test_dflash_trains_its_layers_and_not_the_target():
    target = make_tiny_target()
    drafter = DFlashModel.from_target(target, num_layers=1, block_size=4)
    before = {k: v.clone() for k, v in drafter.named_parameters()}
    frozen = {k: v.clone() for k, v in target.state_dict().items()}
    train(drafter, DFlashObjective(drafter, target, num_anchors=8), target, steps=2)
    assert before.keys() == {k for k, _ in drafter.named_parameters()}
    assert not any(k.startswith("target") or "embed" in k or "lm_head" in k for k in before)
    assert all(not torch.equal(v, dict(drafter.named_parameters())[k]) for k, v in before.items()), \
        [k for k, v in before.items() if torch.equal(v, dict(drafter.named_parameters())[k])]
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in frozen.items())


@pytest.fixture(scope="module", params=[("llama", "qwen3"), ("qwen2", None)], ids=["llama-qwen3layers", "qwen2"])
def dflash(request):
    arch, layers = request.param  # the reference's Qwen3 layers on a Llama target; the target's own layers
    target = make_tiny_target(arch)
    drafter = DFlashModel.from_target(target, num_layers=2, block_size=4, layer_family=layers)
    return target, train(drafter, DFlashObjective(drafter, target, num_anchors=32), target, steps=100)


@pytest.mark.parametrize("paths", [CHAIN, TREE], ids=["chain", "tree"])
def test_dflash_greedy_decoding_is_lossless_and_accepts_drafts(dflash, paths):
    target, drafter = dflash
    assert accepted_if_lossless(target, lambda: DFlashProposer(drafter, paths)) >= 5


# --- through the recipe --------------------------------------------------------------------------------------------


def test_dflash_draft_vocabulary_runs_packed_and_stays_lossless(dflash):
    """Rows of the target's packed LM head (a draft vocabulary) are packed too, and decoding stays the target's."""
    target, drafter = dflash
    vocab = list(range(0, target.config.vocab_size, 2))
    with torch.no_grad(), packed_linears(target):
        drafter.attach_target(target)
        try:
            proposer = DFlashProposer(drafter, CHAIN, draft_vocab=vocab)
            assert isinstance(proposer.head, PackedLinear) == can_pack()
            assert torch.equal(proposer.head.weight, target.lm_head.weight[vocab])
            accepted_if_lossless(target, lambda: DFlashProposer(drafter, CHAIN, draft_vocab=vocab))
        finally:
            drafter.attach_target(target)


@pytest.mark.parametrize("config", ["peagle_tiny", "dflash_tiny"])
def test_parallel_drafters_train_save_and_evaluate_losslessly(assets, tmp_path, config):
    from drafters import load_drafter
    from target.model import load_target
    from tiny_assets import tiny_overrides
    from train.config import load_config
    from train.train_heads import run

    overrides = tiny_overrides(assets, tmp_path / "run", "training.max_steps=2",
                               f"eval.questions={assets['eval.questions']}", "eval.check_lossless=true")
    cfg = load_config(str(REPO / "configs" / f"{config}.yaml"), overrides)
    result = run(cfg)
    assert result.finished and result.step == 2
    pristine, _ = load_target(assets["target"])
    saved = load_drafter(str(tmp_path / "run" / "drafter"), pristine)
    depths = cfg.drafter.block_size - 1 if config.startswith("dflash") else cfg.drafter.ttt_steps
    assert isinstance(saved, DFlashModel if config.startswith("dflash") else EagleModel)
    assert len(saved.config.step_topk_accuracy) == depths
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["setup"]["drafter_kind"] == cfg.drafter.kind and report["setup"]["proposer"]["tree"] == "chain"
    assert report["setup"]["proposer"]["nodes"] == depths + 1
    assert report["lossless"]["mismatches"] == 0 and report["lossless"]["checked"] == 3


@pytest.mark.parametrize("config", ["peagle_tiny", "dflash_tiny"])
def test_random_anchor_recipes_resume_bit_exactly(assets, tmp_path, config):
    """COD's anchors (P-EAGLE) and DFlash's blocks are drawn at random every step: a run stopped after step 1 and
    resumed draws what the uninterrupted run drew (the checkpoint's RNG state), so losses and weights agree."""
    from tiny_assets import metric_rows, tiny_overrides
    from train.config import load_config
    from train.train_heads import run

    common = ("training.max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=1")
    path = str(REPO / "configs" / f"{config}.yaml")
    full = run(load_config(path, tiny_overrides(assets, tmp_path / "full", *common)))
    stopped = run(load_config(path, tiny_overrides(assets, tmp_path / "split", *common, "training.stop_after=1")))
    assert not stopped.finished and stopped.step == 1
    resumed = run(load_config(path, tiny_overrides(assets, tmp_path / "split", *common)))
    assert resumed.finished and resumed.step == 3
    assert metric_rows(tmp_path / "split") == metric_rows(tmp_path / "full")
    for (name, p), q in zip(full.drafter.named_parameters(), resumed.drafter.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("kind", ["peagle", "dflash"])
def test_parallel_drafters_sample_the_targets_distribution(kind):
    """At temperature 1 the whole loop with a one-forward tree (top-k drafts: point masses) emits sequences
    distributed exactly as the target's own samples."""
    from test_sampling import assert_samples_the_target, tiny_pair

    target, _ = tiny_pair("llama")
    torch.manual_seed(0)
    if kind == "peagle":
        proposer = ParallelEagleProposer(EagleModel.from_target(target, version=3, parallel_drafts=2).eval(),
                                         [(0,), (1,), (0, 0)])
    else:
        proposer = DFlashProposer(DFlashModel.from_target(target, block_size=3).eval(), [(0,), (1,), (0, 0)])
    assert_samples_the_target(target, proposer)


@pytest.mark.parametrize("kind", ["peagle", "dflash"])
def test_auto_trees_come_from_the_recorded_accuracy_and_dynamic_is_refused(kind):
    """--tree auto sizes a static tree over the drafter's depths from its held-out accuracy per depth and rank (a
    drafter that is always right at every depth pays at any margin); --tree dynamic is one line."""
    from inference.proposer_setup import make_proposer

    target = make_tiny_target()
    if kind == "peagle":
        drafter, proposer_class = EagleModel.from_target(target, version=3, parallel_drafts=3), ParallelEagleProposer
    else:
        drafter, proposer_class = DFlashModel.from_target(target, block_size=4), DFlashProposer
    drafter.config.step_topk_accuracy = [[1.0, 0.0]] * 3
    with torch.no_grad():
        proposer, setup = make_proposer(drafter.eval(), target, tree="auto", max_tree_nodes=4, min_speedup=0.01)
    assert isinstance(proposer, proposer_class)
    assert setup["depth"] == 3 and proposer.paths == [(0,), (0, 0), (0, 0, 0)]  # the chain: rank 1 is never right
    assert [row["nodes"] for row in setup["calibration"]["candidates"]] == [2, 3, 4]
    with pytest.raises(ValueError, match="--tree dynamic.*one forward: use --tree auto, chain or JSON rank paths"):
        make_proposer(drafter, target, tree="dynamic")


@pytest.mark.parametrize("kind", ["peagle", "dflash"])
def test_a_parallel_chain_is_as_long_as_tree_depth_allows(kind):
    """--tree chain drafts min(--tree-depth, the drafter's depths) tokens, as an EAGLE chain does, so that the
    held-out τ of every kind is measured on chains of training.acceptance_depth."""
    from inference.proposer_setup import make_proposer

    target = make_tiny_target()
    drafter = (EagleModel.from_target(target, version=3, parallel_drafts=3) if kind == "peagle"
               else DFlashModel.from_target(target, block_size=4)).eval()
    for depth, paths in [(2, CHAIN[:2]), (5, CHAIN)]:
        proposer, setup = make_proposer(drafter, target, tree="chain", tree_depth=depth)
        assert proposer.paths == paths and setup["depth"] == len(paths)


@pytest.mark.parametrize("layers", [None, "qwen3"])
def test_dflash_starts_with_the_targets_final_norm(layers):
    """The drafter's output goes through the target's LM head, so its `norm` starts as the target's final norm,
    converting between Gemma's x * (1 + w) and Llama's x * w where the drafter's layers are of another family."""
    target = make_tiny_target("gemma2")
    with torch.no_grad():
        target.get_decoder().norm.weight.normal_()
    drafter = DFlashModel.from_target(target, layer_family=layers)
    x = torch.randn(5, 64)
    assert torch.allclose(drafter.norm(x), target.get_decoder().norm(x), atol=1e-4)
