"""Benchmarks for agent-bridge: `python -m bench` (see bench/RESULTS.md)."""
