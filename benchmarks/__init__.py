"""The benchmark suite: deletion speedup against the analytic bound, framework overhead, shard-parallel
scaling, fused inference and accuracy against the number of shards. Run it with ``python -m benchmarks.run``."""
