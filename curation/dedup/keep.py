"""The keep rule and a dedup stage's outputs, a partition at a time: the driver holds per-row numbers only.

labels (int64 per global row, in key order) + the input's KeyRanges
  --resolve_partitioned, a map over partitions (executor): each worker reads its rows' keys, role,
    resolution and size, and names its best row, and its best protected row, of every duplicate group it
    touches--> candidates (a few per group and partition)
  --the driver: each group's best candidate by the keep rule--> GroupResolution (keep, representative)
  --write_partitioned, ctx.map_shards over partitions (resumable): kept rows --> one `images` part;
    dropped rows --> one `rejected` part naming the row each duplicates and its group's representative
    (their keys read from the parts they lie in)

The driver holds the labels and the resolution (about 17 bytes a row) and the candidates; never a key, a
URI or a table of rows. The result is the in-memory rule's (`components.resolve_groups`) on every input.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curation.dedup.components import (
    NO_MATCH,
    GroupResolution,
    KeepRuleConfig,
    preference_order,
    protected_rows,
    rejection_table,
)
from pipelines.executor import Executor
from pipelines.manifest import IMAGES, ROW_KEY_COLUMNS
from pipelines.part_rows import PartOffsets
from pipelines.partitions import KeyRanges, Partition
from pipelines.shards import SHARD_ID_LENGTH
from pipelines.stage import Shard, ShardResult, StageContext

KEEP_RULE_COLUMNS = ("image_id", "uri", "role", "width", "height", "byte_size")
OUTPUTS_STEP = "outputs"  # mixed into the outputs map's shard ids: a stage's other maps use the plain ids


@dataclass(frozen=True, slots=True)
class Candidates:
    """One partition's part of the keep rule: which of its rows are protected, and per duplicate group it
    touches its best row and best protected row (`rows`, with their keep-rule columns)."""

    first_row: int
    protected: np.ndarray  # bool per row of the partition
    rows: np.ndarray  # int64 global row ids
    labels: np.ndarray  # int64, the group of each candidate
    columns: pa.Table  # KEEP_RULE_COLUMNS of each candidate


def group_candidates(rule: KeepRuleConfig, item: tuple[Partition, np.ndarray, np.ndarray]) -> Candidates:
    """Worker: `item` is a partition with its rows' labels and whether each is in a group of 2 or more."""
    partition, labels, grouped = item
    table = partition.read(KEEP_RULE_COLUMNS, IMAGES)
    protected = protected_rows(table, rule)
    members = np.flatnonzero(grouped)
    order = members[preference_order(table.take(pa.array(members)), rule)]
    picks = []
    for eligible in (np.ones(len(order), dtype=bool), protected[order]):
        ranked = order[eligible]
        _, first = np.unique(labels[ranked], return_index=True)  # the first of each group, by preference
        picks.append(ranked[first])
    chosen = np.unique(np.concatenate(picks))
    return Candidates(
        partition.first_row,
        protected,
        partition.first_row + chosen,
        labels[chosen],
        table.take(pa.array(chosen)),
    )


def resolve_partitioned(
    ranges: KeyRanges, rows_per_partition: int, labels: np.ndarray, rule: KeepRuleConfig, executor: Executor
) -> GroupResolution:
    """`resolve_groups` over the manifest of `ranges`, its rows read a partition at a time by `executor`."""
    num_rows = ranges.num_rows
    sizes = np.bincount(labels, minlength=num_rows)
    grouped = sizes[labels] > 1
    del sizes
    items = [
        (shard.payload, labels[shard.payload.rows], grouped[shard.payload.rows])
        for shard in ranges.shards(rows_per_partition)
    ]
    protected = np.zeros(num_rows, dtype=bool)
    found: list[Candidates] = []
    for _, candidates in executor.map_unordered(functools.partial(group_candidates, rule), items):
        protected[candidates.first_row : candidates.first_row + len(candidates.protected)] = (
            candidates.protected
        )
        found.append(candidates)
    representative = np.arange(num_rows, dtype=np.int64)
    members = np.flatnonzero(grouped)
    if found:
        best_rows, best_labels = _best_candidates(found, rule)
        by_label = np.arange(num_rows, dtype=np.int64)
        by_label[best_labels] = best_rows
        representative[members] = by_label[labels[members]]
        del by_label
    # A row alone in its group represents itself: only group members are compared (no second arange).
    keep = protected | ~grouped
    keep[members] |= representative[members] == members
    return GroupResolution(
        keep=keep, match=np.where(keep, NO_MATCH, representative), representative=representative
    )


def _best_candidates(found: list[Candidates], rule: KeepRuleConfig) -> tuple[np.ndarray, np.ndarray]:
    """(row, label) of each group's representative: its best protected candidate, else its best one."""
    rows = np.concatenate([candidates.rows for candidates in found])
    labels = np.concatenate([candidates.labels for candidates in found])
    columns = pa.concat_tables([candidates.columns for candidates in found])
    protected = protected_rows(columns, rule)
    preference = np.empty(len(rows), dtype=np.int64)
    preference[preference_order(columns, rule)] = np.arange(len(rows))
    order = np.lexsort((preference, ~protected, labels))  # last key sorts first
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    return rows[order][first], labels[order][first]


@dataclass(frozen=True, slots=True)
class OutputsShard:
    """One partition's outputs: which rows stay; for each dropped row, its match, group and similarity."""

    partition: Partition
    keep: np.ndarray  # bool per row of the partition
    match: np.ndarray  # int64 global row per dropped row (in row order)
    group: np.ndarray  # int64 global row: the representative of each dropped row's group
    similarity: np.ndarray  # float32 per dropped row


def outputs_shard(offsets: PartOffsets, reason: str, shard: OutputsShard) -> ShardResult:
    """Worker: the partition's kept `images` rows and its `rejected` rows, both in key order."""
    table = shard.partition.read(IMAGES.names, IMAGES)
    dropped = table.filter(pa.array(~shard.keep))
    matches = offsets.read_rows(shard.match, ROW_KEY_COLUMNS)
    groups = offsets.read_rows(shard.group, ["image_id"]).column("image_id")
    rejected = rejection_table(dropped, matches, groups, shard.similarity, reason)
    kept = table.filter(pa.array(shard.keep))
    return ShardResult(tables={"images": kept, "rejected": rejected}, stats={"written_rows": kept.num_rows})


def outputs_shard_id(partition_id: str) -> str:
    """The outputs map's id for a partition: the partition's id and the step (unique within the stage)."""
    return hashlib.sha256(f"{partition_id}:{OUTPUTS_STEP}".encode()).hexdigest()[:SHARD_ID_LENGTH]


@dataclass(frozen=True, slots=True)
class Dropped:
    """What a dedup stage decided, per global row and per dropped row (dropped rows in row order)."""

    keep: np.ndarray  # bool per row
    match: np.ndarray  # int64 per dropped row: the row it is recorded as a duplicate of
    group: np.ndarray  # int64 per dropped row: the row whose image_id names its group
    similarity: np.ndarray  # float32 per dropped row


def write_partitioned(
    ctx: StageContext, ranges: KeyRanges, rows_per_partition: int, dropped: Dropped, reason: str
) -> None:
    """Writes `images` (kept rows) and `rejected` one part per partition, each in key order."""
    worker = functools.partial(outputs_shard, ranges.offsets, reason)
    shards = list(_outputs_shards(ranges, rows_per_partition, dropped))
    ctx.map_shards(worker, shards, outputs=["images", "rejected"])


def _outputs_shards(ranges: KeyRanges, rows_per_partition: int, dropped: Dropped) -> Iterator[Shard]:
    rows = np.flatnonzero(~dropped.keep)
    for shard in ranges.shards(rows_per_partition):
        partition = shard.payload
        low, high = np.searchsorted(rows, [partition.first_row, partition.first_row + partition.num_rows])
        payload = OutputsShard(
            partition,
            dropped.keep[partition.rows],
            dropped.match[low:high],
            dropped.group[low:high],
            dropped.similarity[low:high],
        )
        yield Shard(outputs_shard_id(shard.shard_id), payload)
