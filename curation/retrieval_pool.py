"""The pool a retrieval searches, held as row ids: the driver never holds its keys, URIs or vectors.

embeddings (key ranges) + assignments (key ranges: the rows the cluster stage assigned)
  --subset_positions: each assigned row's row in embeddings (a key merge, one part at a time)
  --the embeddings' role column: the assigned rows of the pool's role--> Pool: per pool row, its
    assignments row and its embeddings row (16 bytes a row), in key order
Pool.vectors(): the pool's embeddings as a `knn.VectorSource` (an index fills from it a block at a time)
Pool.describe(rows): keys, source, cluster and centroid cosine of a few pool rows (a search shard's hits),
  read from the parts they lie in
Pool.clusters(): cluster and centroid cosine per pool row (cluster mode), one assignments part at a time
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.vector_parts import StoredVectors, stored_vectors
from curation.vectors import EMBEDDING_COLUMN
from pipelines.part_rows import PartOffsets
from pipelines.partitions import KeyRanges, subset_positions

ASSIGNED_COLUMNS = ("image_id", "uri", "cluster", "similarity")


@dataclass(frozen=True, slots=True)
class Pool:
    embeddings: PartOffsets
    assignments: PartOffsets
    embedding_rows: np.ndarray  # int64 per pool row
    assignment_rows: np.ndarray | None  # int64 per pool row; None: pool row i is assignments row i

    def __len__(self) -> int:
        return len(self.embedding_rows)

    def vectors(self) -> StoredVectors:
        return stored_vectors(self.embeddings.subset(self.embedding_rows), EMBEDDING_COLUMN)

    def describe(self, rows: np.ndarray) -> pa.Table:
        """image_id, uri, source, cluster, centroid_similarity of pool `rows` (any order, repeats allowed)."""
        assigned = self.assignments.read_rows(self._assignment_rows(rows), ASSIGNED_COLUMNS)
        sources = self.embeddings.read_rows(self.embedding_rows[rows], ["source"])
        return pa.table(
            {
                "image_id": assigned.column("image_id"),
                "uri": assigned.column("uri"),
                "source": sources.column("source"),
                "cluster": assigned.column("cluster"),
                "centroid_similarity": assigned.column("similarity"),
            }
        )

    def clusters(self) -> tuple[np.ndarray, np.ndarray]:
        """(cluster int64, centroid cosine float32) of every pool row."""
        offsets = self.assignments
        cluster = np.empty(len(offsets), dtype=np.int64)
        similarity = np.empty(len(offsets), dtype=np.float32)
        for path, start, stop in zip(offsets.parts, offsets.starts[:-1], offsets.starts[1:], strict=True):
            table = pq.read_table(path, columns=["cluster", "similarity"], filesystem=offsets.fs)
            cluster[start:stop] = np.asarray(table.column("cluster"))
            similarity[start:stop] = np.asarray(table.column("similarity"))
        if self.assignment_rows is None:
            return cluster, similarity
        return cluster[self.assignment_rows], similarity[self.assignment_rows]

    def _assignment_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.assignment_rows is None else self.assignment_rows[rows]


def assigned_pool(embeddings: KeyRanges, assignments: KeyRanges, roles: Sequence[str]) -> Pool:
    """The rows of `roles` that the cluster stage assigned: only they are the pool (what was clustered)."""
    positions = subset_positions(assignments, embeddings, "the assignments")
    of_roles = embeddings.column_is_in("role", roles)[positions]
    if of_roles.all():  # the usual case (cluster assigned the pool's role only): no second id array
        return Pool(embeddings.offsets, assignments.offsets, positions, None)
    mine = np.flatnonzero(of_roles)
    return Pool(embeddings.offsets, assignments.offsets, positions[mine], mine)
