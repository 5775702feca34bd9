"""Benchmark harness: baselines vs IPCV on real DINOv2-S weights (``python -m benchmarks.run``).

:mod:`.methods` (runners of IPCV's ablations and the baselines, over :mod:`.baselines`' tensor
functions), :mod:`.grid` (what is run, the options), :mod:`.metrics` (measuring one configuration),
:mod:`.report` (the :class:`~benchmarks.report.Row` type and every output), :mod:`.cost` (FLOP
counting with :mod:`ipcv_core.cost`, peak memory)."""
