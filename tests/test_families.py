"""Target families (conftest.FAMILIES): verification is lossless on each, sliding windows included, and what it
cannot verify is refused when the target loads. The full matrix (every drafter kind trained on every family) is
slow: run it before every change to the verification loop (`pytest -m slow tests/test_families.py`)."""
import pytest
import torch

from conftest import FAMILIES, WINDOW, make_tiny_target
from family_matrix import KINDS, REFUSED, run_cell, table, write_target
from test_sampling import NEW, chi_square_p_value, counts_of, exact_sequence_probs
from test_speculative import EOS, PROMPTS, OracleProposer, hf_greedy

from inference.draft_lm_proposer import DraftLMProposer
from inference.speculative import Acceptance, plain_generate, speculative_generate
from inference.tree import tree_shape
from target.attention import attention_layout
from target.model import load_target

LONG = 40  # new tokens: decoding runs far past the sliding windows


@pytest.mark.parametrize("family", FAMILIES)
def test_verification_is_lossless_on_every_family(family):
    """Plain decoding and a tree proposer that is right, partly right and wrong reproduce transformers' own greedy
    generation (its own caches and masks) token for token, far beyond the sliding window."""
    target = make_tiny_target(family)
    for prompt in PROMPTS:
        reference = hf_greedy(target, prompt, LONG)
        assert plain_generate(target, torch.tensor(prompt), LONG, EOS).tokens == reference
        result = speculative_generate(target, OracleProposer(reference, len(prompt), seed=len(prompt)),
                                      torch.tensor(prompt), LONG, EOS)
        assert result.tokens == reference
        assert max(result.accept_lengths) >= 2 and min(result.accept_lengths) == 0


def test_sliding_window_mask_hides_keys_beyond_the_window():
    """Node at depth d (position prefix_len + d) sees prefix key k when prefix_len + d - k < window, and its
    ancestors; a chain root -> a plus a sibling b of a."""
    shape = tree_shape((-1, 0, 0), torch.device("cpu"), torch.float32)
    allowed = shape.attention_mask(prefix_len=5, window=3)[0, 0] == 0
    expected = torch.tensor([
        # prefix 0..4         root   a      b
        [0, 0, 0, 1, 1,       1,     0,     0],  # root, position 5: keys 3, 4 (and itself)
        [0, 0, 0, 0, 1,       1,     1,     0],  # a, position 6: key 4, the root
        [0, 0, 0, 0, 1,       1,     0,     1],  # b, position 6
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    assert torch.equal(shape.attention_mask(5)[0, 0] == 0, torch.cat([torch.ones(3, 5, dtype=torch.bool),
                                                                       expected[:, 5:]], dim=1))


def test_layouts_of_mixed_and_uniform_families():
    assert attention_layout(make_tiny_target("llama").config).window is None
    mistral = attention_layout(make_tiny_target("mistral").config)
    assert mistral.window == WINDOW and not mistral.mixed
    gemma = attention_layout(make_tiny_target("gemma2").config)
    assert gemma.window == WINDOW and gemma.mixed


@pytest.mark.parametrize("family", REFUSED)
def test_recurrent_layers_are_refused_when_the_target_loads(family, tmp_path):
    path = write_target(family, tmp_path / "target")
    with pytest.raises(ValueError) as err:
        load_target(path)
    message = str(err.value)
    assert "\n" not in message and path in message and "linear_attention" in message


def test_speculative_sampling_matches_the_target_distribution_beyond_the_window():
    """Gemma 2 (sliding and full layers mixed, final-logit soft-capping): a sampled draft LM's chains give the
    target's own distribution over 3 new tokens after a prompt longer than the window (the window's mask itself
    is checked exactly, token for token, by the greedy test above)."""
    vocab = 4
    target, draft = make_tiny_target("gemma2", 0, vocab), make_tiny_target("gemma2", 1, vocab)
    with torch.no_grad():
        target.get_output_embeddings().weight.mul_(0.3)
    prompt = torch.tensor([1, 3, 0, 2, 1, 1, 3, 0, 2, 3, 1])                   # 11 tokens > WINDOW
    exact = exact_sequence_probs(target, prompt, NEW)
    gen = torch.Generator().manual_seed(1)
    proposer = DraftLMProposer(draft, k=2, temperature=1.0, generator=gen)
    accepted = []

    def spec():
        r = speculative_generate(target, proposer, prompt, NEW, eos=set(), acceptance=Acceptance(1.0), generator=gen)
        accepted.extend(r.accept_lengths)
        return r.tokens

    assert chi_square_p_value(counts_of(spec, 1500), exact) > 1e-3
    assert 0 < sum(accepted) < 2 * len(accepted)


CELLS = [(family, kind) for family in FAMILIES for kind in KINDS]


@pytest.mark.slow
@pytest.mark.parametrize("family, kind", CELLS)
def test_family_matrix_cell(family, kind, tmp_path):
    """Each drafter kind trains on each family and decodes losslessly; docs/families.md shows this very cell."""
    from pathlib import Path
    cell = run_cell(family, kind, tmp_path)
    assert cell["train"] == "ok" and cell["lossless"] == "3/3"
    row = table({(family, kind): cell}).splitlines()[2]
    docs = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text()
    assert row in docs.splitlines(), f"docs/families.md is stale for {family} {kind}: python tests/family_matrix.py"
