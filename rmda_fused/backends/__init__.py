"""RMDA step implementations, one module per backend; chosen in :mod:`rmda_fused.functional`."""
