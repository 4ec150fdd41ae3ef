"""Searches over configurations: fair tuning, learning-rate sweeps and the choices made from them.

Every method of a config gets the same Optuna budget on validation classes
(:mod:`~benchmarks.search.tune`, ``python -m benchmarks.tune``); each head runs over a
grid of head learning rates (:mod:`~benchmarks.search.lr_sweep`), from which the
safety-first rule picks a default (:mod:`~benchmarks.search.defaults_grid`), and
:mod:`~benchmarks.search.adam_step_size` shows why the useful rates lie where they
do. :mod:`~benchmarks.search.mlrc_table` tunes and then runs every MLRC loss with the
linear embedder and with ``MultiHeadCRT``. All of them train through the protocol's
units (:mod:`benchmarks.protocol`).
"""
