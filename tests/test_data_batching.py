"""data/batching.py: token-budget length buckets and right-padded collation."""
import numpy as np
import pytest
import torch

from data.batching import collate, length_bucketed_batches, padding_fraction


def realistic_lengths(n=20_000, seed=0):
    """Lognormal token counts (median ~245, long tail), clipped to [8, 2048] like a max_length=2048 dataset."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=5.5, sigma=0.8, size=n), 8, 2048).astype(int).tolist()


def test_exact_batches_on_a_tiny_example():
    lengths = [5, 3, 8, 2, 7, 1]  # sorted: 8 | 7 | 5 3 | 2 1  (B * T_max <= 10)
    batches = length_bucketed_batches(lengths, max_tokens=10, seed=0, epoch=0)
    assert sorted(batches) == [[0, 1], [2], [3, 5], [4]]


def test_every_index_once_and_within_budget():
    lengths = realistic_lengths(5_000)
    for epoch in range(3):
        batches = length_bucketed_batches(lengths, max_tokens=4096, seed=1, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) * max(lengths[i] for i in b) <= 4096 for b in batches)


def test_deterministic_per_seed_and_epoch():
    lengths = realistic_lengths(2_000)
    a = length_bucketed_batches(lengths, 4096, seed=3, epoch=1)
    assert a == length_bucketed_batches(lengths, 4096, seed=3, epoch=1)
    assert a != length_bucketed_batches(lengths, 4096, seed=3, epoch=2)
    assert a != length_bucketed_batches(lengths, 4096, seed=4, epoch=1)
    assert length_bucketed_batches(lengths, 4096, seed=1, epoch=0) != length_bucketed_batches(lengths, 4096, 0, 1)


def test_long_example_is_alone_and_max_batch_size_is_respected():
    lengths = [50, 3, 3, 3, 3, 3, 3, 3]
    batches = length_bucketed_batches(lengths, max_tokens=12, seed=0, epoch=0, max_batch_size=3)
    assert [0] in batches
    assert sorted(len(b) for b in batches) == [1, 1, 3, 3]  # 7 threes: 3 + 3 + 1 (budget allows 4, cap is 3)


def test_padding_fraction_on_a_realistic_length_distribution():
    lengths = realistic_lengths()
    batches = length_bucketed_batches(lengths, max_tokens=4096, seed=0, epoch=0)
    frac = padding_fraction(batches, lengths)
    print(f"padding fraction {frac:.4f} over {len(batches)} batches")
    assert 0.0 < frac < 0.05
    shuffled = [list(range(i, min(i + 8, len(lengths)))) for i in range(0, len(lengths), 8)]
    assert padding_fraction(shuffled, lengths) > 0.4  # what unbucketed batches of 8 would waste


def test_padding_fraction_exact():
    assert padding_fraction([[0, 1], [2]], [4, 2, 5]) == pytest.approx(2 / 13)
    assert padding_fraction([], []) == 0.0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"lengths\[1\] = 0: every example needs at least one token"):
        length_bucketed_batches([3, 0], 10, 0, 0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        length_bucketed_batches([3], 0, 0, 0)
    assert length_bucketed_batches([], 10, 0, 0) == []


def test_collate_right_pads():
    batch = collate([{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
                     {"input_ids": [8], "loss_mask": [1], "length": 1}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]  # [B, T]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert {t.dtype for t in batch.values()} == {torch.long}


def test_collate_errors():
    with pytest.raises(ValueError, match="example 1 of the batch has 2 input_ids but 1 loss_mask"):
        collate([{"input_ids": [1], "loss_mask": [1]}, {"input_ids": [1, 2], "loss_mask": [1]}], 0)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate([{"input_ids": [1], "loss_mask": [1]}], None)
