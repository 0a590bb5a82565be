"""Scores dedup and decontamination rejects, retrieval and the balance of curated sets against the demo's
answer key (tests, benchmarks and reports only).

ground_truth.parquet --copy_of / same icon name--> truth clusters of image ids
rejected rows (image_id ~ match_image_id) --same truth cluster?--> precision
planted copies --linked to their cluster by some reject?--> recall
a curated set's uris --concept of each (class, category or origin)--> evenness, Gini over the pool's concepts
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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
    ORIGIN_OPENCLIPART,
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


# Origins whose labels are classes (Fashion-MNIST's ten, Openclipart's categories); any other origin is
# one concept (Adwaita icons, Tux Paint stamps, synthetic junk).
LABELLED_ORIGINS = (*FASHION_ORIGINS, ORIGIN_OPENCLIPART)


def concept(row: Mapping[str, Any]) -> str:
    """A ground-truth row's concept: `fashion/<class>`, `openclipart/<category>`, or its origin."""
    if row["origin"] in FASHION_ORIGINS:
        return f"fashion/{row['label']}"
    if row["origin"] in LABELLED_ORIGINS and row["label"]:
        return f"{row['origin']}/{row['label']}"
    return row["origin"]


@dataclass(frozen=True, slots=True)
class ConceptBalance:
    """How evenly a set of images covers the pool's concepts."""

    rows: int
    concepts: int  # the pool's concepts with at least one row here
    pool_concepts: int
    evenness: float  # entropy of the concept shares / log(pool_concepts): 1 = even over all of them
    gini: (
        float  # Gini coefficient of the counts over the pool's concepts: 0 = even, towards 1 = one holds all
    )
    largest_share: float


def concept_balance(uris: Iterable[str], truth: pa.Table, pool_uris: Iterable[str]) -> ConceptBalance:
    """The concept balance of the images at `uris` over the concepts of the pool's images (`pool_uris`)."""
    by_uri = {row["uri"]: concept(row) for row in truth.to_pylist()}
    pool_concepts = sorted({by_uri[uri] for uri in pool_uris})
    index = {name: position for position, name in enumerate(pool_concepts)}
    counts = np.bincount([index[by_uri[uri]] for uri in uris], minlength=len(pool_concepts)).astype(
        np.float64
    )
    total = counts.sum()
    shares = counts[counts > 0] / total
    ordered = np.sort(counts)
    ranks = np.arange(1, len(ordered) + 1)
    gini = float((2 * ranks - len(ordered) - 1) @ ordered / (len(ordered) * total))
    return ConceptBalance(
        rows=int(total),
        concepts=int((counts > 0).sum()),
        pool_concepts=len(pool_concepts),
        evenness=float(-(shares * np.log(shares)).sum() / np.log(len(pool_concepts))),
        gini=gini,
        largest_share=float(shares.max()),
    )
