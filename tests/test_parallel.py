"""Parallel drafters (one drafter forward drafts every depth): P-EAGLE (EAGLE-3 with placeholders) and DFlash (a
block drafter). Training equals drafting, the placeholders train, and decoding is lossless in two architectures."""
import pytest
import torch
from transformers import DynamicCache

from conftest import make_tiny_target
from drafters import EagleModel
from inference.eagle_proposer import ParallelEagleProposer
from inference.speculative import plain_generate, speculative_generate
from target.model import target_forward
from test_eagle import PROMPTS, greedy_text
from train.eagle_objective import Eagle3Objective

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
        hidden = torch.cat([drafter.fuse(features[:, :n]), torch.zeros(1, 2, 64)], dim=1)
        mask = torch.zeros(1, 1, n + 2, n + 2).masked_fill(torch.ones(n + 2, n + 2).triu(1).bool(), -1e30)
        out = drafter(tokens, hidden, torch.arange(n + 2)[None], mask, DynamicCache())[0]
        for i in range(3):
            assert torch.allclose(out[n - 1 + i], unrolled[i][j], atol=1e-5), (j, i)


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


@pytest.mark.parametrize("paths", [CHAIN, TREE], ids=["chain", "tree"])
def test_peagle_greedy_decoding_is_lossless_and_accepts_drafts(peagle, paths):
    target, drafter = peagle
    accepted = 0
    for prompt in map(torch.tensor, PROMPTS):
        reference = plain_generate(target, prompt, 40, set()).tokens
        result = speculative_generate(target, ParallelEagleProposer(drafter, paths), prompt, 40, set())
        assert result.tokens == reference
        accepted += sum(result.accept_lengths)
    assert accepted >= 10
