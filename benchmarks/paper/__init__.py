"""Huang & Lee (ICLR 2022)'s claims, reproduced on real data: ``python -m benchmarks.paper.run``."""
