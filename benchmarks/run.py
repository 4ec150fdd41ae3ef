"""``python -m benchmarks.run``: run a benchmark config (:mod:`benchmarks.protocol.runner`).

The arguments are parsed (``--help``, a mistyped option) before torch loads.
"""

if __name__ == "__main__":
    from benchmarks.cli import run_parser

    run_parser().parse_args()

    from benchmarks.protocol.runner import main

    main()
