"""Prompt lookup: exact proposals from the n-gram index (longest n-gram first, most recent occurrence, loops), and
lookup beside every drafter kind (LookupProposer): lossless, the drafter skipped on copies and caught up after."""
import pytest
import torch

from conftest import make_tiny_target
from inference.lookup import LookupProposer, PromptLookup
from inference.speculative import plain_generate, speculative_generate
from target.model import target_forward


def test_longest_suffix_ngram_wins_and_its_latest_occurrence():
    lookup = PromptLookup(max_ngram=3, min_ngram=2, num_tokens=3)
    lookup.reset([7, 1, 2, 9, 9, 5, 1, 2, 8, 8, 4, 1, 2])
    assert lookup.propose() == [8, 8, 4]       # "1 2": the latest earlier occurrence is followed by 8 8 4
    lookup.reset([3, 1, 2, 6, 6, 5, 1, 2, 8, 8, 4, 3, 1, 2])
    assert lookup.propose() == [6, 6, 5]       # "3 1 2" (n = 3) beats the later "1 2"


def test_no_match_below_min_ngram():
    lookup = PromptLookup(max_ngram=3, min_ngram=2, num_tokens=4)
    lookup.reset([5, 6, 7, 8, 6])
    assert lookup.propose() == []              # only the 1-gram "6" occurred before
    assert PromptLookup(3, 1, 2).propose() == []
    one = PromptLookup(3, 1, 2)
    one.reset([5, 6, 7, 8, 6])
    assert one.propose() == [7, 8]


def test_a_copy_reaching_the_present_repeats_as_a_loop():
    lookup = PromptLookup(max_ngram=3, min_ngram=2, num_tokens=7)
    lookup.reset([4, 1, 2, 3, 1, 2])
    assert lookup.propose() == [3, 1, 2, 3, 1, 2, 3]
    lookup.reset([9, 9, 9])
    assert lookup.propose() == [9] * 7


def test_extending_equals_resetting():
    tokens = [1, 2, 3, 1, 2, 4, 1, 2, 3, 5, 2, 3]
    step = PromptLookup(3, 2, 4)
    step.reset(tokens[:3])
    for i in range(3, len(tokens)):
        step.extend(tokens[i:i + 1])
        whole = PromptLookup(3, 2, 4)
        whole.reset(tokens[:i + 1])
        assert step.propose() == whole.propose() and step.index == whole.index


@pytest.mark.parametrize("kwargs, match", [(dict(max_ngram=1, min_ngram=2), "min_ngram <= max_ngram"),
                                          (dict(min_ngram=0), "1 <= min_ngram"),
                                          (dict(num_tokens=0), "num_tokens=0 must be >= 1")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptLookup(**kwargs)


# --- prompt lookup beside every drafter kind (LookupProposer) --------------------------------------------------

KINDS = ["medusa", "eagle1", "eagle3", "draft_lm"]
LOOPED = torch.tensor([1, 40, 41, 42, 43, 44, 40, 41, 42, 43, 44, 40, 41])
PROMPTS = [LOOPED, torch.tensor([1, 17, 33, 250, 9, 120, 7]), torch.tensor([1, 200, 201, 202, 203, 3, 3, 90])]


def kind_proposer(kind: str, target):
    """A proposer of each drafter kind for `target`, from a fresh (untrained, perturbed) drafter."""
    from drafters import EagleModel, MedusaModel
    from drafters.draft_lm import build_draft_lm
    from inference.draft_lm_proposer import DraftLMProposer
    from inference.eagle_proposer import EagleProposer
    from inference.proposers import MedusaProposer

    torch.manual_seed(0)
    if kind == "medusa":
        drafter = MedusaModel.from_target(target, num_heads=3)
        with torch.no_grad():
            for p in drafter.blocks.parameters():
                p.normal_(0, 0.05)
        return MedusaProposer(drafter.eval(), [(0,), (1,), (0, 0), (0, 0, 0)])
    if kind.startswith("eagle"):
        drafter = EagleModel.from_target(target, version=int(kind[-1])).eval()
        return EagleProposer(drafter, "dynamic", depth=3, topk=2, nodes=6)
    return DraftLMProposer(build_draft_lm(target, 1, [0]).eval(), k=3, adaptive=True)


def counting(proposer) -> list[int]:
    """Count the drafter's propose() calls (one per step it answers)."""
    calls, propose = [], proposer.propose
    proposer.propose = lambda root: calls.append(root) or propose(root)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_lookup_beside_any_drafter_is_lossless_and_skips_the_drafter_on_copies(kind):
    """Greedy decoding with prompt lookup beside each kind's proposer is the target's greedy output token for
    token; copy steps do not run the drafter, and the copies are counted."""
    target = make_tiny_target("llama")
    for prompt in PROMPTS:
        reference = plain_generate(target, prompt, 40, {2}).tokens
        proposer = LookupProposer(kind_proposer(kind, target), PromptLookup(3, 2, 4))
        calls = counting(proposer.drafter)
        result = speculative_generate(target, proposer, prompt, 40, {2})
        assert result.tokens == reference
        assert len(calls) + proposer.steps == len(result.accept_lengths)  # every step: a copy or the drafter
    assert proposer.steps > 0 and proposer.accepted > 0  # tiny random targets loop: copies happen and are right


@pytest.mark.parametrize("kind", KINDS)
def test_after_a_copy_the_drafter_proposes_as_if_it_had_seen_everything(kind):
    """Exact proposals: a copy where the last tokens occurred before; after the copy step, the drafter's tree is
    the one a fresh proposer begun on the whole sequence proposes (it caught up on the accepted tokens)."""
    target = make_tiny_target("llama")
    layers = getattr(kind_proposer(kind, target), "feature_layers", None)
    accepted = [42, 43, 44, 9]                       # root 42, then the copy's first two tokens, and a new root 9
    whole = torch.cat([LOOPED, torch.tensor(accepted)])
    out = target_forward(target, whole[None], feature_layers=layers)
    features = (out.features if layers else out.hidden_states)[0]          # [T, F]
    proposer = LookupProposer(kind_proposer(kind, target), PromptLookup(3, 2, 4))
    proposer.begin(LOOPED, features[:len(LOOPED)])
    assert proposer.propose(42).tokens.tolist() == [42, 43, 44, 40, 41]  # "... 40 41 42" continues "43 44 40 41"
    proposer.update(torch.tensor(accepted[:3]), features[len(LOOPED):len(LOOPED) + 3])
    assert (proposer.steps, proposer.accepted) == (1, 2)
    tree = proposer.propose(9)                        # "44 9" never occurred: the drafter proposes
    fresh = kind_proposer(kind, target)
    fresh.begin(whole[:-1], features[:-1])
    expected = fresh.propose(9)
    assert tree.tokens.tolist() == expected.tokens.tolist() and tree.parents == expected.parents
    assert len(tree) > 1 and proposer.steps == 1
