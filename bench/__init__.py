"""Benchmarks: run with `make bench`; each prints a table and writes bench/results/latest.json."""
