"""oneDNN-prepacked linear layers: same outputs as nn.Linear, restored on exit, lossless decoding on top."""
import pytest
import torch
from torch import nn

from drafters import MedusaModel
from inference.packing import PackedLinear, can_pack, packed_linears
from inference.proposers import MedusaProposer
from inference.speculative import plain_generate, speculative_generate
from conftest import make_tiny_target

pytestmark = pytest.mark.skipif(not can_pack(), reason="this torch build has no oneDNN prepacked linear")


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_packed_linear_matches_linear(rows):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80).requires_grad_(False)
    x = torch.randn(2, rows, 48)
    packed = PackedLinear(linear)
    torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed(x.transpose(0, 1)), linear(x.transpose(0, 1)), rtol=1e-5, atol=1e-5)
    assert packed(x).shape == (2, rows, 80)


def test_packed_linear_refuses_autograd():
    linear = nn.Linear(8, 8)  # trainable
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        PackedLinear(linear)(torch.randn(2, 8))
    with torch.no_grad():
        PackedLinear(linear)(torch.randn(2, 8))


def test_context_restores_the_model_exactly():
    target = make_tiny_target("llama")
    before = dict(target.named_modules())
    linears = sum(type(m) is nn.Linear for m in target.modules())
    with packed_linears(target) as n:
        assert n == linears == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
        assert not any(type(m) is nn.Linear for m in target.modules())
    assert dict(target.named_modules()) == before
    with packed_linears(target, enabled=False) as n:
        assert n == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_speculative_decoding_on_packed_target_is_lossless(arch):
    target = make_tiny_target(arch)
    drafter = MedusaModel.from_target(target, num_heads=3)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in drafter.blocks.parameters():
            p.normal_(0, 0.05)
    prompt = torch.tensor([5, 17, 99, 3, 42, 7])
    plain_ref = plain_generate(target, prompt, 40, eos={2}).tokens
    with packed_linears(target), packed_linears(drafter):
        drafter.attach_target(target)
        paths = [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
        spec = speculative_generate(target, MedusaProposer(drafter, paths), prompt, 40, eos={2})
        plain = plain_generate(target, prompt, 40, eos={2})
    assert spec.tokens == plain.tokens == plain_ref
    assert len(spec.tokens) == 40 and spec.forwards < plain.forwards
