"""Near-duplicate search over known 64-bit hashes: lvd (Faiss binary index) vs imagededup, side by side.

    python -m benchmarks.phash_search [--sizes 10000 100000] [--repeats N]

Hashes are random but clustered: 90% independent uniform hashes, 10% copies of one of them with 1 to
radius + 2 bits flipped, so some copies fall just outside the radius. Both sides search the same hashes
at phash_dedup's default radius; imagededup runs its default search (`brute_force_cython` with one
process per core). Only the search is timed, and the two pair sets must be equal.
imagededup is quadratic with a Python loop per query: on 2 shared cores it took 22 s at 10k hashes
and 42 min at 100k (lvd: 0.03 s and 0.3 s), so a run with 100k takes that long.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from curation.dedup.hamming import (
    HASH_BITS,
    hashes_to_hex,
    near_duplicate_pairs,
    plan_search,
    quiet_imagededup,
)
from curation.dedup.phash import PhashDedupConfig

DEFAULT_SIZES = (10_000, 100_000)
DEFAULT_REPEATS = 3
COPY_FRACTION = 0.1
# Copies get up to this many bits more than the radius flipped: near misses that must not match.
BEYOND_RADIUS = 2
SEED = 0
KEY_PREFIX = "h"


def clustered_hashes(num_hashes: int, max_distance: int, rng: np.random.Generator) -> np.ndarray:
    """uint64 hashes, a COPY_FRACTION of them copies of others with a few bits flipped."""
    num_copies = int(num_hashes * COPY_FRACTION)
    originals = rng.integers(0, np.iinfo(np.uint64).max, size=num_hashes - num_copies, dtype=np.uint64)
    sources = rng.integers(0, len(originals), size=num_copies)
    flips = rng.integers(1, max_distance + BEYOND_RADIUS + 1, size=num_copies)
    # One random bit order per copy; its first `flips` bits are the ones flipped.
    bit_order = np.argsort(rng.random((num_copies, HASH_BITS)), axis=1)
    flipped = np.arange(HASH_BITS)[None, :] < flips[:, None]
    masks = np.zeros(num_copies, dtype=np.uint64)
    for column in range(HASH_BITS):
        bits = np.left_shift(np.uint64(1), bit_order[:, column].astype(np.uint64))
        masks |= np.where(flipped[:, column], bits, np.uint64(0))
    return np.concatenate([originals, originals[sources] ^ masks])


def lvd_pairs(hashes: np.ndarray, max_distance: int, repeats: int) -> tuple[float, set[tuple[int, int]]]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        pairs = near_duplicate_pairs(hashes, max_distance)
        seconds.append(time.perf_counter() - started)
    return min(seconds), set(zip(pairs.sources.tolist(), pairs.targets.tolist(), strict=True))


def imagededup_pairs(hashes: np.ndarray, max_distance: int) -> tuple[float, set[tuple[int, int]]]:
    from imagededup.methods import PHash

    quiet_imagededup()
    encoding_map = {f"{KEY_PREFIX}{row}": text for row, text in enumerate(hashes_to_hex(hashes))}
    hasher = PHash(verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "num_enc_workers has no effect": true, and noise
        started = time.perf_counter()
        duplicates = hasher.find_duplicates(encoding_map=encoding_map, max_distance_threshold=max_distance)
        seconds = time.perf_counter() - started
    pairs = set()
    for key, found in duplicates.items():
        row = int(key.removeprefix(KEY_PREFIX))
        for other in found:
            other_row = int(other.removeprefix(KEY_PREFIX))
            pairs.add((min(row, other_row), max(row, other_row)))
    return seconds, pairs


def measure(sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """For each hash count: lvd and imagededup search seconds, their ratio, and whether the pairs agree."""
    max_distance = PhashDedupConfig().max_distance
    results = []
    for size in sizes:
        hashes = clustered_hashes(size, max_distance, np.random.default_rng(SEED))
        lvd_seconds, lvd_found = lvd_pairs(hashes, max_distance, repeats)
        theirs_seconds, theirs_found = imagededup_pairs(hashes, max_distance)
        results.append(
            {
                "hashes": size,
                "plan": plan_search(size, max_distance).describe(),
                "lvd_seconds": lvd_seconds,
                "imagededup_seconds": theirs_seconds,
                "ratio": theirs_seconds / lvd_seconds,
                "pairs": len(lvd_found),
                "equal": lvd_found == theirs_found,
            }
        )
    return {"max_distance": max_distance, "sizes": results}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="hash counts")
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help="best of N for lvd; imagededup runs once"
    )
    args = parser.parse_args()
    print(
        f"radius {PhashDedupConfig().max_distance} bits (phash_dedup default), "
        f"{COPY_FRACTION:.0%} planted near copies"
    )
    for size in args.sizes:  # one size at a time, printed as it finishes: 100k takes imagededup long
        found = measure([size], args.repeats)["sizes"][0]
        same = "equal" if found["equal"] else "DIFFERENT"
        print(
            f"{size:>9,} hashes: lvd {found['lvd_seconds']:8.3f} s [{found['plan']}]  "
            f"imagededup {found['imagededup_seconds']:9.2f} s  ratio {found['ratio']:,.0f}x  "
            f"pairs {found['pairs']:,} ({same})",
            flush=True,
        )


if __name__ == "__main__":
    main()
