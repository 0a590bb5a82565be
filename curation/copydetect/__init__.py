"""Copy detection trained by lvd: SSCD's descriptor recipe on the user's pool, and calibrated thresholds.

Importing this package registers the `copy_descriptor` stage.
"""

from curation.copydetect import stage

__all__ = ["stage"]
