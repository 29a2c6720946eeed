"""Benchmarks: figures next to an in-process baseline of the same run.

`bench.serving` runs the serving benchmark (one module per job: settings, model, floors, requests,
sampling, h2, loadgen, perf_analyzer, report with the targets in targets.toml); `bench.training`
times data generation, features and training.
"""
