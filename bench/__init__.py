"""Benchmarks of the gateway (see bench/README.md). Run from the repo root: python -m bench.X"""
