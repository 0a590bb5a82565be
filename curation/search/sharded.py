"""k-NN search over a database split into shards, each held by its own executor worker, merged to one top-k.

    database [N, d] (an array, or rows in a manifest's parts) --contiguous row ranges--> S shards, each a
      Faiss index (flat or IVF) on one worker, which reads its own rows
      (Ray: one actor per shard, spread over the nodes, each reserving the runtime's gpus_per_worker;
      on the GPUs the worker sees when `search.use_gpu`; serial: every shard in this process)
    queries [Q, d] --broadcast to every shard--> per shard: its k best (scores, database row ids)
      --merge: order by (score desc, row id desc), keep k--> (scores [Q, k], row ids [Q, k])

Exactness: the global top-k rows that live in a shard are among that shard's own top-k, so the merge
loses nothing, and a flat shard scores a pair exactly as one flat index over all rows does: flat shards
return what that index returns, ids and scores alike. Where equal scores straddle the k-th place, which
tied rows an index keeps depends on its layout; `knn.ranked_search`, which the stages search through,
settles those by row id for one index and shards alike. IVF shards each train their own lists: as
approximate as one IVF index, not equal to it.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import faiss
import numpy as np

from curation.search.config import DEFAULT_SQ_BITS, SearchConfig
from curation.search.knn import Searcher, VectorSource, build_index, vector_source
from pipelines.executor import Executor, HeldStates

# The default: one index in this process, searched as before sharding existed.
SINGLE_INDEX = 1


def shard_bounds(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous `[start, stop)` row ranges, sizes differing by at most one; never an empty shard
    (fewer shards than asked for when there are fewer rows), and one empty shard for no rows."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    count = max(1, min(num_shards, num_rows))
    edges = [num_rows * shard // count for shard in range(count + 1)]
    return list(itertools.pairwise(edges))


@dataclass(frozen=True, slots=True)
class IndexShard:
    """What one shard's worker holds: an index over database rows `first_row`, `first_row + 1`, ..."""

    index: faiss.Index
    first_row: int


@dataclass(frozen=True, slots=True)
class ShardQuery:
    """One broadcast: every shard searches the same queries for its `k` best rows."""

    queries: np.ndarray  # [Q, d] float32
    k: int


def build_shard(
    rows: VectorSource,
    first_row: int,
    kind: str,
    nprobe: int | None,
    use_gpu: bool,
    sq_bits: int,
    lists: int | None = None,
) -> IndexShard:
    """A worker's state factory: indexes its rows (`kind` as for the whole), on the worker's GPUs when
    asked and present."""
    return IndexShard(build_index(rows, kind, nprobe, use_gpu, sq_bits, lists), first_row)


def search_in_shard(shard: IndexShard, query: ShardQuery) -> tuple[np.ndarray, np.ndarray]:
    """The shard's `k` best rows for each query, as database row ids; Faiss pads short rows with id -1."""
    scores, local_rows = shard.index.search(query.queries, query.k)
    rows = np.where(local_rows >= 0, local_rows + shard.first_row, local_rows)
    return scores.astype(np.float32), rows.astype(np.int64)


def merge_top_k(
    scores: Sequence[np.ndarray], rows: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best of every shard's candidates per query: score, then row id, both descending (as Faiss).

    Args:
        scores: One [Q, k_s] float32 array per shard.
        rows: The matching [Q, k_s] int64 database row ids (-1: an empty slot, scored -FLT_MAX by Faiss).
        k: At most the total number of candidates per query.
    """
    all_scores = np.concatenate(scores, axis=1)
    all_rows = np.concatenate(rows, axis=1)
    # lexsort's last key is the primary one. Empty slots score -FLT_MAX: they come last.
    order = np.lexsort((-all_rows, -all_scores), axis=-1)[:, :k]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_rows, order, axis=1)


class ShardedIndex:
    """A `Searcher` whose rows live in shards held by executor workers (see `sharded_index`)."""

    def __init__(self, shards: HeldStates, num_rows: int):
        self._shards = shards
        self._num_rows = num_rows

    @property
    def ntotal(self) -> int:
        return self._num_rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` database rows nearest each query, best first, as one index over all rows gives them."""
        query = ShardQuery(np.ascontiguousarray(queries, dtype=np.float32), k)
        found = self._shards.broadcast(search_in_shard, query)
        return merge_top_k([scores for scores, _ in found], [rows for _, rows in found], k)


@contextmanager
def sharded_index(
    database: np.ndarray | VectorSource,
    num_shards: int,
    kind: str,
    executor: Executor,
    nprobe: int | None = None,
    use_gpu: bool = False,
    sq_bits: int = DEFAULT_SQ_BITS,
    lists: int | None = None,
) -> Iterator[ShardedIndex]:
    """`database` split into `num_shards` indexes held by the executor's workers for the `with` block.

    Args:
        database: [N, d] rows (unit length for cosine); row i keeps id i. Given as stored rows, each
            worker reads its own part and the caller never holds them.
        num_shards: Workers (Ray: actors) holding one contiguous part each.
        kind: `flat` (exact), `ivf` or `ivfsq`, as `SearchConfig.kind_for` picks it for all N rows.
        executor: Serial builds every shard here; Ray holds each on an actor.
        nprobe: IVF lists searched per query in each shard (None: `knn.ivf_probes`' share).
        use_gpu: Each worker indexes on the GPUs Faiss sees there (Ray: the ones its actor reserved).
        sq_bits: `ivfsq` code bits per dimension.
        lists: IVF lists per shard (None: `knn.ivf_lists` of the shard's rows).
    """
    source = vector_source(database)
    factories = [
        functools.partial(build_shard, source.part(start, stop), start, kind, nprobe, use_gpu, sq_bits, lists)
        for start, stop in shard_bounds(len(source), num_shards)
    ]
    with executor.hold_states(factories) as shards:
        yield ShardedIndex(shards, len(source))


def database_index(
    database: np.ndarray | VectorSource, search: SearchConfig, executor: Executor
) -> AbstractContextManager[Searcher]:
    """The stages' seam: the index `search` describes over `database`: one Faiss index in this process
    for `SINGLE_INDEX` shards, else a `sharded_index`.

    The single index is filled a block at a time and keeps no reference to `database`.
    """
    source = vector_source(database)
    kind = search.kind_for(len(source))
    if search.shards == SINGLE_INDEX:
        index = build_index(source, kind, search.ivf_nprobe, search.use_gpu, search.sq_bits, search.ivf_lists)
        return nullcontext(index)
    return sharded_index(
        source,
        search.shards,
        kind,
        executor,
        search.ivf_nprobe,
        search.use_gpu,
        search.sq_bits,
        search.ivf_lists,
    )
