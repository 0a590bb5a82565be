"""The hand-written soft-target cross-entropy equals autograd through log-softmax, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses.cross_entropy import soft_cross_entropy

TEMPERATURE = 0.1


def reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    return -(targets * F.log_softmax(logits.double() / temperature, dim=-1)).sum(dim=-1)


def test_values_and_gradients_equal_autograd_through_log_softmax_in_fp64():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 300, generator=generator).mul(3).requires_grad_()
    # Rows that sum to 2: the DINO loss sums the two teacher views' targets.
    targets = 2 * torch.softmax(torch.randn(7, 300, generator=generator) / 0.04, dim=-1)
    weights = torch.randn(7, generator=generator)
    ours = soft_cross_entropy(logits, targets, TEMPERATURE)
    (ours * weights).sum().backward()
    our_grad, logits.grad = logits.grad, None
    theirs = reference(logits, targets.double(), TEMPERATURE)
    (theirs * weights.double()).sum().backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(our_grad, logits.grad, rtol=1e-5, atol=1e-6)


def test_uniform_logits_against_one_hot_targets_cost_log_k_and_push_towards_the_target():
    logits = torch.zeros(1, 8, requires_grad=True)
    target = F.one_hot(torch.tensor([3]), 8).float()
    loss = soft_cross_entropy(logits, target, TEMPERATURE)
    loss.sum().backward()
    assert loss.item() == pytest.approx(math.log(8), rel=1e-6)
    # d/ds = (softmax - t) / T: (1/8 - 1) / 0.1 at the target, (1/8) / 0.1 elsewhere.
    expected = torch.full((1, 8), 1.25)
    expected[0, 3] = -8.75
    torch.testing.assert_close(logits.grad, expected)


def test_half_logits_give_an_fp32_loss_and_a_gradient_in_their_dtype():
    logits = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.softmax(torch.randn(4, 64), dim=-1)
    loss = soft_cross_entropy(logits, targets, TEMPERATURE)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), reference(logits.float(), targets.double(), TEMPERATURE))


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match=r"logits \(2, 3\), targets \(2, 4\)"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4), TEMPERATURE)
