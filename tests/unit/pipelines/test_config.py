"""Config: presets, files, overrides, and one-line errors that name the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import (
    ConfigError,
    IngestConfig,
    PipelineConfig,
    apply_overrides,
    build_config,
    preset_names,
    resolve_config,
)


def test_every_preset_validates():
    assert "demo" in preset_names()
    for name in preset_names():
        assert isinstance(resolve_config(name), PipelineConfig)


def test_demo_preset_has_every_role():
    roles = {source.role for source in resolve_config("demo").ingest.sources}
    assert roles == {"curated", "uncurated", "eval"}


def test_overrides_are_typed_and_reach_nested_list_items():
    cfg = resolve_config(
        "demo", overrides=["ingest.max_pixels=1000", "runtime.executor=serial", "ingest.sources.0.path=/x"]
    )
    assert cfg.ingest.max_pixels == 1000 and cfg.runtime.executor == "serial"
    assert cfg.ingest.sources[0].path == "/x"
    assert apply_overrides({"a": {"b": 1}}, {"a.c": [1, 2]}) == {"a": {"b": 1, "c": [1, 2]}}


def test_file_layers_over_the_preset(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"ingest": {"min_side": 32}, "store": "s3://bucket/lvd"}))
    cfg = resolve_config("demo", config_file=path, overrides=["ingest.min_side=8"])
    assert cfg.store == "s3://bucket/lvd" and cfg.ingest.min_side == 8
    assert cfg.ingest.sources  # the preset's sources survive a file that does not mention them


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"ingest": {"max_pixel": 3}}, "ingest.max_pixel: unknown key; allowed: sources, max_pixels"),
        ({"runtime": {"executor": "spark"}}, "runtime.executor: must be one of 'serial', 'ray', got 'spark'"),
        ({"ingest": {"min_side": "big"}}, "ingest.min_side: expected an integer, got 'big'"),
        ({"ingest": {"min_side": 0}}, "ingest: min_side must be >= 1, got 0"),
        (
            {"ingest": {"sources": [{"name": "a", "role": "seed", "kind": "folder", "path": "x"}]}},
            "ingest.sources.0.role: must be one of 'curated', 'uncurated', 'eval', got 'seed'",
        ),
        (
            {"ingest": {"sources": [{"name": "a", "role": "eval", "kind": "folder", "path": "x"}] * 2}},
            "source names must be unique, repeated: ['a']",
        ),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as error:
        build_config(data)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_defaults_are_valid():
    assert build_config({}).ingest == IngestConfig()


def test_cli_fails_fast_with_one_line_and_no_traceback(tmp_path):
    lvd = Path(sys.executable).parent / "lvd"
    result = subprocess.run(
        [str(lvd), "run", "--set", "ingest.max_pixel=10", "--set", f"store={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lvd: error: ingest.max_pixel: unknown key; allowed: sources, max_pixels, min_side, files_per_shard, "
        "row_groups_per_shard"
    ]
    assert not any(tmp_path.iterdir()), "work started before the config was validated"
