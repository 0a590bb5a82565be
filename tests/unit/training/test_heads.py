"""The DINO head: official keys, init, the cosine-times-g closed form, g trainable, sizes, FSDP2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from training.models.heads import DINOHead, WeightNormLinear

FP32_ATOL = 1e-5
INIT_STD = 0.02
STAT_RTOL = 0.03  # sample std of >= 10^5 draws is within 1% of the true std; 3% leaves room


def erf_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def reference_logits(head: DINOHead, x: torch.Tensor) -> torch.Tensor:
    """Linear/GELU MLP, h / ||h||, then g_k * cos(h, v_k), in float64 from the head's parameters."""
    p = {name: value.detach().double() for name, value in head.named_parameters()}
    h = erf_gelu(x.double() @ p["mlp.0.weight"].T + p["mlp.0.bias"])
    h = erf_gelu(h @ p["mlp.2.weight"].T + p["mlp.2.bias"])
    h = h @ p["mlp.4.weight"].T + p["mlp.4.bias"]
    v, g = p["last_layer.weight_v"], p["last_layer.weight_g"]
    cosines = (h / h.norm(dim=-1, keepdim=True)) @ (v / v.norm(dim=-1, keepdim=True)).T
    return cosines * g.T


@pytest.mark.parametrize(
    ("nlayers", "linear_keys"),
    [
        (1, ["mlp"]),
        (2, ["mlp.0", "mlp.2"]),
        (3, ["mlp.0", "mlp.2", "mlp.4"]),
        (4, ["mlp.0", "mlp.2", "mlp.4", "mlp.6"]),
    ],
)
def test_official_keys_and_shapes(nlayers, linear_keys):
    head = DINOHead(32, 100, hidden_dim=48, bottleneck_dim=16, nlayers=nlayers)
    state = head.state_dict()
    expected = {f"{key}.{kind}" for key in linear_keys for kind in ("weight", "bias")}
    assert set(state) == expected | {"last_layer.weight_g", "last_layer.weight_v"}
    assert state[f"{linear_keys[0]}.weight"].shape == (16 if nlayers == 1 else 48, 32)
    assert state[f"{linear_keys[-1]}.weight"].shape == (16, 32 if nlayers == 1 else 48)
    assert state["last_layer.weight_g"].shape == (100, 1)
    assert state["last_layer.weight_v"].shape == (100, 16)
    assert head(torch.randn(5, 32)).shape == (5, 100)


def test_zero_layers_is_refused():
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(32, 100, nlayers=0)


def test_init_statistics():
    torch.manual_seed(0)
    head = DINOHead(256, 4096, hidden_dim=512, bottleneck_dim=256)
    for index in (0, 2, 4):
        linear = head.mlp[index]
        assert linear.weight.std().item() == pytest.approx(INIT_STD, rel=STAT_RTOL)
        assert abs(linear.weight.mean().item()) < INIT_STD / 100
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    # nn.Linear's default: kaiming-uniform with a = sqrt(5) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / math.sqrt(256)
    v = head.last_layer.weight_v
    assert v.abs().max().item() <= bound
    assert v.std().item() == pytest.approx(bound / math.sqrt(3), rel=STAT_RTOL)
    assert torch.equal(head.last_layer.weight_g, torch.ones(4096, 1))
    assert head.last_layer.weight_g.requires_grad and v.requires_grad


def test_prototypes_are_drawn_exactly_as_an_nn_linear():
    torch.manual_seed(7)
    ours = WeightNormLinear(16, 8).weight_v
    torch.manual_seed(7)
    assert torch.equal(ours, nn.Linear(16, 8, bias=False).weight)


def test_output_is_g_times_the_cosine_of_bottleneck_and_prototype():
    torch.manual_seed(0)
    head = DINOHead(24, 40, hidden_dim=32, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # g must scale each row, not just be 1
    x = torch.randn(6, 24)
    logits = head(x)
    assert torch.allclose(logits.double(), reference_logits(head, x), atol=FP32_ATOL)
    assert torch.all(logits.abs() <= head.last_layer.weight_g.T + FP32_ATOL)


def test_gradient_of_g_is_the_cosine():
    """d(sum_b logits_bk) / d g_k = sum_b cos(h_b, v_k)."""
    torch.manual_seed(0)
    head = DINOHead(24, 40, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(6, 24)
    head(x).sum().backward()
    cosines = reference_logits(head, x) / head.last_layer.weight_g.detach().double().T
    assert torch.allclose(
        head.last_layer.weight_g.grad.double(), cosines.sum(0, keepdim=True).T, atol=FP32_ATOL
    )
    assert head.last_layer.weight_v.grad.abs().sum() > 0


def test_fp16_zero_bottleneck_gives_zero_logits_not_nan():
    """1e-12 rounds to 0 in fp16, so the fp16 eps is 1e-6: a zero bottleneck gives 0 / 1e-6 = 0."""
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4).half()
    with torch.no_grad():
        head.mlp[4].weight.zero_()
    logits = head(torch.randn(3, 8, dtype=torch.float16))
    assert logits.dtype == torch.float16 and torch.equal(logits, torch.zeros_like(logits))


@pytest.mark.parametrize(
    ("dims", "millions", "last_layer_millions"),
    [((1024, 65536, 2048, 256), 23.7, 16.8), ((1024, 131072, 2048, 384), 57.5, 50.5)],
)
def test_parameter_counts(dims, millions, last_layer_millions):
    in_dim, out_dim, hidden, bottleneck = dims
    with torch.device("meta"):
        head = DINOHead(in_dim, out_dim, hidden_dim=hidden, bottleneck_dim=bottleneck)
    total = sum(p.numel() for p in head.parameters())
    closed_form = (in_dim + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * bottleneck
    closed_form += out_dim * bottleneck + out_dim
    assert total == closed_form and round(total / 1e6, 1) == millions
    assert round(sum(p.numel() for p in head.last_layer.parameters()) / 1e6, 1) == last_layer_millions


def test_head_under_fsdp2_keeps_keys_and_outputs_and_trains_g(tmp_path):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    head = DINOHead(24, 40, hidden_dim=32, bottleneck_dim=8)
    plain = copy.deepcopy(head)
    x = torch.randn(6, 24)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        fully_shard(head)
        assert type(head.last_layer.weight_g).__name__ == "DTensor"
        assert set(head.state_dict()) == set(plain.state_dict())
        logits = head(x)
        assert torch.allclose(logits, plain(x), atol=FP32_ATOL)
        logits.sum().backward()
        plain(x).sum().backward()
        grad_g = head.last_layer.weight_g.grad.full_tensor()
        assert torch.allclose(grad_g, plain.last_layer.weight_g.grad, atol=FP32_ATOL)
    finally:
        dist.destroy_process_group()
