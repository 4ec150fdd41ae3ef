"""The MLRC protocol: from a config to the tested units and result tables of one run.

A YAML config (:mod:`~benchmarks.protocol.config`) names a dataset, whose classes are
split by position (:mod:`~benchmarks.protocol.splits`) and loaded once per process as
cached images and frozen-trunk features (:mod:`~benchmarks.protocol.data`,
:mod:`~benchmarks.protocol.cache`, :mod:`~benchmarks.protocol.pipeline`); each method's
stock PML parts are built from it (:mod:`~benchmarks.protocol.build`) and checked before
anything runs (:mod:`~benchmarks.protocol.preflight`). Every (method, seed, fold) unit
is trained and tested (:mod:`~benchmarks.protocol.unit`) on the classes and metrics
that :mod:`~benchmarks.protocol.evaluation` names, Recall@K from
:mod:`~benchmarks.protocol.metrics`, with resume points
(:mod:`~benchmarks.protocol.resume`) and under ``torchrun``
(:mod:`~benchmarks.protocol.distributed`); :mod:`~benchmarks.protocol.runner` runs the
units in one process or in local workers (:mod:`~benchmarks.protocol.workers`), each
with its device and threads (:mod:`~benchmarks.protocol.execution`). The units' results
are combined into tables and CSV (:mod:`~benchmarks.protocol.results`) with their
provenance (:mod:`~benchmarks.protocol.provenance`), in a run folder whose file names
:mod:`~benchmarks.protocol.layout` fixes. ``python -m benchmarks.run`` is its command.
"""
