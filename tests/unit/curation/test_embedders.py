"""Embedders: a TorchScript file built here (the path an SSCD file takes) and the packaged EfficientNet."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images

from curation.copydetect.stage import CopyDescriptorConfig
from curation.embedders import (
    EmbedderConfig,
    build_embedder,
    embedder_kinds,
    register_embedder,
    weights_fingerprint,
)
from curation.embedders.base import Embedder, square_transform
from pipelines.stage import Manifest, get_stage, stage_key

TINY_DIM = 24
TINY_SIZE = 48


def _photos() -> list[Image.Image]:
    """Two real photos that ship inside scikit-learn (a temple in China, a flower): no download."""
    return [Image.fromarray(pixels) for pixels in load_sample_images().images]


def _near_copy(image: Image.Image) -> Image.Image:
    """A 5% crop off every side, re-encoded as a low-quality JPEG."""
    width, height = image.size
    cropped = image.crop((width // 20, height // 20, width - width // 20, height - height // 20))
    buffer = io.BytesIO()
    cropped.save(buffer, format="JPEG", quality=40)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory):
    """A randomly initialised torchvision ResNet-18 with a TINY_DIM-wide head, traced and saved."""
    torch.manual_seed(0)
    network = torchvision.models.resnet18(weights=None, num_classes=TINY_DIM).eval()
    path = tmp_path_factory.mktemp("weights") / "tiny.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated; SSCD ships it
        torch.jit.save(torch.jit.trace(network, torch.zeros(1, 3, TINY_SIZE, TINY_SIZE)), str(path))
    return path


def test_torchscript_file_gives_deterministic_unit_vectors_of_its_width(torchscript_file):
    cfg = EmbedderConfig(kind="torchscript", path=str(torchscript_file), image_size=TINY_SIZE, batch_size=2)
    embedder = build_embedder(cfg)
    assert embedder.dim == TINY_DIM
    assert build_embedder(cfg) is embedder, "a process loads each model once"
    photos = [*_photos(), Image.new("RGB", (30, 70), (10, 200, 30))]
    vectors = embedder.embed_images(photos)
    assert vectors.shape == (3, TINY_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([embedder.embed_images([photo]) for photo in photos])
    np.testing.assert_allclose(one_by_one, vectors, atol=1e-5)


def test_torchscript_short_side_keeps_aspect_ratio_one_image_per_batch(torchscript_file):
    cfg = EmbedderConfig(
        kind="torchscript", path=str(torchscript_file), resize="short_side", image_size=TINY_SIZE
    )
    embedder = build_embedder(cfg)
    assert embedder.batch_size == 1
    wide = Image.new("RGB", (120, 60), (90, 90, 200))
    assert tuple(embedder.preprocess(wide).shape) == (3, TINY_SIZE, 2 * TINY_SIZE)
    vectors = embedder.embed_images([wide, Image.new("RGB", (40, 100), (200, 90, 90))])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_weights_fingerprint_follows_the_file_content(torchscript_file, tmp_path):
    copied = tmp_path / "copy.pt"
    copied.write_bytes(torchscript_file.read_bytes())
    cfg = EmbedderConfig(kind="torchscript", path=str(copied))
    before = weights_fingerprint(cfg)
    assert before == weights_fingerprint(EmbedderConfig(kind="torchscript", path=str(torchscript_file)))
    copied.write_bytes(torchscript_file.read_bytes() + b"\0")
    assert weights_fingerprint(cfg) != before


@pytest.mark.parametrize("resize", ["square", "short_side"])
def test_efficientnet_puts_a_near_copy_much_closer_than_another_photo(resize):
    embedder = build_embedder(EmbedderConfig(kind="efficientnet_lite0", resize=resize, batch_size=4))
    temple, flower = _photos()
    vectors = embedder.embed_images([temple, _near_copy(temple), flower])
    assert vectors.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    copy_similarity, other_similarity = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert copy_similarity > 0.85 and other_similarity < 0.5, (copy_similarity, other_similarity)


def test_an_unknown_kind_is_refused_when_the_config_is_built_naming_the_registered_ones():
    with pytest.raises(ValueError) as error:
        EmbedderConfig(kind="sscd_from_the_moon")
    assert str(error.value) == (
        f"unknown embedder kind 'sscd_from_the_moon'; registered: {', '.join(embedder_kinds())}"
    )


def _mean_colour(cfg: EmbedderConfig) -> Embedder:
    """A kind registered by a test: the image's mean RGB (a model needs no weights file)."""
    return Embedder(
        dim=3,
        batch_size=cfg.batch_size,
        device=cfg.device,
        transform=square_transform(cfg),
        features=lambda batch: batch.mean(dim=(2, 3)),
    )


def test_a_registered_kind_can_be_named_in_a_config():
    register_embedder("test_mean_colour", _mean_colour, lambda cfg: None)
    assert "test_mean_colour" in embedder_kinds()
    cfg = EmbedderConfig(kind="test_mean_colour", image_size=8)
    (vector,) = build_embedder(cfg).embed_images([Image.new("RGB", (20, 10), (255, 0, 0))])
    assert vector.argmax() == 0 and weights_fingerprint(cfg) == ""


def test_a_weights_file_replaced_in_place_changes_the_stage_key_and_the_loaded_model(
    torchscript_file, tmp_path
):
    # One long-lived process (as `lvd serve`): the first key and model must not be served from a cache.
    path = tmp_path / "replaced.pt"
    path.write_bytes(torchscript_file.read_bytes())
    # The stage that names a user's weights file: copy_descriptor with `pretrained` (an SSCD file, say).
    cfg = CopyDescriptorConfig(
        pretrained=EmbedderConfig(kind="torchscript", path=str(path), image_size=TINY_SIZE)
    )
    descriptor = get_stage("copy_descriptor")
    images = Manifest("/nowhere/images", "images", "digest", 0)
    first_key, first_model = stage_key(descriptor, cfg, {"images": images}), build_embedder(cfg.pretrained)
    torch.manual_seed(1)
    other = torchvision.models.resnet18(weights=None, num_classes=TINY_DIM).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(other, torch.zeros(1, 3, TINY_SIZE, TINY_SIZE)), str(path))
    assert stage_key(descriptor, cfg, {"images": images}) != first_key
    second_model = build_embedder(cfg.pretrained)
    assert second_model is not first_model
    photo = _photos()[0]
    assert not np.allclose(first_model.embed_images([photo]), second_model.embed_images([photo]))
