"""What every dedup stage shares: components of a duplicate graph, the keep rule, rejected rows, stats.

edges (row i ~ row j) --connected_components, or ComponentLabels fed batch by batch as a search finds them-->
  label per row (smallest row index of its component)
  --resolve_groups(keep rule)--> keep mask + for each dropped row the row it duplicates
  --duplicate_rejections--> `rejected` rows naming the kept image, the group and the similarity
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.manifest import REJECTED, ROLES, ManifestSchema, Role
from pipelines.validation import require

NO_MATCH = -1
# Component sizes are reported in these buckets (upper bounds, inclusive); the last one is open.
SIZE_BUCKETS = (2, 3, 4, 8, 16, 64, 256)

# Every dedup stage's rejects: the REJECTED columns plus what the dropped row duplicates.
DUPLICATES_REJECTED = ManifestSchema(
    name="rejected_duplicates",
    version=1,
    fields=(
        *REJECTED.fields,
        pa.field("match_image_id", pa.string(), nullable=False),  # the kept (or eval) image it matches
        pa.field("match_uri", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),  # image_id of the group's representative
        pa.field("similarity", pa.float32(), nullable=False),  # 1.0 exact; 1 - hamming/64; cosine
    ),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class KeepRuleConfig:
    """Which member of a duplicate group survives.

    Rows of a `protected_roles` role are never dropped by dedup (they are references: seeds, eval
    sets); the other members of their group are. In a group without protected rows one row is kept:
    the first by role (in `role_priority` order), then the larger (or smaller) resolution, then the
    larger file, then the URI and image id as a stable tie-break.
    """

    role_priority: tuple[Role, ...] = ("eval", "curated", "uncurated")
    protected_roles: tuple[Role, ...] = ("eval", "curated")
    prefer_larger: bool = True

    def __post_init__(self) -> None:
        require(sorted(self.role_priority) == sorted(ROLES), f"role_priority must order all of {ROLES}")


class ComponentLabels:
    """Union-find fed edges a batch at a time, so no edge list is ever held whole (memory: 8 bytes a row).

    A batch is merged vectorised, in rounds: find both ends' roots (halving the paths walked, so trees stay
    shallow), hook each larger root under the smallest root it meets, and keep the edges whose ends still
    have different roots. A batch's cost grows with its edges, not with the rows. Roots only ever move to
    smaller roots, so `labels()` gives each row the smallest row index of its component, whatever the
    batches and their order.
    """

    def __init__(self, num_rows: int) -> None:
        self._parent = np.arange(num_rows, dtype=np.int64)

    def add_edges(self, sources: np.ndarray, targets: np.ndarray) -> None:
        """Joins row sources[i] with row targets[i] for every i."""
        sources = np.asarray(sources, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.int64)
        while len(sources):
            root_a, root_b = self._roots(sources), self._roots(targets)
            differ = root_a != root_b
            low = np.minimum(root_a[differ], root_b[differ])
            high = np.maximum(root_a[differ], root_b[differ])
            np.minimum.at(self._parent, high, low)  # hook: every root only ever moves to a smaller root
            sources, targets = sources[differ], targets[differ]

    def _roots(self, rows: np.ndarray) -> np.ndarray:
        """The root of each of `rows`; every row walked past is re-pointed at its grandparent on the way."""
        parent = self._parent
        while True:
            up = parent[rows]
            grand = parent[up]
            if np.array_equal(up, grand):
                return up
            parent[rows] = grand  # path halving: still an ancestor, half as far from the root
            rows = grand

    def labels(self, copy: bool = True) -> np.ndarray:
        """For every row, the smallest row index of its component: a copy, or (`copy=False`, for a caller
        done adding edges) the union-find's own array, 8 bytes a row fewer at the peak."""
        parent = self._parent
        while True:  # compress: point every row straight at its root
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent
        self._parent = parent
        return parent.copy() if copy else parent


def connected_components(num_rows: int, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For every row, the smallest row index of its component, from one whole edge list."""
    components = ComponentLabels(num_rows)
    components.add_edges(sources, targets)
    return components.labels()


@dataclass(frozen=True, slots=True)
class GroupResolution:
    """For each row: whether it is kept, and for a dropped row the row index it duplicates."""

    keep: np.ndarray  # bool
    match: np.ndarray  # int64, NO_MATCH for kept rows
    representative: np.ndarray  # int64: the row that stands for each row's group


def preference_order(images: pa.Table, rule: KeepRuleConfig) -> np.ndarray:
    """Row indices from most to least preferred by the keep rule; ties broken by URI then image id."""
    role_rank = {role: rank for rank, role in enumerate(rule.role_priority)}
    roles = np.array([role_rank[role] for role in images.column("role").to_pylist()], dtype=np.int64)
    pixels = np.asarray(images.column("width"), dtype=np.int64) * np.asarray(
        images.column("height"), dtype=np.int64
    )
    sizes = np.asarray(images.column("byte_size"), dtype=np.int64)
    sign = -1 if rule.prefer_larger else 1
    uris = np.asarray(images.column("uri").to_pylist(), dtype=object)
    ids = np.asarray(images.column("image_id").to_pylist(), dtype=object)
    return np.lexsort((ids, uris, sign * sizes, sign * pixels, roles))  # last key sorts first


def _first_in_order(labels: np.ndarray, order: np.ndarray, eligible: np.ndarray) -> dict[int, int]:
    """For each component label, the first eligible row in `order`."""
    best: dict[int, int] = {}
    for row in order[eligible[order]]:
        best.setdefault(int(labels[row]), int(row))
    return best


def protected_rows(images: pa.Table, rule: KeepRuleConfig) -> np.ndarray:
    """bool per row: its role is one the rule never drops."""
    return np.isin(np.asarray(images.column("role").to_pylist(), dtype=object), list(rule.protected_roles))


def resolve_groups(images: pa.Table, labels: np.ndarray, rule: KeepRuleConfig) -> GroupResolution:
    """Applies the keep rule to every component of `labels` (see KeepRuleConfig), all rows in memory
    (`curation.dedup.keep.resolve_partitioned` is the same rule a partition at a time)."""
    num_rows = images.num_rows
    order = preference_order(images, rule)
    protected = protected_rows(images, rule)
    best_any = _first_in_order(labels, order, np.ones(num_rows, dtype=bool))
    best_protected = _first_in_order(labels, order, protected)
    representative = np.array(
        [best_protected.get(int(label), best_any[int(label)]) for label in labels], dtype=np.int64
    )
    keep = protected | (representative == np.arange(num_rows))
    match = np.where(keep, NO_MATCH, representative)
    return GroupResolution(keep=keep, match=match, representative=representative)


def duplicate_rejections(
    images: pa.Table,
    dropped: np.ndarray,
    match: np.ndarray,
    group: np.ndarray,
    similarity: np.ndarray,
    reason: str,
) -> pa.Table:
    """`rejected` rows for `dropped` row indices; `match`, `group` and `similarity` are per dropped row."""
    keys = images.select(["image_id", "uri"])
    groups = keys.column("image_id").take(pa.array(group, pa.int64()))
    return rejection_table(
        images.take(pa.array(dropped, pa.int64())),
        keys.take(pa.array(match, pa.int64())),
        groups,
        similarity,
        reason,
    )


def rejection_table(
    dropped: pa.Table,
    matches: pa.Table,
    group_ids: pa.ChunkedArray | pa.Array,
    similarity: np.ndarray,
    reason: str,
) -> pa.Table:
    """`rejected` rows for the `dropped` images rows; per row, the (image_id, uri) it duplicates
    (`matches`), its group's representative's image_id and its similarity."""
    match_uris = matches.column("uri").to_pylist()
    details = [
        f"{reason} of {uri} (similarity {score:.3f})"
        for uri, score in zip(match_uris, similarity.tolist(), strict=True)
    ]
    count = dropped.num_rows
    return DUPLICATES_REJECTED.validate(
        pa.table(
            {
                "image_id": dropped.column("image_id"),
                "source": dropped.column("source"),
                "role": dropped.column("role"),
                "uri": dropped.column("uri"),
                "reason": pa.array([reason] * count, pa.string()),
                "detail": pa.array(details, pa.string()),
                "match_image_id": matches.column("image_id"),
                "match_uri": matches.column("uri"),
                "group_id": group_ids,
                "similarity": pa.array(np.asarray(similarity, dtype=np.float32)),
            }
        )
    )


# What every dedup stage's summary shows: stats key -> label.
DEDUP_SHOWN_STATS = {
    "rows_in": "images in",
    "groups": "duplicate groups",
    "rows_in_groups": "images in groups",
    "largest_group": "largest group",
    "rejected": "rejected",
}


def component_sizes(labels: np.ndarray) -> np.ndarray:
    """The size of every component with 2 or more rows (8 bytes a row while counting, no Python objects)."""
    sizes = np.bincount(labels, minlength=len(labels))
    return sizes[sizes > 1]


def component_stats(labels: np.ndarray) -> dict[str, object]:
    """Groups (components of 2 or more rows), the rows in them, the largest, and a size histogram."""
    sizes = component_sizes(labels)
    bounds = np.asarray(SIZE_BUCKETS)
    bucket = np.searchsorted(bounds, sizes)  # index of the first bound >= size; len(bounds): open bucket
    histogram: dict[str, int] = {}
    for index, count in zip(*np.unique(bucket, return_counts=True), strict=True):
        name = f"<={bounds[index]}" if index < len(bounds) else f">{SIZE_BUCKETS[-1]}"
        histogram[name] = int(count)
    return {
        "groups": len(sizes),
        "rows_in_groups": int(sizes.sum()),
        "largest_group": int(sizes.max(initial=1)),
        "group_sizes": histogram,
    }


def largest_groups(labels: np.ndarray, num_groups: int) -> list[np.ndarray]:
    """Row indices of the `num_groups` largest components with 2 or more rows, largest first (ties: the
    smaller label first)."""
    sizes = np.bincount(labels, minlength=len(labels))
    biggest = [label for label in np.argsort(-sizes, kind="stable")[:num_groups] if sizes[label] > 1]
    return [np.flatnonzero(labels == label) for label in biggest]
