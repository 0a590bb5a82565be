"""Cosine k-NN search with Faiss: one index in this process, or shards held by executor workers.

`SearchConfig` is what a stage configures; `database_index` opens the index it describes.
"""

from curation.search.config import SearchConfig
from curation.search.sharded import database_index

__all__ = ["SearchConfig", "database_index"]
