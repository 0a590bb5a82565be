"""`SearchConfig`: how a cosine k-NN search indexes its database, shared by every stage that searches.

copy_dedup and decontaminate (their duplicate graphs) and retrieve (the pool) each hold one under
`search`; the same keys mean the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.validation import require

IndexKind = Literal["auto", "flat", "ivf", "ivfsq"]
# Where `auto` switches from exact to IVF search.
DEFAULT_IVF_MIN_ROWS = 200_000
# Scalar-quantiser bits per dimension Faiss offers. On 128-d unit vectors a near copy's score stays within
# 0.004 of its cosine at 8 bits, within 0.06 at 4 (worst of 1,000 queries over 50,000 rows).
SQ_BITS = (4, 6, 8)
DEFAULT_SQ_BITS = 8


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchConfig:
    index: IndexKind = "auto"
    """`flat`: exact; `ivf`: approximate; `auto`: exact below `ivf_min_rows` database rows, IVF from there;
    `ivfsq`: IVF over scalar-quantised codes of `sq_bits` bits a dimension: the index holds codes, not
    vectors (a quarter of the memory at 8 bits), and its scores are approximate too. The paper's Faiss
    IVF-PQ compresses further; product quantisation's scores stray too far from the cosine for a
    threshold on them (0.08 at 4-bit fast-scan codes, 0.2 at 16 bytes, on 128-d unit vectors)."""
    ivf_min_rows: int = DEFAULT_IVF_MIN_ROWS
    ivf_lists: int | None = None
    """IVF lists; None: 4 sqrt(N) (`knn.ivf_lists`). Fewer lists train faster and scan more per probe."""
    ivf_nprobe: int | None = None
    """IVF lists searched per query (recall against speed); None: a fixed share of the lists, so the
    speed-up over exact search stays the same at any pool size (`knn.ivf_probes`)."""
    sq_bits: int = DEFAULT_SQ_BITS
    """`ivfsq`: bits of code per dimension (4, 6 or 8)."""
    shards: int = 1
    """Index shards, each held by one executor worker (Ray: an actor per node or GPU), merged to the
    exact top-k; 1 keeps one index in the stage's process. Same output for any value (flat index)."""
    use_gpu: bool = True
    """Index and search on the GPUs Faiss sees, if any (the `gpu` extra's faiss-gpu build); CPU otherwise.
    Each index is copied whole to every GPU of its process; `shards` split the rows across workers."""

    def __post_init__(self) -> None:
        require(self.ivf_min_rows >= 1, f"ivf_min_rows must be >= 1, got {self.ivf_min_rows}")
        require(
            self.ivf_nprobe is None or self.ivf_nprobe >= 1, f"ivf_nprobe must be >= 1, got {self.ivf_nprobe}"
        )
        require(
            self.ivf_lists is None or self.ivf_lists >= 1, f"ivf_lists must be >= 1, got {self.ivf_lists}"
        )
        require(self.shards >= 1, f"shards must be >= 1, got {self.shards}")
        require(self.sq_bits in SQ_BITS, f"sq_bits must be one of {SQ_BITS}, got {self.sq_bits}")

    def kind_for(self, num_rows: int) -> Literal["flat", "ivf", "ivfsq"]:
        """The index a database of `num_rows` rows gets: `index`, with `auto` resolved by size."""
        if self.index != "auto":
            return self.index
        return "ivf" if num_rows >= self.ivf_min_rows else "flat"
