"""SSCD's score normalisation for a duplicate graph: a pair scores its cosine minus its rows' background
similarity, so that look-alikes in a dense region need a wider margin than two copies of a rare image.

    graph rows --seeded sample of `background_rows`--> background (a flat index)
    any vector --k-NN in the background, its own row (or, for a copy, its original's) left out-->
      the cosines at ranks BACKGROUND_SKIP+1 .. BACKGROUND_SKIP+BACKGROUND_COUNT --mean--> its bias b
    pair score = cosine(i, j) - (b_i + b_j) / 2

SSCD (Pizzi et al., CVPR 2022, section 4.5) subtracts the mean similarity to the 1st-3rd neighbours in a
background set kept apart from the references (beta = 1): in its repository this lifts sscd_disc_mixup
from 60.9 to 72.4 muAP on DISC. A dedup stage has no such set; its background is drawn from the rows
themselves, which may hold a row's own copy, so the nearest background neighbour is skipped and ranks
2-4 are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation.search.knn import SEARCH_BATCH_ROWS, Searcher, VectorSource, build_index, knn_search

BACKGROUND_SKIP = 1  # the nearest background row may be the row's own copy
BACKGROUND_COUNT = 3  # SSCD averages three background neighbours
NOT_IN_BACKGROUND = -1
# A flat search against this many rows costs each graph row about one k-NN query of a small index.
DEFAULT_BACKGROUND_ROWS = 4096


@dataclass(frozen=True, slots=True)
class Background:
    positions: np.ndarray  # the background rows' positions in the graph's index, sorted
    index: Searcher

    @classmethod
    def sample(cls, rows: VectorSource, size: int, seed: int) -> Background:
        """A flat index of `size` rows of `rows` (all of them if fewer), drawn from `seed`."""
        rng = np.random.default_rng(seed)
        positions = np.sort(rng.choice(len(rows), size=min(size, len(rows)), replace=False))
        return cls(positions, build_index(rows.read_rows(positions), "flat"))

    def bias(self, vectors: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Each vector's background similarity, leaving out index position `own[i]` (NOT_IN_BACKGROUND:
        none); 0 where the background has too few other rows."""
        width = min(BACKGROUND_SKIP + BACKGROUND_COUNT + 1, len(self.positions))
        if width == 0 or len(vectors) == 0:
            return np.zeros(len(vectors), dtype=np.float32)
        scores, found = knn_search(self.index, vectors, width)
        positions = np.where(found >= 0, self.positions[np.maximum(found, 0)], NOT_IN_BACKGROUND)
        valid = (found >= 0) & (positions != np.asarray(own)[:, None])
        rank = np.cumsum(valid, axis=1) - 1
        used = valid & (rank >= BACKGROUND_SKIP) & (rank < BACKGROUND_SKIP + BACKGROUND_COUNT)
        counts = used.sum(axis=1)
        totals = np.where(used, scores, 0.0).sum(axis=1)
        return np.where(counts > 0, totals / np.maximum(counts, 1), 0.0).astype(np.float32)

    def row_bias(self, rows: VectorSource) -> np.ndarray:
        """The bias of every row of the graph's index, a block at a time."""
        biases = [np.zeros(0, dtype=np.float32)]
        for start in range(0, len(rows), SEARCH_BATCH_ROWS):
            stop = min(len(rows), start + SEARCH_BATCH_ROWS)
            biases.append(self.bias(rows.read(start, stop), np.arange(start, stop)))
        return np.concatenate(biases)
