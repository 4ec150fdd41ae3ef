"""``python -m benchmarks.adam_step_size``: how far a head's embeddings move under a few
Adam steps, by learning rate and parameter group (:mod:`benchmarks.search.adam_step_size`)."""

if __name__ == "__main__":
    from benchmarks.search.adam_step_size import main

    main()
