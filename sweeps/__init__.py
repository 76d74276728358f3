"""Benchmark sweeps: conf/sweep/*.yaml run them, sweeps.collect turns a multirun into its table."""
