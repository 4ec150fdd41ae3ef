"""Datasets read from local copies, in the layouts their official downloads unpack to."""

__all__: list[str] = []
