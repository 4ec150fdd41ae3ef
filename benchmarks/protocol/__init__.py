"""The MLRC protocol: from a config to the tested units and result tables of one run.

A YAML config (:mod:`~benchmarks.protocol.config`) names a dataset, whose classes are
split by position (:mod:`~benchmarks.protocol.splits`) and loaded once per process as
cached images and frozen-trunk features (:mod:`~benchmarks.protocol.data`,
:mod:`~benchmarks.protocol.cache`, :mod:`~benchmarks.protocol.pipeline`); each method's
stock PML parts are built from it (:mod:`~benchmarks.protocol.build`), checked before
anything runs (:mod:`~benchmarks.protocol.preflight`), and every (method, seed, fold)
unit is trained and tested (:mod:`~benchmarks.protocol.unit`, with Recall@K from
:mod:`~benchmarks.protocol.metrics`, resume points from
:mod:`~benchmarks.protocol.resume`, DDP from :mod:`~benchmarks.protocol.distributed`)
in one process or several (:mod:`~benchmarks.protocol.runner`). The units' results are
combined into tables and CSV (:mod:`~benchmarks.protocol.results`) with their provenance
(:mod:`~benchmarks.protocol.provenance`), in a run folder whose file names
:mod:`~benchmarks.protocol.layout` fixes. ``python -m benchmarks.run`` is its command.
"""
