"""``python -m benchmarks.defaults_grid``: the safety-first choice of a default from
learning-rate sweeps (:mod:`benchmarks.search.defaults_grid`)."""

if __name__ == "__main__":
    from benchmarks.search.defaults_grid import main

    main()
