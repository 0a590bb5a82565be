"""The backbone's training features: packed crop groups and efficient stochastic depth (recipe 2.5, 2.6)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist

from training.models.attention import Attention, pack_groups, packed_sequence_lengths, unpack_groups
from training.models.vit import block_drop_path_rates, build_vit, kept_sample_count

WIDTH = 64  # vit_test
NUM_HEADS = 2
GLOBAL_SIZE, LOCAL_SIZE = 56, 28  # 4 x 4 and 2 x 2 patches of 14 px
NUM_REGISTERS = 2
FP32_ATOL = 1e-5
NUM_DRAWS = 2000  # forward passes averaged in the expectation test
SIGMAS = 5.0  # tolerance of the expectation test, in standard deviations of the sample mean


def reference_attention(attn: Attention, x_BND: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(K)) v per image and head, written out with explicit matrix products."""
    dim = x_BND.shape[-1]
    head_dim = dim // attn.num_heads
    q, k, v = attn.qkv(x_BND).split(dim, dim=-1)
    heads = [slice(h * head_dim, (h + 1) * head_dim) for h in range(attn.num_heads)]
    out = torch.cat(
        [
            torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(head_dim), dim=-1) @ v[..., s]
            for s in heads
        ],
        dim=-1,
    )
    return attn.proj(out)


def crop_groups(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    generator = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(3, 3, GLOBAL_SIZE, GLOBAL_SIZE, generator=generator)
    local_crops = torch.randn(5, 3, LOCAL_SIZE, LOCAL_SIZE, generator=generator)
    masks = torch.rand(3, 16, generator=generator) < 0.3
    return [global_crops, local_crops], [masks, None]


def tiny_vit(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_vit(
        "vit_test", img_size=GLOBAL_SIZE, num_register_tokens=NUM_REGISTERS, layerscale_init=0.5, **options
    )
    torch.nn.init.normal_(model.mask_token)  # zero at init; made visible so masking matters here
    return model


def random_block(drop_path_rate: float) -> torch.nn.Module:
    block = build_vit("vit_test", drop_path_rate=drop_path_rate).blocks[0]
    with torch.no_grad():
        block.ls1.gamma.uniform_(0.5, 1.5)  # per-channel gammas, so LayerScale placement is visible
        block.ls2.gamma.uniform_(0.5, 1.5)
    return block


def test_block_rates_are_uniform_or_a_linear_ramp_and_add_no_parameters():
    assert block_drop_path_rates(0.4, 3, uniform=True) == [0.4, 0.4, 0.4]
    ramp = block_drop_path_rates(0.3, 4, uniform=False)
    assert ramp == pytest.approx([0.0, 0.1, 0.2, 0.3], abs=1e-7)
    with torch.device("meta"):
        plain = build_vit("vit_small")
        dropping = build_vit("vit_small", drop_path_rate=0.4, drop_path_uniform=False)
    assert [b.drop_path_rate for b in dropping.blocks] == pytest.approx([0.4 * i / 11 for i in range(12)])
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in dropping.state_dict().items()
    }
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_vit("vit_test", drop_path_rate=1.0)


@pytest.mark.parametrize(
    ("batch", "rate", "kept", "scale"),
    [
        (64, 0.4, 38, 1.6842),
        (256, 0.4, 153, 1.6732),
        (24, 0.4, 14, 1.7143),
        (96, 0.4, 57, 1.6842),
        (1, 0.9, 1, 1),
    ],
)
def test_kept_subset_size_and_compensation_scale(batch, rate, kept, scale):
    assert kept_sample_count(batch, rate) == kept == max(math.floor(batch * (1 - rate)), 1)
    assert round(batch / kept, 4) == scale


def test_packing_round_trips_and_lists_one_segment_per_image():
    groups = [torch.randn(2, 5, 3), torch.randn(3, 2, 3)]
    x_TD, shapes = pack_groups(groups)
    assert x_TD.shape == (2 * 5 + 3 * 2, 3) and shapes == ((2, 5), (3, 2))
    assert torch.equal(x_TD[5:10], groups[0][1]) and torch.equal(x_TD[10:12], groups[1][0])
    assert all(torch.equal(a, b) for a, b in zip(unpack_groups(x_TD, shapes), groups, strict=True))
    assert packed_sequence_lengths(shapes) == [5, 5, 2, 2, 2]


def test_packed_attention_is_per_image_attention():
    torch.manual_seed(0)
    attn = Attention(WIDTH, NUM_HEADS)
    groups = [torch.randn(2, 7, WIDTH), torch.randn(3, 4, WIDTH)]
    with torch.no_grad():
        packed = unpack_groups(attn.forward_packed(*pack_groups(groups)), ((2, 7), (3, 4)))
        for out, group in zip(packed, groups, strict=True):
            assert torch.allclose(out, reference_attention(attn, group), atol=FP32_ATOL)


def test_list_forward_equals_separate_forwards_in_eval():
    model = tiny_vit(drop_path_rate=0.4).eval()
    groups, masks = crop_groups()
    with torch.no_grad():
        outputs = model.forward_features(groups, masks)
        separate = [model.forward_features(images, mask) for images, mask in zip(groups, masks, strict=True)]
    assert len(outputs) == 2
    for out, alone in zip(outputs, separate, strict=True):
        assert out.keys() == alone.keys()
        assert out["masks"] is alone["masks"]
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert out[key].shape == alone[key].shape
            assert torch.allclose(out[key], alone[key], atol=FP32_ATOL), key
    assert outputs[1]["x_norm_patchtokens"].shape == (5, 4, WIDTH)
    assert model.forward_features(groups)[0]["masks"] is None
    with pytest.raises(ValueError, match="masks"):
        model.forward_features(groups, [None])


def test_zero_drop_rate_in_training_equals_eval():
    model = tiny_vit()
    groups, masks = crop_groups()
    with torch.no_grad():
        trained = model.train().forward_features(groups, masks)
        tensor_trained = model.forward_features(groups[0], masks[0])
        evaluated = model.eval().forward_features(groups, masks)
        tensor_evaluated = model.forward_features(groups[0], masks[0])
    for out, reference in zip(trained, evaluated, strict=True):
        assert torch.equal(out["x_prenorm"], reference["x_prenorm"])
    assert torch.equal(tensor_trained["x_prenorm"], tensor_evaluated["x_prenorm"])


def test_subset_residuals_follow_the_closed_form_and_leave_dropped_samples_unchanged():
    """x1 = x + [i kept] (b/s) gamma1 attn(norm1 x); x2 = x1 + [i kept'] (b/s) gamma2 mlp(norm2 x1)."""
    torch.manual_seed(0)
    rate = 0.4
    block = random_block(rate).train()
    groups = [torch.randn(8, 5, WIDTH), torch.randn(10, 3, WIDTH)]
    torch.manual_seed(1)
    with torch.no_grad():
        outputs = block.forward_list(groups)
    # The block draws one permutation per group for the attention branch, then one per group for the FFN.
    torch.manual_seed(1)
    kept_attention = [torch.randperm(g.shape[0])[: kept_sample_count(g.shape[0], rate)] for g in groups]
    kept_ffn = [torch.randperm(g.shape[0])[: kept_sample_count(g.shape[0], rate)] for g in groups]
    for x, out, attention_idx, ffn_idx in zip(groups, outputs, kept_attention, kept_ffn, strict=True):
        batch = x.shape[0]
        scale = batch / kept_sample_count(batch, rate)
        attention_on = torch.zeros(batch, 1, 1).index_fill_(0, attention_idx, 1.0)
        ffn_on = torch.zeros(batch, 1, 1).index_fill_(0, ffn_idx, 1.0)
        with torch.no_grad():
            x1 = x + attention_on * scale * block.ls1.gamma * reference_attention(block.attn, block.norm1(x))
            x2 = x1 + ffn_on * scale * block.ls2.gamma * block.mlp(block.norm2(x1))
        assert torch.allclose(out, x2, atol=FP32_ATOL)
        untouched = (attention_on + ffn_on).flatten() == 0
        assert untouched.any() and torch.equal(out[untouched], x[untouched])


def test_tensor_path_in_training_uses_the_same_subset_trick():
    torch.manual_seed(0)
    block = random_block(0.5).train()
    with torch.no_grad():
        block.ls2.gamma.zero_()  # the FFN branch adds exactly zero: only the attention subset changes rows
    x = torch.randn(6, 5, WIDTH)
    torch.manual_seed(3)
    with torch.no_grad():
        from_tensor = block(x)
    torch.manual_seed(3)
    with torch.no_grad():
        from_list = block.forward_list([x])[0]
    assert torch.equal(from_tensor, from_list)
    assert (from_tensor == x).all(dim=(1, 2)).sum() == 6 - kept_sample_count(6, 0.5)


@pytest.mark.parametrize("branch", ["attention", "ffn"])
def test_the_mean_over_draws_of_a_branch_equals_the_full_residual(branch):
    """E[x + [i kept] (b/s) r_i] = x + r_i because P(i kept) = s/b. One branch is switched off (gamma 0) so
    the block output is that of a single branch. Per image the mean residual is r_i c_i with
    c_i = (b/s) k_i / T, k_i ~ Binomial(T, p), p = s/b: sd(c_i) = sqrt((1 - p) / (p T)), so
    |mean - r_i| <= 5 sd |r_i| fails with probability below 1e-6 per image (and the draws are seeded).
    Residuals (out - x) are summed in float64 so that rounding stays far below that bound."""
    torch.manual_seed(0)
    rate = 0.4
    block = random_block(rate)
    with torch.no_grad():
        (block.ls2 if branch == "attention" else block.ls1).gamma.zero_()
    groups = [torch.randn(8, 5, WIDTH), torch.randn(12, 3, WIDTH)]
    with torch.no_grad():
        full_residuals = [out - x for out, x in zip(block.eval().forward_list(groups), groups, strict=True)]
        block.train()
        totals = [torch.zeros_like(x, dtype=torch.float64) for x in groups]
        for _ in range(NUM_DRAWS):
            for total, out, x in zip(totals, block.forward_list(groups), groups, strict=True):
                total += (out - x).double()
        one_draw = block.forward_list(groups)
    for x, total, residual, single in zip(groups, totals, full_residuals, one_draw, strict=True):
        kept_fraction = kept_sample_count(x.shape[0], rate) / x.shape[0]
        sd = math.sqrt((1 - kept_fraction) / (kept_fraction * NUM_DRAWS))
        error = (total / NUM_DRAWS - residual.double()).abs()
        assert torch.all(error <= SIGMAS * sd * residual.abs().double() + FP32_ATOL)
        assert not torch.allclose(single - x, residual)  # one draw alone is not the mean


def test_gradients_reach_every_block_through_the_dropping_list_path():
    model = tiny_vit(drop_path_rate=0.3).train()
    groups, masks = crop_groups()
    outputs = model.forward_features(groups, masks)
    sum(out["x_norm_clstoken"].square().sum() for out in outputs).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


# The output dicts hold slices of the normed tokens, as the official ones do; FSDP2 warns that in-place
# edits of such views would skip its backward hook. Nothing here edits them.
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_list_path_under_fsdp2_matches_the_plain_model_in_training(tmp_path):
    """Blocks and root sharded as the trainer shards them, called as the student is called
    (`backbone(groups, masks=..., is_training=True)`); the same subset draws give the same step."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_vit(drop_path_rate=0.3).train()
    plain = copy.deepcopy(model)
    groups, masks = crop_groups()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        results = []
        for backbone in (model, plain):
            torch.manual_seed(5)
            outputs = backbone(groups, masks=masks, is_training=True)
            sum(out["x_norm_clstoken"].sum() for out in outputs).backward()
            results.append((outputs, backbone.blocks[0].attn.qkv.weight.grad))
        (sharded, sharded_grad), (expected, expected_grad) = results
        for out, reference in zip(sharded, expected, strict=True):
            assert torch.allclose(out["x_prenorm"], reference["x_prenorm"], atol=FP32_ATOL)
        assert torch.allclose(sharded_grad.full_tensor(), expected_grad, atol=FP32_ATOL)
    finally:
        dist.destroy_process_group()


def test_forward_returns_the_normed_cls_or_the_features_when_training():
    model = tiny_vit().eval()
    groups, masks = crop_groups()
    with torch.no_grad():
        features = model.forward_features(groups[0], masks[0])
        assert torch.equal(model(groups[0], masks[0]), features["x_norm_clstoken"])
        assert torch.equal(model(groups[0], masks[0], is_training=True)["x_prenorm"], features["x_prenorm"])
        as_list = model(groups, masks=masks, is_training=True)
    assert [out["x_norm_patchtokens"].shape[1] for out in as_list] == [16, 4]
