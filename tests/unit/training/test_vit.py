"""The backbone: official key layout and sizes, strict reload, token preparation, outputs."""

from __future__ import annotations

import pytest
import torch

from training.models.layers import swiglu_hidden
from training.models.vit import ARCHS, build_vit

HUB_IMG_SIZE = 518  # the official hub backbones carry a 37 x 37 position grid
PER_BLOCK_KEYS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ls1.gamma",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "ls2.gamma",
)


def test_vit_small_hub_layout_has_the_official_175_keys():
    model = build_vit("vit_small", img_size=HUB_IMG_SIZE, layerscale_init=1.0)
    expected = {
        "cls_token",
        "pos_embed",
        "mask_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    }
    expected |= {f"blocks.{i}.{key}" for i in range(12) for key in PER_BLOCK_KEYS}
    state = model.state_dict()
    assert set(state) == expected and len(state) == 175
    assert state["pos_embed"].shape == (1, 1370, 384)
    assert state["blocks.3.attn.qkv.weight"].shape == (3 * 384, 384)


@pytest.mark.parametrize(
    ("arch", "millions"),
    [("vit_small", 22.06), ("vit_base", 86.58), ("vit_large", 304.37), ("vit_giant2", 1136.48)],
)
def test_parameter_counts_match_the_official_models(arch, millions):
    with torch.device("meta"):  # sizes only: no memory for a billion parameters
        model = build_vit(arch, img_size=HUB_IMG_SIZE)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_giant_uses_the_fused_swiglu_layout():
    assert swiglu_hidden(1536) == 4096
    with torch.device("meta"):
        block = build_vit("vit_giant2").blocks[0]
    assert block.mlp.w12.weight.shape == (8192, 1536) and block.mlp.w3.weight.shape == (1536, 4096)


def test_a_saved_state_dict_reloads_strict_and_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    source = build_vit("vit_test", img_size=56, num_register_tokens=4, interpolate_offset=0.0).eval()
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    target = build_vit("vit_test", img_size=56, num_register_tokens=4, interpolate_offset=0.0).eval()
    target.load_state_dict(torch.load(path, weights_only=True), strict=True)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(source(images), target(images))


def test_forward_features_shapes_with_registers_at_another_resolution():
    model = build_vit("vit_test", img_size=56, num_register_tokens=4).eval()
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 42, 70))
    assert out["x_norm_clstoken"].shape == (2, 64)
    assert out["x_norm_regtokens"].shape == (2, 4, 64)
    assert out["x_norm_patchtokens"].shape == (2, 3 * 5, 64)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 15, 64)


def test_mask_token_replaces_patches_before_position_embedding_and_registers_have_none():
    torch.manual_seed(0)
    model = build_vit("vit_test", img_size=28, num_register_tokens=2).eval()
    torch.nn.init.normal_(model.mask_token)
    images = torch.randn(1, 3, 28, 28)
    masks = torch.tensor([[True, False, False, True]])
    tokens = model.prepare_tokens(images, masks)
    pos = model.pos_embed[0]
    assert torch.allclose(tokens[0, 3], model.mask_token[0] + pos[1])  # [CLS, reg, reg, patch 0, ...]
    assert torch.allclose(tokens[0, 6], model.mask_token[0] + pos[4])
    assert torch.equal(tokens[0, 1:3], model.register_tokens[0])
    assert torch.allclose(tokens[0, 0], model.cls_token[0, 0] + pos[0])


def test_position_table_is_untouched_at_the_training_grid_and_resized_elsewhere():
    model = build_vit("vit_test", img_size=224)
    assert torch.equal(model.interpolate_pos_encoding(224, 224, torch.float32), model.pos_embed)
    local = model.interpolate_pos_encoding(98, 98, torch.float32)
    assert local.shape == (1, 1 + 7 * 7, 64)
    by_size = build_vit("vit_test", img_size=224, interpolate_offset=0.0)
    by_size.load_state_dict(model.state_dict())
    # The offset form maps source coordinates with scale (7 + 0.1) / 16, so it differs from a size resize.
    assert not torch.allclose(local, by_size.interpolate_pos_encoding(98, 98, torch.float32))
    assert torch.equal(local[:, 0], model.pos_embed[:, 0])


def test_unknown_arch_and_bad_sizes_fail_clearly():
    with pytest.raises(ValueError, match="unknown arch"):
        build_vit("vit_tiny")
    with pytest.raises(ValueError, match="not a multiple"):
        build_vit("vit_test").forward_features(torch.randn(1, 3, 30, 28))
    assert set(ARCHS) >= {"vit_small", "vit_base", "vit_large", "vit_giant2", "vit_huge", "vit_test"}


def manual_block_outputs(model, images):
    """Every block's output, by running the blocks one by one on the prepared tokens."""
    x = model.prepare_tokens(images)
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(x)
    return outputs


def test_intermediate_layers_are_the_last_blocks_normed_without_cls_and_registers():
    torch.manual_seed(0)
    model = build_vit("vit_test", img_size=56, num_register_tokens=3).eval()
    images = torch.randn(2, 3, 42, 70)  # 3 x 5 patches
    first_patch = 1 + 3
    with torch.no_grad():
        blocks = manual_block_outputs(model, images)
        last = model.get_intermediate_layers(images)
        both = model.get_intermediate_layers(images, n=2)
        listed = model.get_intermediate_layers(images, n=[0], norm=False)
        features = model.forward_features(images)
    assert len(last) == 1 and torch.allclose(last[0], features["x_norm_patchtokens"], atol=1e-6)
    assert len(both) == 2
    for out, block_out in zip(both, blocks, strict=True):
        assert torch.allclose(out, model.norm(block_out)[:, first_patch:], atol=1e-6)
    assert torch.equal(listed[0], blocks[0][:, first_patch:])


def test_intermediate_layers_reshape_to_a_grid_and_return_class_tokens():
    torch.manual_seed(0)
    model = build_vit("vit_test", img_size=56, num_register_tokens=1).eval()
    images = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        ((grid, cls),) = model.get_intermediate_layers(images, reshape=True, return_class_token=True)
        (flat,) = model.get_intermediate_layers(images)
        normed_last = model.norm(manual_block_outputs(model, images)[-1])
    assert grid.shape == (2, 64, 3, 5)
    row, column = 2, 4
    assert torch.equal(grid[:, :, row, column], flat[:, row * 5 + column])
    assert torch.allclose(cls, normed_last[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="block indices"):
        model.get_intermediate_layers(images, n=[2])
