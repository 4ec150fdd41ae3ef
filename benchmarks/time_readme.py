"""``python -m benchmarks.time_readme``: wall-clock time of the README's first command and of
the quickstart example (:mod:`benchmarks.reports.time_readme`)."""

if __name__ == "__main__":
    from benchmarks.reports.time_readme import main

    main()
