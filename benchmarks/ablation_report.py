"""``python -m benchmarks.ablation_report CSV``: paired comparison of variants with a base
method, seed by seed (:mod:`benchmarks.reports.ablation_report`)."""

if __name__ == "__main__":
    from benchmarks.reports.ablation_report import main

    main()
