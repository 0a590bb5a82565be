"""The report page on a real store (ingest and exact dedup committed), and its HTML and table pieces."""

from __future__ import annotations

import base64
import io
import re
import shutil

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curation.assemble import composition_view
from curation.retrieve import COMPOSITION
from flows import prefect_flows
from flows.cli import main
from flows.curate_and_train import CURATE_AND_TRAIN
from flows.dag import run_pipeline
from flows.report import (
    NOT_RUN,
    StageRow,
    build_report,
    html_figure,
    html_table,
    report_markdown,
    report_runs,
    stage_row,
    stage_section,
    stage_table,
)
from pipelines.stage import Manifest, StageRun
from pipelines.store import Store
from pipelines.views import table_view
from tests.helpers import three_source_config
from training.ablate import ABLATION_RESULTS
from training.eval.results import EVAL_RESULTS, accuracy_view

IMAGES_WRITTEN = 36  # three_source_config's distinct images
COMMITTED = ("ingest", "exact_dedup")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """36 distinct images, a file that is not an image, and in an uncurated folder an exact copy of a
    seed image; the config file and the runs of ingest and exact_dedup."""
    root = tmp_path_factory.mktemp("report")
    ingest = three_source_config(root / "data")
    seeds = root / "data" / "folder"
    (seeds / "broken.jpg").write_text("not a jpeg")
    copies = root / "data" / "copies"
    copies.mkdir()
    shutil.copy(next(seeds.rglob("*.png")), copies / "copy.png")
    config_file = root / "job.yaml"
    sources = [{"name": s.name, "role": s.role, "kind": s.kind, "path": s.path} for s in ingest.sources]
    sources.append({"name": "copies", "role": "uncurated", "kind": "folder", "path": str(copies)})
    config_file.write_text(
        yaml.safe_dump(
            {
                "store": str(root / "store"),
                "runtime": {"executor": "serial", "show_progress": False},
                "ingest": {"sources": sources, "files_per_shard": 5},
            }
        )
    )
    cfg = CURATE_AND_TRAIN.resolve_config("demo", str(config_file), [])
    return root, config_file, cfg, run_pipeline(CURATE_AND_TRAIN, cfg, until=COMMITTED[-1])


def test_report_runs_resolve_the_dag_keys_and_leave_the_rest_not_run(job):
    _, _, cfg, runs = job
    found = report_runs(cfg, Store(cfg.store))
    assert [found[stage].key for stage in COMMITTED] == [runs[stage].key for stage in COMMITTED]
    later = [node.stage for node in CURATE_AND_TRAIN.nodes if node.stage not in COMMITTED]
    assert all(found[stage] is None for stage in later)
    assert list(found) == [node.stage for node in CURATE_AND_TRAIN.nodes]  # no ablation: it never ran


def _cells(page: str, stage: str) -> list[str]:
    row = re.search(rf"<tr><td>{stage}</td>(.*?)</tr>", page).group(1)
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


def test_page_is_self_contained_with_the_stage_table_and_the_duplicate_sheet(job):
    root, _, cfg, runs = job
    page = build_report(cfg, root / "out" / "report.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    png = base64.b64decode(sources[0].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).format == "PNG"
    # ingest: every file in, the broken one rejected; exact dedup: the copy rejected.
    assert _cells(page, "ingest") == [
        "committed",
        f"{IMAGES_WRITTEN + 2}",
        f"images {IMAGES_WRITTEN + 1}, rejected 1",
        "not_an_image 1",
        f"{runs['ingest'].record['timings']['seconds']:.1f}",
    ]
    assert _cells(page, "exact_dedup")[:4] == [
        "committed",
        f"{IMAGES_WRITTEN + 1}",
        f"images {IMAGES_WRITTEN}, rejected 1",
        "exact_duplicate 1",
    ]
    assert _cells(page, "evaluate")[0] == NOT_RUN
    for anchor in ["stages", *(node.stage for node in CURATE_AND_TRAIN.nodes)]:
        assert f'href="#{anchor}"' in page and f'<section id="{anchor}">' in page
    # Each stage shows the counts it declares: exact_dedup's dedup counts, from its own stats.
    exact = re.search(r'<section id="exact_dedup">(.*?)</section>', page).group(1)
    assert f"images in {IMAGES_WRITTEN + 1}, duplicate groups 1, images in groups 2" in exact


def test_report_markdown_has_the_stage_table_and_the_page_location(job):
    root, _, cfg, _ = job
    path = root / "store" / "report.html"
    markdown = report_markdown(cfg, path)
    assert f"| ingest | committed | {IMAGES_WRITTEN + 2} |" in markdown
    assert "| pretrain | not run |" in markdown and "random_pool" not in markdown
    assert path.resolve().as_uri() in markdown


def test_cli_report_writes_the_page_and_says_where(job, capsys):
    root, config_file, _, _ = job
    out = root / "cli" / "page.html"
    assert main(["report", "--config", str(config_file), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out.replace("\n", "")
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_html_table_escapes_every_cell_and_marks_numbers():
    page = html_table(table_view("t", ["<name>"], [["a & <b>"], ["1,234.5"]]))
    assert "<name>" not in page and "&lt;name&gt;" in page
    assert "<b>" not in page and "a &amp; &lt;b&gt;" in page
    assert '<td class="num">1,234.5</td>' in page


def test_html_figure_inlines_the_png_bytes_and_escapes_the_caption():
    png = b"\x89PNG fake bytes"
    figure = html_figure(png, 'a "quoted" <caption>')
    source = re.search(r'src="data:image/png;base64,([^"]*)"', figure).group(1)
    assert base64.b64decode(source) == png
    assert "&quot;quoted&quot; &lt;caption&gt;" in figure


def test_rows_in_count_the_main_input_of_the_stage_not_the_first_recorded_one():
    # Records keep their inputs in name order; retrieve's main input, embeddings, comes last there.
    record = {
        "inputs": {
            "assignments": {"num_rows": 70},
            "centroids": {"num_rows": 32},
            "embeddings": {"num_rows": 108},
        },
        "stats": {},
        "timings": {"seconds": 0.5},
    }
    assert stage_row("retrieve", StageRun("retrieve", "key", "uri", {}, record, True)).rows_in == 108


def test_stage_table_totals_the_seconds_of_committed_stages():
    rows = [
        StageRow("ingest", "committed", 10, {"images": 9, "rejected": 1}, {"too_small": 1}, 1.25),
        StageRow("embed", "committed", 9, {"embeddings": 9}, {}, 2.5),
        StageRow("pretrain", NOT_RUN, None, {}, {}, None),
    ]
    view = stage_table(rows)
    assert view.header[-1] == "seconds"
    assert view.rows[0] == ("ingest", "committed", "10", "images 9, rejected 1", "too_small 1", "1.2")
    assert view.rows[2] == ("pretrain", NOT_RUN, "", "", "", "")
    assert view.rows[-1] == ("total", "", "", "", "", f"{1.25 + 2.5:.1f}")


def _results_rows() -> list[dict]:
    common = {"dataset": "fashion_mnist", "parameters": 1234567}
    return [
        {**common, "model": "teacher", "protocol": "knn", "setting": "k=10", "top1": 0.5512},
        {**common, "model": "teacher", "protocol": "knn", "setting": "k=20", "top1": 0.5601},
        {**common, "model": "teacher", "protocol": "linear", "setting": "cls_last1 lr=0.1", "top1": 0.7},
        {**common, "model": "student", "protocol": "knn", "setting": "k=10", "top1": 0.4},
    ]


def test_accuracy_view_gives_percent_per_k_and_the_probe():
    view = accuracy_view(EVAL_RESULTS.table_from_rows(_results_rows()), "top-1")
    assert view.header == ("model", "params", "k-NN k=10", "k-NN k=20", "linear", "probe")
    assert view.rows == (
        ("teacher", "1,234,567", "55.1", "56.0", "70.0", "cls_last1 lr=0.1"),
        ("student", "1,234,567", "40.0", "", "", ""),
    )


def test_composition_table_follows_table_15_with_a_total():
    rows = [
        {"seed_source": "seeds", "mode": "as_is", "seed_images": 12, "retrieved": None, "final": 12},
        {"seed_source": "seeds", "mode": "sample", "seed_images": 12, "retrieved": 1500, "final": 1200},
    ]
    view = composition_view(COMPOSITION.table_from_rows(rows))
    assert view.header == ("seed set", "retrieval", "images", "retrieved", "final")
    assert view.rows == (
        ("seeds", "as_is", "12", "", "12"),
        ("seeds", "sample", "12", "1,500", "1,200"),
        ("total", "", "", "", "1,212"),
    )


def test_a_stage_section_shows_the_tables_its_stage_declares(tmp_path):
    common = {"dataset": "fashion_mnist", "parameters": 1234567, "protocol": "knn", "setting": "k=10"}
    top1 = {
        ("curated", 0): 0.55,
        ("curated", 1): 0.57,
        ("uncurated random", 0): 0.50,
        ("uncurated random", 1): 0.54,
        ("balanced", 0): 0.49,
        ("balanced", 1): 0.55,
    }
    rows = [
        {**common, "model": model, "replicate": replicate, "top1": value}
        for (model, replicate), value in top1.items()
    ]
    rows.append({**common, "model": "raw_pixels", "replicate": None, "top1": 0.6})
    results = ABLATION_RESULTS.table_from_rows(rows)
    (tmp_path / "results").mkdir()
    pq.write_table(results, tmp_path / "results" / "part-all.parquet")
    manifest = Manifest(str(tmp_path / "results"), "ablation_results", "digest", results.num_rows)
    record = {"artifacts": [], "stats": {"replicates": 2}}
    run = StageRun("ablate_data", "key", str(tmp_path), {"results": manifest}, record, True)
    section = stage_section("ablate_data", run, Store(tmp_path))
    assert "2 replicates per arm" in section.body
    # curated 55, 57: 56.0 +- 1.4; random 50, 54: 52.0 +- 2.8; paired differences 5, 3: +4.0 +- 1.4;
    # balanced 49, 55: 52.0 +- 4.2, differences from random -1, 1: +0.0 +- 1.4.
    for cell in ("k-NN k=10", "56.0 ± 1.4", "52.0 ± 2.8", "60.0", "+4.0 ± 1.4", "52.0 ± 4.2", "+0.0 ± 1.4"):
        assert f">{cell}</td>" in section.body, cell
    assert NOT_RUN in stage_section("ablate_data", None, Store(tmp_path)).body


def test_flow_report_task_writes_the_page_in_the_store_and_publishes_its_summary(job, monkeypatch):
    root, _, cfg, _ = job
    published = []
    monkeypatch.setattr(prefect_flows, "create_markdown_artifact", lambda **kwargs: published.append(kwargs))
    prefect_flows.report_task.fn(cfg)
    page = root / "store" / "report.html"
    assert page.read_text().startswith("<!DOCTYPE html>")
    (artifact,) = published
    assert artifact["key"] == prefect_flows.REPORT_ARTIFACT_KEY
    assert (
        "| exact_dedup | committed |" in artifact["markdown"]
        and page.resolve().as_uri() in artifact["markdown"]
    )
