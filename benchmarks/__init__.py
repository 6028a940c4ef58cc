"""Benchmarks of rmda-fused: a pytest-benchmark suite and ``python -m benchmarks.overhead``.

Run from a checkout (this package is not installed with rmda-fused).
"""
