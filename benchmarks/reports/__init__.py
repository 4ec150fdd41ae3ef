"""Reports read from published results: plots, paired comparisons, verdicts and timings.

Nothing here trains. :mod:`~benchmarks.reports.plots` draws a finished run's validation
curves, metrics and spectra from its run folder;
:mod:`~benchmarks.reports.ablation_report` pairs variants with a base method seed by
seed from a published CSV, and :mod:`~benchmarks.reports.verdicts` turns those pairs
into the README's results table; :mod:`~benchmarks.reports.mlrc_report` lays out the
MLRC table of ``python -m benchmarks.mlrc_table``; :mod:`~benchmarks.reports.time_readme`
measures and reports how long the README's commands take.
"""
