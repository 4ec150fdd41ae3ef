"""Performance benchmarks: head cost, ``torch.compile``, evaluation at SOP scale.

Run each script with ``python -m benchmarks.perf.<name>``; ``report`` turns
their JSON output into ``benchmarks/results/perf.md``.
"""
