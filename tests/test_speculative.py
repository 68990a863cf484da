"""Greedy verification must reproduce the target's own greedy output token for token (fp32, tiny models)."""
import pytest
import torch

from conftest import perturbed_medusa

from drafters import MedusaModel
from inference.proposers import MedusaProposer
from inference.speculative import Acceptance, keep_cache_entries, plain_generate, speculative_generate
from target.model import target_forward
from inference.tree import TokenTree, grow_tree, tree_attention_mask
from transformers import DynamicCache

EOS = {2}
PROMPTS = [[1, 17, 33, 250, 9], [1, 5], [1, 200, 201, 202, 203, 204, 205, 206, 3, 3, 3, 90]]


def hf_greedy(target, prompt, max_new_tokens):
    out = target.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class OracleProposer:
    """Knows the target's greedy continuation and proposes a tree mixing right and wrong branches, so that
    verification sees deep acceptances, partial ones and rejections."""

    def __init__(self, continuation: list[int], prompt_len: int, seed: int):
        self.continuation, self.prompt_len = continuation, prompt_len
        self.gen = torch.Generator().manual_seed(seed)

    def begin(self, input_ids, hidden_states):
        self.pos = 0  # tokens of the continuation already in the cache

    def propose(self, root):
        nxt = self.continuation[self.pos + 1:self.pos + 5]
        noisy = [t if torch.rand(1, generator=self.gen).item() < 0.7 else (t + 1) % 256 for t in nxt]
        # chain of (noisy) truth from the root, plus a wrong sibling at depth 1 and a branch off it
        tokens = [root] + noisy + [(nxt[0] + 7) % 256 if nxt else 3, 5] if nxt else [root, 4]
        parents = [-1] + list(range(len(noisy))) + ([0, len(noisy) + 1] if nxt else [])
        return TokenTree(torch.tensor(tokens[:len(parents)]), parents)

    def update(self, tokens, hidden_states):
        self.pos += len(tokens)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_plain_generate_equals_hf_generate(tiny_target, prompt):
    ours = plain_generate(tiny_target, torch.tensor(prompt), 24, EOS)
    assert ours.tokens == hf_greedy(tiny_target, prompt, 24)
    assert ours.forwards == len(ours.tokens)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_oracle_tree_verification_is_lossless(tiny_target, prompt):
    reference = hf_greedy(tiny_target, prompt, 40)
    result = speculative_generate(tiny_target, OracleProposer(reference, len(prompt), seed=len(prompt)),
                                  torch.tensor(prompt), 40, EOS)
    assert result.tokens == reference
    assert max(result.accept_lengths) >= 2 and min(result.accept_lengths) == 0  # deep accepts and rejections
    assert result.forwards == 1 + len(result.accept_lengths)
    steps = [n + 1 for n in result.accept_lengths]  # tokens each verify step emits (bonus included)
    assert 1 + sum(steps[:-1]) < len(result.tokens) <= 1 + sum(steps)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_medusa_tree_verification_is_lossless(tiny_target, prompt):
    drafter = perturbed_medusa(tiny_target)
    paths = grow_tree([[0.6, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.1]], max_nodes=10)
    result = speculative_generate(tiny_target, MedusaProposer(drafter, paths), torch.tensor(prompt), 40, EOS)
    assert result.tokens == hf_greedy(tiny_target, prompt, 40)
    assert sum(result.accept_lengths) > 0  # some drafted tokens were accepted, so compaction was exercised


@pytest.mark.parametrize("share", [False, True])
def test_medusa_frequent_token_vocab_is_lossless_and_drafts_inside_it(tiny_target, share):
    drafter = MedusaModel.from_target(tiny_target, num_heads=3, share_lm_head=share)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in drafter.blocks.parameters():
            p.normal_(0, 0.05)
    drafter.attach_target(tiny_target)
    vocab = list(range(1, 256, 3))
    paths = grow_tree([[0.6, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.1]], max_nodes=10)
    proposer = MedusaProposer(drafter, paths, draft_vocab=vocab)
    result = speculative_generate(tiny_target, proposer, torch.tensor(PROMPTS[0]), 40, EOS)
    assert result.tokens == hf_greedy(tiny_target, PROMPTS[0], 40)
    proposer.begin(torch.tensor(PROMPTS[0]), torch.randn(1, 64))
    tree = proposer.propose(5)
    assert set(tree.tokens[1:].tolist()) <= set(vocab)
    sub = torch.tensor(vocab)
    best = sub[drafter.head_logits(0, drafter.head_states(proposer.hidden)[0])[sub].argmax()]
    assert tree.tokens[proposer.paths.index((0,)) + 1] == best  # node (0,): head 0's best frequent token


def test_max_new_tokens_and_eos_cut_exactly(tiny_target):
    prompt = PROMPTS[0]
    reference = hf_greedy(tiny_target, prompt, 7)
    proposer = OracleProposer(hf_greedy(tiny_target, prompt, 60), len(prompt), seed=1)
    assert speculative_generate(tiny_target, proposer, torch.tensor(prompt), 7, EOS).tokens == reference
    eos = {reference[3]}  # pretend the 4th token is an end-of-turn token: generation must stop right there
    proposer = OracleProposer(hf_greedy(tiny_target, prompt, 60), len(prompt), seed=1)
    assert speculative_generate(tiny_target, proposer, torch.tensor(prompt), 60, eos).tokens == \
        reference[:reference.index(reference[3]) + 1]


def test_tree_attention_mask_shape_and_ancestry():
    tree = TokenTree(torch.tensor([10, 11, 12, 13]), [-1, 0, 0, 1])
    mask = tree_attention_mask(tree, prefix_len=2, dtype=torch.float32)[0, 0]
    allowed = (mask == 0).int().tolist()
    assert allowed == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 1]]
    assert tree.depths() == [0, 1, 1, 2] and tree.path_to(3) == [0, 1, 3]


def test_grow_tree_picks_most_likely_paths_first():
    acc = [[0.8, 0.1], [0.5, 0.3]]
    assert grow_tree(acc, 4) == [(0,), (0, 0), (0, 1), (1,)]  # 0.8, 0.4, 0.24, 0.1


def test_keep_cache_entries_moves_accepted_path(tiny_target):
    cache = DynamicCache(config=tiny_target.config)
    target_forward(tiny_target, torch.tensor([[1, 2, 3, 4, 5, 6]]), past_key_values=cache)
    before = cache.layers[0].keys.clone()
    keep_cache_entries(cache, prefix_len=2, keep=[0, 2, 3])
    after = cache.layers[0].keys
    assert after.shape[2] == 5
    assert torch.equal(after[:, :, :2], before[:, :, :2]) and torch.equal(after[:, :, 2:], before[:, :, [2, 4, 5]])
    keep_cache_entries(cache, prefix_len=1, keep=[0, 1])  # an accepted prefix: cut, nothing moves
    assert torch.equal(cache.layers[0].keys, torch.cat([before[:, :, :2], before[:, :, [2]]], dim=2))


def test_typical_acceptance_runs_and_respects_budget(tiny_target):
    drafter = perturbed_medusa(tiny_target)
    gen = torch.Generator().manual_seed(0)
    result = speculative_generate(tiny_target, MedusaProposer(drafter, grow_tree([[0.5, 0.3]] * 3, 6)),
                                  torch.tensor(PROMPTS[0]), 30, set(), Acceptance(temperature=0.7, typical=True), gen)
    assert len(result.tokens) == 30 and result.forwards == 1 + len(result.accept_lengths)
