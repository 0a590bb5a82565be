"""The copy descriptor: augmentations reproducible, training separates copies from other images, and the
exported TorchScript file gives the same descriptors in a process that cannot import lvd."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import ImageOps

from curation.copydetect.augment import held_out_copy, to_tensor, training_view
from curation.copydetect.model import build_descriptor_net, export_torchscript
from curation.copydetect.stage import CopyDescriptorConfig, descriptor_embedder
from curation.copydetect.train import DescriptorTrainConfig, mix_batch, train_descriptor
from curation.demo.sources import list_tuxpaint_stamps
from pipelines.images import load_rgb
from pipelines.stage import get_stage, run_stage
from pipelines.store import Store
from tests.unit.curation.copy_scenario import ingest_copy_scenario

SIZE = 64
NUM_IMAGES = 16


@pytest.fixture(scope="module")
def photos():
    stamps = [stamp for stamp in list_tuxpaint_stamps() if stamp.label != "symbols"]
    picks = stamps[:: len(stamps) // NUM_IMAGES][:NUM_IMAGES]
    return [ImageOps.contain(load_rgb(stamp.path.read_bytes()), (96, 96)) for stamp in picks]


def test_views_and_copies_are_reproducible_from_their_seed(photos):
    first = training_view(photos[0], np.random.default_rng(3), SIZE)
    again = training_view(photos[0], np.random.default_rng(3), SIZE)
    other = training_view(photos[0], np.random.default_rng(4), SIZE)
    assert first.shape == (3, SIZE, SIZE) and torch.equal(first, again) and not torch.equal(first, other)
    copy = held_out_copy(photos[1], np.random.default_rng(5))
    assert np.array_equal(np.asarray(copy), np.asarray(held_out_copy(photos[1], np.random.default_rng(5))))
    assert copy.mode == "RGB"


def test_a_mixed_view_shows_both_images_and_names_both_as_sources():
    views = torch.stack([torch.full((3, 4, 4), float(value)) for value in range(4)])
    sources = torch.eye(4)
    mixed, mixed_sources = mix_batch(views, sources, 1.0, np.random.default_rng(0))
    # Every view is paired with the mirrored one: 0 with 3, 1 with 2.
    for position, partner in ((0, 3), (1, 2), (2, 1), (3, 0)):
        assert mixed_sources[position].tolist() == (sources[position] + sources[partner]).tolist()
        # Mix-up: a blend strictly between the two; cut-mix: a box of the partner's pixels.
        values = mixed[position].unique()
        low, high = min(position, partner), max(position, partner)
        assert not torch.equal(mixed[position], views[position])
        assert bool(((values >= low) & (values <= high)).all())
    assert torch.equal(
        views, torch.stack([torch.full((3, 4, 4), float(v)) for v in range(4)])
    )  # not in place


def _margins(net, photos) -> np.ndarray:
    """Per image: cosine with its held-out copy minus the highest cosine with another image."""
    rng = np.random.default_rng(11)
    with torch.inference_mode():
        originals = net(torch.stack([to_tensor(p.resize((SIZE, SIZE))) for p in photos]))
        copies = net(torch.stack([to_tensor(held_out_copy(p, rng).resize((SIZE, SIZE))) for p in photos]))
    similarity = (copies @ originals.T).numpy()
    positive = np.diag(similarity).copy()
    np.fill_diagonal(similarity, -np.inf)
    return positive - similarity.max(axis=1)


def test_training_raises_copies_above_the_hardest_other_image(photos, tmp_path):
    torch.manual_seed(0)
    net = build_descriptor_net("efficientnet_lite0", trainable_blocks=2, dim=64, gem_p=3.0)
    before = _margins(net.eval(), photos)
    cfg = DescriptorTrainConfig(steps=40, batch_size=8, learning_rate=1e-3, seed=0)
    history = train_descriptor(net, photos, SIZE, cfg, show_progress=False)
    after = _margins(net, photos)
    assert history[-1].loss < history[0].loss
    assert after.mean() > before.mean() + 0.05
    assert (after > 0).mean() >= 0.75  # most copies now beat every other image

    path = export_torchscript(net, SIZE, tmp_path / "descriptor.pt")
    batch = torch.randn(3, 3, SIZE, SIZE)
    torch.save(batch, tmp_path / "batch.pt")
    with torch.inference_mode():
        expected = net(batch)
    # A fresh interpreter in which lvd's packages cannot be imported: the file must stand alone.
    script = textwrap.dedent(
        f"""
        import sys
        class NoLvd:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"curation", "pipelines", "training", "distillation", "flows"}}:
                    raise ImportError("lvd is not importable here: " + name)
        sys.meta_path.insert(0, NoLvd())
        import torch
        model = torch.jit.load({str(path)!r})
        out = model(torch.load({str(tmp_path / "batch.pt")!r}))
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    loaded = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.linalg.norm(loaded, dim=1), torch.ones(3), atol=1e-5, rtol=0)


def test_the_trained_model_depends_on_its_config_alone_not_on_the_process_random_state(tmp_path):
    _, _, images = ingest_copy_scenario(tmp_path)
    cfg = CopyDescriptorConfig(
        image_size=SIZE, trainable_blocks=1, train=DescriptorTrainConfig(steps=2, batch_size=4)
    )
    weights, recorded = [], []
    for seed in (1, 2):  # what ran before in the process left torch's generator somewhere else
        torch.manual_seed(seed)
        run = run_stage(
            get_stage("copy_descriptor"), cfg, {"images": images}, store=Store(tmp_path / f"s{seed}")
        )
        path = descriptor_embedder(run.outputs["model"]).path
        weights.append(torch.jit.load(path).state_dict())
        recorded.append(run.outputs["model"].read().column("sha256")[0].as_py())
    # The manifest records the weights' sha256, not the file's: a second trace in one process names its
    # classes apart, so the same weights make other file bytes.
    assert recorded[0] == recorded[1]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
