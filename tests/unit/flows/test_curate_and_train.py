"""The curate-and-train job: its config (presets, checks that name the key), its wiring, and the DAG
machinery with a stage that lives outside lvd's packages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from curation.embedders import embedder_kinds
from flows.cli import main
from flows.curate_and_train import CURATE_AND_TRAIN, CurateAndTrainConfig
from flows.dag import Dag, DagError, node, run_pipeline
from pipelines.config import ConfigError, preset_names
from pipelines.manifest import IMAGES, ManifestSchema
from pipelines.stage import Manifest, StageContext, StageSpec, get_stage, register_stage
from pipelines.validation import require
from tests.helpers import three_source_config
from training.models.vit import ARCHS


def test_every_preset_validates():
    assert "demo" in preset_names()
    for name in preset_names():
        assert isinstance(CURATE_AND_TRAIN.resolve_config(name), CurateAndTrainConfig)


def test_demo_preset_has_every_role():
    roles = {source.role for source in CURATE_AND_TRAIN.resolve_config("demo").ingest.sources}
    assert roles == {"curated", "uncurated", "eval"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"ingest": {"max_pixel": 3}}, "ingest.max_pixel: unknown key; allowed: sources, max_pixels"),
        ({"runtime": {"executor": "spark"}}, "runtime.executor: must be one of 'serial', 'ray', got 'spark'"),
        ({"ingest": {"min_side": 0}}, "ingest: min_side must be >= 1, got 0"),
        (
            {"ingest": {"sources": [{"name": "a", "role": "seed", "kind": "folder", "path": "x"}]}},
            "ingest.sources.0.role: must be one of 'curated', 'uncurated', 'eval', got 'seed'",
        ),
        ({"copy_dedup": {"search": {"shards": 0}}}, "copy_dedup.search: shards must be >= 1, got 0"),
        ({"copy_dedup": {"threshold": -0.5}}, "copy_dedup: threshold must be a cosine in (0, 1), got -0.5"),
        (
            {"decontaminate": {"threshold": 1.0}},
            "decontaminate: threshold must be a cosine in (0, 1), got 1.0",
        ),
        ({"store": ""}, "config: store must name a folder or an fsspec URI, got ''"),
        ({"ingest": {"max_bytes": 0}}, "ingest: max_bytes must be >= 1, got 0"),
        (
            {"retrieve": {"sources": [{"source": "s", "min_query_hits": -3}]}},
            "retrieve.sources.0: min_query_hits must be >= 0, got -3",
        ),
        (
            {"pretrain": {"student": {"arch": "vit_nonexistent"}}},
            "pretrain.student: unknown arch 'vit_nonexistent'",
        ),
        (
            {"distill": {"teacher_arch": {"arch": "vit_nope"}}},
            "distill.teacher_arch: unknown arch 'vit_nope'",
        ),
        (
            {"distill": {"recipe": {"student": {"arch": "vit_nope", "drop_path_rate": 0.0}}}},
            "distill.recipe.student: unknown arch 'vit_nope'",
        ),
        (
            {"embed": {"embedder": {"kind": "vit", "path": "x.pth", "arch": "vit_nope"}}},
            "embed.embedder: unknown arch 'vit_nope'",
        ),
        (
            {"embed": {"embedder": {"kind": "vit", "path": "x.pth", "ffn_layer": "relu"}}},
            "embed.embedder: ffn_layer must be one of mlp, swiglu, swiglufused, got 'relu'",
        ),
        (
            {"embed": {"embedder": {"kind": "vit"}}},
            "embed.embedder: vit embedders need a path to a weights file",
        ),
    ],
)
def test_bad_values_name_the_key_in_one_line(data, message):
    with pytest.raises(ConfigError) as error:
        CURATE_AND_TRAIN.build_config(data)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_every_registered_arch_is_accepted_wherever_an_arch_is_named():
    for arch in ARCHS:  # vit_demo included: the demo's own teacher can be the retrieval embedder
        cfg = CURATE_AND_TRAIN.build_config(
            {
                "embed": {
                    "embedder": {
                        "kind": "vit",
                        "path": "teacher.pth",
                        "arch": arch,
                        "patch_size": 8,
                        "image_size": 48,
                    }
                },
                "pretrain": {"student": {"arch": arch}},
                "distill": {"teacher_arch": {"arch": arch}},
            }
        )
        assert cfg.embed.embedder.arch == cfg.pretrain.student.arch == cfg.distill.teacher_arch.arch == arch


def test_an_unknown_embedder_kind_lists_the_registered_ones():
    with pytest.raises(ConfigError) as error:
        CURATE_AND_TRAIN.build_config({"copy_descriptor": {"pretrained": {"kind": "sscd_magic"}}})
    registered = ", ".join(embedder_kinds())
    assert (
        str(error.value)
        == f"copy_descriptor.pretrained: unknown embedder kind 'sscd_magic'; registered: {registered}"
    )
    assert {"torchscript", "efficientnet_lite0", "vit"} <= set(embedder_kinds())


def test_cli_fails_fast_with_one_line_and_no_traceback(tmp_path, capsys):
    assert main(["run", "--set", "ingest.max_pixel=10", "--set", f"store={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "lvd: error: ingest.max_pixel: unknown key; allowed: sources, max_pixels, min_side, max_bytes, "
        "files_per_shard, row_groups_per_shard"
    ]
    assert not any(tmp_path.iterdir()), "work started before the config was validated"


# -- the wiring -----------------------------------------------------------------------------------------


def test_every_input_is_fed_by_an_earlier_output_of_the_schema_the_stage_declares():
    # Branch nodes follow the main nodes in `all_nodes`, and may read any main node.
    seen: dict[str, Mapping[str, ManifestSchema]] = {}
    for item in CURATE_AND_TRAIN.all_nodes:
        spec = get_stage(item.stage)
        wiring = item.inputs()
        assert list(wiring) == list(spec.inputs), item.stage
        for name, source in wiring.items():
            assert source.stage in seen, f"{item.stage}.{name} reads {source.stage}, which is not earlier"
            assert seen[source.stage][source.output] == spec.inputs[name], f"{item.stage}.{name}"
        seen[item.stage] = spec.outputs
    assert list(seen) == [
        "ingest", "exact_dedup", "phash_dedup", "copy_descriptor", "copy_dedup", "decontaminate", "embed",
        "cluster", "retrieve", "assemble", "pretrain", "distill", "evaluate", "random_pool", "balance",
        "pretrain_random", "pretrain_balanced",
        "ablate_data",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (
            ("copy_dedup.images",),
            r"decontaminate: takes inputs \['images', 'descriptors', 'model'\] but is given 1",
        ),
        (
            ("copy_dedup.images", "copy_dedup.rejected", "copy_descriptor.model"),
            "decontaminate.descriptors takes descriptors v1, but",
        ),
        (
            ("copy_dedup.images", "copy_dedup.vectors", "copy_descriptor.model"),
            "decontaminate.descriptors: copy_dedup has no output",
        ),
        (
            ("copy_dedup.images", "embed.embeddings", "copy_descriptor.model"),
            "decontaminate.descriptors: source embed.embeddings is not",
        ),
    ],
)
def test_a_miswired_dag_fails_when_it_is_built(sources, message):
    nodes = [
        node("ingest"),
        node("copy_descriptor", "ingest.images"),
        node("copy_dedup", "ingest.images", "copy_descriptor.model"),
        node("decontaminate", *sources),
    ]
    with pytest.raises(DagError, match=message):
        Dag("broken", nodes, config_name="BrokenConfig", module=__name__)


def test_two_stages_may_share_a_section_only_with_one_config_type():
    nodes = [node("ingest"), node("exact_dedup", "ingest.images", section="ingest")]
    with pytest.raises(DagError, match="section 'ingest' configures IngestConfig and, for exact_dedup"):
        Dag("broken", nodes, config_name="BrokenConfig", module=__name__)


def test_a_node_of_several_sections_gets_them_gathered_into_its_config_type():
    cfg = CURATE_AND_TRAIN.build_config(
        {"ablate_data": {"replicates": 5}, "pretrain": {"train": {"seed": 7}}}
    )
    gathered = CURATE_AND_TRAIN.config_of(CURATE_AND_TRAIN.node("ablate_data"), cfg)
    assert gathered.ablate_data is cfg.ablate_data and gathered.ablate_data.replicates == 5
    assert gathered.pretrain is cfg.pretrain and gathered.evaluate is cfg.evaluate


def test_the_sections_of_a_node_must_be_its_config_types_fields():
    nodes = [node("ingest"), node("exact_dedup", "ingest.images", section=("exact_dedup", "ingest"))]
    with pytest.raises(DagError, match=r"exact_dedup: reads sections \['exact_dedup', 'ingest'\], but"):
        Dag("broken", nodes, config_name="BrokenConfig", module=__name__)


# -- a stage from outside lvd's packages ----------------------------------------------------------------

SOURCE_COUNTS = ManifestSchema(
    name="source_counts",
    version=1,
    fields=(pa.field("source", pa.string(), nullable=False), pa.field("images", pa.int64(), nullable=False)),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceCountsConfig:
    min_images: int = 1
    """Sources with fewer images are left out."""

    def __post_init__(self) -> None:
        require(self.min_images >= 0, f"min_images must be >= 0, got {self.min_images}")


def count_sources(
    cfg: SourceCountsConfig, inputs: Mapping[str, Manifest], ctx: StageContext
) -> dict[str, Any]:
    counts = pc.value_counts(inputs["images"].read(IMAGES).column("source")).to_pylist()
    rows = [{"source": c["values"], "images": c["counts"]} for c in counts if c["counts"] >= cfg.min_images]
    ctx.write_output("counts", SOURCE_COUNTS.table_from_rows(sorted(rows, key=lambda row: row["source"])))
    return {"sources": len(rows)}


register_stage(
    StageSpec(
        name="test_source_counts",
        version=1,
        config_type=SourceCountsConfig,
        fn=count_sources,
        inputs={"images": IMAGES},
        outputs={"counts": SOURCE_COUNTS},
        description="images per source (a stage defined in a test)",
        shown_stats={"sources": "sources"},
    )
)
COUNTING = Dag(
    "count-sources",
    (node("ingest"), node("test_source_counts", "ingest.images")),
    config_name="CountingConfig",
    module=__name__,
)
CountingConfig = COUNTING.config_type


def test_a_stage_defined_outside_the_packages_runs_through_the_dag_with_its_own_section(tmp_path):
    ingest = three_source_config(tmp_path / "data")
    sources = [{"name": s.name, "role": s.role, "kind": s.kind, "path": s.path} for s in ingest.sources]
    data = {
        "store": str(tmp_path / "store"),
        "runtime": {"show_progress": False},
        "ingest": {"sources": sources},
        "test_source_counts": {"min_images": 12},
    }
    cfg = COUNTING.build_config(data)
    assert cfg.test_source_counts == SourceCountsConfig(min_images=12)
    runs = run_pipeline(COUNTING, cfg)
    counts = runs["test_source_counts"].outputs["counts"].read(SOURCE_COUNTS).to_pylist()
    assert counts == [
        {"source": "pool", "images": 12},
        {"source": "seeds", "images": 12},
        {"source": "web", "images": 12},
    ]
    again = run_pipeline(COUNTING, COUNTING.build_config({**data, "test_source_counts": {"min_images": 13}}))
    assert again["ingest"].reused and not again["test_source_counts"].reused
    assert again["test_source_counts"].outputs["counts"].num_rows == 0
    with pytest.raises(ConfigError, match=r"^test_source_counts: min_images must be >= 0, got -1$"):
        COUNTING.build_config({"test_source_counts": {"min_images": -1}})
