"""Deprecated: the similarity-consistency term moved to :mod:`pml_crt.consistency`.

This module only re-exports its public names and warns on import.
"""

import warnings

from ..consistency import (
    MODES,
    STOP_GRADIENTS,
    SimilarityConsistencyMixin,
    check_consistency_options,
    similarity_consistency,
    similarity_consistency_rows,
)

__all__ = [
    "MODES",
    "STOP_GRADIENTS",
    "SimilarityConsistencyMixin",
    "check_consistency_options",
    "similarity_consistency",
    "similarity_consistency_rows",
]

warnings.warn(
    "pml_crt.utils.consistency is deprecated: import from pml_crt.consistency",
    DeprecationWarning,
    stacklevel=2,
)
