"""DINO, iBOT and KoLeo losses against plain-loop closed forms (recipe 4.3), in float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import dino_loss, ibot_loss, koleo_loss, masks_weight_for

torch.set_num_threads(1)

FP32_RTOL = 1e-5


def cross_entropy_reference(student_row: list[float], teacher_row: list[float], temp: float) -> float:
    """-sum_k t_k log softmax(s / T)_k, one row, in Python floats."""
    scaled = [value / temp for value in student_row]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(value - top) for value in scaled))
    return -sum(t * (s - log_norm) for s, t in zip(scaled, teacher_row, strict=True))


def random_probs(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=generator) * 3, dim=-1)


@pytest.mark.parametrize(
    ("batch", "num_students", "num_teachers", "num_prototypes", "temp"),
    [(4, 8, 2, 16, 0.1), (3, 1, 1, 7, 0.1), (5, 2, 2, 32, 0.2), (1, 3, 1, 5, 0.05)],
)
def test_dino_loss_is_the_sum_over_pairs_of_batch_mean_cross_entropies(
    batch, num_students, num_teachers, num_prototypes, temp
):
    generator = torch.Generator().manual_seed(batch * 100 + num_students)
    students = [torch.randn(batch, num_prototypes, generator=generator) for _ in range(num_students)]
    teachers = [random_probs(generator, batch, num_prototypes) for _ in range(num_teachers)]
    expected = 0.0
    for student in students:
        for teacher in teachers:
            rows = [
                cross_entropy_reference(student[b].tolist(), teacher[b].tolist(), temp) for b in range(batch)
            ]
            expected += sum(rows) / batch
    assert dino_loss(students, teachers, student_temp=temp).item() == pytest.approx(expected, rel=FP32_RTOL)


def test_dino_loss_of_uniform_outputs_is_pairs_times_log_k():
    """At initialisation (constant logits, uniform targets) each pair costs ln K: 16 local pairs, 16 ln K."""
    num_prototypes = 64
    students = [torch.zeros(3, num_prototypes) for _ in range(8)]
    teachers = [torch.full((3, num_prototypes), 1 / num_prototypes) for _ in range(2)]
    assert dino_loss(students, teachers).item() == pytest.approx(16 * math.log(num_prototypes), rel=FP32_RTOL)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_dino_loss_with_half_students_and_fp32_teachers_is_fp32(half):
    generator = torch.Generator().manual_seed(3)
    students = [torch.randn(4, 16, generator=generator).to(half) for _ in range(2)]
    teachers = [random_probs(generator, 4, 16)]
    loss = dino_loss(students, teachers)
    assert loss.dtype == torch.float32
    reference = dino_loss([student.double() for student in students], [teachers[0].double()])
    # the half log-softmax costs a few ulps of the half type, not more
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)


def test_dino_loss_rejects_empty_lists():
    with pytest.raises(ValueError, match="at least one"):
        dino_loss([], [torch.ones(1, 2)])


def test_masks_weight_is_one_over_the_masked_count_of_each_token_image():
    masks = torch.tensor(
        [[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]],
        dtype=torch.bool,
    )
    weights = masks_weight_for(masks)
    assert weights.dtype == torch.float32
    expected = [1 / 3] * 3 + [1.0] + [1 / 2] * 2  # image-major order of the True entries
    assert torch.allclose(weights, torch.tensor(expected))
    assert weights.sum().item() == pytest.approx(3.0)  # one per masked image


@pytest.mark.parametrize(
    ("num_images", "num_tokens", "num_prototypes", "temp"), [(4, 6, 8, 0.1), (6, 9, 5, 0.2)]
)
def test_ibot_loss_is_the_per_image_mean_summed_over_images_over_all_images(
    num_images, num_tokens, num_prototypes, temp
):
    generator = torch.Generator().manual_seed(num_images)
    masks = torch.rand(num_images, num_tokens, generator=generator) < 0.4
    masks[0] = False  # an unmasked image still counts in the denominator
    masks[1, :3] = True
    student_patches = torch.randn(num_images, num_tokens, num_prototypes, generator=generator)
    teacher_patches = random_probs(generator, num_images, num_tokens, num_prototypes)
    expected = 0.0
    for image in range(num_images):
        positions = masks[image].nonzero().flatten().tolist()
        if positions:
            terms = [
                cross_entropy_reference(
                    student_patches[image, p].tolist(), teacher_patches[image, p].tolist(), temp
                )
                for p in positions
            ]
            expected += sum(terms) / len(terms)
    expected /= num_images
    loss = ibot_loss(
        student_patches[masks], teacher_patches[masks], masks_weight_for(masks), num_images, student_temp=temp
    )
    assert loss.item() == pytest.approx(expected, rel=FP32_RTOL)


def test_ibot_loss_is_fp32_for_half_logits_and_zero_without_masked_tokens():
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(6, 8, generator=generator)
    teacher = random_probs(generator, 6, 8)
    weights = torch.full((6,), 0.5)
    full = ibot_loss(student, teacher, weights, n_images=4)
    half = ibot_loss(student.half(), teacher, weights, n_images=4)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=1e-2)
    empty = ibot_loss(torch.zeros(0, 8), torch.zeros(0, 8), torch.zeros(0), n_images=4)
    assert empty.item() == 0.0


def koleo_reference(rows: list[list[float]], eps: float = 1e-8) -> float:
    """-mean_i log(||z_i - z_nn(i) + eps|| + eps) with a brute-force neighbour search."""
    normed = []
    for row in rows:
        norm = max(math.sqrt(sum(v * v for v in row)), eps)
        normed.append([v / norm for v in row])
    total = 0.0
    for i, z_i in enumerate(normed):
        dots = [
            -1.0 if j == i else sum(a * b for a, b in zip(z_i, z_j, strict=True))
            for j, z_j in enumerate(normed)
        ]
        neighbour = normed[dots.index(max(dots))]
        distance = math.sqrt(sum((a - b + eps) ** 2 for a, b in zip(z_i, neighbour, strict=True)))
        total += math.log(distance + eps)
    return -total / len(rows)


@pytest.mark.parametrize(("batch", "dim"), [(2, 3), (5, 8), (9, 4)])
def test_koleo_matches_the_closed_form(batch, dim):
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch))
    assert koleo_loss(x).item() == pytest.approx(koleo_reference(x.tolist()), rel=FP32_RTOL)


def test_koleo_is_finite_for_duplicate_rows_even_from_half_inputs():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    x[1] = x[0]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        loss = koleo_loss(x.to(dtype))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # the duplicate pair sits eps * sqrt(D) apart
    assert koleo_loss(x).item() == pytest.approx(koleo_reference(x.tolist()), rel=FP32_RTOL)


def test_koleo_of_a_single_row_is_defined():
    dim, eps = 8, 1e-8
    loss = koleo_loss(torch.randn(1, dim))
    assert loss.item() == pytest.approx(-math.log(eps * math.sqrt(dim) + eps), rel=FP32_RTOL)


def test_koleo_gradient_flows_through_the_row_and_its_neighbour():
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.1]], requires_grad=True)
    koleo_loss(x).backward()
    # closed form of d/dx of the same objective with the neighbours fixed (0<->1, 2->1), in float64
    x64 = x.detach().double().requires_grad_(True)
    z = x64 / x64.norm(dim=1, keepdim=True)
    pairs = [(0, 1), (1, 0), (2, 1)]
    objective = -sum(torch.log((z[i] - z[j] + 1e-8).norm() + 1e-8) for i, j in pairs) / 3
    objective.backward()
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    assert x.grad[1].abs().sum() > 0  # row 1 gets gradient as a neighbour too
