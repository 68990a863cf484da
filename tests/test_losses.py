"""Distillation losses: values and gradients against direct float64 computations on small tensors."""
import pytest
import torch

from train.losses import LOSS_NAMES, distill_loss

N, V = 6, 11


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(N, V, generator=g, dtype=torch.float64)).requires_grad_(True)
    teacher = 2 * torch.randn(N, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    return student, teacher, labels


MASK = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)


def direct(name, student, teacher, labels, temperature=1.0, beta=0.5):
    """The textbook formula per position, from plain softmax probabilities (no log-space tricks) -> [N]."""
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    if name == "forward_kl":
        return (p * (p.log() - q.log())).sum(-1)
    if name == "reverse_kl":
        return (q * (q.log() - p.log())).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    if name == "ce":
        return -torch.softmax(student, -1).log()[torch.arange(N), labels]
    raise AssertionError(name)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_value_and_gradient_match_direct_computation(name, temperature):
    student, teacher, labels = _logits(0)
    loss, parts = distill_loss(student, teacher, MASK, {name: 1.0}, temperature=temperature, labels=labels,
                               jsd_beta=0.3)
    (grad,) = torch.autograd.grad(loss, student)
    ref = direct(name, student, teacher, labels, temperature, beta=0.3)[MASK].mean()
    (ref_grad,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts[name], ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert grad[~MASK].abs().max() == 0  # masked-out positions get no gradient


def test_forward_kl_gradient_is_q_minus_p_over_t():
    """d KL(p || q_T) / d z_q = (q_T - p) / T per position (then / the masked count)."""
    student, teacher, _ = _logits(1)
    T = 1.5
    loss, _ = distill_loss(student, teacher, None, {"forward_kl": 1.0}, temperature=T)
    (grad,) = torch.autograd.grad(loss, student)
    expected = (torch.softmax(student / T, -1) - torch.softmax(teacher / T, -1)) / T / N
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-10, atol=1e-12)


def test_weighted_sum_of_parts():
    student, teacher, labels = _logits(2)
    weights = {"forward_kl": 0.5, "tvd": 2.0, "ce": 0.1, "jsd": 1.0}
    loss, parts = distill_loss(student, teacher, MASK, weights, labels=labels)
    assert set(parts) == set(weights)
    torch.testing.assert_close(loss.detach(), sum(w * parts[n] for n, w in weights.items()))


def test_kl_of_a_distribution_with_itself_is_zero():
    student, teacher, _ = _logits(3)
    for name in ("forward_kl", "reverse_kl", "tvd", "jsd"):
        loss, _ = distill_loss(teacher.clone().requires_grad_(True), teacher, None, {name: 1.0})
        assert abs(loss.item()) < 1e-12, name


def test_tvd_is_in_unit_interval():
    student, teacher, _ = _logits(4)
    per_position = direct("tvd", student, teacher, None)
    assert ((per_position >= 0) & (per_position <= 1)).all()
    far = torch.full((1, V), -50.0, dtype=torch.float64)
    near = far.clone()
    far[0, 0], near[0, 1] = 50.0, 50.0  # disjoint point masses: TVD = 1
    loss, _ = distill_loss(far, near, None, {"tvd": 1.0})
    assert loss.item() == pytest.approx(1.0, abs=1e-12)


def test_jsd_half_is_symmetric_and_other_betas_are_not():
    student, teacher, _ = _logits(5)
    a, _ = distill_loss(student, teacher, MASK, {"jsd": 1.0}, jsd_beta=0.5)
    b, _ = distill_loss(teacher, student, MASK, {"jsd": 1.0}, jsd_beta=0.5)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    c, _ = distill_loss(student, teacher, MASK, {"jsd": 1.0}, jsd_beta=0.1)
    d, _ = distill_loss(teacher, student, MASK, {"jsd": 1.0}, jsd_beta=0.1)
    assert abs(c.item() - d.item()) > 1e-4
    e, _ = distill_loss(teacher, student, MASK, {"jsd": 1.0}, jsd_beta=0.9)
    torch.testing.assert_close(c, e, rtol=1e-12, atol=1e-12)  # JSD(beta)(p, q) = JSD(1 - beta)(q, p)


def test_mask_is_respected_and_chunks_sum_up():
    student, teacher, labels = _logits(6)
    weights = {"reverse_kl": 1.0, "ce": 1.0}
    full, _ = distill_loss(student, teacher, MASK, weights, labels=labels)
    garbage = student.detach().clone()
    garbage[~MASK] = float("inf")  # whatever sits at masked-out positions cannot leak in
    masked, _ = distill_loss(garbage, teacher, MASK, weights, labels=labels)
    torch.testing.assert_close(masked, full.detach())
    count = int(MASK.sum())
    chunks = sum(distill_loss(student[i:i + 2], teacher[i:i + 2], MASK[i:i + 2], weights, labels=labels[i:i + 2],
                              normalizer=count)[0] for i in range(0, N, 2))
    torch.testing.assert_close(chunks, full)
    batched, _ = distill_loss(student.view(2, 3, V), teacher.view(2, 3, V), MASK.view(2, 3), weights,
                              labels=labels.view(2, 3))
    torch.testing.assert_close(batched, full)


def test_empty_mask_gives_zero_with_a_gradient():
    student, teacher, _ = _logits(7)
    loss, parts = distill_loss(student, teacher, torch.zeros(N, dtype=torch.bool), {"forward_kl": 1.0})
    assert loss.item() == 0 and parts["forward_kl"].item() == 0
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.abs().max() == 0


def test_teacher_gets_no_gradient_and_bf16_is_upcast():
    student, teacher, _ = _logits(8)
    teacher = teacher.clone().requires_grad_(True)
    loss, _ = distill_loss(student, teacher, None, {"forward_kl": 1.0})
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    loss16, _ = distill_loss(student.detach().bfloat16(), teacher.detach().bfloat16(), None, {"forward_kl": 1.0})
    assert loss16.dtype == torch.float32


def test_bad_arguments_are_refused():
    student, teacher, labels = _logits(9)
    with pytest.raises(ValueError, match=r"unknown distillation loss\(es\) \['kl'\]; known: forward_kl"):
        distill_loss(student, teacher, None, {"kl": 1.0})
    with pytest.raises(ValueError, match="needs labels"):
        distill_loss(student, teacher, None, {"ce": 1.0})
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        distill_loss(student, teacher, None, {"jsd": 1.0}, jsd_beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        distill_loss(student[:, :5], teacher, None, {"tvd": 1.0})
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(student, teacher, None, {"tvd": 1.0}, temperature=0)
    with pytest.raises(ValueError, match="at least one"):
        distill_loss(student, teacher, None, {})
    with pytest.raises(ValueError, match=r"losses \['tvd'\] compare with the teacher: pass teacher_logits"):
        distill_loss(student, None, None, {"tvd": 1.0, "ce": 1.0}, labels=labels)
