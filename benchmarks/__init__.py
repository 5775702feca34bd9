"""Benchmark harness: baselines vs IPCV on real DINOv2-S weights (``python -m benchmarks.run``)."""
