"""Scores dedup and decontamination rejects against the demo's answer key (tests and reports only).

ground_truth.parquet --copy_of / same icon name--> truth clusters of image ids
rejected rows (image_id ~ match_image_id) --same truth cluster?--> precision
planted copies --linked to their cluster by some reject?--> recall
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curation.dedup.components import connected_components
from curation.demo.ground_truth import (
    KIND_EVAL_NEAR_COPY,
    KIND_EXACT_COPY,
    KIND_NEAR_COPY,
    ORIGIN_ADWAITA,
    ORIGIN_FASHION_TEST,
    ORIGIN_FASHION_TRAIN,
)

COPY_KINDS = (KIND_EXACT_COPY, KIND_NEAR_COPY, KIND_EVAL_NEAR_COPY)


def truth_clusters(truth: pa.Table) -> dict[str, int]:
    """Image id (sha256) -> cluster: a copy joins its original; Adwaita icons of one name join each other."""
    rows = [row for row in truth.to_pylist() if row["sha256"] is not None]
    originals = {row["copy_of_sha256"] for row in rows if row["copy_of_sha256"]}
    ids = sorted({row["sha256"] for row in rows} | originals)
    index = {image_id: position for position, image_id in enumerate(ids)}
    edges = [(row["sha256"], row["copy_of_sha256"]) for row in rows if row["kind"] in COPY_KINDS]
    first_icon: dict[str, str] = {}
    for row in rows:
        if row["origin"] == ORIGIN_ADWAITA:
            edges.append((row["sha256"], first_icon.setdefault(row["label"], row["sha256"])))
    sources = np.array([index[a] for a, _ in edges], dtype=np.int64)
    targets = np.array([index[b] for _, b in edges], dtype=np.int64)
    labels = connected_components(len(ids), sources, targets)
    return {image_id: int(labels[position]) for image_id, position in index.items()}


@dataclass(frozen=True, slots=True)
class RejectScore:
    dropped: int
    true_duplicates: int
    planted: int
    found: int

    @property
    def precision(self) -> float:
        return self.true_duplicates / self.dropped if self.dropped else 1.0

    @property
    def recall(self) -> float:
        return self.found / self.planted if self.planted else 1.0


def score_rejects(rejected: pa.Table, truth: pa.Table, planted_kinds: Iterable[str]) -> RejectScore:
    """Precision of `rejected` (each row's match in its truth cluster) and recall over planted copies.

    A planted copy counts as found when a reject links it (as the dropped row or as the match) with
    another member of its truth cluster.
    """
    clusters = truth_clusters(truth)
    linked: set[str] = set()
    true_duplicates = 0
    for row in rejected.select(["image_id", "match_image_id"]).to_pylist():
        cluster = clusters.get(row["image_id"])
        if cluster is not None and cluster == clusters.get(row["match_image_id"]):
            true_duplicates += 1
            linked.update((row["image_id"], row["match_image_id"]))
    kinds = set(planted_kinds)
    planted = {row["sha256"] for row in truth.to_pylist() if row["kind"] in kinds and row["sha256"]}
    return RejectScore(
        dropped=rejected.num_rows,
        true_duplicates=true_duplicates,
        planted=len(planted),
        found=len(planted & linked),
    )


@dataclass(frozen=True, slots=True)
class RetrievalScore:
    """Shares of retrieved images (and of a same-size random pool sample) by hidden ground truth."""

    retrieved: int
    fashion_share: float
    seed_class_share: float
    baseline_fashion_share: float
    baseline_seed_class_share: float


FASHION_ORIGINS = (ORIGIN_FASHION_TRAIN, ORIGIN_FASHION_TEST)


def score_retrieval(
    retrieved_ids: list[str], pool_ids: list[str], truth: pa.Table, seed_classes: Iterable[str], seed: int = 0
) -> RetrievalScore:
    """How many retrieved images are Fashion-MNIST, and of a seed class, against a random pool sample."""
    by_id = {row["sha256"]: row for row in truth.to_pylist() if row["sha256"]}
    classes = set(seed_classes)

    def shares(ids: list[str]) -> tuple[float, float]:
        rows = [by_id[image_id] for image_id in ids]
        if not rows:
            return 0.0, 0.0
        is_fashion = [row["origin"] in FASHION_ORIGINS for row in rows]
        in_class = [ok and row["label"] in classes for ok, row in zip(is_fashion, rows, strict=True)]
        return sum(is_fashion) / len(rows), sum(in_class) / len(rows)

    rng = np.random.default_rng(seed)
    sample = rng.choice(pool_ids, size=min(len(retrieved_ids), len(pool_ids)), replace=False).tolist()
    fashion, in_class = shares(retrieved_ids)
    baseline_fashion, baseline_in_class = shares(sample)
    return RetrievalScore(len(retrieved_ids), fashion, in_class, baseline_fashion, baseline_in_class)
