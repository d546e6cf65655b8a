"""Benchmarks, each a `python -m pdray.bench.<name>` script (engine: decode and prefill against
this GPU's measured limits; see docs/performance.md)."""
