"""pml-crt: the Coded Residual Transform as a pytorch-metric-learning plugin."""

__version__ = "0.1.0"

from . import datasets, losses, models, regularizers, trunks, utils  # noqa: E402

__all__ = ["__version__", "datasets", "losses", "models", "regularizers", "trunks", "utils"]
