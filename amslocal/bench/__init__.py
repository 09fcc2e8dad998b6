"""Benchmarks a user can run: ``amslocal bench quality`` and ``amslocal bench speed``.

Above the engine: methods (full, context shift, scorer ± AMS) run through sessions; tasks read the
sets from ``../shared/data``; answers are graded; results are JSONL per item, a summary and plots.
"""
