"""oneDNN-prepacked linear layers: same outputs as nn.Linear, restored on exit, lossless decoding on top."""
import pytest
import torch
from torch import nn

from drafters import MedusaModel
from target.packing import PackedLinear, can_pack, grouped_query_attention, grouped_sdpa, packed_linears
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


def test_one_row_goes_through_the_packed_weight_too():
    """Plain decoding's one-row products use the same packed weight as a verify forward's rows (torch's GEMV, which
    rounds differently, made the plain baseline slower inside a decoding step)."""
    torch.manual_seed(0)
    linear = nn.Linear(384, 96).requires_grad_(False)
    packed, x = PackedLinear(linear), torch.randn(1, 384)
    onednn = torch.ops.mkldnn._linear_pointwise(x, packed.packed, linear.bias, "none", [], "")
    assert not torch.equal(linear(x), onednn)
    assert torch.equal(packed(x), onednn)


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


def test_bfloat16_model_runs_packed_where_the_cpu_can_and_unpacked_elsewhere():
    """oneDNN refuses to reorder bf16 weights on CPUs without bf16 instructions (the 2-core test machines): a bf16
    model must then keep torch's layers, not crash; where the CPU can, its layers are packed like fp32 ones."""
    target = make_tiny_target("llama").to(torch.bfloat16)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        ref = target(ids).logits
        with packed_linears(target) as n:
            out = target(ids).logits
    assert n == (2 * 7 + 1 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 0)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


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
    with packed_linears(target), packed_linears(drafter), grouped_query_attention(target) as swapped:
        assert swapped and target.config._attn_implementation == "draftsmith_grouped_sdpa"
        drafter.attach_target(target)
        paths = [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
        spec = speculative_generate(target, MedusaProposer(drafter, paths), prompt, 40, eos={2})
        plain = plain_generate(target, prompt, 40, eos={2})
    assert target.config._attn_implementation == "sdpa"
    assert spec.tokens == plain.tokens == plain_ref
    assert len(spec.tokens) == 40 and spec.forwards < plain.forwards


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_sdpa_equals_transformers_sdpa_on_a_tree_mask(arch):
    """Masked multi-token queries of a grouped-query layer (2 key/value heads for 4 query heads): the kernel's
    enable_gqa gives transformers' repeat-the-cache result; one-token queries take transformers' own path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    layer = make_tiny_target(arch).model.layers[0].self_attn
    assert layer.num_key_value_groups == 2
    gen = torch.Generator().manual_seed(0)
    for n in (1, 5):
        query, key, value = (torch.randn(1, h, t, 16, generator=gen) for h, t in ((4, n), (2, 20 + n), (2, 20 + n)))
        allowed = torch.rand(1, 1, n, 20 + n, generator=gen) < 0.7
        allowed[..., 0] = True
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        ours, _ = grouped_sdpa(layer, query, key, value, mask, scaling=0.25)
        reference, _ = sdpa_attention_forward(layer, query, key, value, mask, scaling=0.25)
        assert ours.shape == (1, n, 4, 16)
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
