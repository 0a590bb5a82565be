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

from curation.embedders import build_embedder, embedder_kinds, weights_fingerprint
from pipelines.config import EmbedderConfig

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


def test_unknown_kind_names_the_registered_ones():
    assert {"torchscript", "efficientnet_lite0"} <= set(embedder_kinds())
    cfg = EmbedderConfig(kind="efficientnet_lite0")
    object.__setattr__(cfg, "kind", "sscd_from_the_moon")  # past config validation, as a new kind would be
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        build_embedder(cfg)
