"""Teacher targets: softmax-centering, the one-step-lagged centre, Sinkhorn-Knopp, and their all-reduces
checked with two gloo processes against one process holding the whole batch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.losses import LaggedCenter, sinkhorn_knopp, softmax_center

torch.set_num_threads(1)

MOMENTUM = 0.9
TEMP = 0.07
WORLD_SIZE = 2
RANK_ROWS = (3, 5)  # unequal, as masked-token counts are
EQUAL_ROWS = 2  # DINO CLS rows per rank: the same 2B on every rank
NUM_PROTOTYPES = 6


def softmax_reference(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(value - top) for value in row]
    return [value / sum(exps) for value in exps]


def test_softmax_center_matches_the_closed_form_in_fp32():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=generator)
    center = torch.randn(1, 5, generator=generator)
    probs = softmax_center(logits.half(), center, TEMP)
    assert probs.dtype == torch.float32 and probs.shape == (3, 5)
    half_logits = logits.half().float()
    for row in range(3):
        expected = softmax_reference([(half_logits[row, k] - center[0, k]).item() / TEMP for k in range(5)])
        assert probs[row].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", ["rows", "rank_mean"])
def test_lagged_center_uses_only_earlier_steps(kind):
    """Hand loop: P_t = softmax((x_t - c_t) / T), c_0 = 0, c_{t+1} = 0.9 c_t + 0.1 mean_rows(x_t).

    On one process both kinds are the row mean of the step's logits."""
    generator = torch.Generator().manual_seed(1)
    steps = [torch.randn(4, NUM_PROTOTYPES, generator=generator) * 2 for _ in range(4)]
    centering = LaggedCenter(NUM_PROTOTYPES, kind)
    center = np.zeros(NUM_PROTOTYPES)
    for logits in steps:
        probs = centering.probabilities(logits, TEMP)
        centering.update(logits)
        rows = logits.double().numpy()
        expected = [softmax_reference(list((row - center) / TEMP)) for row in rows]
        assert probs.numpy() == pytest.approx(np.array(expected), rel=1e-5, abs=1e-7)
        center = MOMENTUM * center + (1 - MOMENTUM) * rows.mean(axis=0)
    centering.flush()
    assert centering.center.reshape(-1).numpy() == pytest.approx(center, abs=1e-6)


def test_center_buffers_have_the_official_shapes_and_dtype():
    dino = LaggedCenter(7, "rows")
    ibot = LaggedCenter(7, "rank_mean")
    assert dino.center.shape == (1, 7) and ibot.center.shape == (1, 1, 7)
    assert dino.center.dtype == torch.float32 and not dino.center.any()
    with pytest.raises(ValueError, match="kind"):
        LaggedCenter(7, "tokens")


def test_ibot_center_gives_probabilities_shaped_like_the_logits():
    centering = LaggedCenter(NUM_PROTOTYPES, "rank_mean")
    logits = torch.randn(5, NUM_PROTOTYPES)
    assert centering.probabilities(logits, TEMP).shape == (5, NUM_PROTOTYPES)


def test_state_dict_saves_the_flushed_center_and_loading_drops_the_pending_update():
    logits = torch.arange(2 * NUM_PROTOTYPES, dtype=torch.float32).reshape(2, NUM_PROTOTYPES)
    centering = LaggedCenter(NUM_PROTOTYPES, "rows")
    centering.update(logits)
    saved = centering.state_dict()["center"].clone()
    expected = (1 - MOMENTUM) * logits.mean(dim=0, keepdim=True)
    assert torch.allclose(saved, expected)

    restored = LaggedCenter(NUM_PROTOTYPES, "rows")
    restored.update(torch.full((2, NUM_PROTOTYPES), 100.0))  # stale: must not leak into the loaded centre
    restored.load_state_dict({"center": saved})
    probs = restored.probabilities(logits, TEMP)
    assert torch.allclose(restored.center, saved)
    assert torch.allclose(probs, softmax_center(logits, saved, TEMP))


def test_two_updates_without_a_read_are_both_applied():
    centering = LaggedCenter(2, "rows")
    centering.update(torch.tensor([[1.0, 3.0]]))
    centering.update(torch.tensor([[5.0, 7.0]]))
    centering.flush()
    first = (1 - MOMENTUM) * torch.tensor([1.0, 3.0])
    expected = MOMENTUM * first + (1 - MOMENTUM) * torch.tensor([5.0, 7.0])
    assert torch.allclose(centering.center.reshape(-1), expected)


@pytest.mark.parametrize("kind", ["rows", "rank_mean"])
def test_an_update_without_rows_adds_a_zero_statistic(kind):
    centering = LaggedCenter(3, kind)
    centering.center.fill_(1.0)
    centering.update(torch.zeros(0, 3))
    centering.flush()
    assert torch.equal(centering.center.reshape(-1), torch.full((3,), MOMENTUM))


def sinkhorn_reference(logits: np.ndarray, temp: float, iterations: int, total_count: float) -> np.ndarray:
    """Recipe 4.5 on the whole batch in float64 (K x B layout)."""
    q = np.exp(logits / temp).T
    q = q / q.sum()
    num_prototypes = q.shape[0]
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True) / num_prototypes
        q = q / q.sum(axis=0, keepdims=True) / total_count
    return (q * total_count).T


@pytest.mark.parametrize(("batch", "num_prototypes", "temp"), [(8, 16, 0.04), (5, 3, 0.07), (32, 64, 0.05)])
def test_sinkhorn_knopp_matches_the_recipe_and_rows_sum_to_one(batch, num_prototypes, temp):
    generator = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, num_prototypes, generator=generator).clamp(-1, 1)  # cosine-like logits
    probs = sinkhorn_knopp(logits, temp)
    assert probs.dtype == torch.float32 and probs.shape == (batch, num_prototypes)
    expected = sinkhorn_reference(logits.double().numpy(), temp, 3, batch)
    assert probs.numpy() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert probs.sum(dim=1).numpy() == pytest.approx(np.ones(batch), abs=1e-5)


def test_sinkhorn_knopp_makes_prototype_marginals_nearly_uniform():
    generator = torch.Generator().manual_seed(7)
    batch, num_prototypes = 64, 8
    # strongly unbalanced raw assignment: prototype 0 favoured by every sample
    logits = torch.rand(batch, num_prototypes, generator=generator) * 0.2
    logits[:, 0] += 0.5
    raw_share = torch.softmax(logits / 0.04, dim=-1).sum(dim=0)[0].item() / batch
    marginals = sinkhorn_knopp(logits, 0.04).sum(dim=0) / batch
    assert raw_share > 0.9
    assert marginals.numpy() == pytest.approx(np.full(num_prototypes, 1 / num_prototypes), rel=0.05)


def test_sinkhorn_total_count_replaces_the_batch_size():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    probs = sinkhorn_knopp(logits, TEMP, total_count=torch.tensor([6]))
    assert torch.allclose(probs, sinkhorn_knopp(logits, TEMP), rtol=1e-6)


def distributed_logits() -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    return torch.randn(sum(RANK_ROWS), NUM_PROTOTYPES, generator=generator).clamp(-1, 1)


def rank_slice(rank: int) -> slice:
    start = sum(RANK_ROWS[:rank])
    return slice(start, start + RANK_ROWS[rank])


def run_rank(rank: int, out_dir: str) -> None:
    """One gloo rank: Sinkhorn on its rows and one update of each centre kind; results saved to disk."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE
    )
    try:
        local = distributed_logits()[rank_slice(rank)]
        results = {"sinkhorn": sinkhorn_knopp(local, TEMP, total_count=sum(RANK_ROWS))}
        equal = distributed_logits()[rank * EQUAL_ROWS : (rank + 1) * EQUAL_ROWS]
        only_rank0 = local if rank == 0 else local[:0]
        for key, kind, rows in (
            ("rows", "rows", equal),
            ("rank_mean", "rank_mean", local),
            ("rank_mean_one_empty", "rank_mean", only_rank0),
        ):
            centering = LaggedCenter(NUM_PROTOTYPES, kind)
            centering.update(rows)
            centering.flush()
            results[key] = centering.center.clone()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduced_sums_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(run_rank, args=(str(tmp_path),), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    logits = distributed_logits()

    whole = sinkhorn_knopp(logits, TEMP)
    assert torch.allclose(torch.cat([r["sinkhorn"] for r in ranks]), whole, rtol=1e-5, atol=1e-7)

    rows_center = (1 - MOMENTUM) * logits[: WORLD_SIZE * EQUAL_ROWS].mean(dim=0)
    rank_means = torch.stack([logits[rank_slice(rank)].mean(dim=0) for rank in range(WORLD_SIZE)])
    rank_mean_center = (1 - MOMENTUM) * rank_means.mean(dim=0)  # not the token-weighted mean
    assert not torch.allclose(rank_mean_center, (1 - MOMENTUM) * logits.mean(dim=0), atol=1e-3)
    one_empty_center = (1 - MOMENTUM) * rank_means[0] / WORLD_SIZE  # the empty rank adds zeros
    for result in ranks:
        assert torch.allclose(result["rows"].reshape(-1), rows_center, atol=1e-6)
        assert torch.allclose(result["rank_mean"].reshape(-1), rank_mean_center, atol=1e-6)
        assert torch.allclose(result["rank_mean_one_empty"].reshape(-1), one_empty_center, atol=1e-6)
