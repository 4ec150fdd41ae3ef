"""``python -m benchmarks.plots RUN_DIR``: redraw the plots of a finished run from its run
folder (:mod:`benchmarks.reports.plots`)."""

if __name__ == "__main__":
    from benchmarks.reports.plots import main

    main()
