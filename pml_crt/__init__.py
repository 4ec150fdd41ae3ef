"""pml-crt: the Coded Residual Transform as a pytorch-metric-learning plugin.

The subpackages (``models``, ``losses``, ``regularizers``, ``trunks``,
``datasets``, ``utils``) and the modules ``consistency`` and ``export`` are
imported on first access.
"""

from ._lazy import lazy_package

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "consistency",
    "datasets",
    "export",
    "losses",
    "models",
    "regularizers",
    "trunks",
    "utils",
]

lazy_package(__name__, submodules=__all__[1:])
