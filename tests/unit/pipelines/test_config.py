"""The generic config machinery on configs of its own: typed loading, job config types, overrides, files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipelines.config import (
    DEFAULT_STORE,
    ConfigError,
    RuntimeConfig,
    apply_overrides,
    build_config,
    job_config_type,
    preset_names,
    resolve_config,
)
from pipelines.validation import require


@dataclass(frozen=True, kw_only=True, slots=True)
class Item:
    name: str
    weight: float = 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Section:
    mode: Literal["fast", "exact"] = "fast"
    count: int = 2
    enabled: bool = True
    items: tuple[Item, ...] = ()
    note: str | None = None

    def __post_init__(self) -> None:
        require(self.count >= 1, f"count must be >= 1, got {self.count}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Other:
    item: Item = field(default_factory=lambda: Item(name="default"))


JobConfig = job_config_type("JobConfig", {"section": Section, "other": Other}, __name__)


def test_plain_data_builds_typed_nested_values():
    data = {"mode": "exact", "count": 3, "items": [{"name": "a", "weight": 2}], "note": None}
    assert build_config(Section, data) == Section(mode="exact", count=3, items=(Item(name="a", weight=2.0),))
    assert build_config(Section, {}) == Section()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"counts": 3}, "section.counts: unknown key; allowed: mode, count, enabled, items, note"),
        ({"mode": "slow"}, "section.mode: must be one of 'fast', 'exact', got 'slow'"),
        ({"count": "3"}, "section.count: expected an integer, got '3'"),
        ({"count": True}, "section.count: expected an integer, got True"),
        ({"enabled": "yes"}, "section.enabled: expected true or false, got 'yes'"),
        ({"items": "a"}, "section.items: expected a list, got 'a'"),
        ({"items": [{"weight": 1}]}, "section.items.0: Item.__init__() missing 1 required keyword-only"),
        ({"count": 0}, "section: count must be >= 1, got 0"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(data, message):
    with pytest.raises(ConfigError) as error:
        build_config(Section, data, "section")
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_a_job_config_has_store_runtime_and_its_sections_with_their_defaults():
    cfg = build_config(JobConfig, {"section": {"count": 5}})
    assert cfg.store == DEFAULT_STORE and cfg.runtime == RuntimeConfig()
    assert cfg.section == Section(count=5) and cfg.other == Other()
    assert [name for name in JobConfig.__dataclass_fields__] == ["store", "runtime", "section", "other"]
    assert JobConfig.__module__ == __name__  # pickle finds the class where the caller binds it
    with pytest.raises(ConfigError, match=r"^nosuch: unknown key; allowed: store, runtime, section, other$"):
        build_config(JobConfig, {"nosuch": {}})


@pytest.mark.parametrize("name", ["store", "runtime"])
def test_a_section_may_not_hide_the_spines_own_keys(name):
    with pytest.raises(ValueError, match=f"would hide the job's own {name!r} key"):
        job_config_type("Bad", {name: Section}, __name__)


def test_overrides_are_typed_and_reach_nested_list_items():
    data = {"section": {"items": [{"name": "a"}, {"name": "b"}]}}
    changed = apply_overrides(data, ["section.count=4", "section.items.1.weight=0.5", "store=/x"])
    cfg = build_config(JobConfig, changed)
    assert cfg.section.count == 4 and cfg.section.items[1] == Item(name="b", weight=0.5)
    assert cfg.store == "/x"
    assert data == {"section": {"items": [{"name": "a"}, {"name": "b"}]}}  # the input is left alone
    assert apply_overrides({"a": {"b": 1}}, {"a.c": [1, 2]}) == {"a": {"b": 1, "c": [1, 2]}}
    with pytest.raises(ConfigError, match=r"^section.items.5: no item 5 in a list of 2$"):
        apply_overrides(data, ["section.items.5.name=c"])


def test_a_file_layers_over_the_preset_and_overrides_over_both(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"section": {"count": 7}, "store": "s3://bucket/lvd"}))
    cfg = resolve_config(JobConfig, None, path, ["section.mode=exact"])
    assert cfg.store == "s3://bucket/lvd" and cfg.section == Section(mode="exact", count=7)
    (tmp_path / "broken.yaml").write_text("section: [")
    with pytest.raises(ConfigError, match=r"^config file: .*broken.yaml is not valid yaml"):
        resolve_config(JobConfig, None, tmp_path / "broken.yaml")


def test_presets_are_listed_and_an_unknown_one_names_them():
    assert "demo" in preset_names()
    with pytest.raises(ConfigError, match=r"^preset: unknown preset 'nosuch'; available: demo"):
        resolve_config(JobConfig, "nosuch")
