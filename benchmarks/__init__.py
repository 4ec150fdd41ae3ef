"""Benchmarks of pml-crt: the MLRC protocol on stock PML parts (``python -m benchmarks.run``).

Each top-level module is one command, ``python -m benchmarks.<command>``, that calls the
``main`` of the module doing the work; :mod:`benchmarks.cli` parses the heavy commands'
arguments before torch loads. The work is organised by role: :mod:`benchmarks.protocol`
runs the protocol's units and tables, :mod:`benchmarks.search` tunes and sweeps
through them, :mod:`benchmarks.reports` reads the results back into reports and
:mod:`benchmarks.perf` measures speed and memory.
"""
