"""``python -m benchmarks.lr_sweep``: each head's validation MAP@R over a grid of head
learning rates (:mod:`benchmarks.search.lr_sweep`)."""

if __name__ == "__main__":
    from benchmarks.search.lr_sweep import main

    main()
