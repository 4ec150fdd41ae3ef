"""``python -m benchmarks.tune``: fair tuning, an Optuna search per method on validation
classes (:mod:`benchmarks.search.tune`).

The arguments are parsed (``--help``, a mistyped option) before torch and Optuna load.
"""

if __name__ == "__main__":
    from benchmarks.cli import tune_parser

    tune_parser().parse_args()

    from benchmarks.search.tune import main

    main()
