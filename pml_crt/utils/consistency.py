"""Deprecated: the similarity-consistency term moved to :mod:`pml_crt.consistency`.

This module only re-exports its public names (its ``__all__``) and warns on import.
"""

import warnings

from ..consistency import *  # noqa: F403
from ..consistency import __all__ as __all__

warnings.warn(
    "pml_crt.utils.consistency is deprecated: import from pml_crt.consistency",
    DeprecationWarning,
    stacklevel=2,
)
