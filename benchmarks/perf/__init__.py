"""Performance benchmarks: head cost, ``torch.compile``, evaluation at SOP scale, step time.

Run each script with ``python -m benchmarks.perf.<name>`` (``head_cost``, ``compile``,
``eval_scale``, ``model_changes``, ``step_time``); each writes its JSON to
``benchmarks/results/perf/``, measured with the shared tools of ``common`` (machine
facts, interleaved timing), ``flops``, ``memory`` and ``heads``, and
``python -m benchmarks.perf.report`` turns the JSON into ``benchmarks/results/perf.md``
(its sections and plots in the ``report_*`` modules).
"""
