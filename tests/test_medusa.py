"""Medusa heads: a fresh head is the target's next-token head; save -> load gives identical outputs; heads are
distinct modules; a drafter refuses a target of another size."""
import pytest
import torch

from conftest import make_tiny_target
from drafters import MedusaModel, load_drafter


@pytest.mark.parametrize("share", [False, True])
def test_fresh_heads_equal_target_next_token_head(tiny_target, share):
    drafter = MedusaModel.from_target(tiny_target, num_heads=3, num_layers=2, share_lm_head=share)
    hidden = torch.randn(2, 5, 64)
    logits = drafter(hidden)                                              # [K, B, T, V]
    assert logits.shape == (3, 2, 5, 256)
    for k in range(3):
        assert torch.equal(logits[k], tiny_target.lm_head(hidden))


@pytest.mark.parametrize("share", [False, True])
def test_save_load_identical_outputs(tiny_target, tmp_path, share):
    drafter = MedusaModel.from_target(tiny_target, num_heads=2, num_layers=1, share_lm_head=share)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    drafter.config.head_topk_accuracy = [[0.5, 0.1], [0.3, 0.1]]
    drafter.save_pretrained(tmp_path)
    loaded = load_drafter(str(tmp_path), tiny_target)
    hidden = torch.randn(1, 4, 64)
    assert torch.equal(loaded(hidden), drafter(hidden))
    assert loaded.config.head_topk_accuracy == [[0.5, 0.1], [0.3, 0.1]]
    saved_names = set(loaded.state_dict())
    assert not any(name.startswith("_target") for name in saved_names)  # the frozen target head is never saved
    assert ("lm_heads.0.weight" in saved_names) == (not share)


def test_heads_do_not_share_weights(tiny_target):
    drafter = MedusaModel.from_target(tiny_target, num_heads=2, num_layers=2)
    blocks = [b.linear.weight for head in drafter.blocks for b in head]
    assert len({w.data_ptr() for w in blocks}) == 4
    assert drafter.lm_heads[0].weight.data_ptr() != drafter.lm_heads[1].weight.data_ptr()


def test_shared_head_needs_a_target(tiny_target, tmp_path):
    MedusaModel.from_target(tiny_target, num_heads=1, share_lm_head=True).save_pretrained(tmp_path)
    loaded = load_drafter(str(tmp_path))
    with pytest.raises(RuntimeError, match="call attach_target"):
        loaded(torch.randn(1, 1, 64))


def test_mismatched_target_refused(tiny_target):
    drafter = MedusaModel.from_target(tiny_target, num_heads=2)
    with pytest.raises(ValueError, match="vocab_size: drafter 256, target 300"):
        drafter.attach_target(make_tiny_target("llama", vocab_size=300))
