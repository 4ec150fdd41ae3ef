"""Reports read from what the runs wrote: plots, paired comparisons, verdicts and timings.

:mod:`~benchmarks.reports.plots` draws a finished run's validation curves, metrics and
spectra from its run folder; :mod:`~benchmarks.reports.paired` compares methods seed
by seed (the paired difference, its 95% CI and its verdict), which
:mod:`~benchmarks.reports.ablation_report` writes for variants of a base method from a
published CSV and :mod:`~benchmarks.reports.verdicts` turns into the README's results
table; :mod:`~benchmarks.reports.mlrc_report` lays out the table of
``python -m benchmarks.mlrc_table``; :mod:`~benchmarks.reports.time_readme` measures
how long the README's commands take and writes that report; every table is a
:func:`~benchmarks.reports.markdown.markdown_table`.
"""
