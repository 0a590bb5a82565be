"""A small real scenario for copy detection: Tux Paint photos with planted near copies, seeds and eval.

    pool/    24 originals + near copies of 8 of them (JPEG re-encode, 5% crop, 0.7 shrink),
             a JPEG copy of the seed, and copies of eval images (one chained: a shrink of a JPEG copy)
    seeds/   1 curated original          eval/   4 evaluation originals

Originals are photos of different things (cosine under 0.6 with EfficientNet-Lite0 at 128 px); the
planted copies sit above 0.8, so a threshold of 0.7 separates them with a margin on both sides.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from curation.copydetect.stage import CopyDescriptorConfig
from curation.demo.sources import list_tuxpaint_stamps
from curation.embedders import EmbedderConfig
from curation.ingest import IngestConfig, SourceConfig
from pipelines.images import folder_uri, load_rgb
from pipelines.stage import Manifest, get_stage, run_stage
from pipelines.store import Store

IMAGE_SIDE = 128
NUM_ORIGINALS = 30
POOL_ORIGINALS = 24
JPEG_QUALITY = 70
SHRINK = 0.7
CROP_MARGIN = 20  # 1/20 of each side
PLANTED = ("jpeg", "jpeg", "jpeg", "crop", "crop", "crop", "shrink", "shrink")
TEST_EMBEDDER = EmbedderConfig(kind="efficientnet_lite0", image_size=IMAGE_SIDE, batch_size=16)
TEST_THRESHOLD = 0.7
# The dedup stages load their descriptor from a `copy_descriptor` run: here one that names the embedder.
TEST_DESCRIPTOR = CopyDescriptorConfig(pretrained=TEST_EMBEDDER)
TEST_NEIGHBOURS = 8


@dataclass(frozen=True, slots=True)
class CopyScenario:
    ingest: IngestConfig
    copy_of: dict[str, str]  # planted copy uri -> uri of the image it was made from
    seed_uri: str
    eval_uris: tuple[str, ...]


def _originals() -> list[Image.Image]:
    # Why "symbols": flags and signs of one template look alike to a classifier; photos do not.
    stamps = [stamp for stamp in list_tuxpaint_stamps() if stamp.label != "symbols"]
    picks = stamps[:: len(stamps) // NUM_ORIGINALS][:NUM_ORIGINALS]
    return [ImageOps.contain(load_rgb(stamp.path.read_bytes()), (IMAGE_SIDE, IMAGE_SIDE)) for stamp in picks]


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _crop(image: Image.Image) -> Image.Image:
    dx, dy = image.width // CROP_MARGIN, image.height // CROP_MARGIN
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def _shrink(image: Image.Image) -> Image.Image:
    return image.resize((round(image.width * SHRINK), round(image.height * SHRINK)))


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return folder_uri(path)


COPY_MAKERS = {
    "jpeg": (".jpg", _jpeg),
    "crop": (".png", lambda image: _png(_crop(image))),
    "shrink": (".png", lambda image: _png(_shrink(image))),
}


def write_copy_scenario(root: Path) -> CopyScenario:
    originals = _originals()
    pool = [
        _write(root / "pool" / f"orig_{i:02d}.png", _png(image))
        for i, image in enumerate(originals[:POOL_ORIGINALS])
    ]
    copy_of = {}
    for i, kind in enumerate(PLANTED):
        extension, make = COPY_MAKERS[kind]
        copy_of[_write(root / "pool" / f"copy_{i:02d}_{kind}{extension}", make(originals[i]))] = pool[i]
    seed, eval_images = originals[POOL_ORIGINALS], originals[POOL_ORIGINALS + 1 : POOL_ORIGINALS + 5]
    seed_uri = _write(root / "seeds" / "seed_00.png", _png(seed))
    copy_of[_write(root / "pool" / "copy_seed_jpeg.jpg", _jpeg(seed))] = seed_uri
    evals = [_write(root / "eval" / f"eval_{i}.png", _png(image)) for i, image in enumerate(eval_images)]
    first_copy = _write(root / "pool" / "evalcopy_0_jpeg.jpg", _jpeg(eval_images[0]))
    copy_of[first_copy] = evals[0]
    chained = _shrink(load_rgb(Path(first_copy).read_bytes()))
    copy_of[_write(root / "pool" / "evalcopy_0_jpeg_shrink.png", _png(chained))] = first_copy
    copy_of[_write(root / "pool" / "evalcopy_1_crop.png", _png(_crop(eval_images[1])))] = evals[1]
    sources = (
        SourceConfig(name="seeds", role="curated", kind="folder", path=str(root / "seeds")),
        SourceConfig(name="pool", role="uncurated", kind="folder", path=str(root / "pool")),
        SourceConfig(name="eval", role="eval", kind="folder", path=str(root / "eval")),
    )
    return CopyScenario(IngestConfig(sources=sources, files_per_shard=16), copy_of, seed_uri, tuple(evals))


def ingest_copy_scenario(root: Path) -> tuple[CopyScenario, Store, Manifest]:
    """Writes the scenario under `root/data` and ingests it into `root/store`."""
    built = write_copy_scenario(root / "data")
    store = Store(root / "store")
    ingest = run_stage(get_stage("ingest"), built.ingest, {}, store=store, show_progress=False)
    return built, store, ingest.outputs["images"]


def descriptor_model(store: Store, images: Manifest) -> Manifest:
    """The `copy_descriptor` manifest that names TEST_EMBEDDER (nothing trained): the dedup stages' model."""
    run = run_stage(
        get_stage("copy_descriptor"), TEST_DESCRIPTOR, {"images": images}, store=store, show_progress=False
    )
    return run.outputs["model"]
