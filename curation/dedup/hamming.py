"""64-bit perceptual hashes as uint64, and exact Hamming-radius search over them with Faiss.

image --imagededup hash class--> 16 hex digits --int(hex, 16)--> uint64 (bit 63 = the first hash bit)
uint64 --big-endian bytes--> 8-byte Faiss binary codes
  --IndexBinaryMultiHash or IndexBinaryFlat, range search--> pairs i < j, popcount(h_i ^ h_j) <= radius

Multi-index hashing cuts the 64 bits into `num_tables` chunks, one hash table each. Two hashes within
`max_distance` bits differ in at most `max_distance // num_tables` bits of some chunk (pigeonhole), so
probing every chunk with that many bit flips finds every pair: the search stays exact. Which index is
cheaper depends on the number of hashes and the radius; `plan_search` picks by a cost model measured
on this code (see PROBE_COST_IN_PAIRS).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from math import comb
from typing import Literal

import faiss
import numpy as np
from PIL import Image

HASH_BITS = 64
HashAlgorithm = Literal["phash", "dhash", "whash", "ahash"]
HASH_BYTES = HASH_BITS // 8
HEX_DIGITS = HASH_BITS // 4
# imagededup's class for each algorithm name of PhashDedupConfig.
HASH_CLASSES: dict[str, str] = {"phash": "PHash", "dhash": "DHash", "whash": "WHash", "ahash": "AHash"}
# Cost of one multi-hash probe or candidate check, in units of one IndexBinaryFlat pair comparison.
# Measured on 100k random-but-clustered hashes, 2 cores: the flat index compares a pair in about
# 0.26 ns (SIMD popcount), while each hash-table probe or candidate of IndexBinaryMultiHash costs
# 25 to 45 ns. With 150, the plan picked was the fastest or within 1.3x of it in every case measured
# (10k and 100k hashes, radii 0 to 10).
PROBE_COST_IN_PAIRS = 150.0
# Queries per range search: bounds the memory of one result set (all neighbours of the batch).
QUERY_BATCH = 1 << 16
# Rows per index block of the pair search: bounds the index (a multi-hash table costs ~60 bytes a row,
# so 4M rows hold ~0.7 GB over 3 tables) while every row is searched against each block.
INDEX_BLOCK_ROWS = 4_000_000
# At least two tables: chunk keys of at most 32 bits, the widest shape the tests cover.
MIN_TABLES = 2
IMAGEDEDUP_LOGGER = "imagededup"

IndexKind = Literal["flat", "multihash"]


def quiet_imagededup() -> None:
    """Silences imagededup's INFO logging: each of its modules logs to its own stderr handler."""
    for name in list(logging.root.manager.loggerDict):
        if name == IMAGEDEDUP_LOGGER or name.startswith(f"{IMAGEDEDUP_LOGGER}."):
            logging.getLogger(name).setLevel(logging.WARNING)


@functools.cache
def imagededup_hasher(algorithm: HashAlgorithm):
    """imagededup's hash object for `algorithm`, without progress bars or logging (cached per process)."""
    from imagededup import methods  # why: imports torch; only hashing workers should pay for it

    quiet_imagededup()
    return getattr(methods, HASH_CLASSES[algorithm])(verbose=False)


def hash_image(algorithm: HashAlgorithm, image: Image.Image) -> int:
    """The 64-bit hash of an RGB image, computed by imagededup, as an int (bit 63 = first hash bit)."""
    return hex_to_int(imagededup_hasher(algorithm).encode_image(image_array=np.asarray(image)))


def hex_to_int(text: str) -> int:
    if len(text) != HEX_DIGITS:
        raise ValueError(f"a {HASH_BITS}-bit hash has {HEX_DIGITS} hex digits, got {text!r}")
    return int(text, 16)


def int_to_hex(value: int) -> str:
    return f"{value:0{HEX_DIGITS}x}"


def hashes_from_hex(texts: Sequence[str]) -> np.ndarray:
    return np.array([hex_to_int(text) for text in texts], dtype=np.uint64)


def hashes_to_hex(hashes: np.ndarray) -> list[str]:
    return [int_to_hex(int(value)) for value in hashes]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between uint64 hashes, element by element."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def binary_codes(hashes: np.ndarray) -> np.ndarray:
    """[n, 8] uint8 codes for Faiss, most significant byte first: the byte order of the hex string.

    Why it is safe: Faiss counts differing bits over the 8 bytes, which any fixed byte order preserves.
    """
    return (
        np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64).astype(">u8"))
        .view(np.uint8)
        .reshape(-1, HASH_BYTES)
    )


@dataclass(frozen=True, slots=True)
class SearchPlan:
    """An exact Hamming-radius search: the index kind and, for multi-index hashing, its shape."""

    kind: IndexKind
    num_tables: int = 0
    bits_per_table: int = 0
    num_flips: int = 0

    def describe(self) -> str:
        if self.kind == "flat":
            return "flat"
        return f"multihash(tables={self.num_tables}, bits={self.bits_per_table}, flips={self.num_flips})"

    def build(self) -> faiss.IndexBinary:
        if self.kind == "flat":
            return faiss.IndexBinaryFlat(HASH_BITS)
        index = faiss.IndexBinaryMultiHash(HASH_BITS, self.num_tables, self.bits_per_table)
        index.nflip = self.num_flips
        return index


def multihash_plan(max_distance: int, num_tables: int) -> SearchPlan:
    """Multi-index hashing with `num_tables` chunks, exact for `max_distance` by the pigeonhole rule."""
    if not MIN_TABLES <= num_tables <= HASH_BITS:
        raise ValueError(f"num_tables must be in [{MIN_TABLES}, {HASH_BITS}], got {num_tables}")
    return SearchPlan("multihash", num_tables, HASH_BITS // num_tables, max_distance // num_tables)


def estimated_cost(plan: SearchPlan, num_hashes: int) -> float:
    """Search cost in flat pair comparisons, assuming hash chunks spread evenly over their buckets."""
    if plan.kind == "flat":
        return float(num_hashes) * num_hashes
    probes_per_table = sum(comb(plan.bits_per_table, flips) for flips in range(plan.num_flips + 1))
    probes = float(num_hashes) * plan.num_tables * probes_per_table
    candidates_per_probe = num_hashes / 2.0**plan.bits_per_table
    return PROBE_COST_IN_PAIRS * probes * (1.0 + candidates_per_probe)


def plan_search(num_hashes: int, max_distance: int) -> SearchPlan:
    """The cheapest exact plan by `estimated_cost`: multi-index hashing for small radii, else flat."""
    tables = range(MIN_TABLES, HASH_BITS + 1)
    plans = [SearchPlan("flat"), *(multihash_plan(max_distance, num_tables) for num_tables in tables)]
    return min(plans, key=lambda plan: estimated_cost(plan, num_hashes))


@dataclass(frozen=True, slots=True)
class HashPairs:
    """Near-duplicate pairs, each once with sources < targets, sorted; distances in bits."""

    sources: np.ndarray  # int64
    targets: np.ndarray  # int64
    distances: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.sources)


def near_duplicate_pairs(
    hashes: np.ndarray,
    max_distance: int,
    plan: SearchPlan | None = None,
    index_rows: int = INDEX_BLOCK_ROWS,
) -> HashPairs:
    """Every pair of rows whose hashes differ in at most `max_distance` bits (exact, both ends included).

    The index holds `index_rows` rows at a time and every row is searched against each block, so a pair
    (i < j) is found once, from i, in the block holding j: memory is one block's index (a multi-hash
    table costs about 60 bytes a row), the search about as long as one index over all rows.

    Args:
        hashes: uint64 hashes, one per row.
        max_distance: the Hamming radius, inclusive.
        plan: the index to use; by default `plan_search` picks one.
        index_rows: rows per index block.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    plan = plan or plan_search(len(hashes), max_distance)
    codes = binary_codes(hashes)
    sources, targets = [], []
    for first in range(0, len(codes), index_rows):
        index = plan.build()
        index.add(codes[first : first + index_rows])
        for start in range(0, len(codes), QUERY_BATCH):
            # Why + 1: Faiss binary range searches keep distances strictly below the radius.
            limits, _, found = index.range_search(codes[start : start + QUERY_BATCH], max_distance + 1)
            counts = np.diff(limits).astype(np.int64)
            queries = start + np.repeat(np.arange(len(counts), dtype=np.int64), counts)
            found = found.astype(np.int64) + first
            upper = found > queries  # each pair once, and no row paired with itself
            sources.append(queries[upper])
            targets.append(found[upper])
        del index  # Why here: the next block's index is built while this one would still be held
    sources_all = np.concatenate(sources) if sources else np.zeros(0, dtype=np.int64)
    targets_all = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)
    order = np.lexsort((targets_all, sources_all))  # Why: Faiss threads return neighbours in any order
    sources_all, targets_all = sources_all[order], targets_all[order]
    distances = hamming(hashes[sources_all], hashes[targets_all])
    assert (distances <= max_distance).all(), "Faiss returned a pair beyond the radius"
    return HashPairs(sources_all, targets_all, distances)
