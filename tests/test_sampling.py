"""Speculative sampling is lossless in distribution: sampled chains verified by the target produce the target's
own sampling distribution. Checked with a chi-square test against exact probabilities (fixed seeds, so the test
is deterministic), with a negative control showing the test tells the draft's distribution from the target's."""
import itertools

import pytest
import torch

from conftest import make_tiny_target
from inference.draft_lm_proposer import DraftLMProposer
from inference.lookup import LookupProposer, PromptLookup
from inference.speculative import Acceptance, plain_generate, speculative_generate, speculative_sampling
from inference.tree import TokenTree

VOCAB, NEW, PROMPT = 4, 3, torch.tensor([1, 3, 0, 2])


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 1 are pooled into one."""
    expected = probs.double() * counts.sum()
    small = expected < 1
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_speculative_sampling_first_token_follows_target():
    """The token emitted at the first draft position (accepted draft or residual sample) ~ p_1 exactly."""
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.randn(3, 6, generator=gen) * 1.5    # target logits after root, after draft 1, after draft 2
    q = torch.softmax(torch.randn(2, 6, generator=gen) * 1.5, dim=-1)
    p1 = torch.softmax(p_logits[0], -1)
    counts = torch.zeros(6)
    accepted = 0
    for _ in range(6000):
        drafts = torch.multinomial(q, 1, generator=gen).squeeze(-1)       # [2], token i ~ q_i
        tree = TokenTree.chain(torch.cat([torch.tensor([0]), drafts]), q)
        n, nxt = speculative_sampling(tree, p_logits, 1.0, gen)
        counts[drafts[0] if n >= 1 else nxt] += 1
        accepted += n >= 1
    assert chi_square_p_value(counts, p1) > 1e-3
    # acceptance rate of the first draft = 1 - TVD(p_1, q_1) (Leviathan et al., Theorem 3.5)
    assert accepted / 6000 == pytest.approx(1 - 0.5 * (p1 - q[0]).abs().sum().item(), abs=0.02)


def tiny_pair(arch: str):
    target, draft = make_tiny_target(arch, seed=0, vocab_size=VOCAB), make_tiny_target(arch, seed=1, vocab_size=VOCAB)
    with torch.no_grad():  # undo most of the fixture's sharpening: spread-out distributions test more cells
        target.lm_head.weight.mul_(0.3)
        draft.lm_head.weight.mul_(0.3)
    return target, draft


@torch.no_grad()
def exact_sequence_probs(model, prompt: torch.Tensor, length: int) -> torch.Tensor:
    """P(x_1..x_length | prompt) under `model` at temperature 1, for all VOCAB**length sequences -> [VOCAB**length]."""
    seqs = torch.tensor(list(itertools.product(range(VOCAB), repeat=length)))            # [S, length]
    ids = torch.cat([prompt.expand(len(seqs), -1), seqs], dim=1)
    logp = torch.log_softmax(model(ids).logits[:, len(prompt) - 1:-1].float(), dim=-1)  # [S, length, V]
    return logp.gather(-1, seqs[..., None]).squeeze(-1).sum(-1).exp()


def counts_of(generate, n: int) -> torch.Tensor:
    counts = torch.zeros(VOCAB ** NEW)
    for _ in range(n):
        tokens = generate()
        counts[sum(t * VOCAB ** (NEW - 1 - i) for i, t in enumerate(tokens))] += 1
    return counts


@pytest.mark.parametrize("arch, draft_vocab", [  # 30 s each: the frequent-token case runs by default
    ("llama", [0, 1, 3]),
    pytest.param("llama", None, marks=pytest.mark.slow),
    pytest.param("qwen2", None, marks=pytest.mark.slow),
])
def test_speculative_sampling_end_to_end_matches_target_distribution(arch, draft_vocab):
    """draft_vocab: the draft proposes from a subset (FR-Spec), so q = 0 on token 2: still exact."""
    target, draft = tiny_pair(arch)
    exact = exact_sequence_probs(target, PROMPT, NEW)
    gen = torch.Generator().manual_seed(1)
    proposer = DraftLMProposer(draft, k=2, temperature=1.0, generator=gen, draft_vocab=draft_vocab)
    accepted = []

    def spec():
        r = speculative_generate(target, proposer, PROMPT, NEW, eos=set(), acceptance=Acceptance(1.0),
                                 generator=gen)
        accepted.extend(r.accept_lengths)
        return r.tokens

    counts = counts_of(spec, 1500)
    assert chi_square_p_value(counts, exact) > 1e-3
    assert 0 < sum(accepted) < 2 * len(accepted)  # both acceptances and rejections happened
    # negative control: the draft's own samples are far from the target's distribution
    draft_counts = counts_of(lambda: plain_generate(draft, PROMPT, NEW, set(), Acceptance(1.0), gen).tokens, 1500)
    assert chi_square_p_value(draft_counts, exact) < 1e-6


def lookup_beside(kind: str, target, draft, gen):
    """Prompt lookup beside a sampled draft LM's chains, or beside deterministic Medusa / EAGLE-3 trees."""
    from drafters import EagleModel, MedusaModel
    from inference.eagle_proposer import EagleProposer
    from inference.proposers import MedusaProposer

    if kind == "draft_lm":
        drafter = DraftLMProposer(draft, k=2, temperature=1.0, generator=gen)
    elif kind == "medusa":
        torch.manual_seed(0)
        drafter = MedusaProposer(MedusaModel.from_target(target, num_heads=2).eval(), [(0,), (1,), (0, 0)])
    else:
        drafter = EagleProposer(EagleModel.from_target(target, version=3).eval(), "dynamic", depth=2, topk=2, nodes=4)
    return LookupProposer(drafter, PromptLookup(2, 2, 2))


@pytest.mark.parametrize("kind", ["draft_lm", *(pytest.param(k, marks=pytest.mark.slow) for k in ("medusa", "eagle3"))])
def test_speculative_sampling_with_prompt_lookup_matches_target_distribution(kind):
    """Steps answered by prompt lookup propose deterministic copies (point masses q = 1 on the copied token)
    between the drafter's proposals: the output is still distributed as the target's own samples."""
    target, draft = tiny_pair("llama")
    prompt = torch.tensor([1, 3, 0, 2, 1, 3, 0, 2, 1, 2, 3, 0])  # every bigram but a few occurred: copies happen
    exact = exact_sequence_probs(target, prompt, NEW)
    gen = torch.Generator().manual_seed(2)
    proposer = lookup_beside(kind, target, draft, gen)
    counts = counts_of(lambda: speculative_generate(target, proposer, prompt, NEW, eos=set(),
                                                    acceptance=Acceptance(1.0), generator=gen).tokens, 1500)
    assert chi_square_p_value(counts, exact) > 1e-3
    assert 0 < proposer.accepted and 0 < proposer.steps < 1500 * NEW  # copies, some accepted
    draft_counts = counts_of(lambda: plain_generate(draft, prompt, NEW, set(), Acceptance(1.0), gen).tokens, 1500)
    assert chi_square_p_value(draft_counts, exact) < 1e-6  # the control: the test tells distributions apart


# --- trees (EAGLE drafts: deterministic top-k nodes, recursive rejection sampling over siblings) ---------------

SAMPLES = 12_000  # per test: enough power that the control's p < 1e-6, while the null gives p > 1e-3


def eagle_tree(shape: str):
    """A tiny VOCAB-token target, an EAGLE-3 drafter for it, and the tree it proposes after PROMPT."""
    from drafters import EagleModel
    from inference.eagle_proposer import EagleProposer
    from target.model import target_forward

    target, _ = tiny_pair("llama")
    drafter = EagleModel.from_target(target, version=3).eval()
    kwargs = dict(tree="static", paths=[(0,), (0, 0), (0, 0, 0)]) if shape == "chain" else \
        dict(tree="dynamic", depth=3, topk=2, nodes=7)
    proposer = EagleProposer(drafter, **kwargs)
    out = target_forward(target, PROMPT[None], feature_layers=proposer.feature_layers)
    proposer.begin(PROMPT, out.features[0])
    return target, proposer.propose(root=1)


@torch.no_grad()
def node_logits(target, tree: TokenTree) -> torch.Tensor:
    """The target's logits after every node, each from a plain forward over PROMPT + the node's path: [N, V]."""
    return torch.stack([target(torch.cat([PROMPT, tree.tokens[tree.path_to(i)]])[None]).logits[0, -1]
                        for i in range(len(tree))])


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_tree_speculative_sampling_matches_target_distribution(shape):
    """The first two tokens emitted after one verification ~ the target's p(x1, x2 | prompt, root) exactly."""
    target, tree = eagle_tree(shape)
    assert tree.draft_probs is None and (tree.is_chain() == (shape == "chain")) and len(tree) >= 4
    logits = node_logits(target, tree)
    with torch.no_grad():  # exact p(x1) and p(x2 | x1), for the second token when only the bonus token was emitted
        prefix = torch.cat([PROMPT, tree.tokens[:1]])
        p1 = torch.softmax(logits[0], -1)
        p2 = torch.softmax(torch.stack([target(torch.cat([prefix, torch.tensor([v])])[None]).logits[0, -1]
                                        for v in range(VOCAB)]), -1)                       # [V, V]
    exact = (p1[:, None] * p2).flatten()
    gen = torch.Generator().manual_seed(2)

    def two_tokens(accept_all: bool = False) -> int:
        node, bonus = speculative_sampling(tree, logits, 1.0, gen)
        if accept_all:  # negative control: a verifier that always accepts the first drafted token
            node = 1
        emitted = tree.tokens[tree.path_to(node)[1:]].tolist() + [bonus]
        x1 = emitted[0]
        x2 = emitted[1] if len(emitted) > 1 else int(torch.multinomial(p2[x1], 1, generator=gen))
        return x1 * VOCAB + x2

    counts = torch.bincount(torch.tensor([two_tokens() for _ in range(SAMPLES)]), minlength=VOCAB ** 2)
    assert chi_square_p_value(counts, exact) > 1e-3
    control = torch.bincount(torch.tensor([two_tokens(True) for _ in range(SAMPLES)]), minlength=VOCAB ** 2)
    assert chi_square_p_value(control, exact) < 1e-6


@pytest.mark.parametrize("shape", [pytest.param("chain", marks=pytest.mark.slow), "tree"])
def test_eagle_sampling_end_to_end_matches_target_distribution(shape):
    """The whole loop (draft cache, tree verification, cache compaction) with an EAGLE drafter at temperature 1."""
    from drafters import EagleModel
    from inference.eagle_proposer import EagleProposer

    target, _ = tiny_pair("llama")
    drafter = EagleModel.from_target(target, version=3).eval()
    kwargs = dict(tree="static", paths=[(0,), (0, 0)]) if shape == "chain" else dict(tree="dynamic", depth=2,
                                                                                        topk=2, nodes=5)
    assert_samples_the_target(target, EagleProposer(drafter, **kwargs))


def assert_samples_the_target(target, proposer, runs: int = 1500) -> None:
    """The loop at temperature 1 with `proposer` emits NEW tokens after PROMPT with the target's own sequence
    probabilities (chi-square), and accepts some drafts but not all (else the test would not exercise rejection)."""
    exact = exact_sequence_probs(target, PROMPT, NEW)
    gen = torch.Generator().manual_seed(3)
    accepted = []

    def spec():
        r = speculative_generate(target, proposer, PROMPT, NEW, eos=set(), acceptance=Acceptance(1.0), generator=gen)
        accepted.extend(r.accept_lengths)
        return r.tokens

    counts = counts_of(spec, runs)
    assert chi_square_p_value(counts, exact) > 1e-3
    assert 0 < sum(accepted) < 2 * len(accepted)
