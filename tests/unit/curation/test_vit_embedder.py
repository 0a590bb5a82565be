"""The `vit` embedder: official DINOv2 hub key names load with strict=True, and so do teacher snapshots."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from curation.embedders import EmbedderConfig, build_embedder
from curation.embedders.vit import hub_state_dict
from tests.helpers import png_bytes
from training.models.vit import build_vit

# The hub's own grid: 518 px at patch 14 is 37 x 37 patches (pos_embed of 1370 tokens).
HUB_IMAGE_SIZE = 518
EMBED_SIZE = 56
FP32_TOLERANCE = 1e-5


def _images(count: int = 3) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(png_bytes(seed, size=(60 + seed, 50)))).convert("RGB") for seed in range(count)
    ]


def _hub_backbone(num_register_tokens: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit(
        "vit_test", patch_size=14, img_size=HUB_IMAGE_SIZE, num_register_tokens=num_register_tokens
    ).eval()


def _cfg(path, **options) -> EmbedderConfig:
    return EmbedderConfig(
        **{"kind": "vit", "arch": "vit_test", "path": str(path), "image_size": EMBED_SIZE, **options}
    )


def _reference(model: torch.nn.Module, embedder, images) -> np.ndarray:
    """The saved model run directly on the embedder's preprocessing: normalised x_norm_clstoken."""
    with torch.inference_mode():
        batch = torch.stack([embedder.preprocess(image) for image in images])
        tokens = model.forward_features(batch)["x_norm_clstoken"]
    return torch.nn.functional.normalize(tokens, dim=1).numpy()


def test_hub_state_dict_loads_strictly_and_embeds_unit_vectors(tmp_path):
    model = _hub_backbone()
    state = model.state_dict()
    # The official key names and grid, as in dinov2_vits14_pretrain.pth.
    assert {"cls_token", "pos_embed", "mask_token", "blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma"} <= set(
        state
    )
    assert state["pos_embed"].shape[1] == 1 + 37 * 37
    path = tmp_path / "dinov2_vittest14_pretrain.pth"
    torch.save(state, path)
    for resize in ("short_side", "square"):
        embedder = build_embedder(_cfg(path, resize=resize))
        images = _images()
        vectors = embedder.embed_images(images)
        assert vectors.shape == (3, 64) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=FP32_TOLERANCE)
        np.testing.assert_allclose(vectors, _reference(model, embedder, images), atol=FP32_TOLERANCE)
        assert embedder.preprocess(images[0]).shape == (3, EMBED_SIZE, EMBED_SIZE)


def test_teacher_snapshot_with_chunked_blocks_embeds_like_the_hub_file(tmp_path):
    model = _hub_backbone(num_register_tokens=4)
    hub_path, teacher_path = tmp_path / "hub.pth", tmp_path / "teacher_checkpoint.pth"
    torch.save(model.state_dict(), hub_path)
    teacher = {}
    for name, tensor in model.state_dict().items():
        # block_chunks=2: blocks 0 and 1 of vit_test land in chunks 0 and 1, as FSDP wrapping writes them.
        chunked = name.replace("blocks.0.", "blocks.0.0.").replace("blocks.1.", "blocks.1.1.")
        teacher[f"backbone.{chunked}"] = tensor
    teacher["dino_head.mlp.0.weight"] = torch.zeros(8, 64)
    teacher["dino_head.last_layer.weight_g"] = torch.ones(16, 1)
    torch.save({"teacher": teacher}, teacher_path)
    assert set(hub_state_dict(torch.load(teacher_path, weights_only=True))) == set(model.state_dict())
    images = _images()
    options = {"num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}
    from_hub = build_embedder(_cfg(hub_path, **options)).embed_images(images)
    from_teacher = build_embedder(_cfg(teacher_path, **options)).embed_images(images)
    np.testing.assert_allclose(from_teacher, from_hub, atol=FP32_TOLERANCE)


def test_mismatched_architecture_or_file_says_how_to_fix_it(tmp_path):
    path = tmp_path / "hub.pth"
    torch.save(_hub_backbone().state_dict(), path)
    with pytest.raises(ValueError, match="num_register_tokens"):
        build_embedder(_cfg(path, num_register_tokens=4))
    with pytest.raises(ValueError, match="ffn_layer"):
        build_embedder(_cfg(path, ffn_layer="swiglufused"))
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a ViT backbone file"):
        build_embedder(_cfg(other))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        _cfg(path, image_size=50)
    with pytest.raises(ValueError, match="need a path"):
        EmbedderConfig(kind="vit")
    with pytest.raises(ValueError, match=r"unknown arch 'vit_tiny'; known: vit_test, vit_demo"):
        EmbedderConfig(kind="vit", path=str(path), arch="vit_tiny")
