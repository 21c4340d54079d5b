"""flora-serve benchmarks: programs, not tests. ``python -m bench.run [--quick]`` writes
``bench/results/<name>.json`` and PNG plots; see docs/performance.md."""
