"""``python -m benchmarks.mlrc_table``: the Metric Learning Reality Check table with
MultiHeadCRT beside every loss (:mod:`benchmarks.search.mlrc_table`).

The arguments are parsed (``--help``, a mistyped option) before torch and Optuna load.
"""

if __name__ == "__main__":
    from benchmarks.cli import mlrc_table_parser

    mlrc_table_parser().parse_args()

    from benchmarks.search.mlrc_table import main

    main()
