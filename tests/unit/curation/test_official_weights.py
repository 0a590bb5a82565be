"""Published weights by name: the config takes the file's options, the file is fetched once (here from a
server on 127.0.0.1 standing in for the official host), keys the stage by its sha256 and loads strictly."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from curation.embedders import EmbedderConfig, build_embedder, weights_fingerprint
from curation.embedders.official import MIRROR_VARIABLE, OFFICIAL, OFFICIAL_HOST, weights_url
from tests.local_http import Served, serve
from training.models.vit import build_vit

TINY_IMAGE = 28  # 2 x 2 patches of 14 px: a real ViT-S/14, small position table


def pictures(count: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)) for _ in range(count)]


def test_every_official_name_has_the_hub_url_and_options():
    assert weights_url("dinov2_vitl14") == f"{OFFICIAL_HOST}/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    assert weights_url("dinov2_vitg14_reg4") == (
        f"{OFFICIAL_HOST}/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
    )
    sscd = f"{OFFICIAL_HOST}/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
    assert weights_url("sscd_disc_mixup") == sscd
    assert {name for name in OFFICIAL if name.startswith("dinov2")} == {
        f"dinov2_vit{size}14{suffix}" for size in "sblg" for suffix in ("", "_reg4")
    }
    cfg = EmbedderConfig(weights="dinov2_vitl14_reg4")
    assert (cfg.kind, cfg.arch, cfg.patch_size, cfg.num_register_tokens) == ("vit", "vit_large", 14, 4)
    assert (cfg.interpolate_offset, cfg.interpolate_antialias) == (0.0, True)
    assert EmbedderConfig(weights="sscd_disc_large").kind == "torchscript"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weights": "dinov2_vits14", "arch": "vit_large"}, "need arch 'vit_small', not 'vit_large'"),
        ({"weights": "dinov2_vits14", "path": "x.pth"}, "set either path or weights"),
        ({"weights": "sscd_disc_mixup", "kind": "vit"}, "need kind 'torchscript', not 'vit'"),
        ({"weights": "dinov2_vitx14"}, "unknown weights 'dinov2_vitx14'; known: dinov2_vits14"),
    ],
)
def test_a_config_that_contradicts_its_named_weights_says_so(options, message):
    with pytest.raises(ValueError, match=message):
        EmbedderConfig(**options)


def test_sscd_by_name_downloads_once_keys_by_sha256_and_embeds(tmp_path, monkeypatch):
    buffer = io.BytesIO()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    torch.jit.save(torch.jit.script(model.eval()), buffer)
    content = buffer.getvalue()
    served = Served({"/sscd-copy-detection/sscd_disc_mixup.torchscript.pt": content})
    with serve(served) as base:
        monkeypatch.setenv(MIRROR_VARIABLE, base)
        cfg = EmbedderConfig(weights="sscd_disc_mixup", weights_cache=str(tmp_path), image_size=16)
        assert weights_fingerprint(cfg) == hashlib.sha256(content).hexdigest()
        vectors = build_embedder(cfg).embed_images(pictures())
        build_embedder(cfg)
    assert len(served.requests) == 1  # the cache serves every later use
    assert (tmp_path / "sscd_disc_mixup.torchscript.pt").read_bytes() == content
    assert vectors.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_a_dinov2_backbone_by_name_loads_strictly_with_the_official_options(tmp_path, monkeypatch):
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=14, img_size=TINY_IMAGE, num_register_tokens=4).eval()
    buffer = io.BytesIO()
    torch.save(backbone.state_dict(), buffer)
    served = Served({"/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth": buffer.getvalue()})
    with serve(served) as base:
        monkeypatch.setenv(MIRROR_VARIABLE, base)
        cfg = EmbedderConfig(weights="dinov2_vits14_reg4", weights_cache=str(tmp_path), image_size=TINY_IMAGE)
        embedder = build_embedder(cfg)
    images = pictures()
    with torch.no_grad():
        batch = torch.stack([embedder.preprocess(image) for image in images])
        expected = torch.nn.functional.normalize(backbone.forward_features(batch)["x_norm_clstoken"], dim=1)
    np.testing.assert_allclose(embedder.embed_images(images), expected.numpy(), atol=1e-5)
