"""Benchmarks: scripts that print numbers (``make bench``). Never part of ``make test``."""
