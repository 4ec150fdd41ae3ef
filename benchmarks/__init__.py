"""Benchmarks of pml-crt: the MLRC protocol on stock PML parts (``python -m benchmarks.run``)."""
