"""``python -m benchmarks.verdicts [--write]``: the README's results table of paired verdicts
(:mod:`benchmarks.reports.verdicts`)."""

if __name__ == "__main__":
    from benchmarks.reports.verdicts import main

    main()
